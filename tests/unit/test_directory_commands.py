"""``directory import|show`` in the admin room and on the CLI: one behaviour
(``bridge.commands.directory``), the same answers. They used to differ: the room's ``directory
show`` was ``whois``, the CLI's the directory's view with the Matrix ID a conversation goes to;
and the room worded an import's report its own way."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from bridge.admin.commands import build_parser
from bridge.admin.parser import parse, split
from bridge.cli import main
from bridge.config import load_config
from bridge.db.database import open_database
from bridge.db.stores import Stores

DATA = Path(__file__).parents[1] / "data" / "directory"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    data = {
        "homeserver": {"url": "http://127.0.0.1:1", "domain": "eimis.localhost"},
        "appservice": {"address": "http://127.0.0.1:2", "as_token": "a", "hs_token": "h"},
        "database": {"url": f"sqlite:{tmp_path / 'bridge.db'}"},
        "connectors": {"pandalab": {"type": "pandalab", "settings": {}}},
    }
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


async def _room(config_path: Path, line: str) -> str:
    config = load_config(config_path)
    db = await open_database(config.database)
    try:
        ctx = SimpleNamespace(config=config, stores=Stores.of(db), uploads={})
        args = parse(build_parser(), split(line))
        return str((await args.handler(ctx, args, "!admin:s|@ops:s")).text)
    finally:
        await db.stop()


async def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert await asyncio.to_thread(main, list(argv)) == 0
    return capsys.readouterr().out.rstrip("\n")


async def test_the_room_and_the_cli_import_and_show_alike(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = str(DATA / "fhir_bundle.json")
    room = await _room(config, f"directory import {bundle}")
    assert room.startswith(f"Read 11 entries of {bundle} in ")
    assert "Directory: " in room and "professional(s) added" in room

    shown = await _room(config, "directory show 810099000050")
    assert shown == await _cli(capsys, "directory", "show", "-c", str(config), "810099000050")
    assert "-> @claire.petit:eimis.localhost  (native)" in shown

    again = await _cli(capsys, "directory", "import", "-c", str(config), bundle)
    assert (
        again.splitlines()[1] == (await _room(config, f"directory import {bundle}")).split("\n")[1]
    )


async def test_the_room_says_what_is_wrong_as_the_cli_does(config: Path) -> None:
    wrong = await _room(config, "directory show 7123")
    assert wrong.startswith("Invalid IDNPS '7123': ") and "starts with '8' (RPPS)" in wrong
    assert await _room(config, "directory show 810099000019") == (
        "No professional 810099000019 in the directory."
    )
    assert (await _room(config, "directory import /nonexistent/x.txt")).startswith(
        "Cannot read /nonexistent/x.txt"
    )
