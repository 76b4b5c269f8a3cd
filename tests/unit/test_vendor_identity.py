"""A vendor speaks only for its own users, and names are ones vendors can trust (issue 11, points
4, 5 and 17), on both storage engines, the homeserver and the vendors played by fakes: a
connector's description names only its own ghost, the national directory outranks every vendor,
``identity.require_directory_entry`` refuses ghosts the directory does not list, a native user is
shown with their Matrix ID or their directory identity, and a vendor's edit or deletion of a
message its users did not write changes nothing and is reported to it. The end-to-end version is
tests/test_e2e_hostile_vendor.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any
from urllib.parse import unquote

import pytest

from bridge.config import DatabaseConfig, MediaConfig
from bridge.core import operations as op
from bridge.core.delivery import Delivery
from bridge.core.errors import NotInDirectory
from bridge.core.ghost_ids import GhostIds
from bridge.core.portals import Portals
from bridge.core.to_matrix import (
    DELETE_NOT_AUTHOR,
    EDIT_NOT_AUTHOR,
    NOT_BRIDGED,
    NOT_IN_DIRECTORY,
    ToMatrix,
)
from bridge.db.database import open_database
from bridge.db.directory import Professional, Record
from bridge.db.portal import Portal
from bridge.db.stores import Stores
from bridge.i18n import _
from connectors.base import (
    Capabilities,
    DeliveryReport,
    MessageDeleted,
    MessageEdited,
    MessageReceived,
    OutboundMessage,
    ReactionRemoved,
    RemoteUser,
)
from connectors.idnps import Idnps

DOMAIN = "eimis.example"
IDS = GhostIds("eimis_", DOMAIN, "eimis_bot")
CAMILLE = Idnps("810000001916")
OTHER = Idnps("899700218896")
ROOM = "!portal:eimis.example"


class FakeVendor:
    def __init__(self, users: dict[str, RemoteUser]) -> None:
        self.users = users
        self.asked: list[str] = []
        self.reports: list[tuple[str, str, DeliveryReport]] = []
        self.capabilities = Capabilities(delivery_status=True)

    async def get_user(self, idnps: Idnps) -> RemoteUser | None:
        self.asked.append(str(idnps))
        return self.users.get(str(idnps))

    async def report_delivery(
        self, conversation_id: str, message_id: str, report: DeliveryReport
    ) -> None:
        self.reports.append((conversation_id, message_id, report))


class FakeConnectors:
    def __init__(self, **vendors: FakeVendor) -> None:
        self.vendors = vendors

    def get(self, connector_id: str) -> FakeVendor | None:
        return self.vendors.get(connector_id)

    def __contains__(self, connector_id: object) -> bool:
        return connector_id in self.vendors

    def __iter__(self) -> Iterator[tuple[str, FakeVendor]]:
        return iter(self.vendors.items())

    def ids(self) -> list[str]:
        return list(self.vendors)


class FakeHomeserver:
    """Records ghost names; answers display names and who sent an event."""

    def __init__(self) -> None:
        self.ghost_names: dict[str, str | None] = {}
        self.display_names: dict[str, str] = {}
        self.authors: dict[str, str] = {}
        self.sent: list[Any] = []
        self.crypto = None
        self.config = SimpleNamespace(bot_mxid=IDS.bot_mxid)

    async def ensure_ghost(self, mxid: str, display_name: str | None) -> None:
        self.ghost_names[mxid] = display_name

    async def display_name(self, room_id: str, mxid: str, *, viewer: str) -> str:
        return self.display_names.get(mxid, mxid)

    def intent(self, mxid: str) -> Any:
        async def request(method: Any, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
            event_id = unquote(str(path).rsplit("/", 1)[-1])
            return {"event_id": event_id, "sender": self.authors[event_id]}

        return SimpleNamespace(api=SimpleNamespace(request=request))

    async def send_message(self, *args: Any, **kwargs: Any) -> str:
        self.sent.append(args)
        return "$sent"

    async def redact(self, *args: Any, **kwargs: Any) -> str:
        self.sent.append(args)
        return "$redaction"


def user(idnps: str, given: str, family: str, profession: str) -> RemoteUser:
    return RemoteUser(Idnps(idnps), given, family, profession)


@pytest.fixture
async def stores(database_url: str) -> AsyncIterator[Stores]:
    db = await open_database(DatabaseConfig(url=database_url))
    try:
        yield Stores.of(db)
    finally:
        await db.stop()


async def ans(stores: Stores, idnps: str, given: str, family: str, label: str, *natives: str):
    record = Record(Professional(idnps, given, family, "10", label, "ps"), tuple(natives))
    await stores.directory.upsert_batch([record], await stores.directory.next_stamp())


# --- The directory store ---------------------------------------------------------------------


async def test_a_connector_updates_only_its_own_entry(stores: Stores) -> None:
    store = stores.directory
    ghost_a = IDS.mxid("pandalab", CAMILLE)
    ghost_b = IDS.mxid("hostile", CAMILLE)
    first = await store.record_connector_user(
        "pandalab", CAMILLE, "Camille", "Martin", "Infirmier", ghost_a
    )
    claim = await store.record_connector_user(
        "hostile", CAMILLE, "Evil", "Impostor", "Pirate", ghost_b
    )
    assert claim == first and claim.display_name == "Camille MARTIN - Infirmier"
    moved = await store.record_connector_user(
        "pandalab", CAMILLE, "Camille", "Martin-Durand", "Infirmier", ghost_a
    )
    assert moved.display_name == "Camille MARTIN-DURAND - Infirmier"
    assert moved.source == "connector:pandalab" and not moved.national
    assert {m.mxid for m in await store.mxids(CAMILLE)} == {ghost_a, ghost_b}


async def test_a_connector_entry_renames_only_that_connectors_ghost(stores: Stores) -> None:
    ghost_a = IDS.mxid("pandalab", CAMILLE)
    ghost_b = IDS.mxid("hostile", CAMILLE)
    await stores.ghosts.upsert(ghost_a, "pandalab", CAMILLE, "Camille M - Infirmier")
    await stores.ghosts.upsert(ghost_b, "hostile", CAMILLE, "Evil Impostor - Pirate")
    await stores.directory.record_connector_user(
        "pandalab", CAMILLE, "Camille", "Martin", "Infirmier", ghost_a
    )
    assert [(r.mxid, r.new_name) for r in await stores.directory.renames(0)] == [
        (ghost_a, "Camille MARTIN - Infirmier")
    ]
    # The national directory's entry names every ghost of the person.
    await ans(stores, CAMILLE, "CAMILLE", "MARTIN-DURAND", "Infirmier")
    renames = await stores.directory.renames(0)
    assert sorted((r.mxid, r.new_name) for r in renames) == sorted(
        [
            (ghost_a, "Camille MARTIN-DURAND - Infirmier"),
            (ghost_b, "Camille MARTIN-DURAND - Infirmier"),
        ]
    )


# --- Ghosts ------------------------------------------------------------------------------------


def portals_of(stores: Stores, hs: FakeHomeserver, **vendors: FakeVendor) -> Portals:
    return Portals(stores, hs, FakeConnectors(**vendors), IDS)  # type: ignore[arg-type]


async def test_each_ghost_carries_its_own_connectors_description(stores: Stores) -> None:
    hs = FakeHomeserver()
    pandalab = FakeVendor({CAMILLE: user(CAMILLE, "Camille", "Martin", "Infirmier")})
    hostile = FakeVendor({CAMILLE: user(CAMILLE, "Evil", "Impostor", "Pirate")})
    portals = portals_of(stores, hs, pandalab=pandalab, hostile=hostile)

    real = await portals.ghost("pandalab", CAMILLE)
    claimed = await portals.ghost("hostile", CAMILLE)

    assert real.display_name == "Camille MARTIN - Infirmier"
    assert claimed.display_name == "Evil IMPOSTOR - Pirate"
    assert hs.ghost_names == {
        real.mxid: "Camille MARTIN - Infirmier",
        claimed.mxid: "Evil IMPOSTOR - Pirate",
    }
    row = await stores.ghosts.get(real.mxid)
    assert row is not None and row.display_name == "Camille MARTIN - Infirmier"


async def test_the_national_directory_names_ghosts_over_any_vendor(stores: Stores) -> None:
    hs = FakeHomeserver()
    await ans(stores, CAMILLE, "Camille", "MARTIN", "Infirmier")
    hostile = FakeVendor({CAMILLE: user(CAMILLE, "Evil", "Impostor", "Pirate")})
    portals = portals_of(stores, hs, hostile=hostile)
    ghost = await portals.ghost("hostile", CAMILLE)
    assert ghost.display_name == "Camille MARTIN - Infirmier"
    entry = await stores.directory.get(CAMILLE)
    assert entry is not None and entry.national and entry.given_name == "Camille"


async def test_require_directory_entry_refuses_unlisted_professionals(stores: Stores) -> None:
    hs = FakeHomeserver()
    vendor = FakeVendor(
        {
            CAMILLE: user(CAMILLE, "Camille", "Martin", "Infirmier"),
            OTHER: user(OTHER, "Julien", "Bernard", "Médecin"),
        }
    )
    portals = portals_of(stores, hs, pandalab=vendor)
    portals.require_directory_entry = True
    await ans(stores, CAMILLE, "Camille", "MARTIN", "Infirmier")
    # A vendor's own description is not a listing either.
    await stores.directory.record_connector_user(
        "medipeps", OTHER, "Julien", "Bernard", "Médecin", IDS.mxid("medipeps", OTHER)
    )

    with pytest.raises(NotInDirectory):
        await portals.ghost("pandalab", OTHER)
    assert vendor.asked == [] and hs.ghost_names == {}
    assert await stores.ghosts.get(IDS.mxid("pandalab", OTHER)) is None
    assert await portals.find_professional(OTHER, exclude="medipeps") is None
    assert (await portals.ghost("pandalab", CAMILLE)).display_name == "Camille MARTIN - Infirmier"


# --- Native users as vendors see them -------------------------------------------------------


async def test_native_users_show_their_matrix_id_or_their_directory_identity(
    stores: Stores,
) -> None:
    hs = FakeHomeserver()
    portals = portals_of(stores, hs)
    mallory, doctor, bare = "@mallory:hs.example", "@ana:hs.example", "@bare:hs.example"
    hs.display_names = {mallory: "Camille MARTIN -\n Infirmier", doctor: "Dr Who"}
    await ans(stores, OTHER, "Ana", "GARCIA", "Médecin", doctor)

    shown = await portals.sender(ROOM, mallory, IDS.bot_mxid)
    assert shown.display_name == f"Camille MARTIN - Infirmier ({mallory})"
    assert shown.connector is None and shown.idnps is None
    assert (await portals.sender(ROOM, doctor, IDS.bot_mxid)).display_name == "Ana GARCIA - Médecin"
    assert (await portals.sender(ROOM, bare, IDS.bot_mxid)).display_name == bare
    # A vendor's claim on a Matrix ID is not the directory's word.
    ghost = IDS.mxid("pandalab", CAMILLE)
    await stores.ghosts.upsert(ghost, "pandalab", CAMILLE, "Camille MARTIN - Infirmier")
    assert (await portals.sender(ROOM, ghost, IDS.bot_mxid)).connector == "pandalab"


class MentionVendor:
    """A Markdown vendor that lists mentions: records the names it is given for them."""

    capabilities = Capabilities(formatting="markdown")

    def __init__(self) -> None:
        self.mentions: list[tuple[str, ...]] = []

    async def send_message(self, conversation_id: str, message: OutboundMessage) -> str:
        self.mentions.append(tuple(m.display_name for m in message.mentions))
        return f"sent-{len(self.mentions)}"


async def test_a_mentioned_native_user_is_named_as_vendors_see_them_as_senders(
    stores: Stores,
) -> None:
    """A mention carries the name vendors show: a native user named like a professional is
    shown with their Matrix ID, one the directory lists with the directory's identity."""
    hs = FakeHomeserver()
    portals = portals_of(stores, hs)
    mallory, doctor = "@mallory:hs.example", "@ana:hs.example"
    hs.display_names = {mallory: "Camille MARTIN - Infirmier", doctor: "Dr Who"}
    await ans(stores, OTHER, "Ana", "GARCIA", "Médecin", doctor)
    await stores.portals.create(Portal(ROOM, None, False, IDS.bot_mxid))
    await stores.portals.add_link(ROOM, "pl", "conv")
    vendor = MentionVendor()
    delivery = Delivery(
        stores,
        hs,  # type: ignore[arg-type]
        {"pl": vendor},  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        MediaConfig(),
        None,  # type: ignore[arg-type]
        portals=portals,
    )
    sender = {"mxid": doctor, "display_name": "Ana GARCIA - Médecin"}
    content = {
        "msgtype": "m.text",
        "body": "Camille MARTIN - Infirmier et Dr Who, voir la dose",
        "m.mentions": {"user_ids": [mallory, doctor]},
    }
    payload = {"event_id": "$m", "sender": sender, "content": content, "ts": 0}
    await stores.outbox.enqueue("pl", ROOM, op.SEND_MESSAGE, "$m", payload)
    [item] = await stores.outbox.pending(0, 10)
    await delivery.handle(item)
    assert vendor.mentions == [(f"Camille MARTIN - Infirmier ({mallory})", "Ana GARCIA - Médecin")]


