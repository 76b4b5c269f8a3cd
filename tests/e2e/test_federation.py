"""Real federation, end to end: homeservers on this machine federating over loopback TLS.

- ``hs1`` runs the bridge (and the vendor sandboxes); ``hs2`` is trusted (hs1 and hs2 whitelist
  each other, and the bridge's trust list holds hs2);
- ``hs3`` is untrusted and outside hs1's ``federation_domain_whitelist``: Synapse itself
  refuses it, before the bridge ever hears of it;
- ``hs4`` is the variant: in hs1's whitelist (a member of the federation) but not in the
  bridge's trust list, so the bridge (invites, events) and the portals' ``m.room.server_acl``
  (joins) must refuse it.

Each refusal is asserted at the layer that refuses. Assertions on the bridge's side of the trust
list (issue 5 point 3) run inside ``trust_list_step()``: while ``TRUST_LIST_PENDING`` is set,
their failure is an xfail, not a failure (the integrator sets it to False once point 3 is in).

The whole module edits /etc/hosts (through ``bridge.devtools.federation.HostsEntries``, which
always removes its entries); where it cannot, the module is skipped, or fails when CI is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import importlib.util
import ipaddress
import json
import logging
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import ClientSession, web
from nio import RoomPreset

from bridge.config import Config
from bridge.devtools.demo import SandboxUser
from bridge.devtools.federation import LocalFederation, hosts_file_writable
from bridge.devtools.ports import free_port
from bridge.devtools.stack import LocalStack

from e2e_helpers import Proxy, app_users_of, counter, inbox_texts, received, unique, users_of
from helpers import wait_until
from matrix_user import MatrixUser, MatrixUserError, connect, text_is
from synapse_db import event_types_in_room, room_holds_text

pytestmark = pytest.mark.e2e

TRUST_LIST_PENDING = False
"""Integrator: set to False when the bridge's trust list (issue 5 point 3) is in the tree."""
TRUST_REASON = "waiting for the trust list (issue 5 point 3)"

TRUST_IN_CONFIG = "trust" in Config.model_fields
"""The config section ``trust: {servers: [...]}`` exists (else it cannot be given)."""

SERVERS: dict[str, list[str] | None] = {
    "hs1": ["hs2", "hs4"],  # the bridge's homeserver: hs4 is the "federated, not trusted" variant
    "hs2": ["hs1"],  # trusted: hs1 and hs2 whitelist each other only
    "hs3": None,  # untrusted, federates with anyone, refused by hs1's whitelist
    "hs4": None,  # untrusted by the bridge, though hs1's whitelist lets it in
}
BURST = 150
REPLIES = 20
PRUNING = re.compile(r"Pruning (\d+) events in room (\S+) from federation queue")
# Synapse logs the pruning of its incoming federation queue at INFO, under a WARNING root.
QUEUE_LOGGER = "synapse.storage.databases.main.event_federation"


@contextlib.contextmanager
def trust_list_step() -> Iterator[None]:
    """Assertions on the bridge's side of the trust list: an xfail while it is pending."""
    try:
        yield
    except (AssertionError, TimeoutError, MatrixUserError) as error:
        if TRUST_LIST_PENDING:
            pytest.xfail(f"{TRUST_REASON}: {type(error).__name__}: {error}")
        raise


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def fed(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalFederation]:
    if importlib.util.find_spec("synapse") is None:
        _unavailable("matrix-synapse is not installed (pip install -e '.[test]')")
    reason = hosts_file_writable()
    if reason is not None:
        _unavailable(f"the federation tests resolve server names through /etc/hosts: {reason}")

    state_dir = Path(tmp_path_factory.mktemp("federation"))
    bridge_port = free_port()
    pushes = PushDelay(f"http://127.0.0.1:{bridge_port}")
    await pushes.start()

    def stack_options(names: dict[str, str]) -> dict[str, Any]:
        overrides: dict[str, Any] = {
            # A short sweep: under a burst, events Synapse never pushes are found quickly.
            "reconcile": {"interval_s": 1.0, "active_within_s": 600},
            # hs1 pushes to the bridge through ``PushDelay`` (transparent unless told).
            "appservice": {
                "id": "eimis-bridge",
                "address": pushes.url,  # what hs1 calls
                "hostname": "127.0.0.1",
                "port": bridge_port,  # where the bridge listens
                "registration": str(state_dir / "hs1" / "registration.yaml"),
            },
        }
        if TRUST_IN_CONFIG:
            overrides["trust"] = {"servers": [names["hs2"]]}
        # Encryption on, portals plain unless a member encrypts (the encrypted DM test does).
        overrides["encryption"] = {"enabled": True, "default": False}
        return {"config_overrides": overrides, "encrypted": True}

    log_levels = {QUEUE_LOGGER: "INFO"}
    federation = LocalFederation(
        state_dir,
        SERVERS,
        bridge_on="hs1",
        stack_options=stack_options,
        synapse_options={label: {"log_levels": log_levels} for label in SERVERS},
    )
    try:
        async with federation:
            assert federation.stack is not None
            federation.stack.bridge_port = bridge_port
            federation.pushes = pushes  # type: ignore[attr-defined]
            yield federation
    finally:
        await pushes.stop()
    assert not federation.hosts.present(), "the /etc/hosts entries were not removed"


