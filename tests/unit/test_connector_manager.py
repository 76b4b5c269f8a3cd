"""Connectors managed at run time, without a homeserver: the ConnectorManager with a real
PandaLab sandbox behind it and its web routes served over real HTTP by the dispatcher; the
``eimis-bridge connector`` CLI changing the registry from "another process" and the running
manager following within its poll interval."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import ClientSession, web
from mautrix.util.async_db import Database

from bridge.cli import main
from bridge.config import Config, SecretsConfig, parse_config
from bridge.core.connector_manager import (
    ConfigConnector,
    ConnectorInUse,
    ConnectorManager,
    InvalidConnector,
    ProbeFailed,
    UnknownConnector,
    Wiring,
)
from bridge.core.connector_routes import ConnectorRoutes
from bridge.core.connectors import ConnectorSet
from bridge.core.held_connector import HeldConnector
from bridge.db.connector_registry import ConnectorRegistry
from bridge.db.connector_state import ConnectorStateStore
from bridge.devtools.ports import free_port
from bridge.devtools.sandboxes import vendor_sandbox
from bridge.devtools.stack import Sandbox
from connectors.base import ConnectorError, RemoteEvent
from connectors.kit.signing import sign
from connectors.pandalab.sandbox import create_app

from helpers import FakeClock, wait_until

POLL_S = 0.2


@dataclass
class Harness:
    """A running manager (as the bridge wires it) and the pieces around it."""

    config: Config
    config_path: Path
    db: Database
    manager: ConnectorManager
    connectors: ConnectorSet
    sandbox: Sandbox
    bridge_url: str
    wire: Any
    resumed: list[str] = field(default_factory=list)
    emitted: list[tuple[str, RemoteEvent]] = field(default_factory=list)
    clock: FakeClock = field(default_factory=FakeClock)
    """The registry's clock (grace periods end when the test moves it)."""

    def sandbox_settings(self) -> dict[str, Any]:
        return vendor_sandbox("pandalab").settings(self.sandbox.url)

    async def cli(self, *args: str) -> int:
        action, *rest = args
        return await asyncio.to_thread(
            main, ["connector", action, "-c", str(self.config_path), *rest]
        )


@pytest.fixture
async def harness(tmp_path: Path, database_url: str) -> AsyncIterator[Harness]:
    key_path = tmp_path / "bridge.key"
    key_path.write_text(base64.b64encode(os.urandom(32)).decode())
    key_path.chmod(0o600)
    sandbox_port, bridge_port = free_port(), free_port()
    sandbox = Sandbox("pandalab", f"http://127.0.0.1:{sandbox_port}", sandbox_port, create_app)
    await sandbox.start()
    raw = {
        "homeserver": {"url": "http://127.0.0.1:1", "domain": "eimis.example"},
        "appservice": {
            "address": f"http://127.0.0.1:{bridge_port}",
            "port": bridge_port,
            "as_token": "a",
            "hs_token": "b",
        },
        "database": {"url": database_url},
        "connectors": {
            "pandalab": {
                "type": "pandalab",
                "settings": vendor_sandbox("pandalab").settings(sandbox.url),
            }
        },
        "secrets": {"key_file": str(key_path)},
    }
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    config = parse_config(raw)
    from bridge.db.database import open_database

    db = await open_database(config.database)
    connectors = ConnectorSet()
    routes = ConnectorRoutes()
    app = web.Application()
    routes.mount(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", bridge_port).start()

    resumed: list[str] = []
    emitted: list[tuple[str, RemoteEvent]] = []

    def wire(connector_id: str) -> Wiring:
        async def emit(event: RemoteEvent) -> None:
            emitted.append((connector_id, event))

        async def emit_all(events: Sequence[RemoteEvent]) -> None:
            emitted.extend((connector_id, e) for e in events)

        return Wiring(
            emit,
            emit_all,
            ConnectorStateStore(db, connector_id),
            f"http://127.0.0.1:{bridge_port}/connectors/{connector_id}",
        )

    clock = FakeClock(time.time())
    manager = ConnectorManager(
        config,
        ConnectorRegistry(db, config.secrets, clock=clock),
        connectors=connectors,
        routes=routes,
        wire=wire,
        on_resumed=resumed.append,
        poll_interval_s=POLL_S,
    )
    await manager.load()
    await manager.start()
    harness = Harness(
        config,
        config_path,
        db,
        manager,
        connectors,
        sandbox,
        f"http://127.0.0.1:{bridge_port}",
        wire,
        resumed,
        emitted,
        clock,
    )
    try:
        yield harness
    finally:
        await manager.stop()
        await runner.cleanup()
        await sandbox.close()
        await db.stop()


async def post_webhook(http: ClientSession, url: str, secret: str, body: bytes) -> int:
    timestamp = str(int(time.time()))
    headers = {
        "X-PandaLab-Timestamp": timestamp,
        "X-PandaLab-Signature": sign(secret, timestamp, body),
        "Content-Type": "application/json",
    }
    async with http.post(url, data=body, headers=headers) as resp:
        return resp.status


# --- Validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("connector_id", "type_name", "settings", "why"),
    [
        ("Bad-Id", "pandalab", {}, "must be 1-32 lower-case letters and digits"),
        ("bot", "pandalab", {}, "not one of"),
        ("pandalab", "pandalab", {}, "a connector of the config file"),
        ("acme", "acme", {}, "unknown connector type 'acme'; installed types: "),
        ("acme", "pandalab", {"client_id": "x"}, "settings.api_url: Field required"),
        (
            "acme",
            "pandalab",
            {
                "api_url": "http://x",
                "client_id": "x",
                "client_secret": "s",
                "webhook_secret": "w",
                "replay_window_s": "soon",
            },
            "settings.replay_window_s: ",
        ),
    ],
)
async def test_bad_registrations_are_refused_with_the_rule(
    harness: Harness, connector_id: str, type_name: str, settings: dict[str, Any], why: str
) -> None:
    with pytest.raises(InvalidConnector, match=why.replace("(", r"\(")):
        await harness.manager.add(connector_id, type_name, settings)
    assert await harness.manager.registry.get(connector_id) is None or connector_id == "pandalab"


