"""``dead-letters``, ``retry``, ``discard``: one behaviour (``bridge.commands.dead_letters``) for
the CLI and the admin room, over a real SQLite database with a dead letter in it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from bridge.cli import main
from bridge.commands import BadInput, Refused
from bridge.commands.dead_letters import DeadLetterCommands, room_table, table
from bridge.config import load_config
from bridge.db.database import open_database
from bridge.db.dead_letters import DeadLetterStore

ROOM = "!dm:own.example"


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
            for seq, state in ((7, "dead"), (8, "pending")):
                await db.execute(
                    "INSERT INTO outbox (seq, connector, room_id, operation, dedup_key, payload, "
                    "created_at, state, attempts, last_error) "
                    "VALUES ($1, 'medipeps', $2, 'send_message', $3, '{}', 1, $4, 9, 'HTTP 500')",
                    seq,
                    ROOM,
                    f"k{seq}",
                    state,
                )
        finally:
            await db.stop()

    asyncio.run(fill())
    return path


async def test_list_retry_discard(config: Path) -> None:
    db = await open_database(load_config(config).database)
    try:
        letters = DeadLetterCommands(DeadLetterStore(db))
        listed = await letters.listing()
        assert [(d.seq, d.held) for d in listed] == [(7, 1)]
        assert "send_message: HTTP 500" in table(listed)
        assert room_table(listed).endswith("discard ID drops one.")
        question = letters.discard_question(await letters.find(7))
        assert question.startswith(f"Discard dead letter 7 (send_message to medipeps in {ROOM})?")
        with pytest.raises(BadInput, match="not 'seven'"):
            await letters.retry("seven")
        with pytest.raises(Refused, match="No dead letter 99"):
            await letters.retry("99")
        assert await letters.retry("7") == (
            "1 dead letter(s) back in their queue; they go out in order."
        )
        assert await letters.retry("all") == "No dead letter."
        assert table(await letters.listing()) == "No dead letter."
        with pytest.raises(Refused, match="No dead letter 7"):
            await letters.discard(7)
    finally:
        await db.stop()


def test_cli_discard_asks_and_says_when_there_is_no_such_letter(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    c = str(config)
    monkeypatch.setattr("builtins.input", lambda question: "n")
    assert main(["discard", "-c", c, "7"]) == 1
    assert "Nothing discarded." in capsys.readouterr().out
    assert main(["discard", "-c", c, "7", "--yes"]) == 0
    assert "Dead letter 7 discarded" in capsys.readouterr().out
    assert main(["discard", "-c", c, "7", "--yes"]) == 1
    assert "No dead letter 7" in capsys.readouterr().err
    assert main(["retry", "-c", c, "x"]) == 2
    assert main(["dead-letters", "-c", c]) == 0
    assert capsys.readouterr().out == "No dead letter.\n"
