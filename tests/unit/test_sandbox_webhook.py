"""The webhook sandbox follows the contract (connectors/webhook/openapi.yaml), checked against the
file itself with JSON Schema 2020-12 (the dialect of OpenAPI 3.1).

Every request the sandbox serves and every answer it gives on the vendor API is validated
against the contract's ``webhooks`` section, and every push it makes against ``POST /events``,
signature included, recomputed here from the contract's text. The bridge side of the exchange
is the real connector, so its requests are held to the contract too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.typedefs import Middleware
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from bridge.devtools.sandboxes import vendor_sandbox
from connectors.base import (
    ConnectorContext,
    DeliveryReport,
    Location,
    Mention,
    NewConversation,
    OutboundAttachment,
    OutboundMessage,
    ParticipantChange,
    RemoteEvent,
    Sender,
)
from connectors.idnps import Idnps
from connectors.webhook import WebhookConnector
from connectors.webhook.connector import CONTRACT_VERSION
from connectors.webhook.sandbox import SECRET, USERS, create_app

from helpers import MemoryStore, wait_until

SPEC_PATH = Path(__file__).parents[2] / "connectors" / "webhook" / "openapi.yaml"
SPEC: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))
SPEC_URI = "urn:eimis:webhook-contract"
REGISTRY = Registry().with_resource(
    SPEC_URI, Resource.from_contents(SPEC, default_specification=DRAFT202012)
)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

FORMATS = FormatChecker()
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


@FORMATS.checks("date-time")
def _date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not _RFC3339.fullmatch(value):
        return False
    normal = value.upper().replace("Z", "+00:00")
    normal = re.sub(r"\.([0-9]+)", lambda m: "." + m.group(1)[:6].ljust(6, "0"), normal)
    try:
        datetime.fromisoformat(normal)
    except ValueError:
        return False
    return True


@FORMATS.checks("idnps")
def _idnps(value: object) -> bool:
    return not isinstance(value, str) or (Idnps.is_valid(value) and Idnps(value) == value)


@FORMATS.checks("uri")
def _uri(value: object) -> bool:
    return not isinstance(value, str) or bool(re.fullmatch(r"https?://\S+", value))


def validator(pointer: str) -> Draft202012Validator:
    return Draft202012Validator(
        {"$ref": f"{SPEC_URI}#{pointer}"}, registry=REGISTRY, format_checker=FORMATS
    )


def resolve(node: dict[str, Any]) -> dict[str, Any]:
    """A ``$ref`` of the document followed (parameters, responses)."""
    while "$ref" in node:
        target: Any = SPEC
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = target
    return node


def pointer(*parts: str) -> str:
    return "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def template_regex(template: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template)))


WEBHOOKS = {
    (method.upper(), template): template_regex(template)
    for template, item in SPEC["webhooks"].items()
    for method in item
}


def webhook_of(method: str, path: str) -> tuple[str, dict[str, str]] | None:
    for (known, template), regex in WEBHOOKS.items():
        match = regex.fullmatch(path)
        if known == method and match:
            return template, match.groupdict()
    return None


def errors_of(schema_pointer: str, instance: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:200]}"
        for e in validator(schema_pointer).iter_errors(instance)
    ]


# --- The contract document itself -----------------------------------------------------------------


def test_the_contract_is_an_openapi_31_document_whose_references_all_resolve() -> None:
    assert SPEC["openapi"] == "3.1.0"
    assert SPEC["info"]["version"] == CONTRACT_VERSION  # what the connector announces
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(SPEC)
    assert refs
    for ref in set(refs):
        assert ref.startswith("#/components/"), ref
        resolve({"$ref": ref})
    for schema in SPEC["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)
    for section in ("paths", "webhooks"):
        for template, item in SPEC[section].items():
            for method, operation in item.items():
                assert operation["responses"], (section, template, method)
                assert operation["operationId"]
                params = [resolve(p) for p in operation.get("parameters", [])]
                names = {p["name"] for p in params}
                assert "X-Eimis-Timestamp" in names, (template, method)
                if method == "post":
                    assert "Idempotency-Key" in names, (template, method)
                for name in re.findall(r"\{(\w+)\}", template):
                    assert name in names, (template, name)


def test_schemathesis_reads_the_bridge_side_of_the_contract() -> None:
    schemathesis = pytest.importorskip("schemathesis")
    schema = schemathesis.openapi.from_path(str(SPEC_PATH))
    labels = sorted(op.ok().label for op in schema.get_all_operations())
    assert labels == ["GET /capabilities", "POST /events"]


def test_every_vendor_operation_of_the_contract_is_served_by_the_sandbox() -> None:
    app = create_app()
    served = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
    }
    for method, template in WEBHOOKS:
        assert (method, template) in served, f"{method} {template}"


# --- A whole exchange, checked against the contract -----------------------------------------------


@dataclass
class ContractCheck:
    """What was seen on the wire, and what did not follow the contract."""

    violations: list[str] = field(default_factory=list)
    operations: set[tuple[str, str]] = field(default_factory=set)
    event_types: set[str] = field(default_factory=set)
    forms: set[str] = field(default_factory=set)
    refuse_pushes: int = 0
    check_requests: bool = True
    """Off when a test sends malformed requests on purpose (only the answers are checked)."""

    def vendor_side(self) -> Middleware:
        """Validates the sandbox's vendor API: each request, then its answer."""

        @web.middleware
        async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path.startswith("/_sandbox/"):
                return await handler(request)
            found = webhook_of(request.method, request.path)
            if found is None:
                self.violations.append(f"{request.method} {request.path}: not in the contract")
                return await handler(request)
            template, path_params = found
            operation = SPEC["webhooks"][template][request.method.lower()]
            where = f"{request.method} {template}"
            self.operations.add((request.method, template))
            if not self.check_requests:
                response = await handler(request)
                self._check_response(where, operation, template, request.method.lower(), response)
                return response
            self._check_parameters(where, operation, request, path_params)
            raw = b""
            if template == "/files":  # signed over the file's digest, announced in a header
                digest = request.headers.get("X-Eimis-Content-SHA256", "")
                self._check_signature(where, request.headers, digest.encode())
            else:
                raw = await request.read()
                self._check_signature(where, request.headers, raw)
            content = (operation.get("requestBody") or {}).get("content", {})
            if "application/json" in content:
                body_pointer = pointer(
                    "webhooks", template, request.method.lower(), "requestBody", "content"
                )
                self._check_json(
                    where + " request", f"{body_pointer}/application~1json/schema", raw
                )
            response = await handler(request)
            self._check_response(where, operation, template, request.method.lower(), response)
            return response

        return check

    def _check_parameters(
        self,
        where: str,
        operation: dict[str, Any],
        request: web.Request,
        path_params: dict[str, str],
    ) -> None:
        for param in map(resolve, operation.get("parameters", [])):
            if param["in"] == "header":
                value = request.headers.get(param["name"])
            else:
                value = path_params.get(param["name"])
            if value is None:
                if param.get("required"):
                    self.violations.append(f"{where}: {param['name']} missing")
                continue
            schema = param["schema"]
            if "$ref" in schema:
                problems = errors_of(schema["$ref"].removeprefix("#"), value)
            else:
                problems = [
                    e.message[:200] for e in Draft202012Validator(schema).iter_errors(value)
                ]
            self.violations += [f"{where}: {param['name']}: {p}" for p in problems]

    def _check_signature(self, where: str, headers: Any, payload: bytes) -> None:
        timestamp = headers.get("X-Eimis-Timestamp", "")
        expected = hmac.new(
            SECRET.encode(), timestamp.encode() + b"." + payload, hashlib.sha256
        ).hexdigest()
        listed = [s.strip() for s in headers.get("X-Eimis-Signature", "").split(",")]
        if f"sha256={expected}" not in listed:
            self.violations.append(f"{where}: the signature is not HMAC-SHA256 of ts.body")
        if abs(time.time() - int(timestamp or 0)) > 300:
            self.violations.append(f"{where}: timestamp outside the replay window")

    def _check_json(self, where: str, schema_pointer: str, raw: bytes) -> Any:
        try:
            data = json.loads(raw)
        except ValueError:
            self.violations.append(f"{where}: the body is not JSON")
            return None
        self.violations += [f"{where}: {e}" for e in errors_of(schema_pointer, data)]
        return data

    def _check_response(
        self,
        where: str,
        operation: dict[str, Any],
        template: str,
        method: str,
        response: web.StreamResponse,
    ) -> None:
        status = str(response.status)
        if status not in operation["responses"]:
            self.violations.append(f"{where}: answered {status}, not in the contract")
            return
        declared = resolve(operation["responses"][status])
        content = declared.get("content") or {}
        if "application/json" not in content:
            return
        if not isinstance(response, web.Response) or not isinstance(response.body, bytes):
            self.violations.append(f"{where}: {status} should have a JSON body")
            return
        if response.content_type != "application/json":
            self.violations.append(f"{where}: {status} is {response.content_type}, not JSON")
        schema = content["application/json"]["schema"]
        schema_pointer = (
            schema["$ref"].removeprefix("#")
            if "$ref" in schema
            else pointer("webhooks", template, method, "responses", status)
        )
        self._check_json(f"{where} {status}", schema_pointer, response.body)

    def events_tap(self, forward_to: Callable[[], str]) -> web.Application:
        """The events URL the sandbox pushes to: validates each push, then hands it to the
        connector's real endpoint and returns its answer."""

        async def events(request: web.Request) -> web.Response:
            raw = await request.read()
            where = "POST /events (pushed by the sandbox)"
            self._check_signature(where, request.headers, raw)
            key = request.headers.get("Idempotency-Key", "")
            if not re.fullmatch(r"[!-~]{1,255}", key):
                self.violations.append(f"{where}: Idempotency-Key missing or malformed")
            if request.content_type != "application/json":
                self.violations.append(f"{where}: Content-Type is not application/json")
            body_pointer = pointer("paths", "/events", "post", "requestBody", "content")
            data = self._check_json(where, f"{body_pointer}/application~1json/schema", raw)
            if isinstance(data, dict):
                events = data.get("events", [data])
                self.forms.add("batch" if "events" in data else "single")
                self.event_types.update(e.get("type") for e in events if isinstance(e, dict))
            if self.refuse_pushes:
                self.refuse_pushes -= 1
                return web.json_response(
                    {"error": "not_stored", "message": "try again"},
                    status=503,
                    headers={"Retry-After": "0"},
                )
            headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
            async with (
                aiohttp.ClientSession() as http,
                http.post(forward_to(), data=raw, headers=headers) as answer,
            ):
                return web.json_response(await answer.json(), status=answer.status)

        app = web.Application()
        app.router.add_post("/events", events)
        return app