async def test_unknown_connectors_are_named(harness: Harness) -> None:
    for action in (harness.manager.enable, harness.manager.disable, harness.manager.test):
        with pytest.raises(UnknownConnector, match="no connector 'ghost'"):
            await action("ghost")
    with pytest.raises(UnknownConnector):
        await harness.manager.rotate_secret("ghost", 10)
    with pytest.raises(ConfigConnector, match="defined in the config file"):
        await harness.manager.remove("pandalab")


# --- The running manager ------------------------------------------------------------------------


async def test_a_connector_added_at_run_time_runs_and_serves_its_webhooks(
    harness: Harness, http: ClientSession
) -> None:
    result = await harness.manager.add("pandalab2", "pandalab", harness.sandbox_settings())
    assert result.running is True and result.problem is None
    assert result.webhook_base_url == f"{harness.bridge_url}/connectors/pandalab2"
    assert result.secret not in repr(result)
    assert harness.connectors.ids() == ["pandalab", "pandalab2"]
    assert "pandalab2" in harness.resumed

    webhook = f"{harness.bridge_url}/connectors/pandalab2/webhook"
    webhook_secret = harness.sandbox_settings()["webhook_secret"]
    # Through the dispatcher to the connector's own handler: the signature is checked there.
    assert await post_webhook(http, webhook, webhook_secret, b"{not json") == 400
    assert await post_webhook(http, webhook, "wrong-secret", b"{}") == 401
    async with http.get(webhook) as resp:
        assert resp.status == 405
    async with http.post(f"{harness.bridge_url}/connectors/pandalab2/nothing") as resp:
        assert resp.status == 404
    async with http.post(f"{harness.bridge_url}/connectors/nobody/webhook") as resp:
        assert resp.status == 404

    connector = harness.connectors.get("pandalab2")
    assert connector is not None
    assert connector.ctx.secrets.current() == result.secret
    assert await harness.manager.test("pandalab2") == (
        "pandalab2: the vendor answers and accepts the credentials (a user look-up)"
    )
    infos = {i.connector_id: i for i in await harness.manager.list()}
    assert infos["pandalab"].origin == "config" and infos["pandalab"].running
    assert infos["pandalab2"].origin == "runtime" and infos["pandalab2"].running
    assert infos["pandalab2"].secret_rotated_at is not None


async def test_disable_holds_the_connector_and_enable_resumes_it(
    harness: Harness, http: ClientSession
) -> None:
    await harness.manager.add("pandalab2", "pandalab", harness.sandbox_settings())
    info = await harness.manager.disable("pandalab2")
    assert not info.enabled and info.running is False
    held = harness.connectors.get("pandalab2")
    assert isinstance(held, HeldConnector)
    assert "pandalab2" in harness.connectors  # deliveries for it are still queued ...
    assert "pandalab2" not in harness.connectors.ids()  # ... but lookups skip it
    with pytest.raises(ConnectorError) as waiting:
        await held.send_message("c1", None)  # type: ignore[arg-type]
    assert waiting.value.unreachable and waiting.value.retriable
    async with http.post(f"{harness.bridge_url}/connectors/pandalab2/webhook") as resp:
        assert resp.status == 503 and resp.headers["Retry-After"]

    # A disabled connector can be tested (before it is enabled again, say).
    assert "answers" in await harness.manager.test("pandalab2")

    harness.resumed.clear()
    info = await harness.manager.enable("pandalab2")
    assert info.running is True
    assert not isinstance(harness.connectors.get("pandalab2"), HeldConnector)
    assert harness.resumed == ["pandalab2"]


