"""Bounded HTTP, both ways, over real HTTP (issue 11, points 12 and 13).

In: a vendor webhook (the PandaLab-style one, the webhook contract's, any connector's route
behind the bridge's dispatcher) refuses an unsigned or stale request (401) and a declared
oversize one (413) before reading its body, and cuts a chunked body at the connector's limit.
The uploads here stall after a few bytes and never end: they get their answer all the same,
which only a server that does not wait for (nor read) the body can give.

Out: every answer the bridge reads from a vendor or a directory server is read up to a cap (a
hostile server offers 300 MB; the bytes the client received stay under the cap plus its
buffer), and credentials (a bearer token, an ``X-Api-Key``, a FHIR key, a client secret) never
reach another origin: redirects and FHIR ``next`` links off the origin are refused, and a
second server that records every request it gets receives none.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr

from bridge.core.connector_routes import ConnectorRoutes
from bridge.devtools.sandboxes import vendor_sandbox
from bridge.directory import fhir
from bridge.directory.fhir import API_KEY_HEADER, FhirFetchError, fetch_bundles
from connectors import http
from connectors.base import (
    MAX_REQUEST_BYTES,
    Connector,
    ConnectorContext,
    ConnectorError,
    RemoteEvent,
)
from connectors.idnps import Idnps
from connectors.kit.signing import sign
from connectors.medipeps.client import MedipepsClient
from connectors.pandalab import PandaLabConnector
from connectors.pandalab.client import PandaLabClient
from connectors.pandalab.connector import SANDBOX_WEBHOOK_SECRET
from connectors.webhook import signing
from connectors.webhook.client import WebhookClient
from connectors.webhook.connector import WebhookConnector

from helpers import MemoryStore

ANSWER_TIMEOUT_S = 30.0
"""A refusal that has not come after this long never will (the server waits for the body)."""
STALLED_DECLARED = 15 * 1024 * 1024
"""What the stalled uploads announce (``Content-Length``); they send a few KB of it."""
HOSTILE_ANSWER = 300 * 1024 * 1024
"""What the hostile servers offer."""
BUFFER_SLACK = 1024 * 1024
"""What a client may have received past its cap: the stream's buffer (aiohttp pauses reading
at 128 KiB unread) and one socket read."""
WEBHOOK_SECRET = "bounds-shared-secret-0123456789abcdef-0123456789"
IDNPS = Idnps("810000001916")


# --- In: the bridge's intake -------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.events: list[RemoteEvent] = []

    async def emit(self, event: RemoteEvent) -> None:
        self.events.append(event)

    async def emit_all(self, events: Sequence[RemoteEvent]) -> None:
        self.events.extend(events)


def context(connector_id: str, settings: Any, recorder: Recorder) -> ConnectorContext:
    return ConnectorContext(
        connector_id=connector_id,
        settings=settings,
        emit=recorder.emit,
        store=MemoryStore(),
        public_base_url=f"http://127.0.0.1/connectors/{connector_id}",
        emit_all=recorder.emit_all,
    )


class ReadingConnector(Connector):
    """A connector whose route reads its body with ``request.read()``, as a new one might: the
    dispatcher alone bounds it."""

    type_name = "reading"

    def __init__(self, ctx: ConnectorContext) -> None:
        super().__init__(ctx)
        self.calls = 0

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def create_conversation(self, conversation: Any) -> str:
        raise NotImplementedError

    async def send_message(self, conversation_id: str, message: Any) -> str:
        raise NotImplementedError

    async def get_user(self, idnps: Idnps) -> Any:
        return None

    def web_routes(self) -> list[web.RouteDef]:
        return [web.post("/hook", self._hook)]

    @property
    def max_request_bytes(self) -> int:
        return 64 * 1024

    async def _hook(self, request: web.Request) -> web.Response:
        self.calls += 1
        body = await request.read()
        return web.json_response({"read": len(body)})


@dataclass
class Intake:
    """The bridge's dispatcher serving three connectors on 127.0.0.1."""

    port: int
    recorder: Recorder
    reading: ReadingConnector
    connectors: list[Connector] = field(default_factory=list)


