"""``eimis-bridge forget IDNPS``: erase a professional's data, on the bridge and on Matrix
(right to erasure)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bridge.cli.common import REFUSED, USAGE_ERROR, config_arg, confirm, on_database, operator

MATRIX_PENDING = 3
"""Exit status of ``forget`` when the Matrix part waits for the homeserver (the database part
is done)."""


def register(sub: Any) -> None:
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
    config_arg(forget)
    forget.add_argument("idnps", help="the professional's IDNPS")
    forget.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    forget.set_defaults(handler=_forget)


def _forget(args: argparse.Namespace) -> int:
    from aiohttp import ClientSession, ClientTimeout

    from bridge.commands import BadInput
    from bridge.commands import erasure as commands
    from bridge.config import load_tokens
    from bridge.core.erasure import Erasure
    from bridge.db.stores import Stores
    from bridge.matrix.homeserver import Homeserver

    try:  # bad input is said before the config is read
        commands.idnps_of(args.idnps)
    except BadInput as error:
        print(f"eimis-bridge forget: {error}", file=sys.stderr)
        return USAGE_ERROR

    async def action(config: Any, db: Any) -> int:
        stores = Stores.of(db, secrets=config.secrets)
        plan = await commands.plan(stores, args.idnps)
        if not args.yes and not confirm(f"{plan.question()} This cannot be undone."):
            print("Nothing erased.")
            return REFUSED
        as_token, _ = load_tokens(config)
        async with ClientSession(timeout=ClientTimeout(total=30)) as session:
            homeserver = Homeserver(config, as_token, db, session)
            homeserver.api.default_retry_count = 0  # an answer now, or the part is queued
            try:
                report = await commands.forget(Erasure(stores, homeserver), plan, operator())
            finally:
                await homeserver.close()
        print("\n".join(report.lines()))
        return MATRIX_PENDING if report.matrix.pending else 0

    return on_database(args, action)
