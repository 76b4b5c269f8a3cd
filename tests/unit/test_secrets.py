"""Secrets at rest (bridge/secrets.py): AES-256-GCM sealing under the operator's key, bound to
each value's place, opened by previous keys during a rotation, and never shown."""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path

import pytest

from bridge.cli import main
from bridge.config import ConfigError, SecretsConfig
from bridge.secrets import (
    KeyUnavailable,
    NotSealed,
    SecretBox,
    TamperedValue,
    UnknownKey,
    generate_key,
    is_sealed,
    key_id,
    parse_key,
    sealed_key_id,
)

SECRET = "pl-client-secret-Zq93kd0"
PLACE = "connector_instance/pandalab2/settings/client_secret"


def raw_key() -> bytes:
    return os.urandom(32)


def key_file(tmp_path: Path, name: str, key: bytes | None = None) -> Path:
    path = tmp_path / name
    path.write_text(base64.b64encode(key or raw_key()).decode() + "\n")
    path.chmod(0o600)
    return path


def test_a_sealed_value_opens_to_what_was_sealed_and_shows_nothing_of_it() -> None:
    box = SecretBox(raw_key())
    sealed = box.seal(SECRET, PLACE)
    assert SECRET not in sealed
    assert sealed.startswith(f"v1:{box.key_id}:")
    assert is_sealed(sealed) and sealed_key_id(sealed) == box.key_id
    assert box.open(sealed, PLACE) == SECRET


def test_sealing_twice_gives_different_texts() -> None:
    box = SecretBox(raw_key())
    assert box.seal(SECRET, PLACE) != box.seal(SECRET, PLACE)  # a fresh nonce each time


def test_unicode_and_empty_values_round_trip() -> None:
    box = SecretBox(raw_key())
    for value in ("", "clé-secrète-🔑", "x" * 10_000):
        assert box.open(box.seal(value, PLACE), PLACE) == value


def test_a_tampered_value_is_refused() -> None:
    box = SecretBox(raw_key())
    sealed = box.seal(SECRET, PLACE)
    head, data = sealed.rsplit(":", 1)
    raw = bytearray(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))
    raw[-1] ^= 1
    altered = f"{head}:{base64.urlsafe_b64encode(bytes(raw)).decode().rstrip('=')}"
    with pytest.raises(TamperedValue) as refused:
        box.open(altered, PLACE)
    assert SECRET not in str(refused.value)


def test_a_value_copied_to_another_place_does_not_open_there() -> None:
    box = SecretBox(raw_key())
    sealed = box.seal(SECRET, PLACE)
    with pytest.raises(TamperedValue, match="altered or copied"):
        box.open(sealed, "connector_instance/other/settings/client_secret")
    with pytest.raises(TamperedValue):
        box.open(sealed, "connector_instance/pandalab2/settings/webhook_secret")


def test_a_value_whose_key_id_is_changed_is_refused() -> None:
    old, new = raw_key(), raw_key()
    box = SecretBox(new, [old])
    sealed = box.seal(SECRET, PLACE)
    swapped = sealed.replace(key_id(new), key_id(old))
    with pytest.raises(TamperedValue):
        box.open(swapped, PLACE)


def test_previous_keys_open_what_they_sealed_and_new_values_use_the_current_key() -> None:
    old, new = raw_key(), raw_key()
    sealed_before = SecretBox(old).seal(SECRET, PLACE)
    rotated = SecretBox(new, [old])
    assert rotated.open(sealed_before, PLACE) == SECRET
    assert rotated.needs_resealing(sealed_before)
    sealed_after = rotated.seal(SECRET, PLACE)
    assert sealed_key_id(sealed_after) == key_id(new)
    assert not rotated.needs_resealing(sealed_after)
    assert rotated.key_ids == (key_id(new), key_id(old))


def test_a_value_sealed_with_an_unknown_key_names_the_key_and_the_remedy() -> None:
    stranger = SecretBox(raw_key())
    sealed = stranger.seal(SECRET, PLACE)
    box = SecretBox(raw_key())
    with pytest.raises(UnknownKey) as refused:
        box.open(sealed, PLACE)
    assert stranger.key_id in str(refused.value)
    assert "previous_key_files" in str(refused.value)


@pytest.mark.parametrize("text", ["", "v1:abc", "v2:abcdef12:AAAA", "v1:abcdef12:!!!", "plain"])
def test_text_that_is_not_a_sealed_value_is_said_so(text: str) -> None:
    assert not is_sealed(text)
    with pytest.raises(NotSealed):
        SecretBox(raw_key()).open(text, PLACE)


