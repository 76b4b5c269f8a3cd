"""Connectors registered at run time, end to end through a real Synapse: an operator adds a
second PandaLab-style instance with the CLI while the bridge runs; without a restart (or a new
appservice registration) its vendor's webhooks reach it through the dispatcher and its users
talk with a Medipeps-style user; disabling it holds what is sent to it, enabling it delivers
that. A connector signing with the bridge-held shared secret keeps accepting the previous secret
for the grace period of a rotation, and refuses it after. No secret is ever in the logs or, in
clear, in the database."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from aiohttp import ClientSession
from pydantic import SecretStr

import bridge.core.connectors as connector_types
from bridge.app import Bridge
from bridge.cli import main
from bridge.core.held_connector import HeldConnector
from bridge.devtools.demo import SandboxUser
from bridge.devtools.ports import free_port
from bridge.devtools.sandboxes import vendor_sandbox
from bridge.devtools.stack import LocalStack, Sandbox
from connectors.kit.signing import sign
from connectors.pandalab import PandaLabConnector
from connectors.pandalab.sandbox import create_app

from e2e_helpers import conversation_titled, received, unique, users_of
from helpers import wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    state = Path(tmp_path_factory.mktemp("stack"))
    key = state / "secrets.key"
    key.write_text(base64.b64encode(os.urandom(32)).decode())
    key.chmod(0o600)
    overrides = {"secrets": {"key_file": str(key)}}
    async with LocalStack(state, config_overrides=overrides) as local:
        yield local


@pytest.fixture
async def vendor() -> AsyncIterator[Sandbox]:
    """A second PandaLab-style vendor, started by the test (the bridge has never heard of it)."""
    port = free_port()
    sandbox = Sandbox("pandalab", f"http://127.0.0.1:{port}", port, create_app)
    await sandbox.start()
    try:
        yield sandbox
    finally:
        await sandbox.close()


async def cli(stack: LocalStack, *args: str) -> int:
    """The operator's command, in another thread, against the running stack's config file."""
    action, *rest = args
    config = stack.state_dir / "config.yaml"
    return await asyncio.to_thread(main, ["connector", action, "-c", str(config), *rest])


def settings_args(sandbox: Sandbox) -> list[str]:
    return [f"--set={k}={v}" for k, v in vendor_sandbox("pandalab").settings(sandbox.url).items()]


async def vendor_users(http: ClientSession, sandbox: Sandbox) -> list[SandboxUser]:
    async with http.get(f"{sandbox.url}/_sandbox/users") as resp:
        users = (await resp.json())["users"]
    return [SandboxUser(http, sandbox, user) for user in users]


def running_bridge(stack: LocalStack) -> Bridge:
    assert stack.bridge is not None
    return stack.bridge


async def running(stack: LocalStack, connector_id: str) -> bool:
    return connector_id in running_bridge(stack).connectors.ids()


async def held(stack: LocalStack, connector_id: str) -> bool:
    return isinstance(running_bridge(stack).connectors.get(connector_id), HeldConnector)


async def database_text(stack: LocalStack) -> str:
    """The two registry tables as someone holding only the database reads them."""
    db = running_bridge(stack).db
    rows = [
        [list(r) for r in await db.fetch("SELECT * FROM connector_instance")],
        [list(r) for r in await db.fetch("SELECT * FROM connector_secret")],
    ]
    return json.dumps(rows, default=str)


def last_line(out: str) -> str:
    return out.strip().splitlines()[-1]


async def test_a_connector_added_at_run_time_bridges_is_held_when_disabled_and_resumes(
    stack: LocalStack,
    vendor: Sandbox,
    http: ClientSession,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    bridge = running_bridge(stack)
    assert await cli(stack, "add", "pandalab2", "--type", "pandalab", *settings_args(vendor)) == 0
    shared = last_line(capsys.readouterr().out)
    await wait_until(lambda: running(stack, "pandalab2"), 15, "the bridge to start pandalab2")
    assert running_bridge(stack) is bridge, "no restart"

    # The new vendor's user opens a conversation with a Medipeps-style user: the vendor's
    # webhook reaches the bridge at /connectors/pandalab2/webhook, through the dispatcher.
    camille = (await vendor_users(http, vendor))[0]
    bob = (await users_of(stack, http, "medipeps"))[2]
    title = unique("Second PandaLab instance")
    conversation = await camille.start_conversation([bob.idnps], title)
    hello = unique("Bonjour depuis la deuxième instance")
    await camille.send(conversation, hello)
    seen = await wait_until(lambda: received(bob, hello), 30, "Bob to get the message")
    assert seen["sender"] == camille.idnps

    bob_side = await wait_until(lambda: conversation_titled(bob, title), 30, "Bob's conversation")
    reply = unique("Bien reçu")
    await bob.send(bob_side, reply)
    await wait_until(lambda: received(camille, reply), 30, "Camille to get the reply")

    # Disabled: its webhooks answer 503 and what Bob writes waits for it.
    assert await cli(stack, "disable", "pandalab2") == 0
    await wait_until(lambda: held(stack, "pandalab2"), 15, "the bridge to hold pandalab2")
    async with http.post(f"{stack.bridge_url}/connectors/pandalab2/webhook", data=b"{}") as resp:
        assert resp.status == 503
    waiting = unique("Message pendant la désactivation")
    await bob.send(bob_side, waiting)

    async def queued() -> bool:
        rows = await bridge.db.fetch(
            "SELECT state FROM outbox WHERE connector = 'pandalab2' ORDER BY seq DESC LIMIT 1"
        )
        return bool(rows) and rows[0]["state"] == "pending"

    await wait_until(queued, 30, "the delivery to wait in the outbox")

    async def tried_and_held() -> bool:
        rows = await bridge.db.fetch(
            "SELECT attempts FROM outbox WHERE connector = 'pandalab2' ORDER BY seq DESC LIMIT 1"
        )
        return bool(rows) and rows[0]["attempts"] >= 1

    # The bridge tried it and the held connector made it wait: it went no further.
    await wait_until(tried_and_held, 30, "the held connector to turn the delivery back")
    assert await received(camille, waiting) is None
    assert await queued(), "held, not failed"

    # Enabled again: the waiting message goes out.
    assert await cli(stack, "enable", "pandalab2") == 0
    await wait_until(lambda: received(camille, waiting), 30, "Camille to get what waited")

    assert await cli(stack, "list") == 0
    listing = capsys.readouterr().out
    assert "pandalab2" in listing and "runtime" in listing
    credentials = vendor_sandbox("pandalab").settings(vendor.url)
    assert "Connector pandalab2 (pandalab) started" in caplog.text  # the logs were captured
    for secret in (shared, credentials["client_secret"], credentials["webhook_secret"]):
        assert secret not in caplog.text
        assert secret not in await database_text(stack)
        assert secret not in listing

    assert await cli(stack, "remove", "pandalab2", "--yes") == 1  # a portal is linked to it
    assert "--force" in capsys.readouterr().err
    assert await cli(stack, "remove", "pandalab2", "--yes", "--force") == 0
    await wait_until(lambda: _gone(stack, "pandalab2"), 15, "pandalab2 to be gone")


async def _gone(stack: LocalStack, connector_id: str) -> bool:
    return connector_id not in running_bridge(stack).connectors


class SharedSecretPandaLab(PandaLabConnector):
    """A PandaLab-style connector whose webhooks are signed with the secret the bridge holds
    (``ctx.secrets``, read at each use), as connectors registered at run time do: the secret
    ``connector add`` shows is the one the vendor signs with."""

    type_name: ClassVar[str] = "sharedlab"

    async def start(self) -> None:
        secret = self.ctx.secrets.current()
        assert secret is not None
        await self.client.set_webhook(self.webhook_url, SecretStr(secret))

    def _check_signature(
        self, timestamp: str | None, signature: str | None, raw: bytes
    ) -> str | None:
        refusal: str | None = "no shared secret"
        for secret in self.ctx.secrets.accepted():
            self.settings = self.settings.model_copy(update={"webhook_secret": SecretStr(secret)})
            refusal = super()._check_signature(timestamp, signature, raw)
            if refusal is None:
                return None
        return refusal


class _SharedSecretType:
    name = SharedSecretPandaLab.type_name

    def load(self) -> type[SharedSecretPandaLab]:
        return SharedSecretPandaLab


@pytest.fixture
def sharedlab_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test's connector type installed, as an entry point would install it."""
    real = connector_types.entry_points

    def entry_points(*, group: str) -> list[Any]:
        return [*real(group=group), _SharedSecretType()]

    monkeypatch.setattr(connector_types, "entry_points", entry_points)