# --- Vendor edits and deletions ------------------------------------------------------------


def to_matrix_of(stores: Stores, hs: FakeHomeserver, portals: Portals) -> ToMatrix:
    async def relay(event: dict[str, Any]) -> list[Any]:
        return []

    portals.outsiders = _no_outsiders  # type: ignore[method-assign]  # all members trusted

    return ToMatrix(
        stores,
        hs,  # type: ignore[arg-type]
        portals,
        None,  # type: ignore[arg-type]
        MediaConfig(),
        None,  # type: ignore[arg-type]
        lambda: None,
        relay,
    )


NOW = datetime(2026, 1, 1, tzinfo=UTC)


async def test_a_vendor_cannot_edit_or_delete_what_its_users_did_not_write(
    stores: Stores,
) -> None:
    hs = FakeHomeserver()
    vendor = FakeVendor({CAMILLE: user(CAMILLE, "Camille", "Martin", "Infirmier")})
    portals = portals_of(stores, hs, hostile=vendor)
    to_matrix = to_matrix_of(stores, hs, portals)
    await stores.portals.create(Portal(ROOM, None, False, IDS.bot_mxid))
    await stores.portals.add_link(ROOM, "hostile", "conv")
    await stores.messages.add("hostile", "native-copy", ROOM, "$native")
    await stores.messages.add("hostile", "other-vendor-copy", ROOM, "$other")
    hs.authors = {"$native": "@victim:hs.example", "$other": IDS.mxid("pandalab", OTHER)}

    for copy in ("native-copy", "other-vendor-copy"):
        edit = MessageEdited(
            event_id=f"e-{copy}",
            conversation_id="conv",
            timestamp=NOW,
            message_id=copy,
            sender=CAMILLE,
            text="Allergie : aucune",
        )
        delete = MessageDeleted(
            event_id=f"d-{copy}",
            conversation_id="conv",
            timestamp=NOW,
            message_id=copy,
            sender=CAMILLE,
        )
        assert len(await to_matrix.handle("hostile", edit)) == 1  # the audit row only
        assert len(await to_matrix.handle("hostile", delete)) == 1

    assert hs.sent == [] and hs.ghost_names == {}, "nothing happened on Matrix"
    assert [(m, r.status, r.detail) for _conv, m, r in vendor.reports] == [
        ("native-copy", "failed", _(EDIT_NOT_AUTHOR)),
        ("native-copy", "failed", _(DELETE_NOT_AUTHOR)),
        ("other-vendor-copy", "failed", _(EDIT_NOT_AUTHOR)),
        ("other-vendor-copy", "failed", _(DELETE_NOT_AUTHOR)),
    ]


