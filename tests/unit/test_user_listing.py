"""Connectors list their vendor's users page by page (``UserListing``), over real HTTP to the
sandboxes: PandaLab, Medipeps and the webhook contract; and the sandboxes' listing endpoints."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bridge.devtools.sandboxes import vendor_sandbox
from connectors.base import (
    Capabilities,
    Connector,
    ConnectorContext,
    ConnectorError,
    RemoteUser,
    UserListing,
    UserPage,
    derive_capabilities,
)
from connectors.medipeps import MedipepsConnector
from connectors.medipeps import sandbox as medipeps_sandbox
from connectors.pandalab import PandaLabConnector
from connectors.pandalab import sandbox as pandalab_sandbox
from connectors.sandbox.errors import SandboxError
from connectors.sandbox.kernel import Kernel, SandboxUser
from connectors.webhook import WebhookConnector
from connectors.webhook import sandbox as webhook_sandbox

from connector_helpers import Recorder, Served, rpps
from helpers import MemoryStore

VENDORS: dict[str, tuple[type[Connector], Any]] = {
    "pandalab": (PandaLabConnector, pandalab_sandbox),
    "medipeps": (MedipepsConnector, medipeps_sandbox),
    "webhook": (WebhookConnector, webhook_sandbox),
}
EXTRA = tuple(SandboxUser(rpps(n), f"Prénom{n}", f"Nom{n}", "Infirmier") for n in (7, 3, 9))
"""Users added to each sandbox's own, out of order, so a listing has several pages."""


def connector_for(vendor: str, url: str, **overrides: Any) -> Connector:
    cls, _ = VENDORS[vendor]
    settings = cls.Settings.model_validate(vendor_sandbox(vendor).settings(url) | overrides)
    ctx = ConnectorContext(
        connector_id=f"{vendor}-list",
        settings=settings,
        emit=Recorder(),
        store=MemoryStore(),
        public_base_url="http://127.0.0.1:1/connectors/x",
    )
    return cls(ctx)


@asynccontextmanager
async def sandbox_and_connector(
    vendor: str, users: tuple[SandboxUser, ...] | None = None
) -> AsyncIterator[tuple[Served, Connector, tuple[SandboxUser, ...]]]:
    module = VENDORS[vendor][1]
    users = (*module.USERS, *EXTRA) if users is None else users
    sandbox = Served(module.create_app(users=users))
    await sandbox.start()
    connector = connector_for(vendor, sandbox.url)
    try:
        yield sandbox, connector, users
    finally:
        close = getattr(connector.client, "close", None)
        if close is not None:
            await close()
        await sandbox.close()


async def list_all(connector: Connector, limit: int) -> tuple[list[RemoteUser], int]:
    assert isinstance(connector, UserListing)
    users: list[RemoteUser] = []
    cursor: str | None = None
    pages = 0
    while True:
        page = await connector.list_users(cursor, limit)
        pages += 1
        assert isinstance(page, UserPage) and len(page.users) <= limit
        users.extend(page.users)
        if page.next_cursor is None:
            return users, pages
        cursor = page.next_cursor
        assert pages < 100, "the listing does not end"


# --- The connectors ------------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", sorted(VENDORS))
async def test_a_connector_lists_every_user_in_idnps_order_across_pages(vendor: str) -> None:
    async with sandbox_and_connector(vendor) as (_, connector, users):
        assert connector.capabilities.user_listing
        listed, pages = await list_all(connector, 2)
        expected = sorted(users, key=lambda u: u.idnps)
        assert [u.idnps for u in listed] == [u.idnps for u in expected]
        assert [(u.given_name, u.family_name, u.profession) for u in listed] == [
            (u.given_name, u.family_name, u.profession) for u in expected
        ]
        assert pages == (len(users) + 1) // 2
        everyone = await connector.list_users(None, 1000)
        assert everyone.next_cursor is None and everyone.users == tuple(listed)