class PushDelay(Proxy):
    """Between hs1 and the bridge: forwards every call, except that a room event whose body is
    in ``delayed`` is taken out of its transaction and pushed after the events of the next one
    (what Synapse does with events it fetched late over federation)."""

    def __init__(self, target: str) -> None:
        super().__init__(free_port())
        self.target = target
        self.delayed: set[str] = set()
        self.held: list[dict[str, Any]] = []
        self.pushed: list[str] = []
        """Bodies of the room messages as the bridge received them, in order."""

    async def forward(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.method == "PUT" and "/transactions/" in request.path:
            transaction = json.loads(body)
            events = list(self.held)
            self.held.clear()
            kept = []
            for event in transaction.get("events", []):
                text = (event.get("content") or {}).get("body")
                if text in self.delayed:
                    self.delayed.discard(text)
                    self.held.append(event)
                else:
                    kept.append(event)
            events = kept + events  # what was held goes after this transaction's own
            self.pushed.extend(str((e.get("content") or {}).get("body")) for e in events)
            body = json.dumps({**transaction, "events": events}).encode()
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in ("host", "content-length", "transfer-encoding")
        }
        async with (
            ClientSession() as http,
            http.request(
                request.method, self.target + request.path_qs, data=body, headers=headers
            ) as resp,
        ):
            return web.Response(
                status=resp.status, body=await resp.read(), content_type=resp.content_type
            )


@pytest.fixture(scope="module")
def stack(fed: LocalFederation) -> LocalStack:
    assert fed.stack is not None
    return fed.stack


async def _user(fed: LocalFederation, label: str, name: str) -> MatrixUser:
    synapse = fed[label].synapse
    assert synapse is not None
    user_id, token = await synapse.register_user(f"{name}{next(counter)}", "correct horse")
    return await connect(synapse.url, user_id, token)


def ghost_of(stack: LocalStack, connector: str, user: SandboxUser) -> str:
    return f"@eimis_{connector}_{user.idnps}:{stack.server_name}"


@dataclass
class Conversation:
    """A DM opened from hs2 to a PandaLab-style ghost, which a Medipeps-style user then joined."""

    native: MatrixUser
    room_id: str
    alice: SandboxUser  # PandaLab-style
    bob: SandboxUser  # Medipeps-style
    alice_conversation: str
    bob_conversation: str
    seen: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
async def conversation(
    fed: LocalFederation, stack: LocalStack, http: ClientSession
) -> AsyncIterator[Conversation]:
    native = await _user(fed, "hs2", "native")
    try:
        alice = (await users_of(stack, http, "pandalab"))[0]
        bob = (await users_of(stack, http, "medipeps"))[0]
        seen: dict[str, Any] = {}

        # A native user on hs2 DMs the PandaLab-style ghost on hs1, by Matrix ID.
        room_id = await native.create_dm(ghost_of(stack, "pandalab", alice))
        hello = seen["hello"] = unique("Bonjour depuis hs2")
        await native.send_text(room_id, hello)
        seen["hello@alice"] = await wait_until(
            lambda: received(alice, hello), 90, "Alice to get hs2's DM"
        )
        alice_conversation = str(seen["hello@alice"]["conversation_id"])

        # She answers; the answer crosses to hs2.
        reply = seen["reply"] = unique("Réponse de PandaLab")
        await alice.send(alice_conversation, reply)
        seen["reply@hs2"] = await native.wait_for_message(room_id, text_is(reply), timeout=30)

        # The native user invites the Medipeps-style ghost: Bob joins the conversation.
        invite = await native.client.room_invite(room_id, ghost_of(stack, "medipeps", bob))
        assert not isinstance(invite, Exception) and not hasattr(invite, "status_code"), invite
        later = seen["later"] = unique("Bob est avec nous")
        await native.send_text(room_id, later)
        seen["later@bob"] = await wait_until(
            lambda: received(bob, later), 90, "Bob to get hs2's message"
        )
        seen["later@alice"] = await wait_until(
            lambda: received(alice, later), 90, "Alice to get it"
        )
        bob_conversation = str(seen["later@bob"]["conversation_id"])

        answer = seen["answer"] = unique("Réponse de Medipeps")
        await bob.send(bob_conversation, answer)
        seen["answer@alice"] = await wait_until(
            lambda: received(alice, answer), 90, "Alice to get Bob's"
        )
        seen["answer@hs2"] = await native.wait_for_message(room_id, text_is(answer), timeout=30)

        yield Conversation(native, room_id, alice, bob, alice_conversation, bob_conversation, seen)
    finally:
        await native.close()


