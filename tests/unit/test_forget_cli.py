"""``eimis-bridge forget`` up to its question: the IDNPS checked first, the question naming how
many ghosts go, and nothing erased without a yes (the erasure itself, end to end:
tests/e2e/test_erasure.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from bridge.cli import main
from bridge.commands import BadInput
from bridge.commands import erasure as commands
from bridge.config import load_config
from bridge.db.database import open_database
from bridge.db.stores import Stores

IDNPS = "810000001916"
GHOST = f"@eimis_pandalab_{IDNPS}:own.example"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    data = {
        "homeserver": {"url": "http://127.0.0.1:1", "domain": "own.example"},
        "appservice": {"address": "http://127.0.0.1:2", "as_token": "a", "hs_token": "b"},
        "database": {"url": f"sqlite:{tmp_path / 'bridge.db'}"},
    }
    path.write_text(yaml.safe_dump(data), encoding="utf-8")

    async def fill() -> None:
        db = await open_database(load_config(path).database)
        try:
            await db.execute(
                "INSERT INTO ghost (mxid, connector, idnps, display_name) "
                "VALUES ($1, 'pandalab', $2, 'Dr Alice')",
                GHOST,
                IDNPS,
            )
        finally:
            await db.stop()

    asyncio.run(fill())
    return path


async def test_the_plan_names_the_ghosts_and_refuses_a_bad_idnps(config: Path) -> None:
    db = await open_database(load_config(config).database)
    try:
        stores = Stores.of(db)
        plan = await commands.plan(stores, IDNPS)
        assert plan.ghosts == [GHOST]
        assert plan.question().startswith(f"Erase everything the bridge holds about {IDNPS} (1 ")
        with pytest.raises(BadInput, match="invalid IDNPS"):
            await commands.plan(stores, "123")
    finally:
        await db.stop()


def test_cli_forget_asks_and_a_no_erases_nothing(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []
    monkeypatch.setattr("builtins.input", lambda question: asked.append(question) or "n")
    assert main(["forget", "-c", str(config), IDNPS]) == 1
    assert "Nothing erased." in capsys.readouterr().out
    assert "(1 ghost(s))" in asked[0] and asked[0].endswith("cannot be undone. [y/N] ")
    assert main(["whois", "-c", str(config), IDNPS]) == 0
    assert f"ghost {GHOST}" in capsys.readouterr().out


def test_cli_forget_of_a_bad_idnps_exits_2(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["forget", "-c", str(config), "123", "--yes"]) == 2
    assert "eimis-bridge forget: invalid IDNPS" in capsys.readouterr().err