@pytest.fixture
async def intake() -> AsyncIterator[Intake]:
    recorder = Recorder()
    pandalab = PandaLabConnector(
        context(
            "pandalab",
            PandaLabConnector.Settings.model_validate(
                vendor_sandbox("pandalab").settings("http://127.0.0.1:9")
            ),
            recorder,
        )
    )
    webhook = WebhookConnector(
        context(
            "acme",
            WebhookConnector.Settings.model_validate(
                {"base_url": "http://127.0.0.1:9/vendor", "secret": WEBHOOK_SECRET}
            ),
            recorder,
        )
    )
    reading = ReadingConnector(context("reading", None, recorder))
    app = web.Application(client_max_size=16 * 1024 * 1024)  # the appservice's default
    routes = ConnectorRoutes()
    routes.mount(app)
    for connector_id, connector in (("pandalab", pandalab), ("acme", webhook)):
        routes.serve(
            connector_id,
            connector.web_routes(),
            connector.max_request_bytes,
            connector.refuse_unread,
        )
    routes.serve("reading", reading.web_routes(), reading.max_request_bytes)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield Intake(runner.addresses[0][1], recorder, reading, [pandalab, webhook])
    finally:
        for connector in (pandalab, webhook):
            await connector.stop()
        await runner.cleanup()


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]