@dataclass
class Exchange:
    check: ContractCheck
    connector: WebhookConnector
    events: list[RemoteEvent]
    sandbox_url: str
    http: aiohttp.ClientSession

    async def user(self, method: str, path: str, expect: int, **kwargs: Any) -> Any:
        async with self.http.request(method, f"{self.sandbox_url}/_sandbox/{path}", **kwargs) as r:
            text = await r.text()
            assert r.status == expect, text
            return json.loads(text) if text else None


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@asynccontextmanager
async def exchange() -> AsyncIterator[Exchange]:
    check = ContractCheck()
    sandbox_app = create_app(retry_initial=0.05, retry_max=0.2, batch_size=50)
    sandbox_app.middlewares.insert(0, check.vendor_side())
    sandbox, sandbox_url = await _serve(sandbox_app)
    events: list[RemoteEvent] = []

    async def store(event: RemoteEvent) -> None:
        events.append(event)

    settings = WebhookConnector.Settings.model_validate(
        vendor_sandbox("webhook").settings(sandbox_url)
    )
    ctx = ConnectorContext(
        connector_id="wh", settings=settings, emit=store, store=MemoryStore(), public_base_url=""
    )
    connector = WebhookConnector(ctx)
    bridge_app = web.Application()
    sub = web.Application()
    sub.add_routes(connector.web_routes())
    bridge_app.add_subapp("/connectors/wh", sub)
    bridge, bridge_url = await _serve(bridge_app)
    tap, tap_url = await _serve(check.events_tap(lambda: f"{bridge_url}/connectors/wh/events"))
    ctx.public_base_url = tap_url  # the sandbox is told to push to the tap
    await connector.start()
    try:
        async with aiohttp.ClientSession() as http:
            yield Exchange(check, connector, events, sandbox_url, http)
    finally:
        await connector.stop()
        for runner in (tap, bridge, sandbox):
            await runner.cleanup()


