"""``eimis-bridge audit``: the audit log of deliveries (metadata only), as a table, CSV or
JSON."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bridge.cli.common import USAGE_ERROR, config_arg, on_database, output

AUDIT_TABLE_LIMIT = 100


def register(sub: Any) -> None:
    audit = sub.add_parser(
        "audit",
        help="the audit log of deliveries (metadata only), as a table, CSV or JSON",
        description="Who sent what kind of message to whom, when, how big, and what became of "
        "it: one row per delivery to a vendor and per vendor event sent into Matrix. Never "
        "content. Times are UTC. Rows are kept audit.retention_days after their conversation's "
        "last activity.",
    )
    config_arg(audit)
    audit.add_argument(
        "--since",
        help="from this time: ISO 8601 (2025-01-31, 2025-01-31T08:00, ...; UTC unless an offset "
        "is given) or a duration back from now (90s, 15m, 24h, 7d, 2w)",
    )
    audit.add_argument("--until", help="up to this time (excluded), same forms as --since")
    audit.add_argument("--connector", help="only this connector's deliveries")
    audit.add_argument("--portal", help="only this portal room (Matrix room id)")
    audit.add_argument(
        "--format", choices=("table", "csv", "json"), default="table", help="default: table"
    )
    audit.add_argument("--output", type=Path, help="write to this file instead of stdout")
    audit.add_argument(
        "--limit",
        type=int,
        default=AUDIT_TABLE_LIMIT,
        help=f"table only: show the latest N rows (default {AUDIT_TABLE_LIMIT}); CSV and JSON "
        "hold every matching row",
    )
    audit.set_defaults(handler=_audit)


def _audit(args: argparse.Namespace) -> int:
    """Read straight from the database (the bridge may be running). CSV and JSON are streamed,
    so a six-month export needs no more memory than a day's."""
    from bridge.commands import BadInput
    from bridge.commands import audit as commands
    from bridge.db.audit import AuditLog

    try:  # bad input is said before the config is read
        since, until = commands.window(args.since, args.until)
        commands.check_limit(args.limit)
    except BadInput as error:
        print(f"eimis-bridge audit: {error}", file=sys.stderr)
        return USAGE_ERROR

    async def action(config: Any, db: Any) -> int:
        log = AuditLog(db, config.audit.retention_days)
        filters = {"connector": args.connector, "portal": args.portal}
        with output(args.output) as out:
            if args.format == "table":
                latest = await commands.latest(log, since, until, limit=args.limit, **filters)
                out.write(latest.table())
            else:
                async for chunk in log.export(args.format, since, until, **filters):
                    out.write(chunk)
        return 0

    return on_database(args, action)
