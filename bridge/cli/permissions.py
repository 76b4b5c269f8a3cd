"""``eimis-bridge permissions show|set|allow|block|clear``: who may invite a vendor user."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bridge.cli.common import USAGE_ERROR, config_arg, on_database


def register(sub: Any) -> None:
    from bridge.values.permissions import DEFAULT_SETTINGS

    perms = sub.add_parser(
        "permissions",
        help="who may invite a vendor user (TI-Messenger permission concept)",
        description="Per-person permissions of a vendor user, by IDNPS: allow-all or block-all, "
        "with exceptions by server and by Matrix user (blocked under allow-all, allowed under "
        "block-all). No setting means allow-all.",
    )
    actions = perms.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (
        ("show", "the professional's setting"),
        ("set", "set the default (drops exceptions when it changes: their meaning flips)"),
        ("allow", "let servers or users invite this professional"),
        ("block", "refuse invitations of servers or users"),
        ("clear", "forget the setting (back to allow-all)"),
    ):
        action = actions.add_parser(name, help=text)
        config_arg(action)
        action.add_argument("idnps", help="the professional's IDNPS")
        if name == "set":
            action.add_argument("setting", choices=DEFAULT_SETTINGS, help="the default")
        if name in ("allow", "block"):
            action.add_argument(
                "--server", action="append", default=[], help="server name (repeatable)"
            )
            action.add_argument(
                "--user", action="append", default=[], help="Matrix user id (repeatable)"
            )
        action.set_defaults(handler=_permissions)


def _permissions(args: argparse.Namespace) -> int:
    from bridge.commands import BadInput
    from bridge.commands.permissions import PermissionCommands, exceptions_of, idnps_of
    from bridge.db.permissions import PermissionStore

    try:  # bad input is said before the config is read
        idnps = idnps_of(args.idnps)
        exceptions = exceptions_of(
            args.action, getattr(args, "server", []), getattr(args, "user", [])
        )
    except BadInput as error:
        print(f"eimis-bridge permissions: {error}", file=sys.stderr)
        return USAGE_ERROR

    async def action(config: Any, db: Any) -> int:
        permissions = PermissionCommands(PermissionStore(db))
        if args.action == "show":
            lines = await permissions.show(idnps)
        elif args.action == "clear":
            lines = await permissions.clear(idnps)
        elif args.action == "set":
            lines = await permissions.set_default(idnps, args.setting)
        else:
            lines = await permissions.except_(idnps, args.action, exceptions)
        print("\n".join(lines))
        return 0

    return on_database(args, action)
