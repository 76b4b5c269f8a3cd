"""Content and secrets at rest (issue 11, point 15), without a homeserver: the outbox seals what
waits for a vendor, discards drop it, SQLite's write-ahead log keeps no cleared content, and the
files that hold content or secrets are their owner's only. End to end: test_e2e_at_rest.py."""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from mautrix.util.async_db import Database

from bridge.config import DatabaseConfig, SecretsConfig
from bridge.db.database import open_database, truncate_wal
from bridge.db.dead_letters import DeadLetterStore
from bridge.db.outbox import OutboxStore
from bridge.db.stores import Stores
from bridge.devtools import demo
from bridge.private_files import private_dir, private_file, write_private
from bridge.registration import write_registration
from bridge.secrets import KeyUnavailable, SecretBox, TamperedValue, generate_key

BODY = "Allergie: penicilline, patient de la chambre 12"
"""A message body (ASCII: JSON stores it as is): never found in clear where the tests look."""


def box(key: str | None = None, *previous: str) -> SecretBox:
    raw = base64.b64decode(key or generate_key())
    return SecretBox(raw, [base64.b64decode(p) for p in previous])


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask() -> Iterator[None]:
    """The usual umask (022): what the bridge creates is private by its own doing."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


async def raw_outbox(db: Database) -> str:
    """Every outbox row's every column, as stored."""
    rows = await db.fetch("SELECT * FROM outbox")
    return json.dumps([[str(v) for v in tuple(r)] for r in rows], ensure_ascii=False)


def in_clear(text: str) -> bool:
    return BODY in text or json.dumps(BODY)[1:-1] in text


# --- The outbox, sealed (both engines) -----------------------------------------------------------


async def test_outbox_rows_hold_no_plaintext_and_callers_see_dicts(db: Database) -> None:
    outbox = OutboxStore(db, box())
    payload = {"text": BODY, "sender": {"name": "Camille Martin"}}
    assert await outbox.enqueue("pl", "!r:x", "send_message", "$a", payload)
    write = outbox.enqueue_write("pl", "!r:x", "send_message", "$b", payload)  # group commits
    await db.execute(write.sql, *write.args)
    await outbox.enqueue("mp", "!s:x", "send_message", "$c", {"text": BODY})

    stored = await raw_outbox(db)
    assert not in_clear(stored) and "Camille" not in stored
    assert stored.count("v1:") == 3  # each payload is a sealed value

    items = await outbox.pending(0, 10)
    assert [i.payload for i in items] == [payload, payload, {"text": BODY}]
    lane = await outbox.pending_in_lane(items[0].lane, 0, 10)
    assert [i.dedup_key for i in lane] == ["$a", "$b"] and lane[0].payload == payload


async def test_failing_and_dead_letters_stay_sealed_and_a_discard_drops_the_content(
    db: Database,
) -> None:
    outbox = OutboxStore(db, box())
    for key in ("$a", "$b", "$c"):
        await outbox.enqueue("pl", "!r:x", "send_message", key, {"text": f"{BODY} {key}"})
    a, b, c = await outbox.pending(0, 10)
    await outbox.record_attempt(a.seq, "timeout")
    await outbox.mark_failed(b.seq, "refused")
    await outbox.mark_dead(c.seq, "retry budget spent")
    assert not in_clear(await raw_outbox(db))
    waiting = await outbox.waiting(room_id="!r:x")
    assert [(i.seq, i.payload["text"]) for i in waiting] == [
        (a.seq, f"{BODY} $a"), (b.seq, f"{BODY} $b"), (c.seq, f"{BODY} $c"),
    ]  # fmt: skip

    assert await DeadLetterStore(db).discard(c.seq)
    assert await db.fetchval("SELECT payload FROM outbox WHERE seq = $1", c.seq) is None
    assert await outbox.drop([a.seq, b.seq], "erased") == 2
    assert await db.fetchval("SELECT COUNT(*) FROM outbox WHERE payload IS NOT NULL") == 0
    assert await outbox.waiting() == []


async def test_a_sealed_payload_does_not_open_in_another_row(db: Database) -> None:
    outbox = OutboxStore(db, box())
    await outbox.enqueue("pl", "!r:x", "send_message", "$a", {"text": BODY})
    await outbox.enqueue("pl", "!r:x", "send_message", "$b", {"text": "autre"})
    sealed = await db.fetchval("SELECT payload FROM outbox WHERE dedup_key = '$a'")
    await db.execute("UPDATE outbox SET payload = $1 WHERE dedup_key = '$b'", sealed)
    with pytest.raises(TamperedValue):
        await outbox.pending(0, 10)