# -- helpers ---------------------------------------------------------------------------------


async def join_via(user: MatrixUser, room_id: str, servers: list[str]) -> tuple[int, dict]:
    """POST /join with ``server_name`` hints; (HTTP status, body)."""
    query = "&".join(f"server_name={quote(s)}" for s in servers)
    url = f"{user.client.homeserver}/_matrix/client/v3/join/{quote(room_id)}?{query}"
    headers = {"Authorization": f"Bearer {user.client.access_token}"}
    async with ClientSession() as http, http.post(url, json={}, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


async def state_event(user: MatrixUser, room_id: str, event_type: str) -> dict[str, Any] | None:
    url = f"{user.client.homeserver}/_matrix/client/v3/rooms/{quote(room_id)}/state/{event_type}"
    headers = {"Authorization": f"Bearer {user.client.access_token}"}
    async with ClientSession() as http, http.get(url, headers=headers) as resp:
        return await resp.json() if resp.status == 200 else None


def acl_allows(acl: dict[str, Any], server_name: str) -> bool:
    """Whether an ``m.room.server_acl`` content lets ``server_name`` in (the spec's rules)."""
    host = server_name.rsplit(":", 1)[0] if server_name.count(":") == 1 else server_name
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host.strip("[]"))
        if not acl.get("allow_ip_literals", True):
            return False
    if any(fnmatch.fnmatchcase(host, str(p)) for p in acl.get("deny", [])):
        return False
    return any(fnmatch.fnmatchcase(host, str(p)) for p in acl.get("allow", []))


async def acl_matching(
    reader: MatrixUser, room_id: str, allowed: list[str], denied: list[str], timeout: float
) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        acl = await state_event(reader, room_id, "m.room.server_acl")
        if acl is None:
            return None
        ok = all(acl_allows(acl, s) for s in allowed)
        ok = ok and not any(acl_allows(acl, s) for s in denied)
        return acl if ok else None

    return dict(await wait_until(check, timeout, f"the server ACL of {room_id}"))


async def all_messages(
    user: MatrixUser, room_id: str, *, graph: bool = False
) -> list[dict[str, Any]]:
    """The room's m.room.message events through /messages (oldest first): the timeline as
    the homeserver holds it, including what /sync skipped. ``graph``: every event, in the
    federation format (with ``prev_events``: the room graph)."""
    events: list[dict[str, Any]] = []
    token = ""
    headers = {"Authorization": f"Bearer {user.client.access_token}"}
    base = f"{user.client.homeserver}/_matrix/client/v3/rooms/{quote(room_id)}/messages"
    async with ClientSession() as http:
        while True:
            params = {"dir": "b", "limit": "500"}
            if graph:
                params["filter"] = json.dumps({"event_format": "federation"})
            if token:
                params["from"] = token
            async with http.get(base, params=params, headers=headers) as resp:
                assert resp.status == 200, await resp.text()
                page = await resp.json()
            chunk = page.get("chunk") or []
            events.extend(e for e in chunk if graph or e.get("type") == "m.room.message")
            token = page.get("end") or ""
            if not chunk or not token:
                break
    return list(reversed(events))


def causal_violations(got: list[str], graph: list[dict[str, Any]], of: set[str]) -> list[str]:
    """Messages of ``of`` in ``got`` delivered before a message they follow in the room graph
    (``prev_events``, transitively): what a reader would see as an answer before its question.
    Messages sent concurrently (neither follows the other) may come in either order.

    ``of``: messages whose sender's server held all they follow when they were sent (a native
    user's). What a ghost sends follows, in the graph, whatever hs1 held at that moment, which
    the vendor user may not have received yet: per sender order is what holds for those."""
    prevs = {e["event_id"]: list(e.get("prev_events") or ()) for e in graph}
    bodies = {
        e["event_id"]: str(e["content"].get("body"))
        for e in graph
        if e.get("type") == "m.room.message" and isinstance(e.get("content"), dict)
    }
    before: dict[str, set[str]] = {}  # event id -> the bodies of the messages it follows
    for event in graph:  # oldest first: an event's prev_events come before it
        mine: set[str] = set()
        for prev in prevs[event["event_id"]]:
            mine |= before.get(prev, set())
            if prev in bodies:
                mine.add(bodies[prev])
        before[event["event_id"]] = mine
    follows = {bodies[i]: before[i] for i in bodies}
    delivered: set[str] = set()
    out = []
    for text in got:
        if text in of and text in follows and (follows[text] & set(got)) - delivered:
            out.append(text)
        delivered.add(text)
    return out


