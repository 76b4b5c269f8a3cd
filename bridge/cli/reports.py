"""``eimis-bridge status|queue|portals|portal|whois``: the admin room's reports, from the
host."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from bridge import __version__
from bridge.config import load_config


def register(sub: Any) -> None:
    """The admin room's reports, from the host: read from the database only, so they answer
    when Matrix (or the bridge) is down. Same text as the room's; ``--json`` for a program."""
    for name, text, argument, argument_help in (
        ("status", "the database's view: inbox, each connector's queue and dead letters", None, ""),
        ("queue", "the next deliveries waiting for one connector", "name", "connector id"),
        ("portals", "the portal rooms (20 most recent matching)", "filter", "part of a room "
         "id, title or connector"),
        ("portal", "one portal: its links, queue and dead letters", "room", "room id, or a "
         "vendor conversation id"),
        ("whois", "a professional: directory entry, Matrix IDs, ghosts, permissions", "who",
         "IDNPS or @user:server"),
    ):  # fmt: skip
        report = sub.add_parser(name, help=text, description=text)
        report.add_argument("-c", "--config", type=Path, required=True, help="bridge config file")
        if argument == "filter":
            report.add_argument(argument, nargs="?", default="", help=argument_help)
        elif argument is not None:
            report.add_argument(argument, help=argument_help)
        report.add_argument("--json", action="store_true", help="the same content as JSON")
        report.set_defaults(handler=lambda args: asyncio.run(_report(args)))


async def _report(args: argparse.Namespace) -> int:
    from bridge.commands import BadInput, CommandFailed, reports
    from bridge.core.connector_manager import ConnectorManager
    from bridge.core.ghost_ids import GhostIds
    from bridge.db.database import open_database
    from bridge.db.stores import Stores

    config = load_config(args.config)
    db = await open_database(config.database)
    try:
        stores = Stores.of(db, secrets=config.secrets)
        known = await ConnectorManager(config, stores.connector_registry).list()
        report: Any
        try:
            if args.command == "status":
                states = [
                    reports.ConnectorState(
                        c.connector_id, c.type_name, "enabled" if c.enabled else "disabled"
                    )
                    for c in known
                ]
                report = await reports.database_status(stores, states)
            elif args.command == "queue":
                ids = [c.connector_id for c in known]
                report = await reports.queue(stores.reports, args.name, ids, "connector")
            elif args.command == "portals":
                report = await reports.portals(stores.reports, args.filter)
            elif args.command == "portal":
                report = await reports.portal(stores.reports, args.room)
            else:
                a = config.appservice
                ids = GhostIds(a.user_prefix, config.homeserver.domain, a.bot_username)
                report = await reports.whois(stores, ids, args.who)
        except CommandFailed as error:
            print(error, file=sys.stderr)
            return 2 if isinstance(error, BadInput) else 1
        if args.json:
            print(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
        elif args.command == "status":
            print(f"eimis-bridge {__version__}: {STATUS_FROM_THE_HOST}")
            print(report.text())
        else:
            print(report.text())
        return 0
    finally:
        await db.stop()


STATUS_FROM_THE_HOST = (
    "read from the database only (the homeserver, encryption and each connector's health are "
    "the running bridge's: see 'status' in the admin room)"
)
