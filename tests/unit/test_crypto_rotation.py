"""Rotating the secrets key reseals the encryption pickle key: after ``secrets rotate`` the
old key can go, and every Olm/Megolm session the bridge pickled still opens."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest
import yaml

from bridge.cli import main
from bridge.config import DatabaseConfig, SecretsConfig
from bridge.crypto.pickling import META_NAME, PickleKey
from bridge.db.crypto import CryptoStore
from bridge.db.database import open_database
from bridge.secrets import KeyUnavailable, SecretBox, UnknownKey, generate_key


def write_key(path: Path) -> Path:
    path.write_text(generate_key() + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


def write_config(path: Path, db: Path, key: Path, previous: list[Path]) -> Path:
    raw = {
        "homeserver": {"url": "http://127.0.0.1:1", "domain": "example.org"},
        "appservice": {"address": "http://127.0.0.1:2", "as_token": "a", "hs_token": "h"},
        "database": {"url": f"sqlite:{db}"},
        "secrets": {"key_file": str(key), "previous_key_files": [str(p) for p in previous]},
    }
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


async def pickle_key(db_path: Path, secrets: SecretsConfig) -> bytes:
    db = await open_database(DatabaseConfig(url=f"sqlite:{db_path}"))
    try:
        return (await PickleKey.load(CryptoStore(db), SecretBox.from_config(secrets))).raw
    finally:
        await db.stop()


async def test_secrets_rotate_reseals_the_pickle_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db_path = tmp_path / "bridge.db"
    old, new = write_key(tmp_path / "old.key"), write_key(tmp_path / "new.key")
    original = await pickle_key(db_path, SecretsConfig(key_file=old))

    rotated = write_config(tmp_path / "rotated.yaml", db_path, new, [old])
    assert await asyncio.to_thread(main, ["secrets", "rotate", "-c", str(rotated)]) == 0
    out = capsys.readouterr().out
    assert "encryption pickle key is sealed with key" in out

    # The old key is gone: the new one alone opens the same pickle key.
    assert await pickle_key(db_path, SecretsConfig(key_file=new)) == original
    with pytest.raises(UnknownKey):
        await pickle_key(db_path, SecretsConfig(key_file=old))


async def test_the_stored_pickle_key_is_sealed_not_in_clear(tmp_path: Path) -> None:
    db_path = tmp_path / "bridge.db"
    key = write_key(tmp_path / "k.key")
    raw = await pickle_key(db_path, SecretsConfig(key_file=key))
    db = await open_database(DatabaseConfig(url=f"sqlite:{db_path}"))
    try:
        stored = await CryptoStore(db).meta(META_NAME)
    finally:
        await db.stop()
    assert stored is not None and stored.startswith("v1:")
    assert base64.b64encode(raw).decode() not in stored
    with pytest.raises(KeyUnavailable):
        SecretBox.from_config(SecretsConfig(key_file=None, key_env="EIMIS_NO_SUCH_VARIABLE"))