async def put_transaction(stack: LocalStack, txn_id: str, events: list[dict[str, Any]]) -> int:
    token = stack.registration["hs_token"]
    url = f"{stack.bridge_url}/_matrix/app/v1/transactions/{txn_id}"
    async with (
        ClientSession() as http,
        http.put(url, json={"events": events}, headers={"Authorization": f"Bearer {token}"}) as r,
    ):
        return r.status


async def trust_cli(stack: LocalStack, *args: str) -> str:
    config = stack.state_dir / "config.yaml"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        "trust",
        args[0],
        "-c",
        str(config),
        *args[1:],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"eimis-bridge trust {' '.join(args)}: {text}"
    return text


class RecordsOf(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def pruned(synapse_log: Path, since: int) -> list[tuple[int, str]]:
    text = synapse_log.read_text(errors="replace")[since:] if synapse_log.exists() else ""
    return [(int(m[1]), m[2]) for m in PRUNING.finditer(text)]


def log_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def late(got: list[str], expected: list[str]) -> list[str]:
    """The messages of ``expected`` delivered after one that comes later in ``expected``."""
    rank = {text: i for i, text in enumerate(expected)}
    highest, out = -1, []
    for text in got:
        if text not in rank:
            continue
        if rank[text] < highest:
            out.append(text)
        highest = max(highest, rank[text])
    return out


def first_disorder(got: list[str], expected: list[str]) -> str | None:
    """None when ``got`` holds ``expected`` in that order, else where it first differs."""
    mine = [t for t in got if t in set(expected)]
    for i, (a, b) in enumerate(zip(mine, expected, strict=False)):
        if a != b:
            return f"position {i}: got {a!r}, expected {b!r}"
    return None if len(mine) == len(expected) else f"{len(mine)} of {len(expected)}"


# -- the conversation across servers ---------------------------------------------------------


async def test_native_user_on_a_trusted_server_talks_with_both_vendors(
    conversation: Conversation, stack: LocalStack
) -> None:
    seen, native = conversation.seen, conversation.native
    assert seen["hello@alice"]["sender"] == native.user_id
    assert seen["reply@hs2"].sender == ghost_of(stack, "pandalab", conversation.alice)
    assert seen["later@bob"]["sender"] == native.user_id
    assert seen["answer@alice"]["sender"] == conversation.bob.idnps
    assert seen["answer@hs2"].sender == ghost_of(stack, "medipeps", conversation.bob)
    # Once each.
    alice_texts = await inbox_texts(conversation.alice)
    bob_texts = await inbox_texts(conversation.bob)
    for text in (seen["hello"], seen["later"], seen["answer"]):
        assert alice_texts.count(text) == 1, text
    assert bob_texts.count(seen["later"]) == 1
    assert seen["answer"] not in bob_texts, "Bob's own message came back to him"


async def test_an_encrypted_dm_from_a_federated_server_is_bridged_both_ways(
    fed: LocalFederation, stack: LocalStack, http: ClientSession, tmp_path: Path
) -> None:
    """A native user of hs2, on an encrypting client, opens an encrypted DM with a PandaLab-
    style ghost: keys cross the federation (device lists, one-time key claims, to-device), the
    bridge decrypts for the vendor and encrypts the answer; neither homeserver stores the text."""
    synapse = fed["hs2"].synapse
    assert synapse is not None
    user_id, token = await synapse.register_user(f"enc{next(counter)}", "correct horse")
    native = await connect(synapse.url, user_id, token, encrypted=True, store_dir=tmp_path / "n")
    try:
        alice = (await users_of(stack, http, "pandalab"))[4]
        ghost = ghost_of(stack, "pandalab", alice)
        room_id = await native.create_room(invite=[ghost], is_direct=True, encrypted=True)
        await native.wait_for_join(room_id, ghost, timeout=60)
        question = unique("Chiffré depuis hs2")
        await native.send_text(room_id, question)
        at_alice = await wait_until(
            lambda: received(alice, question), 60, "the question at PandaLab"
        )
        assert at_alice["sender"] == native.user_id
        answer = unique("Réponse chiffrée vers hs2")
        await alice.send(str(at_alice["conversation_id"]), answer)
        got = await native.wait_for_message(room_id, text_is(answer), timeout=60)
        assert got.decrypted and got.sender == ghost
        for server in (synapse, stack.synapse):
            assert not room_holds_text(server, room_id, question)
            assert not room_holds_text(server, room_id, answer)
            assert "m.room.message" not in event_types_in_room(server, room_id)
    finally:
        await native.close()


async def test_portal_carries_an_acl_of_the_trusted_servers(
    conversation: Conversation, fed: LocalFederation
) -> None:
    with trust_list_step():
        acl = await acl_matching(
            conversation.native,
            conversation.room_id,
            allowed=[fed.server_name("hs1"), fed.server_name("hs2")],
            denied=[fed.server_name("hs3"), fed.server_name("hs4"), "evil.example", "127.0.0.1"],
            timeout=60,
        )
        assert acl.get("allow_ip_literals") is False


# -- order across the federation ------------------------------------------------------------


async def test_a_question_pushed_after_its_answer_still_reaches_the_vendors_first(
    conversation: Conversation, fed: LocalFederation
) -> None:
    """hs1 pushes hs2's question after the answer that follows it (as Synapse does with events
    it fetched late): the bridge reads the room graph and delivers the question first."""
    native, room_id = conversation.native, conversation.room_id
    pushes: PushDelay = fed.pushes  # type: ignore[attr-defined]
    question, answer = unique("Allergie à la pénicilline ?"), unique("Oui, confirmée")
    pushes.delayed.add(question)
    await native.send_text(room_id, question)
    await native.send_text(room_id, answer)

    for user in (conversation.alice, conversation.bob):

        async def both(user: SandboxUser = user) -> list[str] | None:
            texts = [t for t in await inbox_texts(user) if t in (question, answer)]
            return texts if len(texts) >= 2 else None

        assert await wait_until(both, 60, "the question and its answer") == [question, answer]
    # The test proves something only if the bridge was pushed the answer first.
    pushed = [t for t in pushes.pushed if t in (question, answer)]
    assert pushed == [answer, question], pushed


# -- a burst across the federation -----------------------------------------------------------


async def test_burst_across_the_federation_arrives_once_and_in_order(
    conversation: Conversation, fed: LocalFederation, stack: LocalStack
) -> None:
    """150 messages from hs2 at once, with both vendors answering meanwhile. Each vendor gets
    each message exactly once; never a native message before one it follows in the room graph;
    each vendor's messages in the order sent. What Synapse did (pruned federation queues) and
    what the bridge did (reconciliation, rooms held behind a gap) is recorded in burst.json.

    150 parallel sends have no order of their own: hs2 creates several at once, on branches of
    the graph, and hs1 may list concurrent ones in another order than hs2's timeline (counted,
    not asserted, as ``later_than_hs2_timeline_at_*``)."""
    native, room_id = conversation.native, conversation.room_id
    alice, bob = conversation.alice, conversation.bob
    hs1_log, hs2_log = fed["hs1"].synapse.log_path, fed["hs2"].synapse.log_path  # type: ignore[union-attr]
    hs1_at, hs2_at = log_size(hs1_log), log_size(hs2_log)
    recon = RecordsOf()
    recon_logger = logging.getLogger("eimis.reconcile")
    recon_level = recon_logger.level
    recon_logger.setLevel(logging.INFO)  # a sweep reports what it found at INFO
    recon_logger.addHandler(recon)
    assert stack.bridge is not None
    order = stack.bridge.causal_order
    gaps_before, released_before = order.gaps, order.released_at_deadline
    tag = unique("burst")
    natives = [f"{tag} hs2 {i:03d}" for i in range(BURST)]
    from_alice = [f"{tag} pandalab {i:03d}" for i in range(REPLIES)]
    from_bob = [f"{tag} medipeps {i:03d}" for i in range(REPLIES)]
    began = time.monotonic()
    try:

        async def vendor(user: SandboxUser, conversation_id: str, texts: list[str]) -> None:
            for text in texts:
                await user.send(conversation_id, text)

        await asyncio.gather(
            *(native.send_text(room_id, text) for text in natives),
            vendor(alice, conversation.alice_conversation, from_alice),
            vendor(bob, conversation.bob_conversation, from_bob),
        )
        sent_s = time.monotonic() - began

        async def arrived(user: SandboxUser, expected: list[str]) -> list[str] | None:
            texts = [t for t in await inbox_texts(user) if t in set(expected)]
            return texts if len(set(texts)) == len(expected) else None

        alice_got = await wait_until(
            lambda: arrived(alice, natives + from_bob), 150, "the burst at PandaLab"
        )
        bob_got = await wait_until(
            lambda: arrived(bob, natives + from_alice), 150, "the burst at Medipeps"
        )
        delivered_s = time.monotonic() - began

        async def at_hs2() -> list[str] | None:
            bodies = [str(e["content"].get("body")) for e in await all_messages(native, room_id)]
            mine = [b for b in bodies if b in set(from_alice + from_bob)]
            return mine if len(set(mine)) == len(from_alice + from_bob) else None

        hs2_got = await wait_until(at_hs2, 60, "the vendors' answers at hs2")
        # The order the native user's messages took in the room (hs2 decided it).
        hs2_timeline = [
            str(e["content"].get("body"))
            for e in await all_messages(native, room_id)
            if e["sender"] == native.user_id
        ]
        native_order = [b for b in hs2_timeline if b in set(natives)]
    finally:
        recon_logger.removeHandler(recon)
        recon_logger.setLevel(recon_level)

    graph = await all_messages(native, room_id, graph=True)
    # The native /sync view of hs2 (what a client sees live) may lack events hs2 pruned.
    await native.sync()
    synced = [getattr(e, "body", None) for e in native.messages(room_id)]
    findings = {
        "burst": BURST,
        "vendor_replies_each": REPLIES,
        "sent_s": round(sent_s, 1),
        "delivered_s": round(delivered_s, 1),
        "hs1_pruned_federation_queue": pruned(hs1_log, hs1_at),
        "hs2_pruned_federation_queue": pruned(hs2_log, hs2_at),
        "bridge_reconciliation": [m for m in recon.messages if "had not received" in m],
        "hs2_sync_missing_vendor_answers": len(set(from_alice + from_bob) - set(synced)),
        "duplicates": {
            "pandalab": len(alice_got) - len(set(alice_got)),
            "medipeps": len(bob_got) - len(set(bob_got)),
            "hs2": len(hs2_got) - len(set(hs2_got)),
        },
        "order": {
            "medipeps messages at pandalab": first_disorder(alice_got, from_bob),
            "pandalab messages at medipeps": first_disorder(bob_got, from_alice),
            "pandalab messages at hs2": first_disorder(hs2_got, from_alice),
            "medipeps messages at hs2": first_disorder(hs2_got, from_bob),
        },
        # What the test asserts: no message before one it follows in the room graph.
        "causal_violations": {
            "pandalab": causal_violations(alice_got, graph, set(natives)),
            "medipeps": causal_violations(bob_got, graph, set(natives)),
        },
        "bridge_gaps_held": order.gaps - gaps_before,
        "bridge_gaps_released_at_deadline": order.released_at_deadline - released_before,
        # Informational: concurrent messages (same place in the graph) have no order of their
        # own; these came in another order than hs2's timeline shows them.
        "later_than_hs2_timeline_at_pandalab": late(alice_got, native_order),
        "later_than_hs2_timeline_at_medipeps": late(bob_got, native_order),
        # Informational: 150 parallel sends have no order of their own; hs2's timeline decides.
        "hs2_timeline_vs_send_order": first_disorder(native_order, natives),
    }
    (fed.state_dir / "burst.json").write_text(json.dumps(findings, indent=2))
    print("\nburst findings:", json.dumps(findings, indent=2))

    assert sorted(native_order) == sorted(natives), "hs2's timeline lacks some of its own"
    assert findings["duplicates"] == {"pandalab": 0, "medipeps": 0, "hs2": 0}, findings
    disorder = {k: v for k, v in findings["order"].items() if v is not None}
    assert not disorder, findings
    assert findings["causal_violations"] == {"pandalab": [], "medipeps": []}, findings


# -- the untrusted servers -------------------------------------------------------------------


async def test_server_outside_the_whitelist_is_refused_by_synapse(
    conversation: Conversation, fed: LocalFederation, stack: LocalStack, http: ClientSession
) -> None:
    """hs3 is not in hs1's federation_domain_whitelist: hs1 refuses it before the bridge."""
    outsider = await _user(fed, "hs3", "outsider")
    try:
        carol = (await users_of(stack, http, "pandalab"))[1]
        ghost = ghost_of(stack, "pandalab", carol)
        # Its invite to a ghost: hs1 answers hs3's /invite with "Federation denied".
        room_id = await outsider.create_room()
        answer = await outsider.client.room_invite(room_id, ghost)
        assert getattr(answer, "status_code", None) == "M_FORBIDDEN", answer
        assert "Federation denied" in str(answer.message), answer
        assert stack.bridge is not None
        assert await stack.bridge.stores.portals.get(room_id) is None
        # Its join attempt to a portal, through both servers of the room.
        status, body = await join_via(
            outsider, conversation.room_id, [fed.server_name("hs1"), fed.server_name("hs2")]
        )
        assert status >= 400, body
        # Its events: it is in no portal, so there is nowhere to send them.
        sent = await outsider.client.room_send(
            conversation.room_id, "m.room.message", {"msgtype": "m.text", "body": "intrus"}
        )
        assert getattr(sent, "status_code", None) is not None, sent
        # And nothing of it reached a vendor.
        for user in (carol, conversation.alice, conversation.bob):
            assert all(m["sender"] != outsider.user_id for m in await user.inbox())
        assert not await carol.conversations() or all(
            outsider.user_id not in json.dumps(c) for c in await carol.conversations()
        )
    finally:
        await outsider.close()


async def test_invites_from_an_untrusted_server_are_refused_by_the_bridge(
    fed: LocalFederation, stack: LocalStack, http: ClientSession
) -> None:
    """hs4 is in hs1's whitelist, so its invites reach hs1: the bot and the ghosts leave."""
    stranger = await _user(fed, "hs4", "stranger")
    try:
        dan = (await users_of(stack, http, "pandalab"))[2]
        ghost = ghost_of(stack, "pandalab", dan)
        room_id = await stranger.create_room(invite=[ghost, stack.config.bot_mxid])
        await stranger.send_text(room_id, unique("Bonjour d'un serveur inconnu"))
        assert stack.bridge is not None

        def left(user_id: str) -> Any:
            return lambda e: (
                e.get("type") == "m.room.member"
                and e.get("state_key") == user_id
                and (e.get("content") or {}).get("membership") == "leave"
            )

        with trust_list_step():
            for refused in (ghost, stack.config.bot_mxid):
                event = await stranger.wait_for_event(room_id, left(refused), timeout=60)
                assert event["content"].get("reason"), f"{refused} left without a reason"
            assert await stack.bridge.stores.portals.get(room_id) is None
            assert not [m for m in await dan.inbox() if m["sender"] == stranger.user_id]
            assert not await dan.conversations()
    finally:
        await stranger.close()


async def test_a_join_from_an_untrusted_server_is_refused_by_the_room_acl(
    fed: LocalFederation, stack: LocalStack, http: ClientSession
) -> None:
    """A user of the bridge's own homeserver (trusted) opens a portal and invites a user of
    hs4: hs1 lets hs4 federate, the invitation is allowed, so only the portal's
    m.room.server_acl stands between hs4 and the conversation."""
    host = await _user(fed, "hs1", "host")
    guest = await _user(fed, "hs4", "guest")
    try:
        erin = (await users_of(stack, http, "pandalab"))[3]
        answer = await host.client.room_create(
            preset=RoomPreset.trusted_private_chat,
            invite=[ghost_of(stack, "pandalab", erin)],
        )
        room_id = str(answer.room_id)
        hello = unique("Bonjour depuis hs1")
        await host.send_text(room_id, hello)
        await wait_until(lambda: received(erin, hello), 90, "Erin to get the message")

        acl_missing: TimeoutError | None = None
        try:
            await acl_matching(
                host,
                room_id,
                allowed=[fed.server_name("hs1"), fed.server_name("hs2")],
                denied=[fed.server_name("hs4")],
                timeout=15,
            )
        except TimeoutError as error:
            acl_missing = error  # go on: the bridge's filter is checked below all the same
        invited = await host.client.room_invite(room_id, guest.user_id)
        assert getattr(invited, "status_code", None) is None, invited
        status, body = await join_via(guest, room_id, [fed.server_name("hs1")])
        if status == 200:
            # No ACL stopped it: its events must still never reach the vendor (the bridge).
            intrusion = unique("Message d'un serveur non approuvé")
            await guest.send_text(room_id, intrusion)
            sentinel = unique("Sentinelle de confiance")
            await host.send_text(room_id, sentinel)
            await wait_until(lambda: received(erin, sentinel), 90, "the sentinel at Erin's")
            with trust_list_step():
                assert intrusion not in await inbox_texts(erin), "an untrusted event was bridged"
                raise AssertionError(f"hs4 joined a portal (no ACL stopped it): {body}")
        with trust_list_step():
            if acl_missing is not None:
                raise acl_missing
            assert status == 403, (status, body)
            assert "banned" in str(body.get("error", "")).lower(), body
    finally:
        await guest.close()
        await host.close()


async def test_a_room_without_the_acl_gets_nothing_from_vendors_once_an_outsider_is_in(
    fed: LocalFederation, stack: LocalStack, http: ClientSession
) -> None:
    """A user of hs1 opens a plain private chat: the ghost has no power to set the room's
    ACL, so hs4's user can join. From then on the vendor user's messages are not sent into
    the room (hs4 would read them): the vendor gets a failed delivery with the reason, and
    hs4's messages never reach the vendor."""
    host = await _user(fed, "hs1", "owner")
    guest = await _user(fed, "hs4", "outsider")
    try:
        frank = (await app_users_of(stack, http, "pandalab"))[2]
        answer = await host.client.room_create(
            preset=RoomPreset.private_chat, invite=[ghost_of(stack, "pandalab", frank)]
        )
        room_id = str(answer.room_id)
        hello = unique("Bonjour, salle sans ACL")
        await host.send_text(room_id, hello)
        got = await wait_until(lambda: received(frank, hello), 90, "Frank to get the message")
        conversation_id = str(got["conversation_id"])
        before = unique("Avant l'intrus")
        await frank.send(conversation_id, before)
        await host.wait_for_message(room_id, text_is(before), timeout=30)
        assert await state_event(host, room_id, "m.room.server_acl") is None, "had the power"

        invited = await host.client.room_invite(room_id, guest.user_id)
        assert getattr(invited, "status_code", None) is None, invited
        status, body = await join_via(guest, room_id, [fed.server_name("hs1")])
        assert status == 200, (status, body)
        intrusion = unique("Message de hs4")
        await guest.send_text(room_id, intrusion)
        sentinel = unique("Sentinelle")
        await host.send_text(room_id, sentinel)
        await wait_until(lambda: received(frank, sentinel), 90, "the sentinel at Frank's")
        assert intrusion not in await inbox_texts(frank), "an untrusted event was bridged"

        secret = unique("Résultat d'analyse confidentiel")
        message_id = await frank.post(conversation_id, text=secret)

        async def refused() -> dict[str, Any] | None:
            message = await frank.message(conversation_id, message_id)
            reports = (message or {}).get("delivery") or []
            bad = [
                r
                for r in reports
                if r["status"] == "failed" and "espace de confiance" in r["detail"]
            ]
            return bad[0] if bad else None

        report = await wait_until(refused, 30, "the failed delivery of Frank's message")
        assert fed.server_name("hs4").split(":")[0] in str(report["detail"]), report
        notice = await host.wait_for_message(
            room_id, lambda e: "n'a pas pu être transmis" in str(getattr(e, "body", "")), timeout=30
        )
        assert secret not in str(getattr(notice, "body", ""))
        bodies = [str(e["content"].get("body")) for e in await all_messages(host, room_id)]
        assert secret not in bodies, "the message went into a room hs4 reads"
        assert before in bodies
    finally:
        await guest.close()
        await host.close()


async def test_events_from_untrusted_servers_never_reach_a_vendor(
    conversation: Conversation, fed: LocalFederation, stack: LocalStack
) -> None:
    """The bridge's own filter, whatever the homeserver lets through: events of hs3 and hs4
    senders handed to the bridge in a transaction of hs1 are never delivered."""
    now = int(time.time() * 1000)
    forged = []
    for label in ("hs3", "hs4"):
        text = unique(f"Message forgé de {label}")
        forged.append(text)
        forged_event = {
            "event_id": f"$forged-{label}-{next(counter)}",
            "room_id": conversation.room_id,
            "type": "m.room.message",
            "sender": f"@mallory:{fed.server_name(label)}",
            "origin_server_ts": now,
            "content": {"msgtype": "m.text", "body": text},
        }
        status = await put_transaction(stack, f"forged-untrusted-{next(counter)}", [forged_event])
        assert status == 200
    sentinel = unique("Sentinelle après les messages forgés")
    await conversation.native.send_text(conversation.room_id, sentinel)
    await wait_until(lambda: received(conversation.alice, sentinel), 90, "the sentinel at Alice's")
    await wait_until(lambda: received(conversation.bob, sentinel), 90, "the sentinel at Bob's")
    with trust_list_step():
        for user in (conversation.alice, conversation.bob):
            texts = await inbox_texts(user)
            assert not [t for t in forged if t in texts], "an untrusted server's event was bridged"


async def test_trust_list_changes_reach_every_portal_within_five_seconds(
    conversation: Conversation, fed: LocalFederation, stack: LocalStack
) -> None:
    hs4 = fed.server_name("hs4")
    with trust_list_step():
        await trust_cli(stack, "add", hs4)
        try:
            listed = await trust_cli(stack, "list")
            assert hs4 in listed and fed.server_name("hs2") in listed, listed
            await acl_matching(
                conversation.native, conversation.room_id, [hs4], [fed.server_name("hs3")], 6.0
            )
        finally:
            await trust_cli(stack, "remove", hs4)
        await acl_matching(conversation.native, conversation.room_id, [], [hs4], 6.0)