def _file(data: bytes, name: str, mime_type: str) -> OutboundAttachment:
    @asynccontextmanager
    async def opener() -> AsyncIterator[AsyncIterator[bytes]]:
        async def chunks() -> AsyncIterator[bytes]:
            yield data

        yield chunks()

    return OutboundAttachment(name, mime_type, len(data), opener)


CAROL = Sender("@carol:matrix.example.org", "Carol Petit")


async def test_a_whole_exchange_follows_the_contract_both_ways() -> None:
    ines, hugo = USERS[0].idnps, USERS[1].idnps
    async with exchange() as ex:
        connector = ex.connector
        # Vendor -> bridge: every kind of event; the first push is refused once (redelivered),
        # so the events written meanwhile travel as a batch.
        ex.check.refuse_pushes = 3
        conv = (
            await ex.user(
                "POST",
                f"users/{ines}/conversations",
                201,
                json={"with": [str(hugo), CAROL.mxid], "title": "Contrat"},
            )
        )["conversation_id"]
        base = f"users/{ines}/conversations/{conv}"
        upload = await ex.user(
            "POST",
            f"users/{ines}/files",
            201,
            data=b"%PDF-1.4 test",
            headers={"Content-Type": "application/pdf", "X-Filename": "cr.pdf"},
        )
        first = (await ex.user("POST", f"{base}/messages", 201, json={"text": "**Bilan**"}))[
            "message_id"
        ]
        await ex.user(
            "POST",
            f"{base}/messages",
            201,
            json={
                "text": f"@{CAROL.mxid} ci-joint",
                "file_id": upload["file_id"],
                "reply_to": first,
                "mentions": [CAROL.mxid],
                "location": None,
            },
        )
        await ex.user(
            "POST",
            f"{base}/messages",
            201,
            json={"text": "", "location": {"lat": 48.85, "lon": 2.35, "label": "Ici"}},
        )
        await ex.user("PATCH", f"{base}/messages/{first}", 200, json={"text": "Bilan revu"})
        reaction = await ex.user(
            "POST", f"{base}/messages/{first}/reactions", 201, json={"emoji": "👍"}
        )
        await ex.user("DELETE", f"{base}/messages/{first}/reactions/{reaction['reaction_id']}", 204)
        await ex.user("POST", f"{base}/read", 204, json={"up_to": first})
        await ex.user("POST", f"{base}/typing", 204, json={"typing": True})
        await ex.user("DELETE", f"{base}/messages/{first}", 204)
        await wait_until(lambda: len(ex.events) == 10, what="ten events at the bridge")
        with_file = ex.events[2]
        assert getattr(with_file, "attachment", None) is not None
        async with await connector.open_attachment(with_file.attachment) as chunks:  # type: ignore[attr-defined]
            assert b"".join([c async for c in chunks]) == b"%PDF-1.4 test"

        # Bridge -> vendor: every operation.
        assert await connector.get_user(hugo) is not None
        assert hugo in [u.idnps for u in (await connector.list_users(None, 1000)).users]
        assert await connector.get_user(Idnps("810000023456")) is None  # a PandaLab user
        mine = await connector.create_conversation(
            NewConversation("!contract:example.org", "Depuis Matrix", (ines, hugo), (CAROL,))
        )
        sent = await connector.send_message(
            mine,
            OutboundMessage(
                "$m1",
                CAROL,
                "Bonjour @Inès Garnier",
                datetime.now(UTC),
                html="Bonjour <a>Inès</a>",
                mentions=(Mention("Inès Garnier", idnps=ines),),
                location=Location(1.0, 2.0, None),
                message_kind="notice",
            ),
        )
        await connector.send_message(
            mine,
            OutboundMessage(
                "$m2",
                CAROL,
                "",
                datetime.now(UTC),
                attachment=_file(b"PNG", "a.png", "image/png"),
                reply_to=sent,
            ),
        )
        await connector.edit_message(
            mine, sent, OutboundMessage("$m3", CAROL, "Bonsoir", datetime.now(UTC))
        )
        hers = (
            await ex.user(
                "POST", f"users/{ines}/conversations/{mine}/messages", 201, json={"text": "Oui"}
            )
        )["message_id"]
        reaction_id = await connector.add_reaction(mine, hers, CAROL, "❤️", "$m4")
        await connector.remove_reaction(mine, hers, reaction_id, CAROL)
        await connector.mark_read(mine, CAROL, hers)
        await connector.set_typing(mine, CAROL, True)
        await connector.report_delivery(mine, hers, DeliveryReport("delivered", "reçu"))
        await connector.delete_message(mine, sent, CAROL)

        # A conversation lives: its vendor users change it, then the bridge does.
        emma = USERS[2].idnps
        dave = Sender("@dave:matrix.example.org", "Dave Roy")
        await ex.user("POST", f"{base}/participants", 200, json={"add": [str(emma), dave.mxid]})
        await ex.user("POST", f"{base}/participants", 200, json={"remove": [dave.mxid]})
        await ex.user("PATCH", base, 200, json={"title": "Renommée", "description": "Sujet"})
        await ex.user("POST", f"users/{hugo}/conversations/{conv}/leave", 204)
        await wait_until(lambda: len(ex.events) == 16, what="the conversation's changes")
        assert [e.kind for e in ex.events[11:]] == [
            "participants.added",
            "participants.removed",
            "conversation.renamed",
            "conversation.topic",
            "member.left",
        ]
        live = connector  # typed loosely: the operations come with the declared capabilities
        await live.add_participants(  # type: ignore[attr-defined]
            mine, ParticipantChange("$p1", members=(emma,), external=(dave,), by=CAROL)
        )
        await live.remove_external(  # type: ignore[attr-defined]
            mine, ParticipantChange("$p2", external=(dave,), by=CAROL)
        )
        await live.remove_members(  # type: ignore[attr-defined]
            mine, ParticipantChange("$p3", members=(emma,), by=CAROL)
        )
        await live.set_title(mine, "Nouveau titre", CAROL)  # type: ignore[attr-defined]
        await live.set_topic(mine, None, CAROL)  # type: ignore[attr-defined]
        await live.send_system_message(  # type: ignore[attr-defined]
            mine, "Un message n'a pas pu être remis.", "system:eimis.1"
        )
        history = await live.history(  # type: ignore[attr-defined]
            conv, limit=10, since=datetime(2000, 1, 1, tzinfo=UTC)
        )
        # The first message of the conversation was deleted: history leaves it out.
        pushed = [e for e in ex.events if e.kind == "message" and e.conversation_id == conv]
        assert [m.message_id for m in history] == [m.message_id for m in pushed[1:]]  # type: ignore[attr-defined]

    assert ex.check.violations == []
    assert ex.check.operations == set(WEBHOOKS), set(WEBHOOKS) - ex.check.operations
    assert ex.check.event_types == {
        "conversation.created",
        "message",
        "message.edited",
        "message.deleted",
        "reaction.added",
        "reaction.removed",
        "read",
        "typing",
        "participants.added",
        "participants.removed",
        "member.left",
        "conversation.renamed",
        "conversation.topic",
    }
    assert ex.check.forms == {"single", "batch"}


