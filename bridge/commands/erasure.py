"""``eimis-bridge forget IDNPS``: erase a professional (the right to erasure) from the bridge's
host, with its config; the same erasure as the admin room's ``forget`` (``bridge.core.erasure``).

The database part always runs. The Matrix part (redactions, leaving rooms, clearing profiles)
is done at once when the homeserver answers; otherwise it is queued in the database and the
running bridge finishes it when the homeserver is back (or the next ``forget`` does). The
command says which.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, ClientTimeout

from bridge.config import load_config, load_tokens
from connectors.idnps import Idnps, InvalidIdnps

USAGE_ERROR = 2
MATRIX_PENDING = 3
"""Exit status when the Matrix part waits for the homeserver (the database part is done)."""


def register(sub: Any) -> None:
    """Add ``forget`` to the ``eimis-bridge`` parser."""
    forget = sub.add_parser(
        "forget",
        help="erase a professional's data, on the bridge and on Matrix (right to erasure)",
        description="Erase what the bridge holds of a professional: directory entry, "
        "permissions, ghosts, what they sent that still waits in queues, crypto material; "
        "redact what their ghosts sent in every portal, make the ghosts leave and clear their "
        "profiles. When the homeserver does not answer, the Matrix part is queued and the "
        f"running bridge finishes it (exit status {MATRIX_PENDING}). An audit record of the "
        "erasure is kept (no content).",
    )
    forget.add_argument("-c", "--config", type=Path, required=True, help="bridge config file")
    forget.add_argument("idnps", help="the professional's IDNPS")
    forget.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    forget.set_defaults(handler=_forget)


def _forget(args: argparse.Namespace) -> int:
    try:
        idnps = str(Idnps(args.idnps))
    except InvalidIdnps as error:
        print(f"eimis-bridge forget: invalid IDNPS: {error}", file=sys.stderr)
        return USAGE_ERROR
    if not args.yes:
        answer = input(
            f"Erase everything the bridge holds about {idnps}, and redact their messages on "
            "Matrix? This cannot be undone. [y/N] "
        )
        if answer.strip().lower() not in ("y", "yes"):
            print("Nothing erased.")
            return 1
    return int(asyncio.run(_run(args.config, idnps)))


async def _run(config_path: Path, idnps: str) -> int:
    from bridge.core.erasure import Erasure
    from bridge.db.database import open_database
    from bridge.db.stores import Stores
    from bridge.matrix.homeserver import Homeserver

    config = load_config(config_path)
    as_token, _ = load_tokens(config)
    db = await open_database(config.database)
    try:
        stores = Stores.of(db, secrets=config.secrets)
        async with ClientSession(timeout=ClientTimeout(total=30)) as session:
            homeserver = Homeserver(config, as_token, db, session)
            homeserver.api.default_retry_count = 0  # an answer now, or the part is queued
            try:
                report = await Erasure(stores, homeserver).erase(idnps, f"cli:{_operator()}")
            finally:
                await homeserver.close()
        for line in report.lines():
            print(line)
        return MATRIX_PENDING if report.matrix.pending else 0
    finally:
        await db.stop()


def _operator() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"
