"""The audit log: metadata of every delivery (never content), its retention, its exports, and the
``eimis-bridge audit`` command. What a real delivery leaves in it: tests/e2e/test_audit.py."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from mautrix.util.async_db import Database

from bridge.cli import main
from bridge.commands.audit import parse_moment
from bridge.db.audit import DAY_MS, EXPORT_COLUMNS, MAX_SIZE, AuditLog, AuditRecord
from bridge.db.group_commit import GroupCommit

NOW = 1_750_000_000_000


def record(at: int, **fields: object) -> AuditRecord:
    values: dict[str, object] = {
        "connector": "vendora",
        "direction": "to_vendor",
        "kind": "text",
        "outcome": "delivered",
        "sender": "@nurse:hs.example",
        "recipient": "conv-1",
        "portal": "!room1:hs.example",
        "event_id": f"$event{at}",
        "remote_id": f"r{at}",
        "size": 12,
    }
    values.update(fields)
    return AuditRecord(at=at, **values)  # type: ignore[arg-type]


async def store(log: AuditLog, *records: AuditRecord) -> None:
    """Through a group commit, as the bridge writes them (with the delivery they describe)."""
    await GroupCommit(log.db).commit([log.record_write(r) for r in records])


async def collect(chunks: AsyncIterator[str]) -> str:
    return "".join([chunk async for chunk in chunks])


# --- The store, on SQLite and PostgreSQL ---------------------------------------------------------


async def test_a_record_committed_with_a_delivery_reads_back_whole(db: Database) -> None:
    log = AuditLog(db)
    written = record(NOW, detail="degraded", kind="image", size=2048)
    await store(log, written)

    [found] = await log.query()
    assert found.id is not None
    assert found == AuditRecord(**{**written.__dict__, "id": found.id})
    assert found.time == "2025-06-15T15:06:40.000+00:00"


async def test_query_filters_by_time_connector_and_portal(db: Database) -> None:
    log = AuditLog(db)
    await store(
        log,
        record(NOW - 3000),
        record(NOW - 2000, connector="vendorb"),
        record(NOW - 1000, portal="!room2:hs.example"),
        record(NOW),
    )

    assert [r.at for r in await log.query(NOW - 2000, NOW)] == [NOW - 2000, NOW - 1000]
    assert [r.at for r in await log.query(connector="vendorb")] == [NOW - 2000]
    assert [r.at for r in await log.query(portal="!room2:hs.example")] == [NOW - 1000]
    assert [r.at for r in await log.query(limit=2)] == [NOW - 3000, NOW - 2000]
    assert [r.at for r in await log.query(limit=2, latest=True)] == [NOW - 1000, NOW]


async def test_rows_reads_everything_in_batches_in_time_order(db: Database) -> None:
    log = AuditLog(db)
    # Several rows share a millisecond: the batches must neither skip nor repeat them.
    moments = [NOW, NOW, NOW, NOW + 1, NOW + 1, NOW + 2, NOW + 5]
    await store(log, *(record(at, remote_id=f"r{i}") for i, at in enumerate(moments)))

    rows = [r async for r in log.rows(batch=2)]
    assert [r.remote_id for r in rows] == [f"r{i}" for i in range(len(moments))]
    assert [r.at for r in [x async for x in log.rows(NOW + 1, batch=2)]] == [
        NOW + 1,
        NOW + 1,
        NOW + 2,
        NOW + 5,
    ]


async def test_csv_and_json_exports_hold_the_metadata_columns(db: Database) -> None:
    log = AuditLog(db)
    await store(
        log,
        record(NOW, sender="@a,b:hs.example", detail=None),
        record(NOW + 1, direction="to_matrix", outcome="refused", size=None, detail="too_large"),
    )

    rows = list(csv.reader(io.StringIO(await collect(log.export("csv")))))
    assert tuple(rows[0]) == EXPORT_COLUMNS
    assert len(rows) == 3
    first = dict(zip(EXPORT_COLUMNS, rows[1], strict=True))
    assert first["sender"] == "@a,b:hs.example"  # quoted, not split
    assert first["time"] == "2025-06-15T15:06:40.000+00:00" and first["at"] == str(NOW)
    assert first["detail"] == "" and first["size"] == "12"
    second = dict(zip(EXPORT_COLUMNS, rows[2], strict=True))
    assert (second["outcome"], second["detail"], second["size"]) == ("refused", "too_large", "")

    exported = json.loads(await collect(log.export("json", connector="vendora")))
    assert [e["at"] for e in exported] == [NOW, NOW + 1]
    assert set(exported[0]) == set(EXPORT_COLUMNS)
    assert exported[1]["size"] is None and exported[1]["direction"] == "to_matrix"
    assert json.loads(await collect(log.export("json", connector="nobody"))) == []
    with pytest.raises(ValueError):
        await collect(log.export("xml"))  # type: ignore[arg-type]


async def test_purge_keeps_a_conversation_until_its_last_activity_is_past_retention(
    db: Database,
) -> None:
    log = AuditLog(db, retention_days=10)
    old, recent = NOW - 11 * DAY_MS, NOW - 9 * DAY_MS
    await store(
        log,
        record(old, portal="!quiet:hs"),  # quiet since: all of it goes
        record(old + 1, portal="!quiet:hs"),
        record(old, portal="!active:hs"),  # old, but the conversation went on: kept
        record(recent, portal="!active:hs"),
        record(old, portal=None),  # no conversation: by its own age
        record(recent, portal=None),
    )

    assert await log.purge(NOW) == 3
    left = await log.query()
    assert [(r.portal, r.at) for r in left] == [
        ("!active:hs", old),
        ("!active:hs", recent),
        (None, recent),
    ]
    assert await log.purge(NOW) == 0
    # A shorter retention asked for explicitly (the config's) wins over the store's default.
    assert await log.purge(NOW, retention_days=1) == 3
    assert await log.query() == []


async def test_an_absurd_announced_size_cannot_fail_the_commit(db: Database) -> None:
    log = AuditLog(db)
    await store(log, record(NOW, size=10 * 2**40))  # a 10 TiB file announced: kept as is
    await store(log, record(NOW + 1, size=2**70))  # beyond any column: capped
    assert [r.size for r in await log.query()] == [10 * 2**40, MAX_SIZE]


# --- The command ---------------------------------------------------------------------------------


def test_times_are_iso_8601_or_a_duration_back_from_now() -> None:
    now = datetime(2025, 6, 15, 12, 0, tzinfo=UTC)
    assert (
        parse_moment("2025-06-15", now) == int(datetime(2025, 6, 15, tzinfo=UTC).timestamp()) * 1000
    )
    assert parse_moment("2025-06-15T10:00+02:00", now) == int(
        datetime(2025, 6, 15, 8, tzinfo=UTC).timestamp() * 1000
    )
    assert parse_moment("2025-06-15T08:00:00Z", now) == parse_moment("2025-06-15T08:00", now)
    assert parse_moment("24h", now) == int(datetime(2025, 6, 14, 12, tzinfo=UTC).timestamp() * 1000)
    assert parse_moment("2w", now) == parse_moment("14d", now)
    assert parse_moment("90s", now) == parse_moment("1.5m", now)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    data = {
        "homeserver": {"url": "http://127.0.0.1:1", "domain": "hs.example"},
        "appservice": {"address": "http://127.0.0.1:2", "as_token": "a", "hs_token": "h"},
        "database": {"url": f"sqlite:{tmp_path / 'bridge.db'}"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


async def _fill(config: Path) -> None:
    from bridge.config import load_config
    from bridge.db.database import open_database

    db = await open_database(load_config(config).database)
    try:
        now = int(datetime.now(UTC).timestamp() * 1000)
        log = AuditLog(db)
        await store(
            log,
            record(now - 3 * DAY_MS, remote_id="three-days"),
            record(now - 3600_000, remote_id="an-hour", connector="vendorb"),
            record(now - 60_000, remote_id="a-minute", portal="!other:hs.example"),
        )
    finally:
        await db.stop()


async def test_the_audit_command_shows_filters_and_exports(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await _fill(config)
    loop_free = __import__("asyncio").to_thread  # the command runs its own event loop

    assert await loop_free(main, ["audit", "-c", str(config), "--since", "2d"]) == 0
    out = capsys.readouterr().out
    assert "an-hour" in out and "a-minute" in out and "three-days" not in out
    assert "time (UTC)" in out

    assert await loop_free(main, ["audit", "-c", str(config), "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "a-minute" in out and "an-hour" not in out and "the latest 1 rows" in out

    target = tmp_path / "audit.csv"
    status = await loop_free(
        main,
        [
            "audit",
            "-c",
            str(config),
            "--format",
            "csv",
            "--connector",
            "vendora",
            "--output",
            str(target),
        ],
    )
    assert status == 0
    rows = list(csv.DictReader(target.open(encoding="utf-8")))
    assert [r["remote_id"] for r in rows] == ["three-days", "a-minute"]

    status = await loop_free(
        main, ["audit", "-c", str(config), "--format", "json", "--portal", "!other:hs.example"]
    )
    assert status == 0
    assert [r["remote_id"] for r in json.loads(capsys.readouterr().out)] == ["a-minute"]

    assert await loop_free(main, ["audit", "-c", str(config), "--since", "yesterday"]) == 2
    assert "neither an ISO 8601 time" in capsys.readouterr().err
    assert (
        await loop_free(main, ["audit", "-c", str(config), "--since", "1h", "--until", "2h"]) == 2
    )