# --- Refusals, checked against the contract -------------------------------------------------------


def signed(
    body: bytes, *, secret: str = SECRET, ts: int | None = None, key: str | None = "k"
) -> dict[str, str]:
    timestamp = str(int(time.time()) if ts is None else ts)
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    headers = {
        "Content-Type": "application/json",
        "X-Eimis-Timestamp": timestamp,
        "X-Eimis-Signature": f"sha256={mac}",
    }
    if key is not None:
        headers["Idempotency-Key"] = key
    return headers


@pytest.fixture
async def checked_sandbox() -> AsyncIterator[tuple[str, ContractCheck, aiohttp.ClientSession]]:
    check = ContractCheck(check_requests=False)
    app = create_app()
    app.middlewares.insert(0, check.vendor_side())
    runner, url = await _serve(app)
    try:
        async with aiohttp.ClientSession() as http:
            yield url, check, http
    finally:
        await runner.cleanup()


async def test_the_sandbox_refuses_as_the_contract_says(
    checked_sandbox: tuple[str, ContractCheck, aiohttp.ClientSession],
) -> None:
    url, check, http = checked_sandbox
    ines = str(USERS[0].idnps)
    new = json.dumps({"title": None, "members": [ines], "external": []}).encode()

    async def post(path: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any, Any]:
        async with http.post(url + path, data=body, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None), resp.headers

    status, answer, _ = await post("/conversations", new, {"Content-Type": "application/json"})
    assert status == 401 and answer["error"] == "unauthorized"
    status, answer, _ = await post("/conversations", new, signed(new, secret="x" * 40))
    assert status == 401
    status, answer, _ = await post("/conversations", new, signed(new, ts=int(time.time()) - 301))
    assert status == 401 and "replay window" in answer["message"]
    status, answer, _ = await post("/conversations", new, signed(new, key=None))
    assert status == 400 and "Idempotency-Key" in answer["message"]

    status, first, _ = await post("/conversations", new, signed(new, key="same"))
    assert status == 201
    status, again, headers = await post("/conversations", new, signed(new, key="same"))
    assert (status, again) == (201, first) and headers["Idempotent-Replayed"] == "true"
    other = json.dumps({"title": "Autre", "members": [ines], "external": []}).encode()
    status, answer, _ = await post("/conversations", other, signed(other, key="same"))
    assert status == 422 and answer["error"] == "idempotency_key_reused"

    bad = json.dumps({"title": None, "members": [ines], "external": [], "extra": 1}).encode()
    status, answer, _ = await post("/conversations", bad, signed(bad, key="bad"))
    assert status == 400 and "extra" in answer["message"]
    unknown = json.dumps({"title": None, "members": ["810000001916"], "external": []}).encode()
    status, answer, _ = await post("/conversations", unknown, signed(unknown, key="unknown"))
    assert status == 404 and answer["error"] == "user_not_found"
    read = json.dumps(
        {"reader": {"ref": CAROL.mxid, "display_name": "C", "mxid": CAROL.mxid}, "up_to": "m"}
    ).encode()
    status, answer, _ = await post("/conversations/nope/read", read, signed(read, key="r"))
    assert status == 404 and answer["error"] == "conversation_not_found"

    data = b"some bytes"
    digest = hashlib.sha256(b"other bytes").hexdigest()
    headers = signed(digest.encode(), key="f")
    headers.update(
        {
            "Content-Type": "text/plain",
            "X-Eimis-Content-SHA256": digest,
            "X-Eimis-Filename": "a.txt",
        }
    )
    status, answer, _ = await post("/files", data, headers)
    assert status == 400 and answer["error"] == "digest_mismatch"

    async with http.get(f"{url}/users/{ines}", headers=signed(b"", key=None)) as resp:
        assert resp.status == 200
    async with http.get(f"{url}/users/812345678901", headers=signed(b"", key=None)) as resp:
        assert resp.status == 400
    async with http.get(f"{url}/files/nope", headers=signed(b"", key=None)) as resp:
        assert resp.status == 404

    assert check.violations == []
