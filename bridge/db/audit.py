"""The audit log: every delivery's metadata (who, to whom, when, what kind, how big, what became
of it), never its content.

A record is written in the same group commit as the delivery it describes (``record_write``),
so the log holds exactly what the bridge did: no delivery without its row, no row for a delivery
that was not done. Rows are kept ``audit.retention_days`` after their conversation's last
activity (TI-Messenger keeps content six months after it; the bridge keeps no content, and its
metadata no longer than that), then purged.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from mautrix.util.async_db import Database

from bridge.db import clock
from bridge.db.group_commit import Write

DAY_MS = 86_400_000
MAX_SIZE = 2**63 - 1
ExportFormat = Literal["csv", "json"]

_FIELDS = (
    "at",
    "connector",
    "direction",
    "sender",
    "recipient",
    "portal",
    "event_id",
    "remote_id",
    "kind",
    "size",
    "outcome",
    "detail",
)
_INSERT = (
    f"INSERT INTO audit_log ({', '.join(_FIELDS)}) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(_FIELDS) + 1))})"
)
_SIZE = _FIELDS.index("size")
EXPORT_COLUMNS = ("id", "time", *_FIELDS)
"""The columns of an export, in order (``time`` is ``at`` in ISO 8601, UTC)."""


@dataclass(frozen=True)
class AuditRecord:
    """One delivery, as the audit log keeps it.

    ``direction``: ``to_vendor`` (a Matrix event delivered to a connector) or ``to_matrix`` (a
    vendor event sent into Matrix). ``sender``/``recipient``: Matrix IDs, IDNPS, vendor
    conversation ids. ``kind``: text, notice, emote, location, image, file, audio, video, edit,
    deletion, reaction, reaction_removal, read, conversation. ``size``: bytes of the body or the
    file. ``outcome``: delivered / sent, skipped (nothing to do there: e.g. an edit of a message
    that never reached that vendor), refused, failed, dead_letter; ``detail``: the reason's
    class (never the reason's text, which may quote what was refused).
    """

    at: int
    connector: str
    direction: str
    kind: str
    outcome: str
    sender: str | None = None
    recipient: str | None = None
    portal: str | None = None
    event_id: str | None = None
    remote_id: str | None = None
    size: int | None = None
    detail: str | None = None
    id: int | None = None

    @property
    def time(self) -> str:
        return iso_time(self.at)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "time": self.time, **{k: getattr(self, k) for k in _FIELDS}}


@dataclass(frozen=True)
class AuditWrite(Write):
    """An audit row as a group-commit write; ``record`` lets the committer count it (metrics)."""

    record: AuditRecord | None = None


def iso_time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")


class AuditLog:
    def __init__(self, db: Database, retention_days: float = 183.0) -> None:
        self.db = db
        self.retention_days = retention_days

    # Writing -----------------------------------------------------------------------------------

    @staticmethod
    def record_write(record: AuditRecord) -> AuditWrite:
        """The row as a write, to commit with the delivery it describes."""
        values = [getattr(record, f) for f in _FIELDS]
        if record.size is not None:
            # A BIGINT column: still bounded, so an absurd announced size cannot fail the commit.
            values[_SIZE] = min(max(int(record.size), 0), MAX_SIZE)
        return AuditWrite(_INSERT, tuple(values), record=record)

    async def record(self, record: AuditRecord) -> None:
        """Write one row on its own (what is not part of a group commit)."""
        write = self.record_write(record)
        await self.db.execute(write.sql, *write.args)

    # Reading -----------------------------------------------------------------------------------

    async def query(
        self,
        since_ms: int | None = None,
        until_ms: int | None = None,
        *,
        connector: str | None = None,
        portal: str | None = None,
        limit: int = 100,
        latest: bool = False,
    ) -> list[AuditRecord]:
        """Rows with ``since_ms <= at < until_ms`` (either bound optional), oldest first.

        At most ``limit``: the oldest ones, or with ``latest`` the newest ones (still returned
        oldest first)."""
        where, args = _where(since_ms, until_ms, connector, portal)
        order = "DESC" if latest else "ASC"
        rows = await self.db.fetch(
            f"SELECT id, {', '.join(_FIELDS)} FROM audit_log {where} "
            f"ORDER BY at {order}, id {order} LIMIT ${len(args) + 1}",
            *args,
            max(0, limit),
        )
        records = [_record(row) for row in rows]
        return records[::-1] if latest else records

    async def rows(
        self,
        since_ms: int | None = None,
        until_ms: int | None = None,
        *,
        connector: str | None = None,
        portal: str | None = None,
        batch: int = 1000,
    ) -> AsyncIterator[AuditRecord]:
        """Every matching row, oldest first, read ``batch`` at a time (memory stays bounded
        however long the range)."""
        after: tuple[int, int] | None = None
        while True:
            where, args = _where(since_ms, until_ms, connector, portal)
            if after is not None:
                n = len(args)
                clause = f"(at > ${n + 1} OR (at = ${n + 1} AND id > ${n + 2}))"
                where = f"{where} AND {clause}" if where else f"WHERE {clause}"
                args = [*args, *after]
            rows = await self.db.fetch(
                f"SELECT id, {', '.join(_FIELDS)} FROM audit_log {where} "
                f"ORDER BY at, id LIMIT ${len(args) + 1}",
                *args,
                batch,
            )
            for row in rows:
                yield _record(row)
            if len(rows) < batch:
                return
            after = (int(rows[-1]["at"]), int(rows[-1]["id"]))

    async def export(
        self,
        fmt: ExportFormat,
        since_ms: int | None = None,
        until_ms: int | None = None,
        *,
        connector: str | None = None,
        portal: str | None = None,
    ) -> AsyncIterator[str]:
        """The matching rows as CSV (a header line, then one line per row) or as one JSON array
        (one object per line), in chunks of text to write as they come."""
        found = self.rows(since_ms, until_ms, connector=connector, portal=portal)
        if fmt == "csv":
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            writer.writerow(EXPORT_COLUMNS)
            yield _drain(buffer)
            async for record in found:
                row = record.to_json()
                writer.writerow(["" if row[c] is None else row[c] for c in EXPORT_COLUMNS])
                yield _drain(buffer)
        elif fmt == "json":
            first = True
            yield "["
            async for record in found:
                yield ("\n" if first else ",\n") + json.dumps(record.to_json(), ensure_ascii=False)
                first = False
            yield "\n]\n" if not first else "]\n"
        else:
            raise ValueError(f"unknown export format {fmt!r} (csv or json)")

    # Retention ---------------------------------------------------------------------------------

    async def purge(self, now_ms: int | None = None, *, retention_days: float | None = None) -> int:
        """Delete the rows of conversations inactive for longer than the retention (all their
        rows, once the latest is that old), and rows of no conversation older than it.
        Returns how many rows went."""
        days = self.retention_days if retention_days is None else retention_days
        cutoff = (clock.now_ms() if now_ms is None else now_ms) - int(days * DAY_MS)
        expired_portals = (
            "SELECT portal FROM audit_log WHERE portal IS NOT NULL "
            "GROUP BY portal HAVING MAX(at) < $1"
        )
        condition = f"(portal IS NULL AND at < $1) OR portal IN ({expired_portals})"
        async with self.db.acquire() as conn, conn.transaction():
            count = int(
                await conn.fetchval(f"SELECT COUNT(*) FROM audit_log WHERE {condition}", cutoff)
            )
            if count:
                await conn.execute(f"DELETE FROM audit_log WHERE {condition}", cutoff)
        return count


def _where(
    since_ms: int | None, until_ms: int | None, connector: str | None, portal: str | None
) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    for column, op, value in (
        ("at", ">=", since_ms),
        ("at", "<", until_ms),
        ("connector", "=", connector),
        ("portal", "=", portal),
    ):
        if value is not None:
            args.append(value)
            clauses.append(f"{column} {op} ${len(args)}")
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), args


def _record(row: Any) -> AuditRecord:
    values = {f: row[f] for f in _FIELDS}
    values["at"] = int(values["at"])
    if values["size"] is not None:
        values["size"] = int(values["size"])
    return AuditRecord(id=int(row["id"]), **values)


def _drain(buffer: io.StringIO) -> str:
    text = buffer.getvalue()
    buffer.seek(0)
    buffer.truncate()
    return text
