"""``eimis-bridge dead-letters|retry|discard``: deliveries that spent their retry budget."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from bridge.cli.common import REFUSED, USAGE_ERROR, confirm
from bridge.config import load_config


def register(sub: Any) -> None:
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
    for parser in (dead, retry, discard):
        parser.set_defaults(handler=lambda args: asyncio.run(_dead_letter_command(args)))


async def _dead_letter_command(args: argparse.Namespace) -> int:
    """Operator commands on dead letters, straight on the database (the bridge may be running:
    it picks released work up on its next idle rescan)."""
    from bridge.commands import BadInput, CommandFailed
    from bridge.commands.dead_letters import DeadLetterCommands, table
    from bridge.db.database import open_database
    from bridge.db.dead_letters import DeadLetterStore

    config = load_config(args.config)
    db = await open_database(config.database)
    try:
        letters = DeadLetterCommands(DeadLetterStore(db))
        if args.command == "dead-letters":
            print(table(await letters.listing(args.connector)))
            return 0
        if args.command == "retry":
            print(await letters.retry(args.id))
            return 0
        letter = await letters.find(args.id)
        if not args.yes and not confirm(letters.discard_question(letter)):
            print("Nothing discarded.")
            return REFUSED
        print(await letters.discard(args.id))
        return 0
    except CommandFailed as error:
        print(error, file=sys.stderr)
        return USAGE_ERROR if isinstance(error, BadInput) else REFUSED
    finally:
        await db.stop()
