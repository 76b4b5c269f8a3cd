"""The connector kit (connectors/kit): signed webhooks, the backoff policy, the polled feed, the
sandboxes' pusher, and the remote-id rule the bridge's intake applies to every vendor event."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bridge.core.connector_manager import START_BACKOFF
from bridge.core.intake import VendorIntake
from bridge.core.lanes import DEFAULT_BACKOFF
from bridge.db.inbox import InboxStore
from connectors.base import MessageReceived, RemoteEvent
from connectors.idnps import Idnps
from connectors.kit.backoff import Backoff
from connectors.kit.feed import Page, PolledFeed
from connectors.kit.ids import MAX_ID_BYTES, InvalidRemoteId, check_event_ids
from connectors.kit.pusher import Delivery, Pusher
from connectors.kit.signing import SignedWebhook, sign
from connectors.medipeps.connector import MedipepsConnector
from connectors.pandalab import connector as pandalab
from connectors.pandalab.sandbox import WebhookPusher
from connectors.webhook import signing as webhook_signing
from connectors.webhook.connector import WebhookConnector
from connectors.webhook.sandbox import EventPusher

from helpers import MemoryStore, settle, wait_until

HEADERS = SignedWebhook("X-Test-Timestamp", "X-Test-Signature")
NEW, OLD = "new-secret-" + "n" * 30, "old-secret-" + "o" * 30
BODY = b'{"id":"evt_1"}'
NOW = 1_700_000_000.0
WINDOW_S = 300
SENDER = Idnps("810000001916")


def refusal(
    secrets: Sequence[str], headers: dict[str, str], body: bytes = BODY, now: float = NOW
) -> str | None:
    return HEADERS.refusal(
        secrets,
        headers.get(HEADERS.timestamp_header),
        headers.get(HEADERS.signature_header),
        body,
        now=now,
        window_s=WINDOW_S,
    )


# --- Signed webhooks -----------------------------------------------------------------------------


def test_the_signature_is_the_documented_hmac_of_timestamp_dot_body() -> None:
    expected = hmac.new(NEW.encode(), b"1700000000." + BODY, hashlib.sha256).hexdigest()
    assert sign(NEW, "1700000000", BODY) == "sha256=" + expected
    assert HEADERS.headers([NEW], BODY, NOW) == {
        "X-Test-Timestamp": "1700000000",
        "X-Test-Signature": "sha256=" + expected,
    }


def test_the_vendors_header_names_are_unchanged() -> None:
    assert (webhook_signing.TIMESTAMP_HEADER, webhook_signing.SIGNATURE_HEADER) == (
        "X-Eimis-Timestamp",
        "X-Eimis-Signature",
    )
    assert webhook_signing.SIGNATURES.signature_header == "X-Eimis-Signature"
    assert (pandalab.SIGNATURES.timestamp_header, pandalab.SIGNATURES.signature_header) == (
        "X-PandaLab-Timestamp",
        "X-PandaLab-Signature",
    )


def test_a_signed_request_round_trips() -> None:
    assert refusal([NEW], HEADERS.headers([NEW], BODY, NOW)) is None
    assert refusal([NEW], HEADERS.headers([NEW], BODY, NOW - WINDOW_S), now=NOW) is None


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("wrong secret", "does not match"),
        ("other body", "does not match"),
        ("stale", "replay window"),
        ("future", "replay window"),
        ("missing", "headers are required"),
        ("upper-case hex", "64 lower-case hex"),
        ("no prefix", "64 lower-case hex"),
        ("timestamp not digits", "unix time"),
        ("too many", "more than 5"),
    ],
)
def test_a_wrong_or_stale_signature_is_refused(case: str, words: str) -> None:
    headers = HEADERS.headers([NEW], BODY, NOW)
    body = BODY
    sig = HEADERS.signature_header
    if case == "wrong secret":
        headers = HEADERS.headers(["not-the-secret"], BODY, NOW)
    elif case == "other body":
        body = BODY + b" "
    elif case == "stale":
        headers = HEADERS.headers([NEW], BODY, NOW - WINDOW_S - 1)
    elif case == "future":
        headers = HEADERS.headers([NEW], BODY, NOW + WINDOW_S + 1)
    elif case == "missing":
        del headers[sig]
    elif case == "upper-case hex":
        headers[sig] = "sha256=" + headers[sig][7:].upper()
    elif case == "no prefix":
        headers[sig] = headers[sig][7:]
    elif case == "timestamp not digits":
        headers[HEADERS.timestamp_header] = "+1700000000"
    elif case == "too many":
        headers[sig] = ", ".join([headers[sig]] * 6)
    reason = refusal([NEW], headers, body)
    assert reason is not None and words in reason


def test_the_headers_alone_refuse_without_reading_the_body() -> None:
    stale = HEADERS.headers([NEW], BODY, NOW - 3600)
    stamp, signature = HEADERS.timestamp_header, HEADERS.signature_header
    reason = HEADERS.header_refusal(
        [NEW], stale[stamp], stale[signature], now=NOW, window_s=WINDOW_S
    )
    assert reason is not None and "3600 s away" in reason
    fresh = HEADERS.headers(["anything"], BODY, NOW)
    unread = HEADERS.header_refusal(
        [NEW], fresh[stamp], fresh[signature], now=NOW, window_s=WINDOW_S
    )
    assert unread is None, "the signature itself is checked with the body"
    assert "no shared secret" in (refusal([], fresh) or "")


def test_rotated_secrets_are_accepted_during_the_grace_period_only() -> None:
    during_grace = [NEW, OLD]  # the receiver's accepted secrets, current first
    # A sender still on the old secret, one already on the new, and one listing both.
    for secrets in ([OLD], [NEW], [NEW, OLD]):
        assert refusal(during_grace, HEADERS.headers(secrets, BODY, NOW)) is None, secrets
    assert refusal([OLD], HEADERS.headers([NEW, OLD], BODY, NOW)) is None, "a late receiver"
    after_grace = [NEW]
    assert "does not match" in (refusal(after_grace, HEADERS.headers([OLD], BODY, NOW)) or "")


def test_a_vendor_signing_with_one_value_refuses_a_list() -> None:
    single = SignedWebhook("T", "S", max_signatures=1)
    two = single.headers([NEW, OLD], BODY, NOW)
    reason = single.refusal([NEW], two["T"], two["S"], BODY, now=NOW, window_s=WINDOW_S)
    assert reason is not None and "more than 1" in reason
    one = single.headers([NEW], BODY, NOW)
    assert single.refusal([NEW], one["T"], one["S"], BODY, now=NOW, window_s=WINDOW_S) is None


# --- Backoff -------------------------------------------------------------------------------------


def test_backoff_doubles_up_to_its_cap() -> None:
    policy = Backoff(initial_s=5.0, max_s=300.0, jitter=False)
    assert [policy.delay(n) for n in range(1, 9)] == [5, 10, 20, 40, 80, 160, 300, 300]
    assert policy.delay(100_000) == 300.0, "thousands of failures: the cap, no overflow"


def test_backoff_jitter_draws_half_to_all_of_the_capped_wait() -> None:
    policy = Backoff(initial_s=1.0, max_s=8.0)
    rng = random.Random(7)
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)]:
        delays = [policy.delay(attempt, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 4, "spread, not a constant"


def test_each_former_user_keeps_its_numbers() -> None:
    # The outbox and inbox lanes: 0.5 s doubling to a minute, with jitter.
    assert Backoff(initial_s=0.5, max_s=60.0, factor=2.0, jitter=True) == DEFAULT_BACKOFF
    # A connector that did not start: 5 s doubling to 5 minutes, exactly.
    assert [START_BACKOFF.delay(n) for n in (1, 2, 3, 7)] == [5.0, 10.0, 20.0, 300.0]
    # Medipeps polling and the webhook announcement: 1 s doubling to a minute, with jitter.
    assert (MedipepsConnector.backoff_initial_s, MedipepsConnector.backoff_max_s) == (1.0, 60.0)
    assert (WebhookConnector.announce_retry_initial_s, WebhookConnector.announce_retry_max_s) == (
        1.0,
        60.0,
    )
    # The sandboxes' redeliveries: no jitter.
    assert EventPusher(lambda: NEW).backoff == Backoff(0.2, 10.0, jitter=False)
    assert WebhookPusher(retry_initial=0.5, retry_max=30.0).backoff == Backoff(
        0.5, 30.0, jitter=False
    )


# --- The polled feed -----------------------------------------------------------------------------


def message(event_id: str, conversation_id: str = "c1", message_id: str = "m1") -> RemoteEvent:
    return MessageReceived(
        event_id=event_id,
        conversation_id=conversation_id,
        timestamp=datetime(2025, 1, 1, tzinfo=UTC),
        message_id=message_id,
        sender=SENDER,
        text="hello",
    )


class Vendor:
    """A feed of numbered events: the page after cursor n holds events n+1 ... n+page."""

    def __init__(self, total: int, page: int = 2) -> None:
        self.total = total
        self.page = page
        self.reads: list[str] = []

    async def read(self, cursor: str) -> Page:
        self.reads.append(cursor)
        after = int(cursor)
        last = min(self.total, after + self.page)
        events = [message(f"e{n}") for n in range(after + 1, last + 1)]
        return Page(events, str(last), more=last < self.total)


class Sink:
    def __init__(self) -> None:
        self.stored: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_next = 0
        self.calls = 0

    async def __call__(self, events: Sequence[RemoteEvent]) -> None:
        self.calls += 1
        await self.gate.wait()
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("storage down")
        self.stored += [e.event_id for e in events]


def feed(vendor: Vendor, sink: Sink, store: MemoryStore) -> PolledFeed:
    return PolledFeed(
        name="test feed",
        read=vendor.read,
        emit=sink,
        store=store,
        interval_s=0.01,
        backoff=Backoff(0.01, 0.02),
        log=logging.getLogger("eimis.test.feed"),
        start="0",
    )


@pytest.fixture
async def running() -> AsyncIterator[list[asyncio.Task[None]]]:
    tasks: list[asyncio.Task[None]] = []
    yield tasks
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_the_feed_moves_its_cursor_only_after_the_page_is_stored(
    running: list[asyncio.Task[None]],
) -> None:
    vendor, sink, store = Vendor(total=3), Sink(), MemoryStore()
    sink.gate.clear()  # the first emit hangs, as a slow database would
    running.append(asyncio.create_task(feed(vendor, sink, store).run()))
    await wait_until(lambda: sink.calls == 1, 10, "the first page's emit")
    await settle()  # the feed, waiting for its emit, runs no further
    assert store.data == {}, "the cursor moved before the page was stored"
    assert vendor.reads == ["0"]
    sink.gate.set()
    await wait_until(lambda: store.data.get("cursor") == "3", 10, "the feed to catch up")
    assert sink.stored == ["e1", "e2", "e3"]
    assert vendor.reads[:2] == ["0", "2"], "the second page at once: the first was full"


async def test_a_failed_emit_rereads_the_same_page_after_a_backoff(
    running: list[asyncio.Task[None]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    vendor, sink, store = Vendor(total=2), Sink(), MemoryStore()
    store.data["cursor"] = "0"
    sink.fail_next = 2
    running.append(asyncio.create_task(feed(vendor, sink, store).run()))
    await wait_until(lambda: sink.stored == ["e1", "e2"], 10, "the page, stored at last")
    await wait_until(lambda: store.data["cursor"] == "2", 10, "the cursor")
    assert vendor.reads[:3] == ["0", "0", "0"], "the cursor did not move while emits failed"
    failed = [r.getMessage() for r in caplog.records if "polling failed" in r.getMessage()]
    assert len(failed) == 2 and "storage down" not in " ".join(failed)  # the type only
    assert any("recovered after 2 failures" in r.getMessage() for r in caplog.records)


async def test_the_feed_starts_from_the_stored_cursor(running: list[asyncio.Task[None]]) -> None:
    vendor, sink, store = Vendor(total=5), Sink(), MemoryStore()
    store.data["cursor"] = "4"
    running.append(asyncio.create_task(feed(vendor, sink, store).run()))
    await wait_until(lambda: store.data["cursor"] == "5", 10, "the last page")
    assert vendor.reads[0] == "4" and sink.stored == ["e5"]


# --- The pusher ----------------------------------------------------------------------------------


class Receiver:
    """Answers each request with the next status of ``statuses`` (then 200)."""

    def __init__(self, statuses: Sequence[int]) -> None:
        self.statuses = list(statuses)
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.read())
        self.headers.append(dict(request.headers))
        status = self.statuses.pop(0) if self.statuses else 200
        return web.json_response({}, status=status)


class ListPusher(Pusher):
    def __init__(self, url: str, bodies: Sequence[bytes], backoff: Backoff) -> None:
        super().__init__(backoff=backoff, log=logging.getLogger("eimis.test.push"))
        self.url = url
        self.queue = list(bodies)
        self.acknowledged: list[bytes] = []
        self.attempts = 0

    def next_delivery(self) -> Delivery | None:
        if not self.queue:
            return None
        self.attempts += 1
        headers = HEADERS.headers([NEW], self.queue[0], time.time())
        return Delivery(self.url, self.queue[0], headers, "test: one body")

    def delivered(self) -> None:
        self.acknowledged.append(self.queue.pop(0))


@pytest.fixture
async def receiver_url() -> AsyncIterator[tuple[Receiver, str, aiohttp.ClientSession]]:
    receiver = Receiver([503, 500, 429])
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    server = TestServer(app)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield receiver, str(server.make_url("/hook")), session
    finally:
        await server.close()


async def test_the_pusher_redelivers_until_a_2xx_in_order(
    receiver_url: tuple[Receiver, str, aiohttp.ClientSession], running: list[asyncio.Task[None]]
) -> None:
    receiver, url, session = receiver_url
    pusher = ListPusher(url, [b'{"n":1}', b'{"n":2}'], Backoff(0.01, 0.02, jitter=False))
    running.append(asyncio.create_task(pusher.run(session)))
    await wait_until(lambda: len(pusher.acknowledged) == 2, 10, "both bodies acknowledged")
    assert receiver.bodies == [b'{"n":1}'] * 4 + [b'{"n":2}'], "the first until its 2xx"
    assert pusher.acknowledged == [b'{"n":1}', b'{"n":2}']
    for body, headers in zip(receiver.bodies, receiver.headers, strict=True):
        stamp, signature = headers["X-Test-Timestamp"], headers["X-Test-Signature"]
        assert HEADERS.signature_refusal([NEW], stamp, signature, body) is None


async def test_the_pusher_waits_for_work_then_delivers_it(
    receiver_url: tuple[Receiver, str, aiohttp.ClientSession], running: list[asyncio.Task[None]]
) -> None:
    receiver, url, session = receiver_url
    receiver.statuses.clear()
    pusher = ListPusher(url, [], Backoff(0.01, 0.02, jitter=False))
    running.append(asyncio.create_task(pusher.run(session)))
    await settle()  # it starts, finds no work, and waits
    assert receiver.bodies == []
    pusher.queue.append(b"{}")
    pusher.wake()
    await wait_until(lambda: pusher.acknowledged == [b"{}"], 10, "the new body delivered")


async def test_an_interrupt_ends_the_wait_after_a_failure(
    receiver_url: tuple[Receiver, str, aiohttp.ClientSession], running: list[asyncio.Task[None]]
) -> None:
    receiver, url, session = receiver_url
    receiver.statuses[:] = [503]
    pusher = ListPusher(url, [b"{}"], Backoff(60.0, 60.0, jitter=False))
    running.append(asyncio.create_task(pusher.run(session)))
    await wait_until(
        lambda: pusher.attempts == 1 and len(receiver.bodies) == 1, 10, "the first try"
    )
    await settle()
    assert pusher.acknowledged == [], "waiting its minute"
    pusher.interrupt()
    await wait_until(lambda: pusher.acknowledged == [b"{}"], 10, "delivered without the minute")


# --- Remote ids, checked at the intake -----------------------------------------------------------


class Commits:
    def __init__(self) -> None:
        self.batches: list[list[Any]] = []

    async def commit(self, writes: list[Any]) -> None:
        self.batches.append(writes)


def intake() -> tuple[VendorIntake, Commits]:
    commits = Commits()
    return VendorIntake(InboxStore(None), commits, lambda: None), commits  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "fields",
    [
        {"event_id": "e" * MAX_ID_BYTES},
        {"conversation_id": "é" * (MAX_ID_BYTES // 2)},  # bytes of UTF-8, not characters
        {"message_id": "conv-7/msg 8 (émoji 💊)"},
    ],
)
async def test_the_intake_stores_every_id_some_connector_accepts(fields: dict[str, str]) -> None:
    vendor_intake, commits = intake()
    event = message(**{"event_id": "e1", **fields})
    await vendor_intake.batch_emitter("pandalab")([event])
    assert len(commits.batches) == 1 and len(commits.batches[0]) == 1


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("event_id", "", "non-empty"),
        ("conversation_id", "c\x00", "control characters"),
        ("message_id", "m\n1", "control characters"),
        ("message_id", "m\x7f", "control characters"),
        ("event_id", "e" * (MAX_ID_BYTES + 1), f"at most {MAX_ID_BYTES} bytes"),
        ("conversation_id", "é" * (MAX_ID_BYTES // 2 + 1), f"at most {MAX_ID_BYTES} bytes"),
        ("event_id", "evt_\ud800", "Unicode"),
        ("reply_to", "", "non-empty"),
    ],
)
async def test_the_intake_refuses_an_id_it_cannot_store_and_stores_nothing(
    field: str, value: str, words: str
) -> None:
    vendor_intake, commits = intake()
    good = message("e1")
    bad = replace(good, **{"event_id": "e2", field: value})
    with pytest.raises(InvalidRemoteId) as refused:
        await vendor_intake.batch_emitter("pandalab")([good, bad])
    assert isinstance(refused.value, ValueError)
    assert field in str(refused.value) and words in str(refused.value)
    assert value not in str(refused.value) or not value
    assert commits.batches == [], "the whole batch refused, nothing written"
    with pytest.raises(InvalidRemoteId):
        await vendor_intake.emitter("pandalab")(bad)


def test_events_without_a_message_id_are_checked_on_what_they_have() -> None:
    check_event_ids(message("e1", message_id="m1"))
    with pytest.raises(InvalidRemoteId, match="conversation_id"):
        check_event_ids(message("e1", conversation_id="x" * (MAX_ID_BYTES + 1)))