async def test_an_unlisted_sender_is_refused_and_told(stores: Stores) -> None:
    hs = FakeHomeserver()
    vendor = FakeVendor({OTHER: user(OTHER, "Julien", "Bernard", "Médecin")})
    portals = portals_of(stores, hs, hostile=vendor)
    portals.require_directory_entry = True
    to_matrix = to_matrix_of(stores, hs, portals)
    await stores.portals.create(Portal(ROOM, None, False, IDS.bot_mxid))
    await stores.portals.add_link(ROOM, "hostile", "conv")

    def message(conversation: str, message_id: str) -> MessageReceived:
        return MessageReceived(
            event_id=message_id,
            conversation_id=conversation,
            timestamp=NOW,
            message_id=message_id,
            sender=OTHER,
            text="Bonjour",
        )

    writes = await to_matrix.handle("hostile", message("conv", "m1"))
    assert len(writes) == 1 and hs.sent == [] and hs.ghost_names == {}
    with pytest.raises(Exception, match="not bridged"):
        await to_matrix.handle("hostile", message("elsewhere", "m2"))
    assert [(c, m, r.detail) for c, m, r in vendor.reports] == [
        ("conv", "m1", _(NOT_IN_DIRECTORY)),
        ("elsewhere", "m2", _(NOT_BRIDGED)),
    ]


async def _no_outsiders(room_id: str, voice: str) -> list[str]:
    return []


async def test_a_vendor_cannot_remove_a_reaction_its_user_did_not_make(stores: Stores) -> None:
    hs = FakeHomeserver()
    vendor = FakeVendor({CAMILLE: user(CAMILLE, "Camille", "Martin", "Infirmier")})
    portals = portals_of(stores, hs, hostile=vendor)
    to_matrix = to_matrix_of(stores, hs, portals)
    await stores.portals.create(Portal(ROOM, None, False, IDS.bot_mxid))
    await stores.portals.add_link(ROOM, "hostile", "conv")
    # A Matrix user's reaction, delivered to the vendor as its reaction "r1" on message "m1".
    await stores.messages.add("hostile", op.reaction_ref("m1", "r1"), ROOM, "$reaction")
    hs.authors = {"$reaction": "@victim:hs.example"}
    removal = ReactionRemoved(
        event_id="x",
        conversation_id="conv",
        timestamp=NOW,
        reaction_id="r1",
        message_id="m1",
        sender=CAMILLE,
    )
    assert len(await to_matrix.handle("hostile", removal)) == 1  # the audit row only
    assert hs.sent == [] and hs.ghost_names == {}, "nothing was redacted"
