"""The directory published in the homeserver's user directory (bridge/core/discovery.py), on
both engines: connectors' listings recorded, unlisted ghosts forgotten only after complete
passes, chosen ghosts registered once with their names, a moved person's old ghost renamed;
the open-registration probe's warning."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from mautrix.errors import MForbidden

from bridge.config import Config, load_config
from bridge.core.discovery import Discovery
from bridge.db.database import open_database
from bridge.db.directory import GHOST, NATIVE, Professional, Record
from bridge.db.stores import Stores
from bridge.matrix.registration_probe import warn_if_open_registration
from connectors.base import RemoteUser, UserListing, UserPage
from connectors.idnps import Idnps

DOMAIN = "eimis.localhost"
MARIE, PAUL, JEANNE, LUC = "810099000019", "810099000027", "810099000035", "810099000043"


def ghost(connector: str, idnps: str) -> str:
    return f"@eimis_{connector}_{idnps}:{DOMAIN}"


def user(idnps: str, given: str, family: str, profession: str = "Médecin") -> RemoteUser:
    return RemoteUser(Idnps(idnps), given, family, profession)


class Lister(UserListing):
    """A connector that lists its users, two per page; ``fail_at`` breaks a page."""

    def __init__(self, users: list[RemoteUser], fail_at: int | None = None) -> None:
        self.users = users
        self.fail_at = fail_at

    async def list_users(self, cursor: str | None, limit: int) -> UserPage:
        start = int(cursor or 0)
        if self.fail_at is not None and start >= self.fail_at:
            raise ConnectionError("vendor down")
        end = start + 2
        return UserPage(tuple(self.users[start:end]), str(end) if end < len(self.users) else None)


class Running:
    """The running connectors (``ConnectorSet``'s iteration)."""

    def __init__(self, **connectors: Any) -> None:
        self.by_id = connectors

    def __iter__(self) -> Any:
        return iter(list(self.by_id.items()))


class FakeHomeserver:
    def __init__(self) -> None:
        self.named: list[tuple[str, str | None]] = []
        self.refuse: set[str] = set()

    async def ensure_ghost(
        self, mxid: str, display_name: str | None, *, check_current: bool = True
    ) -> None:
        if mxid in self.refuse:
            raise MForbidden(403, "nope")
        self.named.append((mxid, display_name))


@pytest.fixture
async def stores(database_url: str) -> AsyncIterator[Stores]:
    from bridge.config import DatabaseConfig

    db = await open_database(DatabaseConfig(url=database_url))
    try:
        yield Stores.of(db)
    finally:
        await db.stop()


def make_config(tmp_path: Path, *, require: bool = False) -> Config:
    path = tmp_path / "config.yaml"
    data = {
        "homeserver": {"url": "http://127.0.0.1:1", "domain": DOMAIN},
        "appservice": {"address": "http://127.0.0.1:2", "as_token": "a", "hs_token": "h"},
        "connectors": {
            "pandalab": {"type": "pandalab", "settings": {}},
            "medipeps": {"type": "medipeps", "settings": {}},
        },
        "identity": {"require_directory_entry": require},
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return load_config(path)


def discovery(stores: Stores, config: Config, hs: FakeHomeserver, **running: Any) -> Discovery:
    return Discovery(stores, hs, Running(**running), config)  # type: ignore[arg-type]


async def test_listing_records_entries_and_ghost_rows(stores: Stores, tmp_path: Path) -> None:
    config = make_config(tmp_path)
    users = [
        user(MARIE, "Marie", "Dupont"),
        user(PAUL, "Paul", "Martin"),
        user(JEANNE, "Jeanne", "Roux"),
    ]
    d = discovery(stores, config, FakeHomeserver(), pandalab=Lister(users))

    report = await d.list_users()

    assert report.listed == {"pandalab": 3} and report.failed == () and report.forgotten == 0
    marie = await stores.directory.get(MARIE)
    assert marie is not None and marie.source == "connector:pandalab"
    assert marie.display_name == "Marie DUPONT - Médecin"
    rows = await stores.directory.mxids(PAUL)
    assert [(m.mxid, m.kind, m.connector) for m in rows] == [
        (ghost("pandalab", PAUL), GHOST, "pandalab")
    ]


async def test_a_connectors_word_never_overwrites_a_national_entry(
    stores: Stores, tmp_path: Path
) -> None:
    national = Professional(MARIE, "Marie", "Dupont-Durand", "10", "Médecin", "ps")
    await stores.directory.upsert_batch([Record(national)], await stores.directory.next_stamp())
    d = discovery(
        stores, make_config(tmp_path), FakeHomeserver(), pandalab=Lister([user(MARIE, "M", "X")])
    )
    await d.list_users()
    entry = await stores.directory.get(MARIE)
    assert entry is not None and entry.family_name == "Dupont-Durand" and entry.national


async def test_forget_unlisted_only_after_a_complete_pass(stores: Stores, tmp_path: Path) -> None:
    config = make_config(tmp_path)
    everyone = [
        user(MARIE, "Marie", "Dupont"),
        user(PAUL, "Paul", "Martin"),
        user(JEANNE, "J", "R"),
    ]
    await discovery(stores, config, FakeHomeserver(), pandalab=Lister(everyone)).list_users()

    # Paul left; the pass breaks on its second page: nothing is forgotten.
    broken = Lister([everyone[0], everyone[2], user(LUC, "Luc", "Petit")], fail_at=2)
    report = await discovery(stores, config, FakeHomeserver(), pandalab=broken).list_users()
    assert report.failed == ("pandalab",) and report.forgotten == 0
    assert await stores.directory.mxids(PAUL) != []

    # The next, complete pass forgets him.
    whole = Lister([everyone[0], everyone[2]])
    report = await discovery(stores, config, FakeHomeserver(), pandalab=whole).list_users()
    assert report.failed == () and report.forgotten == 1
    assert await stores.directory.mxids(PAUL) == []
    assert await stores.directory.mxids(MARIE) != []


async def test_forget_unlisted_leaves_other_connectors_and_native_ids(
    stores: Stores, tmp_path: Path
) -> None:
    directory = stores.directory
    stamp = await directory.next_stamp()
    await directory.record_listed_users(
        "pandalab", [user(MARIE, "Marie", "Dupont")], lambda i: ghost("pandalab", i), stamp
    )
    await directory.add_mxid(MARIE, ghost("medipeps", MARIE), GHOST, "medipeps")
    await directory.add_mxid(MARIE, "@marie:hopital.example", NATIVE)

    gone = await directory.forget_unlisted("pandalab", stamp + 1)

    assert gone == [(MARIE, ghost("pandalab", MARIE))]
    assert sorted(m.mxid for m in await directory.mxids(MARIE)) == sorted(
        ["@marie:hopital.example", ghost("medipeps", MARIE)]
    )


async def test_a_user_the_vendor_describes_during_a_pass_is_not_forgotten(
    stores: Stores,
) -> None:
    """The listing read past Paul before the vendor added him; a conversation then made his
    ghost (the vendor described him): the pass that ends does not forget him."""
    directory = stores.directory
    pass_stamp = await directory.next_stamp()
    await directory.record_listed_users(
        "pandalab", [user(MARIE, "Marie", "Dupont")], lambda i: ghost("pandalab", i), pass_stamp
    )
    await directory.record_connector_user(
        "pandalab", PAUL, "Paul", "Martin", "Médecin", ghost("pandalab", PAUL)
    )

    assert await directory.forget_unlisted("pandalab", pass_stamp) == []
    assert [m.mxid for m in await directory.mxids(PAUL)] == [ghost("pandalab", PAUL)]


async def test_publish_registers_chosen_ghosts_only_and_is_idempotent(
    stores: Stores, tmp_path: Path
) -> None:
    config = make_config(tmp_path)
    directory = stores.directory
    hs = FakeHomeserver()
    # Marie on both vendors: pandalab (first in the config) is chosen. Paul has a native
    # account: not published. Jeanne on medipeps only.
    await directory.record_listed_users(
        "pandalab",
        [user(MARIE, "Marie", "Dupont"), user(PAUL, "Paul", "Martin")],
        lambda i: ghost("pandalab", i),
        1,
    )
    await directory.record_listed_users(
        "medipeps",
        [user(MARIE, "Marie", "Dupont"), user(JEANNE, "Jeanne", "Roux", "Infirmière")],
        lambda i: ghost("medipeps", i),
        1,
    )
    await directory.add_mxid(PAUL, "@paul:hopital.example", NATIVE)
    progress: list[tuple[int, int]] = []

    report = await discovery(stores, config, hs).publish(progress=lambda *p: progress.append(p))

    assert sorted(hs.named) == [
        (ghost("medipeps", JEANNE), "Jeanne ROUX - Infirmière"),
        (ghost("pandalab", MARIE), "Marie DUPONT - Médecin"),
    ]
    assert (report.considered, report.registered, report.renamed, report.failed) == (2, 2, 0, 0)
    assert progress[-1] == (3, 3)
    row = await stores.ghosts.get(ghost("pandalab", MARIE))
    assert row is not None and row.display_name == "Marie DUPONT - Médecin"

    hs.named.clear()
    again = await discovery(stores, config, hs).publish()
    assert hs.named == [] and (again.registered, again.unchanged) == (0, 2)


async def test_publish_counts_a_failure_and_goes_on(stores: Stores, tmp_path: Path) -> None:
    hs = FakeHomeserver()
    hs.refuse.add(ghost("pandalab", MARIE))
    await stores.directory.record_listed_users(
        "pandalab",
        [user(MARIE, "Marie", "Dupont"), user(PAUL, "Paul", "Martin")],
        lambda i: ghost("pandalab", i),
        1,
    )
    report = await discovery(stores, make_config(tmp_path), hs).publish()
    assert (report.registered, report.failed) == (1, 1)
    assert await stores.ghosts.get(ghost("pandalab", MARIE)) is None


async def test_with_require_directory_entry_only_national_entries_are_published(
    stores: Stores, tmp_path: Path
) -> None:
    directory = stores.directory
    national = Professional(MARIE, "Marie", "Dupont", "10", "Médecin", "ps")
    await directory.upsert_batch([Record(national)], await directory.next_stamp())
    await directory.record_listed_users(
        "pandalab",
        [user(MARIE, "Marie", "Dupont"), user(PAUL, "Paul", "Martin")],
        lambda i: ghost("pandalab", i),
        1,
    )
    hs = FakeHomeserver()
    await discovery(stores, make_config(tmp_path, require=True), hs).publish()
    assert hs.named == [(ghost("pandalab", MARIE), "Marie DUPONT - Médecin")]


async def test_a_moved_persons_old_ghost_is_renamed_former_account(
    stores: Stores, tmp_path: Path
) -> None:
    config = make_config(tmp_path)
    hs = FakeHomeserver()
    marie = user(MARIE, "Marie", "Dupont")
    d = discovery(stores, config, hs, pandalab=Lister([marie]), medipeps=Lister([]))
    await d.run_pass()
    assert (ghost("pandalab", MARIE), "Marie DUPONT - Médecin") in hs.named

    # Marie moves from pandalab to medipeps.
    hs.named.clear()
    d = discovery(stores, config, hs, pandalab=Lister([]), medipeps=Lister([marie]))
    await d.run_pass()

    assert (ghost("pandalab", MARIE), "Marie DUPONT - Médecin (ancien compte)") in hs.named
    assert (ghost("medipeps", MARIE), "Marie DUPONT - Médecin") in hs.named
    old = await stores.ghosts.get(ghost("pandalab", MARIE))
    assert old is not None and old.display_name == "Marie DUPONT - Médecin (ancien compte)"
    # A rename pass (GhostNames) leaves the former ghost's name alone.
    assert [r.mxid for r in await stores.directory.renames(0)] == []


async def _probe(status: int, body: dict[str, Any]) -> bool | None:
    async def register(request: web.Request) -> web.Response:
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_post("/_matrix/client/v3/register", register)
    server = TestServer(app)
    await server.start_server()
    try:
        from aiohttp import ClientSession

        async with ClientSession() as session:
            return await warn_if_open_registration(session, str(server.make_url("")), "eimis_")
    finally:
        await server.close()


async def test_probe_warns_when_registration_is_open(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="eimis.homeserver"):
        found = await _probe(401, {"session": "x", "flows": [{"stages": ["m.login.dummy"]}]})
    assert found is True
    assert any("open registration" in r.getMessage() for r in caplog.records)


async def test_probe_is_quiet_when_registration_is_closed(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="eimis.homeserver"):
        found = await _probe(403, {"errcode": "M_FORBIDDEN", "error": "Registration disabled"})
    assert found is False
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_probe_never_fails_on_an_unreachable_homeserver() -> None:
    from aiohttp import ClientSession

    async with ClientSession() as session:
        assert await warn_if_open_registration(session, "http://127.0.0.1:1", "eimis_") is None


async def test_the_admin_rooms_directory_publish_answers_with_the_summary(
    stores: Stores, tmp_path: Path
) -> None:
    from types import SimpleNamespace

    from bridge.admin.commands import build_parser
    from bridge.admin.parser import parse, split

    config = make_config(tmp_path)
    hs = FakeHomeserver()
    await stores.directory.record_listed_users(
        "pandalab", [user(MARIE, "Marie", "Dupont")], lambda i: ghost("pandalab", i), 1
    )
    ctx = SimpleNamespace(config=config, stores=stores, discovery=discovery(stores, config, hs))
    args = parse(build_parser(), split("directory publish"))
    reply = await args.handler(ctx, args, "!admin:s|@ops:s")
    assert "1 registered" in reply.text and "0 failed" in reply.text
    assert hs.named == [(ghost("pandalab", MARIE), "Marie DUPONT - Médecin")]
