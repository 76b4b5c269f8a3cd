"""The ``eimis-bridge`` command: run, generate-registration, sandbox, demo."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bridge import __version__
from bridge.config import ConfigError, load_config
from bridge.logs import setup_logging


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eimis-bridge",
        description="Matrix application service joining health-sector messaging tools to EIMIS.",
    )
    parser.add_argument("--version", action="version", version=f"eimis-bridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    reg = sub.add_parser("generate-registration", help="write the appservice registration file")
    reg.add_argument("-c", "--config", type=Path, required=True, help="bridge config file")
    reg.add_argument(
        "-r",
        "--registration",
        type=Path,
        required=True,
        help="registration file to write (give it to the homeserver)",
    )

    run = sub.add_parser("run", help="check the homeserver, then bridge")
    run.add_argument("-c", "--config", type=Path, required=True, help="bridge config file")

    sandbox = sub.add_parser("sandbox", help="serve a vendor-style API emulator")
    sandbox.add_argument(
        "type", help="connector type (e.g. one listed by 'sandbox --list')", nargs="?"
    )
    sandbox.add_argument("--port", type=int, default=0, help="port to listen on")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--list", action="store_true", help="list the connector types")

    dead = sub.add_parser("dead-letters", help="list deliveries that spent their retry budget")
    dead.add_argument("-c", "--config", type=Path, required=True, help="bridge config file")
    dead.add_argument("--connector", help="only this connector's")

    retry = sub.add_parser("retry", help="put a dead letter (or all) back in its queue")
    retry.add_argument("-c", "--config", type=Path, required=True, help="bridge config file")
    retry.add_argument("id", help="dead letter id (from dead-letters), or 'all'")

    discard = sub.add_parser("discard", help="drop a dead letter; its conversation flows again")
    discard.add_argument("-c", "--config", type=Path, required=True, help="bridge config file")
    discard.add_argument("id", type=int, help="dead letter id (from dead-letters)")
    discard.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    demo = sub.add_parser("demo", help="local Synapse + bridge + sandboxes + a scripted chat")
    demo.add_argument(
        "--once",
        action="store_true",
        help="exit after the scripted conversation: 0 only if every side saw it",
    )
    demo.add_argument("--state-dir", type=Path, default=Path(".demo"))

    for module in _command_modules():
        module.register(sub)
    return parser


def _command_modules() -> list[Any]:
    from bridge.commands import audit, connectors, directory, erasure, secrets, trust

    return [audit, directory, trust, connectors, secrets, erasure]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        handler = getattr(args, "handler", None)
        if handler is not None:
            return int(handler(args))
        if args.command == "generate-registration":
            return _generate_registration(args.config, args.registration)
        if args.command == "run":
            return _run(args.config)
        if args.command == "sandbox":
            return _sandbox(args.type, args.host, args.port, args.list)
        if args.command in ("dead-letters", "retry", "discard"):
            return asyncio.run(_dead_letter_command(args))
        if args.command == "demo":
            from bridge.devtools.demo import run_demo

            return asyncio.run(run_demo(args.state_dir, once=args.once))
    except ConfigError as error:
        print(f"Configuration error:\n{error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


async def _dead_letter_command(args: argparse.Namespace) -> int:
    """Operator commands on dead letters, straight on the database (the bridge may be running:
    it picks released work up on its next idle rescan)."""
    from bridge.db.database import open_database
    from bridge.db.dead_letters import DeadLetterStore

    config = load_config(args.config)
    db = await open_database(config.database)
    try:
        store = DeadLetterStore(db)
        if args.command == "dead-letters":
            letters = await store.list(args.connector)
            if not letters:
                print("No dead letters.")
                return 0
            print(f"{'id':>8}  {'connector':<12} {'attempts':>8} {'held':>5}  room / last error")
            for d in letters:
                print(f"{d.seq:>8}  {d.connector:<12} {d.attempts:>8} {d.held:>5}  {d.room_id}")
                print(f"{'':>8}  {d.operation}: {d.last_error or ''}")
            return 0
        if args.command == "retry":
            if args.id == "all":
                count = await store.retry(None)
            elif args.id.isdigit():
                count = await store.retry(int(args.id))
            else:
                print("retry takes a dead letter id or 'all'", file=sys.stderr)
                return 2
            print(f"{count} dead letter(s) back in their queue.")
            return 0 if count or args.id == "all" else 1
        if not args.yes:
            answer = input(
                f"Discard dead letter {args.id}? Its content is deleted and it will never be "
                "delivered. [y/N] "
            )
            if answer.strip().lower() not in ("y", "yes"):
                print("Nothing discarded.")
                return 1
        if await store.discard(args.id):
            print(f"Dead letter {args.id} discarded; its conversation flows again.")
            return 0
        print(f"No dead letter {args.id}.", file=sys.stderr)
        return 1
    finally:
        await db.stop()


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


def _sandbox(type_name: str | None, host: str, port: int, list_only: bool) -> int:
    from aiohttp import web

    from bridge.devtools.sandboxes import vendor_sandboxes

    with_sandbox = vendor_sandboxes()
    if list_only or type_name is None:
        print("Connector types with a sandbox: " + ", ".join(sorted(with_sandbox)))
        return 0 if list_only else 2
    sandbox = with_sandbox.get(type_name)
    if sandbox is None:
        print(
            f"No sandbox for {type_name!r}; choose one of: {', '.join(sorted(with_sandbox))}",
            file=sys.stderr,
        )
        return 2
    app = sandbox.app()

    async def serve() -> None:
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        url = f"http://{host}:{bound}"
        print(f"{type_name}-style sandbox (an emulator, not the vendor's API) on {url}")
        print("Connector settings for the bridge config:")
        print(yaml.safe_dump({"settings": sandbox.settings(url)}, sort_keys=False))
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
