"""The registry of connectors added at run time, on SQLite and PostgreSQL: settings and shared
secrets sealed at rest (the raw rows hold none in clear), rotation with a grace period, key
rotation, and the fingerprint a running bridge polls."""

from __future__ import annotations

import json
import os
import time

import pytest
from mautrix.util.async_db import Database
from pydantic import BaseModel, SecretStr

from bridge.config import SecretsConfig
from bridge.db.connector_registry import (
    ConnectorRegistry,
    DuplicateConnector,
    UnsupportedSettings,
    secret_paths,
)
from bridge.db.connector_state import ConnectorStateStore
from bridge.secrets import KeyUnavailable, SecretBox, TamperedValue, UnknownKey, key_id
from connectors.pandalab.connector import PandaLabSettings

from helpers import FakeClock

CLIENT_SECRET = "client-secret-8hf2Lx0q"
WEBHOOK_SECRET = "webhook-secret-Pz71mQ4v"
SHARED = "shared-secret-Yq0e3Jd8s"
NO_KEY = SecretsConfig(key_env="EIMIS_TEST_NO_SUCH_VARIABLE")


def settings() -> PandaLabSettings:
    return PandaLabSettings(
        api_url="http://127.0.0.1:9",
        client_id="bridge",
        client_secret=SecretStr(CLIENT_SECRET),
        webhook_secret=SecretStr(WEBHOOK_SECRET),
    )


@pytest.fixture
def key() -> bytes:
    return os.urandom(32)


@pytest.fixture
def box(key: bytes) -> SecretBox:
    return SecretBox(key)


@pytest.fixture
def clock() -> FakeClock:
    """The registry's clock: a grace period ends when the test moves it."""
    return FakeClock(time.time())


@pytest.fixture
def registry(db: Database, box: SecretBox, clock: FakeClock) -> ConnectorRegistry:
    return ConnectorRegistry(db, box, clock=clock)


async def raw_rows(db: Database) -> str:
    """Everything the two tables hold, as text: what someone with the database alone sees."""
    instances = await db.fetch("SELECT * FROM connector_instance")
    secrets = await db.fetch("SELECT * FROM connector_secret")
    return json.dumps([[list(r) for r in instances], [list(r) for r in secrets]], default=str)


async def test_a_registered_connector_keeps_its_credentials_and_secret_sealed(
    db: Database, registry: ConnectorRegistry
) -> None:
    record = await registry.add("pandalab2", "pandalab", settings(), secret=SHARED)
    assert record.enabled and not record.overrides_config
    assert SHARED not in repr(record) and CLIENT_SECRET not in repr(record)

    stored = await raw_rows(db)
    for secret in (CLIENT_SECRET, WEBHOOK_SECRET, SHARED):
        assert secret not in stored
    assert "http://127.0.0.1:9" in stored  # what is not secret stays readable

    opened = registry.open_settings(record, PandaLabSettings)
    assert isinstance(opened, PandaLabSettings)
    assert opened.client_secret.get_secret_value() == CLIENT_SECRET
    assert opened.webhook_secret.get_secret_value() == WEBHOOK_SECRET
    assert [s.value for s in await registry.secrets("pandalab2")] == [SHARED]


async def test_only_the_settings_given_are_stored(registry: ConnectorRegistry) -> None:
    record = await registry.add("pandalab2", "pandalab", settings(), secret=None)
    stored = json.loads(record.sealed_settings)
    assert "replay_window_s" not in stored  # the default stays the code's, not frozen here
    assert set(stored) == {"api_url", "client_id", "client_secret", "webhook_secret"}


async def test_settings_sealed_for_one_connector_do_not_open_for_another(
    db: Database, registry: ConnectorRegistry
) -> None:
    await registry.add("one", "pandalab", settings(), secret=None)
    await registry.add("two", "pandalab", settings(), secret=None)
    one = await registry.get("one")
    assert one is not None
    # Someone with write access to the database copies one row's sealed settings to another.
    await db.execute(
        "UPDATE connector_instance SET settings = $1 WHERE connector_id = 'two'",
        one.sealed_settings,
    )
    two = await registry.get("two")
    assert two is not None
    with pytest.raises(TamperedValue):
        registry.open_settings(two, PandaLabSettings)


