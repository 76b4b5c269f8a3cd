"""The operators' reports (``status``, ``queue``, ``portals``, ``portal``, ``whois``): the subject
module over a real SQLite database with rows, and the same reports from the host's CLI (the
admin room gives the same text: tests/e2e/test_admin.py compares them)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml

from bridge.cli import main
from bridge.commands import BadInput, Refused, reports
from bridge.config import load_config
from bridge.core.ghost_ids import GhostIds
from bridge.db.clock import now_ms
from bridge.db.database import open_database
from bridge.db.stores import Stores

IDNPS = "810000001916"
GHOST = f"@eimis_pandalab_{IDNPS}:own.example"
ROOM = "!portal:own.example"


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    data = {
        "homeserver": {"url": "http://127.0.0.1:1", "domain": "own.example"},
        "appservice": {"address": "http://127.0.0.1:2", "as_token": "a", "hs_token": "b"},
        "database": {"url": f"sqlite:{tmp_path / 'bridge.db'}"},
        "connectors": {
            "pandalab": {"type": "pandalab", "settings": {}},
            "medipeps": {"type": "medipeps", "settings": {}},
        },
    }
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


async def _fill(config_path: Path) -> None:
    """A portal linking two vendors, two deliveries waiting for medipeps (one held behind a dead
    letter), a professional with a ghost, a native account and a permission."""
    config = load_config(config_path)
    db = await open_database(config.database)
    try:
        now = now_ms()
        await db.execute(
            "INSERT INTO portal (room_id, title, is_direct, voice, created_at) "
            "VALUES ($1, 'Staff', false, $2, $3)",
            ROOM,
            GHOST,
            now,
        )
        for connector, conversation in (("pandalab", "conv-1"), ("medipeps", None)):
            await db.execute(
                "INSERT INTO portal_link (room_id, connector, conversation_id) VALUES ($1, $2, $3)",
                ROOM,
                connector,
                conversation,
            )
        for seq, state, error in ((1, "dead", "HTTP 500"), (2, "pending", None)):
            await db.execute(
                "INSERT INTO outbox (seq, connector, room_id, operation, dedup_key, payload, "
                "created_at, state, attempts, last_error) "
                "VALUES ($1, 'medipeps', $2, 'message', $3, '{}', $4, $5, 3, $6)",
                seq,
                ROOM,
                f"d{seq}",
                now - 120_000,
                state,
                error,
            )
        await db.execute(
            "INSERT INTO ghost (mxid, connector, idnps, display_name) "
            "VALUES ($1, 'pandalab', $2, 'Dr Alice Martin')",
            GHOST,
            IDNPS,
        )
        await db.execute(
            "INSERT INTO professional (idnps, given_name, family_name, source, updated_at) "
            "VALUES ($1, 'Alice', 'Martin', 'ps', $2)",
            IDNPS,
            now,
        )
        await db.execute(
            "INSERT INTO professional_mxid (idnps, mxid, kind, preferred) "
            "VALUES ($1, '@alice:hs2.example', 'native', true)",
            IDNPS,
        )
        await db.execute(
            "INSERT INTO permission (idnps, default_setting, updated_at) "
            "VALUES ($1, 'block-all', $2)",
            IDNPS,
            now,
        )
    finally:
        await db.stop()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = _config(tmp_path)
    asyncio.run(_fill(path))
    return path


async def _stores(config_path: Path) -> tuple[Stores, GhostIds]:
    config = load_config(config_path)
    db = await open_database(config.database)
    return Stores.of(db), GhostIds("eimis_", "own.example", "eimis_bot")


# --- The subject module -------------------------------------------------------------------------


async def test_reports_read_the_rows(config: Path) -> None:
    stores, ids = await _stores(config)
    try:
        queue = await reports.queue(stores.reports, "medipeps", ["medipeps"], "connector")
        assert [item.id for item in queue.items] == [2]
        assert "message" in queue.text() and ROOM in queue.text()
        with pytest.raises(Refused, match="No connector 'nope': medipeps."):
            await reports.queue(stores.reports, "nope", ["medipeps"], "connector")

        status = await reports.database_status(
            stores, [reports.ConnectorState("medipeps", "medipeps", "CONNECTED")]
        )
        line = status.connector_lines()[1]
        assert "medipeps (medipeps): CONNECTED, 1 queued (1 held behind dead letters)" in line
        assert "oldest 2 min, 1 dead letter(s); last error: HTTP 500" in line

        assert (await reports.portals(stores.reports, "medi")).total == 1
        assert (await reports.portals(stores.reports, "nothing")).text() == "No portal matches."
        portal = await reports.portal(stores.reports, "conv-1")  # a vendor conversation id
        assert portal.portal.room_id == ROOM
        assert "deliveries waiting: 1; dead letters: 1" in portal.text()
        assert "  medipeps: conversation (being opened)" in portal.text()
        with pytest.raises(Refused, match="is not a portal room"):
            await reports.portal(stores.reports, "!other:own.example")

        by_ghost = await reports.whois(stores, ids, GHOST)
        by_native = await reports.whois(stores, ids, "@alice:hs2.example")
        assert by_ghost.text() == by_native.text()
        assert by_ghost.text().splitlines() == [
            f"IDNPS {IDNPS}",
            "name: Alice MARTIN (source: ps)",
            "  reached at @alice:hs2.example [native] (preferred)",
            f"  ghost {GHOST} (pandalab): Dr Alice Martin",
            "permissions: block-all",
        ]
        with pytest.raises(BadInput, match="Invalid IDNPS"):
            await reports.whois(stores, ids, "123")
        with pytest.raises(Refused, match="not in the directory and is not a ghost"):
            await reports.whois(stores, ids, "@bob:hs2.example")
    finally:
        await stores.db.stop()


# --- The CLI, from the host ---------------------------------------------------------------------


def test_cli_reports_work_on_the_database_alone(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The homeserver of this config does not answer (port 1): the reports still do."""
    c = str(config)
    assert main(["status", "-c", c]) == 0
    out = capsys.readouterr().out
    assert "read from the database only" in out
    assert "Database: answering; inbox 0 pending" in out
    assert "  medipeps (medipeps): enabled, 1 queued (1 held behind dead letters)" in out

    assert main(["queue", "-c", c, "medipeps"]) == 0
    assert ROOM in capsys.readouterr().out
    assert main(["queue", "-c", c, "pandalab"]) == 0
    assert capsys.readouterr().out == "Nothing waits for pandalab.\n"

    assert main(["portals", "-c", c]) == 0
    assert f"{ROOM}  group  [medipeps, pandalab]  Staff" in capsys.readouterr().out
    assert main(["portal", "-c", c, ROOM]) == 0
    assert "  pandalab: conversation conv-1" in capsys.readouterr().out

    assert main(["whois", "-c", c, IDNPS]) == 0
    assert f"ghost {GHOST} (pandalab)" in capsys.readouterr().out


def test_cli_reports_as_json(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = str(config)
    assert main(["whois", "-c", c, IDNPS, "--json"]) == 0
    whois = json.loads(capsys.readouterr().out)
    assert whois["idnps"] == IDNPS and whois["ghosts"][0]["mxid"] == GHOST
    assert main(["queue", "-c", c, "medipeps", "--json"]) == 0
    assert [item["id"] for item in json.loads(capsys.readouterr().out)["items"]] == [2]
    assert main(["status", "-c", c, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["queues"]["medipeps"]["held"] == 1 and status["dead_letters"] == {"medipeps": 1}


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        (["whois", "123"], 2, "Invalid IDNPS"),
        (["whois", "@nobody:hs2.example"], 1, "not in the directory and is not a ghost"),
        (["portal", "!nope:own.example"], 1, "!nope:own.example is not a portal room."),
        (["queue", "acme"], 1, "No connector 'acme': "),
    ],
)
def test_cli_reports_say_what_is_wrong(
    config: Path, capsys: pytest.CaptureFixture[str], argv: list[str], status: int, message: str
) -> None:
    assert main([argv[0], "-c", str(config), *argv[1:]]) == status
    assert message in capsys.readouterr().err