async def test_rows_queued_before_sealing_are_read_then_sealed(db: Database) -> None:
    """An upgrade: rows written in clear by an older bridge still deliver, and are sealed."""
    plain = OutboxStore(db)  # no key: how rows were written before
    await plain.enqueue("pl", "!r:x", "send_message", "$old", {"text": BODY})
    assert in_clear(await raw_outbox(db))

    sealing = OutboxStore(db, box())
    assert [i.payload for i in await sealing.pending(0, 10)] == [{"text": BODY}]
    assert await sealing.key_usage() == {"": 1}
    assert await sealing.seal_all() == (1, 0)
    assert not in_clear(await raw_outbox(db))
    assert [i.payload for i in await sealing.pending(0, 10)] == [{"text": BODY}]
    assert await sealing.seal_all() == (0, 1)


async def test_key_rotation_seals_queued_content_again_and_no_key_cannot_read_it(
    db: Database,
) -> None:
    old_key, new_key = generate_key(), generate_key()
    await OutboxStore(db, box(old_key)).enqueue("pl", "!r:x", "send", "$a", {"text": BODY})
    rotated = OutboxStore(db, box(new_key, old_key))
    assert list(await rotated.key_usage()) == [box(old_key).key_id]
    assert await rotated.seal_all() == (1, 0)
    assert list(await rotated.key_usage()) == [box(new_key).key_id]
    assert [i.payload for i in await OutboxStore(db, box(new_key)).pending(0, 1)] == [
        {"text": BODY}
    ]
    with pytest.raises(KeyUnavailable, match="secrets.key_file"):
        await OutboxStore(db).pending(0, 1)


async def test_stores_seal_the_outbox_with_the_configured_key(db: Database, tmp_path: Path) -> None:
    key_file = tmp_path / "secrets.key"
    write_private(key_file, generate_key())
    stores = Stores.of(db, secrets=SecretsConfig(key_file=key_file))
    assert stores.outbox.box is not None
    await stores.outbox.enqueue("pl", "!r:x", "send", "$a", {"text": BODY})
    assert not in_clear(await raw_outbox(db))
    # No key configured at all: the documented fallback (stored in clear; the bridge warns).
    assert Stores.of(db, secrets=SecretsConfig(key_env="EIMIS_TEST_NO_SUCH_KEY")).outbox.box is None
    # A key configured but unreadable is an error, not a silent fallback.
    with pytest.raises(KeyUnavailable):
        Stores.of(db, secrets=SecretsConfig(key_file=tmp_path / "missing.key"))


# --- SQLite's files ------------------------------------------------------------------------------


@pytest.fixture
async def sqlite_db(tmp_path: Path, umask: None) -> AsyncIterator[tuple[Database, Path]]:
    path = tmp_path / "new" / "state" / "bridge.db"
    database = await open_database(DatabaseConfig(url=f"sqlite:{path}"))
    try:
        yield database, path
    finally:
        await database.stop()


def raw_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())


async def test_cleared_content_leaves_the_database_file_and_its_write_ahead_log(
    sqlite_db: tuple[Database, Path],
) -> None:
    db, path = sqlite_db
    outbox = OutboxStore(db)  # in clear, so the bytes would show it
    await outbox.enqueue("pl", "!r:x", "send_message", "$a", {"text": BODY})
    (item,) = await outbox.pending(0, 1)
    needle = BODY.encode()
    assert needle in Path(f"{path}-wal").read_bytes()  # the log holds it while it waits
    await outbox.mark_done(item.seq)
    assert needle in Path(f"{path}-wal").read_bytes()  # cleared rows live on in old frames

    await truncate_wal(db)

    assert Path(f"{path}-wal").stat().st_size == 0
    assert needle not in raw_bytes(path)  # nor in the database file the log was copied to
    await outbox.enqueue("pl", "!r:x", "send_message", "$b", {"text": "suite"})
    assert needle not in raw_bytes(path)


async def test_a_discard_empties_the_write_ahead_log(sqlite_db: tuple[Database, Path]) -> None:
    db, path = sqlite_db
    outbox = OutboxStore(db)
    await outbox.enqueue("pl", "!r:x", "send_message", "$a", {"text": BODY})
    (item,) = await outbox.pending(0, 1)
    await outbox.mark_dead(item.seq, "retry budget spent")
    assert await DeadLetterStore(db).discard(item.seq)
    assert BODY.encode() not in raw_bytes(path)


async def test_the_database_its_wal_and_shm_are_the_owners_only(
    sqlite_db: tuple[Database, Path],
) -> None:
    db, path = sqlite_db
    await db.execute("CREATE TABLE IF NOT EXISTS t (x TEXT)")
    await db.execute("INSERT INTO t VALUES ('x')")
    for file in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        assert file.exists() and mode(file) == 0o600, file
    assert mode(path.parent) == 0o700 and mode(path.parent.parent) == 0o700  # created here


