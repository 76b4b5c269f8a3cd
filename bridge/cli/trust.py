"""``eimis-bridge trust list|add|remove``: the run-time trust list, from the host."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bridge.cli.common import USAGE_ERROR, config_arg, on_database, operator


def register(sub: Any) -> None:
    trust = sub.add_parser(
        "trust",
        help="the trust list: homeservers whose users may share conversations",
        description="Show or edit the run-time trust list. The config's trust.servers and the "
        "bridge's own server are always trusted; the running bridge applies a change to every "
        "portal's m.room.server_acl within trust.poll_interval_s.",
    )
    actions = trust.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (
        ("list", "the effective trust list and the ACL portals carry"),
        ("add", "trust a server"),
        ("remove", "stop trusting a server added with 'add'"),
    ):
        action = actions.add_parser(name, help=text)
        config_arg(action)
        if name != "list":
            action.add_argument("server", help="server name, hostname[:port]")
        if name == "list":
            action.set_defaults(server=None)
        action.set_defaults(handler=_trust)


def _trust(args: argparse.Namespace) -> int:
    from bridge.commands import BadInput
    from bridge.commands.trust import TrustCommands, server_name
    from bridge.db.trust import TrustStore

    if args.action != "list":  # bad input is said before the config is read
        try:
            server_name(args.server, args.action)
        except BadInput as error:
            print(f"eimis-bridge trust: {error}", file=sys.stderr)
            return USAGE_ERROR

    async def action(config: Any, db: Any) -> int:
        trust = TrustCommands(TrustStore(db), config.homeserver.domain, config.trust.servers)
        if args.action == "list":
            print((await trust.listing()).text())
        elif args.action == "add":
            print(await trust.add(args.server, operator()))
        else:
            print(await trust.remove(args.server))
        return 0

    return on_database(args, action)