async def stalled_request(
    port: int,
    path: str,
    headers: dict[str, str],
    *,
    declared: int | None,
    sent: bytes,
    chunked: bool = False,
) -> Answer:
    """POST ``path`` announcing ``declared`` bytes (or chunked), send ``sent`` of the body, then
    stall: the body never ends. Returns the answer the server gives meanwhile."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        step = 16 * 1024
        sent = b"".join(
            f"{len(sent[i : i + step]):x}\r\n".encode() + sent[i : i + step] + b"\r\n"
            for i in range(0, len(sent), step)
        )  # and never the last, empty chunk
    else:
        lines.append(f"Content-Length: {declared}")
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + sent)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        async with asyncio.timeout(ANSWER_TIMEOUT_S):
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            body = await reader.readexactly(length)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return Answer(int(status_line.split()[1]), json.loads(body))


def pandalab_signed(body: bytes, timestamp: int | None = None) -> dict[str, str]:
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    digest = hmac.new(
        SANDBOX_WEBHOOK_SECRET.encode(), stamp.encode() + b"." + body, hashlib.sha256
    ).hexdigest()
    return {
        "Content-Type": "application/json",
        "X-PandaLab-Timestamp": stamp,
        "X-PandaLab-Signature": f"sha256={digest}",
    }


def webhook_signed(body: bytes, timestamp: int | None = None) -> dict[str, str]:
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    return {
        "Content-Type": "application/json",
        "Idempotency-Key": "k1",
        signing.TIMESTAMP_HEADER: stamp,
        signing.SIGNATURE_HEADER: sign(WEBHOOK_SECRET, stamp, body),
    }


PATHS = {"pandalab": "/connectors/pandalab/webhook", "webhook": "/connectors/acme/events"}
SIGNED = {"pandalab": pandalab_signed, "webhook": webhook_signed}
UNSIGNED_CASES = ["no headers", "stale", "future", "malformed signature"]


def unsigned_headers(vendor: str, case: str) -> dict[str, str]:
    """Headers no valid request has, told from the headers alone (the body is not needed)."""
    now = int(time.time())
    if case == "no headers":
        return {"Content-Type": "application/json"}
    if case == "stale":
        return SIGNED[vendor](b"{}", now - 3600)
    if case == "future":
        return SIGNED[vendor](b"{}", now + 3600)
    headers = SIGNED[vendor](b"{}")
    name = "X-PandaLab-Signature" if vendor == "pandalab" else signing.SIGNATURE_HEADER
    headers[name] = "sha1=not-a-signature"
    return headers


@pytest.mark.parametrize("case", UNSIGNED_CASES)
@pytest.mark.parametrize("vendor", ["pandalab", "webhook"])
async def test_an_unsigned_stalled_upload_is_refused_401_before_its_body_is_read(
    intake: Intake, vendor: str, case: str
) -> None:
    answer = await stalled_request(
        intake.port,
        PATHS[vendor],
        unsigned_headers(vendor, case),
        declared=STALLED_DECLARED,
        sent=b"{" * 4096,
    )
    assert answer.status == 401, answer
    assert answer.body["error"] == "unauthorized" and answer.body["message"]
    assert intake.recorder.events == []


async def test_thirty_stalled_unsigned_uploads_all_get_their_401_at_once(intake: Intake) -> None:
    """The issue's attack: 30 unauthenticated 15 MB uploads that stall. Each is answered while
    it stalls: none is waited for, none is read (15 MB each would be 450 MB)."""
    answers = await asyncio.gather(
        *(
            stalled_request(
                intake.port,
                PATHS["pandalab" if n % 2 else "webhook"],
                {"Content-Type": "application/json"},
                declared=STALLED_DECLARED,
                sent=b"x" * 65536,
            )
            for n in range(30)
        )
    )
    assert [a.status for a in answers] == [401] * 30
    assert intake.recorder.events == []


@pytest.mark.parametrize("vendor", ["pandalab", "webhook"])
async def test_a_signed_upload_declaring_more_than_the_limit_is_refused_413_unread(
    intake: Intake, vendor: str
) -> None:
    answer = await stalled_request(
        intake.port,
        PATHS[vendor],
        SIGNED[vendor](b"{}"),
        declared=STALLED_DECLARED,
        sent=b"x" * 4096,
    )
    assert answer.status == 413, answer
    assert answer.body["error"] == "body_too_large"
    assert "1048576 bytes" in answer.body["message"]


@pytest.mark.parametrize("vendor", ["pandalab", "webhook"])
async def test_a_chunked_body_is_cut_at_the_limit_without_waiting_for_its_end(
    intake: Intake, vendor: str
) -> None:
    """Signed headers (a fresh timestamp costs nothing to forge), then a chunked body past the
    1 MiB limit that never ends: refused once past the limit, not read to an end."""
    answer = await stalled_request(
        intake.port,
        PATHS[vendor],
        SIGNED[vendor](b"{}"),
        declared=None,
        sent=b"x" * (1024 * 1024 + 128 * 1024),
        chunked=True,
    )
    assert answer.status == 413, answer
    assert answer.body["error"] == "body_too_large"
    assert intake.recorder.events == []


async def test_the_dispatcher_bounds_any_connector_route(intake: Intake) -> None:
    """A route that reads its body whole (``request.read()``) is still bounded: a declared
    oversize body is refused before the route runs, a chunked one once past the limit."""
    path = "/connectors/reading/hook"
    declared = await stalled_request(
        intake.port, path, {}, declared=STALLED_DECLARED, sent=b"x" * 4096
    )
    assert declared.status == 413 and declared.body["error"] == "body_too_large", declared
    assert intake.reading.calls == 0, "refused before the route ran"

    chunked = await stalled_request(
        intake.port, path, {}, declared=None, sent=b"x" * (192 * 1024), chunked=True
    )
    assert chunked.status == 413 and "65536 bytes" in chunked.body["message"], chunked
    assert intake.reading.calls == 1

    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{intake.port}{path}", data=b"y" * 1000) as resp,
    ):
        assert (resp.status, await resp.json()) == (200, {"read": 1000})


@pytest.mark.parametrize("vendor", ["pandalab", "webhook"])
async def test_the_routes_themselves_refuse_unread_without_the_dispatcher(
    intake: Intake, vendor: str
) -> None:
    """The same answers from the connector's routes mounted bare (as a connector's own tests
    and tools mount them): the routes do not rely on the dispatcher's checks."""
    connector = intake.connectors[0 if vendor == "pandalab" else 1]
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.add_routes(connector.web_routes())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    path = PATHS[vendor].split("/", 3)[3]
    try:
        port = runner.addresses[0][1]
        unsigned = await stalled_request(
            port, f"/{path}", {}, declared=STALLED_DECLARED, sent=b"x" * 4096
        )
        oversize = await stalled_request(
            port, f"/{path}", SIGNED[vendor](b"{}"), declared=STALLED_DECLARED, sent=b"x" * 4096
        )
    finally:
        await runner.cleanup()
    assert (unsigned.status, unsigned.body["error"]) == (401, "unauthorized")
    assert (oversize.status, oversize.body["error"]) == (413, "body_too_large")
    assert intake.recorder.events == []


def test_a_connector_accepts_one_mebibyte_unless_it_says_otherwise() -> None:
    assert MAX_REQUEST_BYTES == 1024 * 1024
    settings = PandaLabConnector.Settings.model_validate(
        {**vendor_sandbox("pandalab").settings("http://x"), "max_body_bytes": 256 * 1024}
    )
    assert PandaLabConnector(context("p", settings, Recorder())).max_request_bytes == 256 * 1024


