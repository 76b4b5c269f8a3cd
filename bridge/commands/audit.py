"""``eimis-bridge audit``: the audit log of deliveries (metadata only), shown or exported.

Read straight from the database (the bridge may be running). A table for a look on a terminal;
CSV or JSON for an auditor, streamed, so a six-month export needs no more memory than a day's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from bridge.config import load_config
from bridge.db.audit import AuditLog, AuditRecord

USAGE_ERROR = 2
TABLE_LIMIT = 100
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def register(sub: Any) -> None:
    """Add ``audit`` to the ``eimis-bridge`` parser."""
    audit = sub.add_parser(
        "audit",
        help="the audit log of deliveries (metadata only), as a table, CSV or JSON",
        description="Who sent what kind of message to whom, when, how big, and what became of "
        "it: one row per delivery to a vendor and per vendor event sent into Matrix. Never "
        "content. Times are UTC. Rows are kept audit.retention_days after their conversation's "
        "last activity.",
    )
    audit.add_argument("-c", "--config", type=Path, required=True, help="bridge config file")
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
        default=TABLE_LIMIT,
        help=f"table only: show the latest N rows (default {TABLE_LIMIT}); CSV and JSON hold "
        "every matching row",
    )
    audit.set_defaults(handler=_audit)


class _Usage(ValueError):
    """Bad input: the message is printed and the exit status is 2."""


def parse_moment(value: str, now: datetime | None = None) -> int:
    """Milliseconds since the epoch of an ISO 8601 time or of ``now`` minus a duration."""
    now = now or datetime.now(UTC)
    text = value.strip()
    duration = _DURATION.match(text.lower())
    if duration:
        seconds = float(duration.group(1)) * _UNITS[duration.group(2)]
        return int((now - timedelta(seconds=seconds)).timestamp() * 1000)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise _Usage(
            f"{value!r} is neither an ISO 8601 time (2025-01-31T08:00) nor a duration "
            "(90s, 15m, 24h, 7d, 2w)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _audit(args: argparse.Namespace) -> int:
    try:
        since = parse_moment(args.since) if args.since else None
        until = parse_moment(args.until) if args.until else None
        if since is not None and until is not None and since >= until:
            raise _Usage("--since must be before --until")
        if args.limit < 1:
            raise _Usage("--limit must be at least 1")
        return int(asyncio.run(_run(args, since, until)))
    except _Usage as error:
        print(f"eimis-bridge audit: {error}", file=sys.stderr)
        return USAGE_ERROR


async def _run(args: argparse.Namespace, since: int | None, until: int | None) -> int:
    from bridge.db.database import open_database

    config = load_config(args.config)
    db = await open_database(config.database)
    try:
        log = AuditLog(db, config.audit.retention_days)
        with _output(args.output) as out:
            if args.format == "table":
                await _table(log, out, since, until, args)
            else:
                async for chunk in log.export(
                    args.format, since, until, connector=args.connector, portal=args.portal
                ):
                    out.write(chunk)
        return 0
    finally:
        await db.stop()


@contextlib.contextmanager
def _output(path: Path | None) -> Any:
    if path is None:
        yield sys.stdout
        return
    with path.open("w", encoding="utf-8", newline="") as file:
        yield file


async def _table(
    log: AuditLog, out: TextIO, since: int | None, until: int | None, args: argparse.Namespace
) -> None:
    filters = {"connector": args.connector, "portal": args.portal}
    records = await log.query(since, until, limit=args.limit + 1, latest=True, **filters)
    more = len(records) > args.limit
    records = records[-args.limit :]
    if not records:
        out.write("No audit records.\n")
        return
    out.write(
        f"{'time (UTC)':<24} {'direction':<9} {'connector':<12} {'kind':<10} "
        f"{'outcome':<11} {'size':>9}  sender -> recipient\n"
    )
    for record in records:
        out.write(_row(record))
    if more:
        out.write(
            f"(the latest {args.limit} rows; narrow with --since/--until or export them all "
            "with --format csv or json)\n"
        )


def _row(record: AuditRecord) -> str:
    size = "" if record.size is None else str(record.size)
    line = (
        f"{record.time.replace('+00:00', 'Z'):<24} {record.direction:<9} "
        f"{record.connector:<12} {record.kind:<10} {record.outcome:<11} {size:>9}  "
        f"{record.sender or '-'} -> {record.recipient or '-'}\n"
    )
    ids = [
        f"portal {record.portal}" if record.portal else "",
        f"event {record.event_id}" if record.event_id else "",
        f"remote {record.remote_id}" if record.remote_id else "",
        f"({record.detail})" if record.detail else "",
    ]
    return line + f"{'':<24} " + "  ".join(i for i in ids if i) + "\n"