async def test_an_existing_database_readable_by_others_is_made_private(
    tmp_path: Path, umask: None
) -> None:
    path = tmp_path / "bridge.db"
    first = await open_database(DatabaseConfig(url=f"sqlite:{path}"))
    await first.stop()
    path.chmod(0o644)
    again = await open_database(DatabaseConfig(url=f"sqlite:{path}"))
    try:
        assert mode(path) == 0o600
    finally:
        await again.stop()


# --- Files holding secrets -----------------------------------------------------------------------


def test_private_files_are_0600_from_creation_and_directories_0700(
    tmp_path: Path, umask: None
) -> None:
    target = tmp_path / "a" / "b" / "token"
    write_private(target, "s3cret")
    assert mode(target) == 0o600 and target.read_text() == "s3cret"
    assert mode(tmp_path / "a") == 0o700 and mode(tmp_path / "a" / "b") == 0o700
    loose = tmp_path / "loose"
    loose.write_text("x")
    loose.chmod(0o644)
    write_private(loose, "y")
    assert mode(loose) == 0o600
    private_file(loose)
    assert loose.read_text() == "y"
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    private_dir(shared)
    assert mode(shared) == 0o755  # not ours to change


def test_the_registration_and_the_demo_files_are_0600(tmp_path: Path, umask: None) -> None:
    from bridge.config import parse_config

    config = parse_config(
        {
            "homeserver": {"url": "http://127.0.0.1:8008", "domain": "eimis.example"},
            "appservice": {"address": "http://127.0.0.1:29340", "as_token": "a", "hs_token": "b"},
        }
    )
    registration = tmp_path / "reg" / "registration.yaml"
    write_registration(config, registration)
    assert mode(registration) == 0o600 and mode(registration.parent) == 0o700
    state = tmp_path / "demo"
    private_dir(state)
    demo._native_password(state)
    assert mode(state / "native-password") == 0o600
    homeserver = SimpleNamespace(url="http://127.0.0.1:8008", server_name="eimis.localhost")
    demo._write_demo_json(state, homeserver, "@julie:eimis.localhost", "pw", [])  # type: ignore[arg-type]
    assert mode(state / "demo.json") == 0o600


async def test_secrets_rotate_seals_queued_content_written_in_clear(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio

    import yaml

    from bridge.cli import main

    db_path = tmp_path / "bridge.db"
    key_file = tmp_path / "secrets.key"
    write_private(key_file, generate_key())
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "homeserver": {"url": "http://127.0.0.1:8008", "domain": "eimis.example"},
                "appservice": {"address": "http://127.0.0.1:1", "as_token": "a", "hs_token": "b"},
                "database": {"url": f"sqlite:{db_path}"},
                "secrets": {"key_file": str(key_file)},
            }
        )
    )
    db = await open_database(DatabaseConfig(url=f"sqlite:{db_path}"))
    try:
        await OutboxStore(db).enqueue("pl", "!r:x", "send_message", "$old", {"text": BODY})
    finally:
        await db.stop()
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["secrets", "status", "-c", str(config)]) == 0
    assert "Queued deliveries in clear: 1" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["secrets", "rotate", "-c", str(config)]) == 0
    assert "1 queued delivery(ies) sealed" in capsys.readouterr().out
    db = await open_database(DatabaseConfig(url=f"sqlite:{db_path}"))
    try:
        assert not in_clear(await raw_outbox(db))
        sealed = OutboxStore(db, SecretBox.from_config(SecretsConfig(key_file=key_file)))
        assert [i.payload for i in await sealed.pending(0, 1)] == [{"text": BODY}]
    finally:
        await db.stop()
    assert await asyncio.to_thread(main, ["secrets", "status", "-c", str(config)]) == 0
    assert "in clear" not in capsys.readouterr().out


async def test_the_bridge_will_not_start_without_the_key_that_sealed_its_queue(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from bridge.app import Bridge
    from bridge.config import ConfigError, parse_config

    db_path = tmp_path / "bridge.db"
    sealing = box()
    db = await open_database(DatabaseConfig(url=f"sqlite:{db_path}"))
    try:
        await OutboxStore(db, sealing).enqueue("pl", "!r:x", "send", "$a", {"text": BODY})
    finally:
        await db.stop()
    config = parse_config(
        {
            "homeserver": {"url": "http://127.0.0.1:9", "domain": "eimis.example"},
            "appservice": {"address": "http://127.0.0.1:9", "as_token": "a", "hs_token": "b"},
            "database": {"url": f"sqlite:{db_path}"},
            "encryption": {"enabled": False},
            "secrets": {"key_env": "EIMIS_TEST_NO_SUCH_KEY"},
        }
    )
    bridge = Bridge(config)
    try:
        with pytest.raises(ConfigError, match=sealing.key_id):
            await bridge.start()
    finally:
        await bridge.stop()
    assert BODY not in caplog.text
