"""``eimis-bridge run`` (check the homeserver, then bridge, on uvloop when installed) and
``eimis-bridge generate-registration`` (the appservice registration file)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bridge.config import load_config
from bridge.logs import setup_logging


def register(sub: Any) -> None:
    reg = sub.add_parser("generate-registration", help="write the appservice registration file")
    reg.add_argument("-c", "--config", type=Path, required=True, help="bridge config file")
    reg.add_argument(
        "-r",
        "--registration",
        type=Path,
        required=True,
        help="registration file to write (give it to the homeserver)",
    )
    reg.set_defaults(handler=lambda args: _generate_registration(args.config, args.registration))

    run = sub.add_parser("run", help="check the homeserver, then bridge")
    run.add_argument("-c", "--config", type=Path, required=True, help="bridge config file")
    run.set_defaults(handler=lambda args: _run(args.config))


def _generate_registration(config_path: Path, registration_path: Path) -> int:
    from bridge.registration import write_registration

    config = load_config(config_path)
    registration = write_registration(config, registration_path)
    print(
        f"Wrote {registration_path} (appservice id {registration['id']!r}, users "
        f"{registration['namespaces']['users'][0]['regex']}). Add it to the homeserver's "
        "app_service_config_files and point appservice.registration at it."
    )
    return 0


def _run(config_path: Path) -> int:
    from bridge.app import Bridge
    from bridge.matrix.homeserver import HomeserverCheckFailed

    config = load_config(config_path)
    setup_logging(config.logging.level, config.logging.json_format)

    async def serve() -> None:
        bridge = Bridge(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await bridge.start()
            await stop.wait()
        finally:
            await bridge.stop()

    try:
        with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
            runner.run(serve())
    except HomeserverCheckFailed as error:
        print(f"Homeserver check failed: {error}", file=sys.stderr)
        return 3
    return 0


def _event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when installed (about twice asyncio's for the HTTP both ways), else
    asyncio's own. ``EIMIS_EVENT_LOOP=asyncio`` forces the latter."""
    if os.environ.get("EIMIS_EVENT_LOOP", "").lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