async def test_a_secret_swapped_between_rows_does_not_open(
    db: Database, registry: ConnectorRegistry
) -> None:
    await registry.add("one", "pandalab", settings(), secret="first-secret")
    await registry.add("two", "pandalab", settings(), secret="second-secret")
    sealed_one = await db.fetchval("SELECT sealed FROM connector_secret WHERE connector_id = 'one'")
    await db.execute(
        "UPDATE connector_secret SET sealed = $1 WHERE connector_id = 'two'", sealed_one
    )
    with pytest.raises(TamperedValue):
        await registry.secrets("two")


async def test_an_id_is_registered_once(registry: ConnectorRegistry) -> None:
    await registry.add("pandalab2", "pandalab", settings(), secret=SHARED)
    with pytest.raises(DuplicateConnector):
        await registry.add("pandalab2", "pandalab", settings(), secret=SHARED)


async def test_settings_without_secrets_need_no_key(db: Database) -> None:
    class Plain(BaseModel):
        url: str

    registry = ConnectorRegistry(db, NO_KEY)
    record = await registry.add("plain", "plaintype", Plain(url="http://x"), secret=None)
    assert registry.open_settings(record, Plain) == Plain(url="http://x")
    with pytest.raises(KeyUnavailable, match="generate-key"):
        await registry.add("sealed", "pandalab", settings(), secret=None)


async def test_enable_disable_and_config_overrides(registry: ConnectorRegistry) -> None:
    await registry.add("pandalab2", "pandalab", settings(), secret=None)
    assert await registry.set_enabled("pandalab2", False)
    record = await registry.get("pandalab2")
    assert record is not None and not record.enabled
    assert not await registry.set_enabled("absent", True)

    await registry.override("pandalab", "pandalab", enabled=False)
    override = await registry.get("pandalab")
    assert override is not None and override.overrides_config and not override.enabled
    await registry.override("pandalab", "pandalab", enabled=True)
    override = await registry.get("pandalab")
    assert override is not None and override.enabled
    assert [r.connector_id for r in await registry.list()] == ["pandalab2", "pandalab"]


async def test_update_settings_seals_them_again(db: Database, registry: ConnectorRegistry) -> None:
    await registry.add("pandalab2", "pandalab", settings(), secret=None)
    changed = settings().model_copy(update={"client_secret": SecretStr("new-client-secret-77")})
    assert await registry.update_settings("pandalab2", changed)
    record = await registry.get("pandalab2")
    assert record is not None
    opened = registry.open_settings(record, PandaLabSettings)
    assert isinstance(opened, PandaLabSettings)
    assert opened.client_secret.get_secret_value() == "new-client-secret-77"
    assert "new-client-secret-77" not in await raw_rows(db)


async def test_rotation_keeps_the_previous_secret_for_the_grace_period(
    db: Database, registry: ConnectorRegistry, clock: FakeClock
) -> None:
    await registry.add("pandalab2", "pandalab", settings(), secret="old-secret")
    status = await registry.rotate_secret("pandalab2", "new-secret", grace_s=0.5)
    assert status.rotated_at is not None and status.grace_until is not None
    secrets = await registry.secrets("pandalab2")
    assert [s.value for s in secrets] == ["new-secret", "old-secret"]
    assert secrets[0].valid_until is None and secrets[1].valid_until == status.grace_until
    assert "new-secret" not in await raw_rows(db) and "old-secret" not in await raw_rows(db)

    clock.advance(0.6)
    assert [s.value for s in await registry.secrets("pandalab2")] == ["new-secret"]
    assert await db.fetchval("SELECT COUNT(*) FROM connector_secret") == 1  # purged
    assert (await registry.secret_status("pandalab2")).grace_until is None


async def test_rotation_without_grace_refuses_the_previous_secret_at_once(
    registry: ConnectorRegistry,
) -> None:
    await registry.add("pandalab2", "pandalab", settings(), secret="old-secret")
    await registry.rotate_secret("pandalab2", "next-secret", grace_s=60)
    await registry.rotate_secret("pandalab2", "newest-secret", grace_s=0)
    # The one in its grace period keeps it; the current one is dropped at once.
    assert [s.value for s in await registry.secrets("pandalab2")] == [
        "newest-secret",
        "old-secret",
    ]


async def test_a_config_connector_can_hold_a_secret_without_a_row(
    registry: ConnectorRegistry,
) -> None:
    await registry.rotate_secret("pandalab", "first-secret", grace_s=10)
    assert [s.value for s in await registry.secrets("pandalab")] == ["first-secret"]
    assert await registry.get("pandalab") is None