async def test_a_signed_webhook_within_the_limit_is_still_stored(intake: Intake) -> None:
    body = json.dumps(
        {
            "id": "evt_1",
            "type": "conversation.typing",
            "created_at": "2026-01-01T10:00:00Z",
            "data": {
                "typing": {
                    "conversation_id": "c1",
                    "at": "2026-01-01T10:00:00Z",
                    "who": str(IDNPS),
                    "typing": True,
                }
            },
        }
    ).encode()
    url = f"http://127.0.0.1:{intake.port}{PATHS['pandalab']}"
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=pandalab_signed(body)) as resp,
    ):
        assert resp.status == 200, await resp.text()
    assert [e.event_id for e in intake.recorder.events] == ["evt_1"]


# --- Out: answers read with a cap ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(
    routes: list[web.RouteDef],
) -> AsyncIterator[str]:
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@dataclass
class Hostile:
    """Answers with ``HOSTILE_ANSWER`` bytes of a JSON string, declared or chunked; counts
    what it could write before the client hung up."""

    declared: bool
    written: int = 0

    async def handler(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        if self.declared:
            resp.content_length = HOSTILE_ANSWER
        else:
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        chunk = b'"' + b"x" * (64 * 1024 - 1)
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while self.written < HOSTILE_ANSWER:
                await resp.write(chunk)
                self.written += len(chunk)
        return resp


class Received:
    """A trace config that keeps each response, to read how many bytes reached it."""

    def __init__(self) -> None:
        self.responses: list[aiohttp.ClientResponse] = []
        self.config = aiohttp.TraceConfig()
        self.config.on_request_end.append(self._end)

    async def _end(self, session: Any, ctx: Any, params: aiohttp.TraceRequestEndParams) -> None:
        self.responses.append(params.response)

    def session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=60),
            cookie_jar=aiohttp.DummyCookieJar(),
            trace_configs=[self.config],
        )

    def last_received(self) -> int:
        """Bytes of the last answer's body that reached the client (read or buffered)."""
        return self.responses[-1].content.total_bytes


def token_route() -> web.RouteDef:
    async def token(request: web.Request) -> web.Response:
        return web.json_response({"access_token": "tok-secret", "expires_in": 3600})

    return web.post("/oauth/token", token)


async def pandalab_user(base: str, received: Received) -> Any:
    client = PandaLabClient(base, "client", SecretStr("client-secret"))
    client._http._session = received.session()
    try:
        return await client.get_user(str(IDNPS))
    finally:
        await client.close()


async def medipeps_user(base: str, received: Received) -> Any:
    client = MedipepsClient(base, SecretStr("medipeps-key"))
    client._http._session = received.session()
    try:
        return await client.get_professional(str(IDNPS))
    finally:
        await client.close()


async def webhook_user(base: str, received: Received) -> Any:
    client = WebhookClient(base, lambda: [WEBHOOK_SECRET], timeout_s=60)
    client._http._session = received.session()
    try:
        return await client.get(f"/users/{IDNPS}")
    finally:
        await client.close()


USER_LOOKUPS: dict[str, tuple[str, Callable[[str, Received], Awaitable[Any]]]] = {
    "pandalab": (f"/api/v1/users/{IDNPS}", pandalab_user),
    "medipeps": (f"/mp/professionals/{IDNPS}", medipeps_user),
    "webhook": (f"/users/{IDNPS}", webhook_user),
}


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
@pytest.mark.parametrize("vendor", sorted(USER_LOOKUPS))
async def test_a_huge_user_look_up_answer_is_refused_after_at_most_the_cap(
    vendor: str, declared: bool
) -> None:
    """The issue's 300 MB user look-up: a clear, permanent error, and the client received at
    most the cap (1 MiB) and its buffer, not the 300 MB."""
    path, look_up = USER_LOOKUPS[vendor]
    hostile = Hostile(declared)
    received = Received()
    async with serving([token_route(), web.get(path, hostile.handler)]) as base:
        with pytest.raises(ConnectorError) as error:
            await look_up(base, received)
    assert "bytes accepted" in str(error.value) and str(http.MAX_ANSWER_BYTES) in str(error.value)
    assert not error.value.retriable
    got = received.last_received()
    if declared:
        assert "is 314572800 bytes" in str(error.value)
        assert got <= BUFFER_SLACK, got  # refused on its header: not one chunk was asked for
    else:
        assert got <= http.MAX_ANSWER_BYTES + BUFFER_SLACK, got
    assert hostile.written < HOSTILE_ANSWER