@pytest.mark.parametrize("vendor", sorted(VENDORS))
async def test_a_malformed_user_is_left_out_without_failing_the_page(
    vendor: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret_name = "Zorglub-Secret-Name"
    broken = SandboxUser(rpps(5), "", secret_name, "Infirmier")  # an empty given name
    users = (EXTRA[0], broken, EXTRA[1], EXTRA[2])
    caplog.set_level(logging.INFO)
    async with sandbox_and_connector(vendor, users) as (_, connector, _users):
        listed, _ = await list_all(connector, 2)
    assert [u.idnps for u in listed] == sorted(u.idnps for u in EXTRA)
    left_out = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(left_out) == 1 and left_out[0].levelno == logging.WARNING
    assert secret_name not in caplog.text


async def test_a_page_that_does_not_advance_is_refused() -> None:
    async def stuck(request: web.Request) -> web.Response:
        return web.json_response({"users": [], "next_cursor": request.query.get("cursor", "a")})

    app = web.Application()
    app.router.add_get("/users", stuck)
    served = Served(app)
    await served.start()
    try:
        connector = connector_for("webhook", served.url)
        assert isinstance(connector, UserListing)
        assert (await connector.list_users(None, 10)).next_cursor == "a"
        with pytest.raises(ConnectorError, match="does not move past"):
            await connector.list_users("a", 10)
    finally:
        await served.close()


@pytest.mark.parametrize("status", [404, 501])
async def test_a_webhook_vendor_without_a_listing_gives_an_empty_complete_page(
    status: int, caplog: pytest.LogCaptureFixture
) -> None:
    async def none(_: web.Request) -> web.Response:
        return web.json_response({"error": "not_found", "message": "no"}, status=status)

    app = web.Application()
    app.router.add_get("/users", none)
    served = Served(app)
    await served.start()
    caplog.set_level(logging.INFO)
    try:
        connector = connector_for("webhook", served.url)
        assert isinstance(connector, UserListing)
        for _ in range(3):
            assert await connector.list_users(None, 100) == UserPage((), None)
    finally:
        await served.close()
    said = [r for r in caplog.records if "lists no users" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO


async def test_a_malformed_webhook_page_fails_the_call() -> None:
    async def bad(_: web.Request) -> web.Response:
        return web.json_response({"users": "nope", "next_cursor": None})

    app = web.Application()
    app.router.add_get("/users", bad)
    served = Served(app)
    await served.start()
    try:
        connector = connector_for("webhook", served.url)
        assert isinstance(connector, UserListing)
        with pytest.raises(ConnectorError) as refused:
            await connector.list_users(None, 10)
        assert refused.value.retriable is False
    finally:
        await served.close()


# --- The sandboxes' endpoints ----------------------------------------------------------------


@asynccontextmanager
async def raw_get(vendor: str) -> AsyncIterator[tuple[Served, Any]]:
    """A sandbox, and a function doing an authenticated GET of its listing with a query."""
    async with (
        sandbox_and_connector(vendor) as (sandbox, connector, _),
        aiohttp.ClientSession() as http,
    ):
        if vendor == "pandalab":
            form = {
                "grant_type": "client_credentials",
                "client_id": pandalab_sandbox.CLIENT_ID,
                "client_secret": pandalab_sandbox.CLIENT_SECRET,
            }
            async with http.post(f"{sandbox.url}/oauth/token", data=form) as resp:
                token = (await resp.json())["access_token"]

            async def get(query: dict[str, str]) -> tuple[int, Any]:
                async with http.get(
                    f"{sandbox.url}/api/v1/users",
                    params=query,
                    headers={"Authorization": f"Bearer {token}"},
                ) as resp:
                    return resp.status, await resp.json()

        elif vendor == "medipeps":

            async def get(query: dict[str, str]) -> tuple[int, Any]:
                async with http.get(
                    f"{sandbox.url}/mp/professionals",
                    params=query,
                    headers={"X-Api-Key": medipeps_sandbox.API_KEY},
                ) as resp:
                    return resp.status, await resp.json()

        else:
            assert isinstance(connector, WebhookConnector)

            async def get(query: dict[str, str]) -> tuple[int, Any]:
                query = {"cursor" if k == "after" else k: v for k, v in query.items()}
                status, body = await connector.client.get("/users", params=query, accept=(400,))
                return status, body

        yield sandbox, get


ERROR_SHAPES = {
    "pandalab": lambda body: body["error"] == "invalid_request" and body["message"],
    "medipeps": lambda body: body["code"] == "BAD_REQUEST" and body["detail"],
    "webhook": lambda body: body["error"] == "invalid_request" and body["message"],
}
LIST_KEYS = {
    "pandalab": ("users", "next"),
    "medipeps": ("professionals", "after"),
    "webhook": ("users", "next_cursor"),
}


@pytest.mark.parametrize("vendor", sorted(VENDORS))
async def test_the_sandbox_refuses_a_bad_limit_or_cursor(vendor: str) -> None:
    async with raw_get(vendor) as (_, get):
        for query in (
            {"limit": "0"},
            {"limit": "1001"},
            {"limit": "x"},
            {"limit": "-1"},
            {"after": "not-an-idnps"},
            {"after": "810000001917"},  # a wrong check digit
        ):
            status, body = await get(query)
            assert status == 400, query
            assert ERROR_SHAPES[vendor](body), body


@pytest.mark.parametrize("vendor", sorted(VENDORS))
async def test_the_sandbox_pages_and_ends(vendor: str) -> None:
    items, next_key = LIST_KEYS[vendor]
    module = VENDORS[vendor][1]
    ids = sorted(str(u.idnps) for u in (*module.USERS, *EXTRA))
    async with raw_get(vendor) as (_, get):
        status, body = await get({})
        assert status == 200 and [u["idnps"] for u in body[items]] == ids
        assert body[next_key] is None, "the default page (100) holds them all"
        status, body = await get({"limit": "1000"})
        assert status == 200 and body[next_key] is None
        status, body = await get({"limit": "3"})
        assert [u["idnps"] for u in body[items]] == ids[:3] and body[next_key] == ids[2]
        status, body = await get({"limit": "3", "after": ids[2]})
        assert [u["idnps"] for u in body[items]] == ids[3:6]
        status, body = await get({"after": ids[-1]})
        assert status == 200 and body == {items: [], next_key: None}
        beyond = str(rpps(999_999_999))
        assert beyond > ids[-1]
        status, body = await get({"after": beyond})
        assert status == 200 and body == {items: [], next_key: None}


async def test_the_sandbox_listing_needs_the_vendors_credentials() -> None:
    async with aiohttp.ClientSession() as http:
        async with sandbox_and_connector("medipeps") as (sandbox, _, _):
            for headers in ({}, {"X-Api-Key": "wrong"}):
                async with http.get(f"{sandbox.url}/mp/professionals", headers=headers) as resp:
                    assert resp.status == 403
                    assert (await resp.json())["code"] == "FORBIDDEN"
        bearer = {"Authorization": "Bearer nope"}
        async with (
            sandbox_and_connector("pandalab") as (sandbox, _, _),
            http.get(f"{sandbox.url}/api/v1/users", headers=bearer) as resp,
        ):
            assert resp.status == 401
            assert (await resp.json())["error"] == "invalid_token"
        async with (
            sandbox_and_connector("webhook") as (sandbox, _, _),
            http.get(f"{sandbox.url}/users") as resp,
        ):
            assert resp.status == 401
            assert (await resp.json())["error"] == "unauthorized"


async def test_a_wrong_key_fails_the_medipeps_listing() -> None:
    async with sandbox_and_connector("medipeps") as (sandbox, _, _):
        connector = connector_for("medipeps", sandbox.url, api_key="not-the-k3y")
        assert isinstance(connector, UserListing)
        try:
            with pytest.raises(ConnectorError) as refused:
                await connector.list_users(None, 10)
        finally:
            await connector.client.close()  # type: ignore[attr-defined]
        assert "403" in str(refused.value) and "k3y" not in str(refused.value)


def test_the_kernel_pages_through_100000_users_quickly() -> None:
    users = [SandboxUser(rpps(n), "A", "B", "C") for n in range(100_000, 0, -1)]
    kernel = Kernel(users, vendor_name="Big", new_id=lambda _kind: "x")
    started = time.monotonic()
    seen: list[str] = []
    after: str | None = None
    while True:
        page, after = kernel.users_after(after, 1000)
        seen.extend(u.idnps for u in page)
        if after is None:
            break
    assert len(seen) == 100_000 and seen == sorted(seen)
    assert time.monotonic() - started < 2.0, "a page is a bisect and a slice"
    with pytest.raises(SandboxError) as bad:
        kernel.users_after(None, 0)
    assert bad.value.status == 400


# --- Capabilities ----------------------------------------------------------------------------


def test_user_listing_is_an_operation_flag_derived_from_its_class() -> None:
    assert Capabilities().user_listing is False
    assert derive_capabilities(UserListing, Capabilities()).user_listing is True
    assert derive_capabilities(object, Capabilities()).user_listing is False
    for cls in (PandaLabConnector, MedipepsConnector, WebhookConnector):
        assert issubclass(cls, UserListing) and cls.capabilities.user_listing
    assert Capabilities(user_listing=True).to_json()["user_listing"] is True
