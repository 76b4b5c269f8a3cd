"""The audit log of deliveries (metadata only): who sent what kind of message to whom, when, how
big, and what became of it. Never content. The CLI's ``audit`` (a table, or a streamed CSV or
JSON export for an auditor) and the admin room's (the latest rows) read it the same way.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from bridge.commands import BadInput
from bridge.db.audit import AuditLog, AuditRecord

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


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
        raise BadInput(
            f"{value!r} is neither an ISO 8601 time (2025-01-31T08:00) nor a duration "
            "(90s, 15m, 24h, 7d, 2w)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def window(since: str | None, until: str | None) -> tuple[int | None, int | None]:
    """``--since`` and ``--until`` as typed, in ms (None: open)."""
    start = parse_moment(since) if since else None
    end = parse_moment(until) if until else None
    if start is not None and end is not None and start >= end:
        raise BadInput("--since must be before --until")
    return start, end


def check_limit(limit: int) -> int:
    if limit < 1:
        raise BadInput("--limit must be at least 1")
    return limit


@dataclass
class LatestRecords:
    records: list[AuditRecord]
    more: bool
    """Older rows in the window were left out."""
    limit: int

    def table(self) -> str:
        """For a terminal: a header, two lines per record, and what was left out."""
        if not self.records:
            return "No audit records.\n"
        lines = [
            f"{'time (UTC)':<24} {'direction':<9} {'connector':<12} {'kind':<10} "
            f"{'outcome':<11} {'size':>9}  sender -> recipient\n"
        ]
        lines += [_table_row(record) for record in self.records]
        if self.more:
            lines.append(
                f"(the latest {self.limit} rows; narrow with --since/--until or export them all "
                "with --format csv or json)\n"
            )
        return "".join(lines)

    def lines(self) -> list[str]:
        """For a chat room: one short line per record."""
        return [_room_line(record) for record in self.records]


async def latest(
    log: AuditLog,
    since: int | None,
    until: int | None = None,
    *,
    connector: str | None = None,
    portal: str | None = None,
    limit: int,
) -> LatestRecords:
    """The latest ``limit`` records of the window, oldest first."""
    check_limit(limit)
    filters = {"connector": connector, "portal": portal}
    records = await log.query(since, until, limit=limit + 1, latest=True, **filters)
    return LatestRecords(records[-limit:], len(records) > limit, limit)


def _table_row(record: AuditRecord) -> str:
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


def _room_line(record: AuditRecord) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(record.at / 1000))
    return (
        f"{when}Z {record.connector} {record.direction} {record.kind} {record.outcome} "
        f"{record.sender or '-'} -> {record.recipient or '-'} {record.portal or '-'}"
    )