async def test_a_medipeps_events_page_may_be_larger_than_an_ordinary_answer() -> None:
    """Pages carry inline files (up to about 9.5 MiB): read up to their own, larger cap."""
    events = [{"seq": 1, "type": "NEW_MSG", "pad": "x" * (3 * 1024 * 1024)}]

    async def page(request: web.Request) -> web.Response:
        return web.json_response({"events": events, "cursor": 1})

    async with serving([web.get("/mp/events", page)]) as base:
        client = MedipepsClient(base, SecretStr("medipeps-key"))
        try:
            result = await client.events(after=0, limit=10)
        finally:
            await client.close()
    assert result.cursor == 1 and len(result.events) == 1


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_a_huge_fhir_page_is_refused_after_at_most_the_cap(declared: bool) -> None:
    hostile = Hostile(declared)
    received = Received()
    async with (
        serving([web.get("/fhir/Practitioner", hostile.handler)]) as base,
        received.session() as session,
    ):
        with pytest.raises(FhirFetchError, match="bytes accepted") as error:
            async for _ in fetch_bundles(f"{base}/fhir", "fhir-key", session=session):
                pass
    assert "page 1" in str(error.value) and "fhir-key" not in str(error.value)
    got = received.last_received()
    assert got <= fhir.MAX_PAGE_BYTES + BUFFER_SLACK, got
    assert hostile.written < HOSTILE_ANSWER


# --- Out: credentials stay on their origin -------------------------------------------------------


@dataclass
class Collector:
    """Another origin: records every request it gets, with its headers and body."""

    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)

    async def handler(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, dict(request.headers), await request.read()))
        return web.json_response({"resourceType": "Bundle", "entry": [], "id": "x"})


@contextlib.asynccontextmanager
async def elsewhere() -> AsyncIterator[tuple[str, Collector]]:
    collector = Collector()
    async with serving([web.route("*", "/{tail:.*}", collector.handler)]) as url:
        yield url, collector


def redirect_to(url: str, status: int = 302) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": url})

    return handler


@pytest.mark.parametrize("status", [302, 307])
async def test_a_pandalab_download_redirected_elsewhere_never_carries_the_token(
    status: int,
) -> None:
    async with elsewhere() as (other, collector):

        async def file(request: web.Request) -> web.Response:
            assert request.headers["Authorization"] == "Bearer tok-secret"
            return web.Response(body=b"the file")

        routes = [
            token_route(),
            web.get("/api/v1/files/away", redirect_to(f"{other}/steal", status)),
            web.get("/api/v1/files/moved", redirect_to("/api/v1/files/here", status)),
            web.get("/api/v1/files/here", file),
        ]
        async with serving(routes) as base:
            client = PandaLabClient(base, "client", SecretStr("client-secret"))
            try:
                with pytest.raises(ConnectorError, match="off the API's origin") as error:
                    async with client.download(f"{base}/api/v1/files/away"):
                        pass
                assert not error.value.retriable
                # A redirect on the API's own origin is followed, with the token.
                async with client.download(f"{base}/api/v1/files/moved") as chunks:
                    assert b"".join([c async for c in chunks]) == b"the file"
            finally:
                await client.close()
    assert collector.requests == []


async def test_pandalab_api_calls_and_the_token_request_follow_no_redirect() -> None:
    async with elsewhere() as (other, collector):
        routes = [web.post("/oauth/token", redirect_to(f"{other}/token", 307))]
        async with serving(routes) as base:
            client = PandaLabClient(base, "client", SecretStr("client-secret"))
            try:
                with pytest.raises(ConnectorError, match="HTTP 307.*not followed"):
                    await client.get_user(str(IDNPS))
            finally:
                await client.close()

        routes = [
            token_route(),
            web.get(f"/api/v1/users/{IDNPS}", redirect_to(f"{other}/users", 307)),
        ]
        async with serving(routes) as base:
            client = PandaLabClient(base, "client", SecretStr("client-secret"))
            try:
                with pytest.raises(ConnectorError, match="HTTP 307.*not followed"):
                    await client.get_user(str(IDNPS))
            finally:
                await client.close()
    assert collector.requests == [], "the client secret and the token stay on the API's origin"