async def test_the_fingerprint_moves_with_every_change(
    db: Database, registry: ConnectorRegistry
) -> None:
    seen = {await registry.fingerprint()}

    async def changed() -> None:
        fingerprint = await registry.fingerprint()
        assert fingerprint not in seen
        seen.add(fingerprint)

    await registry.add("pandalab2", "pandalab", settings(), secret="s1")
    await changed()
    await registry.set_enabled("pandalab2", False)
    await changed()
    await registry.set_enabled("pandalab2", True)  # back to a state seen before, yet news
    await changed()
    await registry.rotate_secret("pandalab2", "s2", grace_s=0)
    await changed()
    await registry.override("pandalab", "pandalab", enabled=False)
    await changed()
    await registry.remove("pandalab2")
    await changed()


async def test_remove_forgets_the_connector_its_secrets_and_its_state(
    db: Database, registry: ConnectorRegistry
) -> None:
    await registry.add("pandalab2", "pandalab", settings(), secret=SHARED)
    await ConnectorStateStore(db, "pandalab2").set("cursor", "42")
    await ConnectorStateStore(db, "pandalab").set("cursor", "7")
    assert await registry.remove("pandalab2")
    assert await registry.get("pandalab2") is None
    assert await registry.secrets("pandalab2") == []
    assert await ConnectorStateStore(db, "pandalab2").get("cursor") is None
    assert await ConnectorStateStore(db, "pandalab").get("cursor") == "7"
    assert not await registry.remove("pandalab2")


async def test_linked_portals_are_counted(db: Database, registry: ConnectorRegistry) -> None:
    await db.execute(
        "INSERT INTO portal (room_id, voice, created_at) VALUES ('!a:x', '@v:x', 1), "
        "('!b:x', '@v:x', 2)"
    )
    await db.execute(
        "INSERT INTO portal_link (room_id, connector, conversation_id) VALUES "
        "('!a:x', 'pandalab2', 'c1'), ('!b:x', 'pandalab2', 'c2'), ('!b:x', 'medipeps', 'c3')"
    )
    assert await registry.linked_portals("pandalab2") == 2
    assert await registry.linked_portals("other") == 0


async def test_key_rotation_seals_everything_again_with_the_new_key(
    db: Database, key: bytes, box: SecretBox
) -> None:
    old_registry = ConnectorRegistry(db, box)
    await old_registry.add("pandalab2", "pandalab", settings(), secret=SHARED)
    await old_registry.rotate_secret("pandalab2", "next-shared", grace_s=60)
    assert await old_registry.key_usage() == {box.key_id: 4}

    new_key = os.urandom(32)
    rotating = ConnectorRegistry(db, SecretBox(new_key, [os.urandom(32)]))
    with pytest.raises(UnknownKey):  # the old key is not among the previous ones: nothing moves
        await rotating.reseal()
    assert await old_registry.key_usage() == {box.key_id: 4}

    rotating = ConnectorRegistry(db, SecretBox(new_key, [key]))
    report = await rotating.reseal()
    assert (report.resealed, report.already_current) == (4, 0)
    assert await rotating.key_usage() == {key_id(new_key): 4}
    assert (await rotating.reseal()).already_current == 4

    only_new = ConnectorRegistry(db, SecretBox(new_key))
    record = await only_new.get("pandalab2")
    assert record is not None
    opened = only_new.open_settings(record, PandaLabSettings)
    assert isinstance(opened, PandaLabSettings)
    assert opened.client_secret.get_secret_value() == CLIENT_SECRET
    assert [s.value for s in await only_new.secrets("pandalab2")] == ["next-shared", SHARED]
    for secret in (CLIENT_SECRET, WEBHOOK_SECRET, SHARED, "next-shared"):
        assert secret not in await raw_rows(db)


def test_secret_fields_are_found_in_nested_models_and_unsealable_ones_refused() -> None:
    class Inner(BaseModel):
        token: SecretStr
        name: str = ""

    class Outer(BaseModel):
        api_key: SecretStr
        optional: SecretStr | None = None
        inner: Inner | None = None
        plain: str = ""

    assert sorted(secret_paths(Outer)) == [("api_key",), ("inner", "token"), ("optional",)]
    assert sorted(secret_paths(PandaLabSettings)) == [("client_secret",), ("webhook_secret",)]

    class Listed(BaseModel):
        keys: list[SecretStr]

    with pytest.raises(UnsupportedSettings, match="list or mapping"):
        secret_paths(Listed)