async def post_signed(http: ClientSession, url: str, secret: str) -> int:
    """A webhook whose body is not JSON: 401 if the signature is refused, 400 if accepted."""
    body = b"{not json"
    timestamp = str(int(time.time()))
    headers = {
        "X-PandaLab-Timestamp": timestamp,
        "X-PandaLab-Signature": sign(secret, timestamp, body),
    }
    async with http.post(url, data=body, headers=headers) as resp:
        return resp.status


async def _refused(http: ClientSession, url: str, secret: str) -> bool:
    return await post_signed(http, url, secret) == 401


async def test_a_rotated_secret_is_accepted_for_the_grace_period_then_refused(
    stack: LocalStack,
    vendor: Sandbox,
    http: ClientSession,
    sharedlab_installed: None,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    bridge = running_bridge(stack)
    args = settings_args(vendor)
    assert await cli(stack, "add", "shared1", "--type", "sharedlab", *args) == 0
    first = last_line(capsys.readouterr().out)
    await wait_until(lambda: running(stack, "shared1"), 15, "the bridge to start shared1")

    # The vendor signs with the shared secret: messages cross.
    camille = (await vendor_users(http, vendor))[1]
    bob = (await users_of(stack, http, "medipeps"))[3]
    conversation = await camille.start_conversation([bob.idnps], unique("Shared secret"))
    hello = unique("Signé avec le secret partagé")
    await camille.send(conversation, hello)
    await wait_until(lambda: received(bob, hello), 30, "Bob to get the signed message")

    grace_s = 8
    rotate = ["rotate-secret", "shared1", "--grace", f"{grace_s}s", "--yes"]
    assert await cli(stack, *rotate) == 0
    second = last_line(capsys.readouterr().out)
    assert second != first
    connector = bridge.connectors.get("shared1")
    assert connector is not None

    async def rotated() -> bool:
        return connector.ctx.secrets.current() == second

    await wait_until(rotated, 10, "the bridge to take the new secret")
    webhook = f"{stack.bridge_url}/connectors/shared1/webhook"
    status = await bridge.stores.connector_registry.secret_status("shared1")
    assert status.grace_until is not None
    assert await post_signed(http, webhook, second) == 400
    assert time.time() * 1000 < status.grace_until - 500, "checked inside the grace period"
    assert await post_signed(http, webhook, first) == 400  # still accepted
    assert await post_signed(http, webhook, "a-guess") == 401

    # The bridge's real clock runs the grace period out (the CLI and the bridge share none but
    # the database's): wait for the refusal, the grace period bounding the wait.
    await wait_until(
        lambda: _refused(http, webhook, first),
        grace_s + 10,
        "the previous secret to be refused once the grace period is over",
    )
    assert time.time() * 1000 >= status.grace_until, "not refused before the grace period's end"
    assert await post_signed(http, webhook, first) == 401  # the grace period is over
    assert await post_signed(http, webhook, second) == 400

    for secret in (first, second):
        assert secret not in caplog.text
        assert secret not in await database_text(stack)
    assert await cli(stack, "remove", "shared1", "--yes", "--force") == 0
    await wait_until(lambda: _gone(stack, "shared1"), 15, "shared1 to be gone")


async def test_the_webhook_dispatcher_answers_unknown_connectors_with_404(
    stack: LocalStack, http: ClientSession
) -> None:
    async with http.post(f"{stack.bridge_url}/connectors/nobody/webhook", data=b"{}") as resp:
        assert resp.status == 404
    # The config connectors' webhooks are served by the same dispatcher.
    async with http.post(f"{stack.bridge_url}/connectors/pandalab/webhook", data=b"{}") as resp:
        assert resp.status == 401