async def test_a_medipeps_call_redirected_elsewhere_never_carries_the_api_key() -> None:
    """aiohttp would have followed it with ``X-Api-Key`` (it only drops Authorization)."""
    async with elsewhere() as (other, collector):
        routes = [
            web.get(f"/mp/professionals/{IDNPS}", redirect_to(f"{other}/steal")),
            web.post("/mp/conversations", redirect_to(f"{other}/steal", 308)),
        ]
        async with serving(routes) as base:
            client = MedipepsClient(base, SecretStr("medipeps-key"))
            try:
                with pytest.raises(ConnectorError, match="HTTP 302.*not followed"):
                    await client.get_professional(str(IDNPS))
                with pytest.raises(ConnectorError, match="HTTP 308.*not followed"):
                    await client.create_conversation({"subject": None})
            finally:
                await client.close()
    assert collector.requests == []


async def test_a_webhook_vendor_download_redirected_elsewhere_is_refused() -> None:
    async with elsewhere() as (other, collector):
        routes = [web.get("/vendor/files/f1", redirect_to(f"{other}/steal"))]
        async with serving(routes) as base:
            client = WebhookClient(f"{base}/vendor", lambda: [WEBHOOK_SECRET], timeout_s=10)
            try:
                with pytest.raises(ConnectorError, match="HTTP 302.*not followed"):
                    async with client.download("f1"):
                        pass
            finally:
                await client.close()
    assert collector.requests == []


def bundle(next_url: str | None) -> dict[str, Any]:
    links = [{"relation": "next", "url": next_url}] if next_url else []
    return {"resourceType": "Bundle", "type": "searchset", "entry": [], "link": links}


async def test_a_fhir_next_link_to_another_origin_is_refused_and_never_gets_the_key() -> None:
    async with elsewhere() as (other, collector):
        seen: list[str | None] = []

        async def first(request: web.Request) -> web.Response:
            seen.append(request.headers.get(API_KEY_HEADER))
            if request.query.get("page") == "2":
                return web.json_response(bundle(f"{other}/fhir/Practitioner?page=3"))
            return web.json_response(bundle(f"{base}/fhir/Practitioner?page=2"))

        async with serving([web.get("/fhir/Practitioner", first)]) as base:
            pages = []
            with pytest.raises(FhirFetchError, match="another origin") as error:
                async for page in fetch_bundles(f"{base}/fhir", "fhir-key"):
                    pages.append(page)
    assert len(pages) == 2, "the pages on the endpoint's origin are read"
    assert seen == ["fhir-key", "fhir-key"]
    assert "fhir-key" not in str(error.value)
    assert collector.requests == []


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_fhir_redirect_to_another_origin_is_not_followed(status: int) -> None:
    async with elsewhere() as (other, collector):
        routes = [web.get("/fhir/Practitioner", redirect_to(f"{other}/fhir/Practitioner", status))]
        async with serving(routes) as base:
            with pytest.raises(FhirFetchError, match="off the API's origin"):
                async for _ in fetch_bundles(f"{base}/fhir", "fhir-key"):
                    pass
    assert collector.requests == []


async def test_a_fhir_redirect_on_the_same_origin_is_followed_with_the_key() -> None:
    seen: list[str | None] = []

    async def moved(request: web.Request) -> web.Response:
        seen.append(request.headers.get(API_KEY_HEADER))
        return web.json_response(bundle(None))

    routes = [
        web.get("/fhir/Practitioner", redirect_to("/v2/fhir/Practitioner")),
        web.get("/v2/fhir/Practitioner", moved),
    ]
    async with serving(routes) as base:
        pages = [page async for page in fetch_bundles(f"{base}/fhir", "fhir-key")]
    assert len(pages) == 1 and seen == ["fhir-key"]


def test_same_origin_compares_scheme_host_and_port() -> None:
    base = "https://api.vendor.example/v1"
    assert http.same_origin("https://api.vendor.example:443/files/1", base)
    assert not http.same_origin("http://api.vendor.example/files/1", base)
    assert not http.same_origin("https://api.vendor.example:8443/files/1", base)
    assert not http.same_origin("https://api.vendor.example.evil.example/files/1", base)
    assert not http.same_origin("//evil.example/files/1", base)
    assert not http.same_origin("/files/1", base)