def test_the_key_comes_from_the_key_file(tmp_path: Path) -> None:
    key = raw_key()
    box = SecretBox.from_config(SecretsConfig(key_file=key_file(tmp_path, "k", key)), environ={})
    assert box.key_id == key_id(key)
    assert box.open(SecretBox(key).seal(SECRET, PLACE), PLACE) == SECRET


def test_the_key_file_wins_over_the_environment(tmp_path: Path) -> None:
    file_key, env_key = raw_key(), raw_key()
    config = SecretsConfig(key_file=key_file(tmp_path, "k", file_key))
    env = {"EIMIS_SECRETS_KEY": base64.b64encode(env_key).decode()}
    assert SecretBox.from_config(config, environ=env).key_id == key_id(file_key)


def test_the_key_comes_from_the_named_environment_variable() -> None:
    key = raw_key()
    config = SecretsConfig(key_env="MY_KEY")
    box = SecretBox.from_config(config, environ={"MY_KEY": base64.urlsafe_b64encode(key).decode()})
    assert box.key_id == key_id(key)


def test_previous_key_files_open_old_values(tmp_path: Path) -> None:
    old, new = raw_key(), raw_key()
    sealed = SecretBox(old).seal(SECRET, PLACE)
    previous = (key_file(tmp_path, "old", old),)
    config = SecretsConfig(key_file=key_file(tmp_path, "new", new), previous_key_files=previous)
    assert SecretBox.from_config(config, environ={}).open(sealed, PLACE) == SECRET


def test_no_key_says_how_to_make_one() -> None:
    with pytest.raises(KeyUnavailable) as missing:
        SecretBox.from_config(SecretsConfig(), environ={})
    message = str(missing.value)
    assert "EIMIS_SECRETS_KEY" in message and "secrets.key_file" in message
    assert "eimis-bridge secrets generate-key" in message
    assert isinstance(missing.value, ConfigError)  # the CLI reports it as a configuration error


def test_a_missing_key_file_is_named(tmp_path: Path) -> None:
    config = SecretsConfig(key_file=tmp_path / "absent.key")
    with pytest.raises(KeyUnavailable, match="absent.key does not exist.*generate-key"):
        SecretBox.from_config(config, environ={})


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (base64.b64encode(b"short").decode(), "holds 5 bytes; a key is 32"),
        (base64.b64encode(os.urandom(64)).decode(), "holds 64 bytes"),
        ("not base64 at all!", "is not base64"),
        ("", "is empty"),
    ],
)
def test_a_key_of_the_wrong_form_is_refused_without_showing_it(
    tmp_path: Path, content: str, why: str
) -> None:
    path = tmp_path / "bad.key"
    path.write_text(content)
    with pytest.raises(KeyUnavailable, match=why) as refused:
        SecretBox.from_config(SecretsConfig(key_file=path), environ={})
    if content:
        assert content not in str(refused.value)


def test_a_key_file_readable_by_others_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = raw_key()
    path = key_file(tmp_path, "open.key", key)
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="eimis.secrets"):
        SecretBox.from_config(SecretsConfig(key_file=path), environ={})
    assert "chmod 600" in caplog.text
    assert base64.b64encode(key).decode() not in caplog.text


def test_nothing_secret_in_reprs_errors_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    key = raw_key()
    encoded = base64.b64encode(key).decode()
    with caplog.at_level(logging.DEBUG):
        box = SecretBox(key)
        sealed = box.seal(SECRET, PLACE)
        texts = [repr(box), str(box)]
        for attempt in (lambda: box.open(sealed, "elsewhere"), lambda: box.open("junk", PLACE)):
            with pytest.raises(Exception) as error:
                attempt()
            texts.append(str(error.value))
    for text in [*texts, caplog.text]:
        assert SECRET not in text and encoded not in text and key.hex() not in text


def test_generate_key_makes_32_random_bytes() -> None:
    first, second = generate_key(), generate_key()
    assert first != second
    assert len(parse_key(first, "k")) == 32


def test_the_cli_writes_a_new_key_readable_by_its_owner_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bridge.key"
    assert main(["secrets", "generate-key", "--out", str(out)]) == 0
    assert out.stat().st_mode & 0o777 == 0o600
    key = parse_key(out.read_text(), "k")
    printed = capsys.readouterr().out
    assert key_id(key) in printed and out.read_text().strip() not in printed
    # An existing key is never overwritten by accident.
    assert main(["secrets", "generate-key", "--out", str(out)]) == 1
    assert parse_key(out.read_text(), "k") == key