async def test_a_config_connector_is_disabled_and_enabled_through_the_database(
    harness: Harness,
) -> None:
    await harness.manager.disable("pandalab")
    assert isinstance(harness.connectors.get("pandalab"), HeldConnector)
    record = await harness.manager.registry.get("pandalab")
    assert record is not None and record.overrides_config and not record.enabled
    info = await harness.manager.enable("pandalab")
    assert info.running and info.origin == "config"


async def test_the_cli_reaches_the_running_manager_within_its_poll(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = harness.sandbox_settings()
    args = [f"--set={k}={v}" for k, v in settings.items()]
    assert await harness.cli("add", "pandalab3", "--type", "pandalab", *args) == 0
    out = capsys.readouterr().out
    secret = out.strip().splitlines()[-1]
    assert len(secret) >= 40

    async def running() -> bool:
        connector = harness.connectors.get("pandalab3")
        return connector is not None and not isinstance(connector, HeldConnector)

    await wait_until(running)
    connector = harness.connectors.get("pandalab3")
    assert connector is not None and connector.ctx.secrets.current() == secret

    assert await harness.cli("disable", "pandalab3") == 0
    await wait_until(lambda: _is_held(harness, "pandalab3"))

    assert await harness.cli("rotate-secret", "pandalab3", "--grace", "0", "--yes") == 0
    new_secret = capsys.readouterr().out.strip().splitlines()[-1]
    assert await harness.cli("enable", "pandalab3") == 0
    await wait_until(running)
    connector = harness.connectors.get("pandalab3")
    assert connector is not None
    assert list(connector.ctx.secrets.accepted()) == [new_secret]

    assert await harness.cli("list") == 0
    listing = capsys.readouterr().out
    assert "pandalab3" in listing and "runtime" in listing and "config" in listing
    assert secret not in listing and new_secret not in listing

    assert await harness.cli("remove", "pandalab3", "--yes") == 0
    await wait_until(lambda: _gone(harness, "pandalab3"))


async def test_a_secret_rotated_in_the_running_bridge_keeps_the_old_one_for_the_grace(
    harness: Harness,
) -> None:
    first = (await harness.manager.add("pandalab2", "pandalab", harness.sandbox_settings())).secret
    connector = harness.connectors.get("pandalab2")
    assert connector is not None
    second = await harness.manager.rotate_secret("pandalab2", 0.4)
    assert second != first
    assert connector.ctx.secrets.current() == second
    assert list(connector.ctx.secrets.accepted()) == [second, first]
    harness.clock.advance(0.5)
    assert list(connector.ctx.secrets.accepted()) == [second]  # at once, no refresh needed
    info = await harness.manager.info("pandalab2")
    assert info.secret_grace_until is None


async def test_remove_refuses_while_portals_are_linked_unless_forced(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    await harness.manager.add("pandalab2", "pandalab", harness.sandbox_settings())
    await harness.db.execute(
        "INSERT INTO portal (room_id, voice, created_at) VALUES ('!a:x', '@v:x', 1)"
    )
    await harness.db.execute(
        "INSERT INTO portal_link (room_id, connector, conversation_id) "
        "VALUES ('!a:x', 'pandalab2', 'c1')"
    )
    with pytest.raises(ConnectorInUse, match="linked to 1 portal room"):
        await harness.manager.remove("pandalab2")
    assert await harness.cli("remove", "pandalab2", "--yes") == 1
    assert "--force" in capsys.readouterr().err
    await harness.manager.remove("pandalab2", force=True)
    assert "pandalab2" not in harness.connectors
    assert await harness.manager.registry.get("pandalab2") is None


async def test_a_connector_whose_vendor_is_down_is_held_then_started_when_it_answers(
    harness: Harness,
) -> None:
    await harness.sandbox.stop()
    try:
        result = await harness.manager.add("pandalab2", "pandalab", harness.sandbox_settings())
        assert result.running is False and "did not start" in (result.problem or "")
        assert isinstance(harness.connectors.get("pandalab2"), HeldConnector)
        with pytest.raises(ProbeFailed, match="pandalab2: "):
            await harness.manager.test("pandalab2")
    finally:
        await harness.sandbox.start()
    # Tried again (5 s after the first failure) by the poll.
    await wait_until(lambda: _running(harness, "pandalab2"), timeout=12)


async def test_the_cli_refuses_bad_input_with_a_sentence(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await harness.cli("add", "Bad", "--type", "pandalab") == 1
    assert "lower-case letters" in capsys.readouterr().err
    assert await harness.cli("add", "x2", "--type", "pandalab", "--set", "novalue") == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert await harness.cli("add", "x2", "--type", "pandalab", "--set", "api_url=${NOPE_X}") == 2
    assert "NOPE_X is not set" in capsys.readouterr().err
    assert await harness.cli("rotate-secret", "pandalab", "--grace", "soon", "--yes") == 2
    assert "duration" in capsys.readouterr().err
    assert await harness.cli("test", "ghost") == 1
    assert "no connector 'ghost'" in capsys.readouterr().err


async def test_settings_come_from_a_file_and_the_environment(
    harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = harness.sandbox_settings()
    monkeypatch.setenv("PL_CLIENT_SECRET", settings.pop("client_secret"))
    settings["client_secret"] = "${PL_CLIENT_SECRET}"
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(settings))
    args = ["--settings-file", str(path), "--set", "replay_window_s=120"]
    assert await harness.cli("add", "pandalab4", "--type", "pandalab", *args) == 0
    assert await harness.cli("test", "pandalab4") == 0  # the credentials from the env work
    record = await harness.manager.registry.get("pandalab4")
    assert record is not None and '"replay_window_s": 120' in record.sealed_settings


async def _is_held(harness: Harness, connector_id: str) -> bool:
    return isinstance(harness.connectors.get(connector_id), HeldConnector)


async def _gone(harness: Harness, connector_id: str) -> bool:
    return connector_id not in harness.connectors


async def _running(harness: Harness, connector_id: str) -> bool:
    return connector_id in harness.connectors.ids()


async def test_a_restarted_bridge_runs_what_was_registered_and_holds_what_it_cannot_open(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    added = await harness.manager.add("pandalab2", "pandalab", harness.sandbox_settings())
    await harness.manager.disable("pandalab")

    async def restarted(secrets: Any) -> tuple[ConnectorManager, ConnectorSet]:
        connectors = ConnectorSet()
        manager = ConnectorManager(
            harness.config,
            ConnectorRegistry(harness.db, secrets),
            connectors=connectors,
            routes=ConnectorRoutes(),
            wire=harness.wire,
        )
        await manager.load()
        await manager.start()
        return manager, connectors

    manager, connectors = await restarted(harness.config.secrets)
    try:
        assert connectors.ids() == ["pandalab2"]  # the config one stays disabled
        assert isinstance(connectors.get("pandalab"), HeldConnector)
        running = connectors.get("pandalab2")
        assert running is not None and running.ctx.secrets.current() == added.secret
    finally:
        await manager.stop()

    # Started without the key: the bridge runs, the sealed connector is held and says why.
    manager, connectors = await restarted(SecretsConfig(key_env="EIMIS_TEST_NO_SUCH_VARIABLE"))
    try:
        assert "pandalab2" in connectors and "pandalab2" not in connectors.ids()
        info = await manager.info("pandalab2")
        assert info.running is False and "generate-key" in (info.problem or "")
        assert "Connector pandalab2 cannot run" in caplog.text
    finally:
        await manager.stop()


async def test_the_key_is_rotated_with_the_cli(
    harness: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    added = await harness.manager.add("pandalab2", "pandalab", harness.sandbox_settings())
    old_key = harness.config.secrets.key_file
    assert old_key is not None
    new_key = tmp_path / "new.key"
    assert await asyncio.to_thread(main, ["secrets", "generate-key", "--out", str(new_key)]) == 0
    raw = yaml.safe_load(harness.config_path.read_text())
    raw["secrets"] = {"key_file": str(new_key), "previous_key_files": [str(old_key)]}
    rotated_config = tmp_path / "rotated.yaml"
    rotated_config.write_text(yaml.safe_dump(raw))
    capsys.readouterr()

    def secrets_cli(*args: str) -> int:
        return main(["secrets", *args, "-c", str(rotated_config)])

    assert await asyncio.to_thread(secrets_cli, "rotate") == 0
    out = capsys.readouterr().out
    assert "3 value(s) sealed again" in out  # two credentials and the shared secret
    assert await asyncio.to_thread(secrets_cli, "status") == 0
    assert "Previous key" in (out := capsys.readouterr().out) and ": 0 value(s)" in out

    # Only the new key is needed from now on.
    raw["secrets"] = {"key_file": str(new_key)}
    rotated_config.write_text(yaml.safe_dump(raw))
    registry = ConnectorRegistry(harness.db, parse_config(raw).secrets)
    assert [s.value for s in await registry.secrets("pandalab2")] == [added.secret]
    # ... and the old one alone opens nothing any more.
    assert await harness.cli("list") == 0
    assert "not configured" in capsys.readouterr().out
