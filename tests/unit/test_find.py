"""Ask the bot (issue 14, point 2): the directory search by name or identifier on both engines,
the help desk's French answers, and the third-party lookup endpoints of the appservice API."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge.admin.room import HELP, NOT_ADMIN, UNKNOWN, AdminRoom
from bridge.appservice.server import matrix_errors
from bridge.appservice.thirdparty import ThirdParty
from bridge.commands import BadInput, Refused
from bridge.commands import find as finding
from bridge.config import DatabaseConfig
from bridge.core.errors import PermanentFailure
from bridge.db.database import open_database
from bridge.db.directory import GHOST, NATIVE, Professional, Record, search_key
from bridge.db.portal import Portal
from bridge.db.stores import Stores
from bridge.i18n import _, set_locale
from connectors.idnps import luhn_check_digit

HS_TOKEN = "hs-token-for-find-tests-0123456789"
AUTH = {"Authorization": f"Bearer {HS_TOKEN}"}
CONNECTORS = ["pandalab", "medipeps"]


def rpps(n: int) -> str:
    partial = f"1009900{n:03d}"
    return partial + luhn_check_digit(partial)


def adeli(n: int) -> str:
    partial = f"75000{n:03d}"
    return partial + luhn_check_digit(partial)


MARIE = "8" + rpps(1)
JEAN_ERIC = "8" + rpps(2)
LOUISE = "0" + adeli(3)
NOBODY_REACHES = "8" + rpps(4)


def person(idnps: str, given: str, family: str, label: str = "Médecin") -> Record:
    return Record(Professional(idnps, given, family, "10", label, "ps"))


def ghost(connector: str, idnps: str) -> str:
    return f"@eimis_{connector}_{idnps}:eimis.example"


@pytest.fixture
async def stores(database_url: str) -> AsyncIterator[Stores]:
    db = await open_database(DatabaseConfig(url=database_url))
    try:
        stores = Stores.of(db)
        store = stores.directory
        await store.upsert_batch(
            [
                person(MARIE, "MARIE", "DUPONT"),
                person(JEAN_ERIC, "Jean-Éric", "DE LA FONTAINE", "Infirmier"),
                person(LOUISE, "Louise", "Dupond", "Infirmière"),
                person(NOBODY_REACHES, "Paul", "Dupuis"),
            ]
            + [person("8" + rpps(100 + n), "Anne", f"Durand{n:02d}") for n in range(30)],
            await store.next_stamp(),
        )
        await store.add_mxid(MARIE, ghost("medipeps", MARIE), GHOST, "medipeps")
        await store.add_mxid(MARIE, ghost("pandalab", MARIE), GHOST, "pandalab")
        await store.add_mxid(JEAN_ERIC, ghost("medipeps", JEAN_ERIC), GHOST, "medipeps")
        await store.add_mxid(LOUISE, "@louise:hopital.example", NATIVE)
        for n in range(30):
            idnps = "8" + rpps(100 + n)
            await store.add_mxid(idnps, ghost("pandalab", idnps), GHOST, "pandalab")
        yield stores
    finally:
        await db.stop()


def test_search_keys_fold_case_accents_and_punctuation() -> None:
    assert search_key("Jean-Éric") == "jean eric"
    assert search_key("  DE LA FONTAINE ") == "de la fontaine"
    assert search_key("Lætitia Œuvrard") == "laetitia oeuvrard"
    assert search_key("o'BRIEN_%") == "o brien"  # never a LIKE wildcard


@pytest.mark.parametrize(
    ("query", "found"),
    [
        ("dupont", [MARIE]),
        ("DUPONT", [MARIE]),
        ("marie", [MARIE]),
        ("marie dup", [MARIE]),
        ("dup marie", [MARIE]),
        ("dupo", [LOUISE, MARIE]),
        ("jean-eric", [JEAN_ERIC]),
        ("Jean Éric", [JEAN_ERIC]),
        ("de la font", [JEAN_ERIC]),
        ("jean fontaine", []),  # a word inside a family name is not a prefix of it
        ("upont", []),
        ("%", []),
        ("_", []),
    ],
)
async def test_the_store_searches_names_by_prefix_whatever_the_case_and_accents(
    stores: Stores, query: str, found: list[str]
) -> None:
    assert [p.idnps for p in await stores.directory.search(query)] == found


async def test_a_search_is_bounded(stores: Stores) -> None:
    assert len(await stores.directory.search("anne", limit=10)) == 10
    assert len(await stores.directory.search("anne", limit=10_000)) == 30  # under SEARCH_LIMIT
    assert len(await stores.directory.search("a b c d e f g h")) == 0


async def test_find_answers_in_french_with_where_they_are_reached_and_a_link(
    stores: Stores,
) -> None:
    lines = await finding.find(stores.directory, CONNECTORS, "Dupo")

    assert lines == [
        "2 professionnel(s) trouvé(s) :",
        f"- Louise DUPOND - Infirmière ({LOUISE}), compte Matrix @louise:hopital.example : "
        "https://matrix.to/#/@louise:hopital.example",
        f"- Marie DUPONT - Médecin ({MARIE}), joignable via pandalab : "
        f"https://matrix.to/#/{ghost('pandalab', MARIE)}",
    ]
    unreachable = await finding.find(stores.directory, CONNECTORS, "dupuis")
    assert "joignable par aucune messagerie" in unreachable[1]
    assert "matrix.to" not in unreachable[1]


@pytest.mark.parametrize(
    ("query", "found"),
    [(MARIE, MARIE), (MARIE[1:], MARIE), (LOUISE, LOUISE), (LOUISE[1:], LOUISE)],
)
async def test_find_takes_an_idnps_or_the_rpps_or_adeli_as_typed(
    stores: Stores, query: str, found: str
) -> None:
    matches = await finding.search(stores.directory, CONNECTORS, query)
    assert [m.professional.idnps for m in matches] == [found]


async def test_find_refusals_are_french_sentences(stores: Stores) -> None:
    with pytest.raises(Refused, match="Aucun professionnel trouvé"):
        await finding.find(stores.directory, CONNECTORS, "zzz")
    with pytest.raises(BadInput, match="trop longue"):
        await finding.find(stores.directory, CONNECTORS, "x" * 101)
    with pytest.raises(BadInput, match="pas un identifiant valide"):
        await finding.find(stores.directory, CONNECTORS, "12345678901")
    with pytest.raises(BadInput, match="Indiquez un nom"):
        await finding.find(stores.directory, CONNECTORS, "  ")
    many = await finding.find(stores.directory, CONNECTORS, "anne")
    assert len(many) == 12 and many[-1].startswith("D'autres réponses")


async def test_dm_gives_the_link_to_the_chosen_matrix_id(stores: Stores) -> None:
    lines = await finding.dm_link(stores.directory, CONNECTORS, JEAN_ERIC)
    assert lines == [
        "Jean-Éric DE LA FONTAINE - Infirmier, joignable via medipeps.",
        f"Ouvrez la conversation ici : https://matrix.to/#/{ghost('medipeps', JEAN_ERIC)}",
    ]
    with pytest.raises(Refused, match="aucune messagerie"):
        await finding.dm_link(stores.directory, CONNECTORS, NOBODY_REACHES)
    with pytest.raises(BadInput, match="Indiquez un identifiant"):
        await finding.dm_link(stores.directory, CONNECTORS, "dupont")
    with pytest.raises(Refused, match="Aucun professionnel connu"):
        await finding.dm_link(stores.directory, CONNECTORS, "8" + rpps(900))


@pytest.fixture
def english() -> Iterator[None]:
    """``bridge.locale: en`` for one test (the suite runs in the default, French)."""
    set_locale("en")
    try:
        yield
    finally:
        set_locale("fr")


async def test_find_and_dm_answer_in_english_with_bridge_locale_en(
    stores: Stores, english: None
) -> None:
    lines = await finding.find(stores.directory, CONNECTORS, "Dupo")
    assert lines == [
        "2 professional(s) found:",
        f"- Louise DUPOND - Infirmière ({LOUISE}), Matrix account @louise:hopital.example: "
        "https://matrix.to/#/@louise:hopital.example",
        f"- Marie DUPONT - Médecin ({MARIE}), reachable via pandalab: "
        f"https://matrix.to/#/{ghost('pandalab', MARIE)}",
    ]
    assert (await finding.find(stores.directory, CONNECTORS, "dupuis"))[1] == (
        f"- Paul DUPUIS - Médecin ({NOBODY_REACHES}), reachable by no messaging service "
        "connected to the bridge"
    )
    assert (await finding.dm_link(stores.directory, CONNECTORS, JEAN_ERIC))[1] == (
        f"Open the conversation here: https://matrix.to/#/{ghost('medipeps', JEAN_ERIC)}"
    )
    with pytest.raises(Refused, match="^No professional found"):
        await finding.find(stores.directory, CONNECTORS, "zzz")
    with pytest.raises(BadInput, match=r"^Search too long \(at most 100 characters\)\.$"):
        await finding.find(stores.directory, CONNECTORS, "x" * 101)
    with pytest.raises(BadInput, match="^This number is not a valid identifier"):
        await finding.find(stores.directory, CONNECTORS, "12345678901")


# The help desk ---------------------------------------------------------------------------------


class FakeHomeserver:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.joined: list[str] = []
        self.left: list[tuple[str, str | None]] = []
        self.config = SimpleNamespace(bot_mxid="@eimis_bot:eimis.example")
        homeserver = self

        class Bot:
            async def join_room_by_id(self, room_id: str) -> None:
                homeserver.joined.append(room_id)

            async def leave_room(self, room_id: str, reason: str | None = None) -> None:
                homeserver.left.append((room_id, reason))

        self.bot = Bot()

    async def follow_encryption(self, room_id: str, mxid: str) -> None:
        del room_id, mxid

    async def send_event(
        self, sender: str, room_id: str, kind: str, content: dict[str, Any], txn_id: str
    ) -> None:
        del sender, kind, txn_id
        self.sent.append((room_id, content))


class FakePortals:
    def __init__(self, refuse: Exception | None = None) -> None:
        self.refuse = refuse
        self.asked: list[tuple[str, str]] = []

    async def open_direct(self, asker: str, idnps: str) -> tuple[str | None, Any, bool]:
        self.asked.append((asker, idnps))
        if self.refuse is not None:
            raise self.refuse
        name = SimpleNamespace(display_name="Jean-Éric DE LA FONTAINE")
        return "!portal:eimis.example", name, len(self.asked) == 1


def admin_room(
    stores: Stores, homeserver: FakeHomeserver, portals: FakePortals | None = None
) -> AdminRoom:
    connectors = {cid: SimpleNamespace(enabled=True) for cid in CONNECTORS}
    config = SimpleNamespace(
        admin=SimpleNamespace(admins=["@admin:eimis.example"], confirm_within_s=30),
        bot_mxid="@eimis_bot:eimis.example",
        homeserver=SimpleNamespace(domain="eimis.example"),
        connectors=connectors,
    )
    ctx = SimpleNamespace(
        config=config, stores=stores, homeserver=homeserver, uploads={}, portals=portals
    )
    return AdminRoom(ctx)  # type: ignore[arg-type]


def message(room_id: str, sender: str, body: str, n: int) -> dict[str, Any]:
    return {
        "room_id": room_id,
        "type": "m.room.message",
        "sender": sender,
        "event_id": f"$e{n}",
        "content": {"msgtype": "m.text", "body": body},
    }


async def test_a_user_of_the_homeserver_gets_a_help_desk_in_french(stores: Stores) -> None:
    hs = FakeHomeserver()
    room = admin_room(stores, hs)

    await room.on_bot_invite("!desk:eimis.example", "@doc:eimis.example")

    assert hs.joined == ["!desk:eimis.example"] and hs.left == []
    assert hs.sent[-1][1]["body"].startswith("Bonjour ! Je trouve les professionnels")
    assert "!desk:eimis.example" in await admin_room(stores, hs).help_rooms(), "remembered"
    assert "!desk:eimis.example" not in await room.rooms(), "not an admin room"

    async def ask(body: str, n: int) -> str:
        assert await room.handles(message("!desk:eimis.example", "@doc:eimis.example", body, n))
        return str(hs.sent[-1][1]["body"])

    assert "Marie DUPONT - Médecin" in await ask("find dupont", 1)
    assert "https://matrix.to/#/" in await ask("!find Marie", 2)
    assert (await ask("find zzz", 3)).startswith("Aucun professionnel trouvé")
    assert (await ask(f"dm {JEAN_ERIC}", 4)).startswith("Jean-Éric DE LA FONTAINE")
    assert await ask("aide", 5) == _(HELP)
    assert (await ask("help", 6)).startswith("Je trouve les professionnels de santé")
    assert await ask("status", 7) == _(NOT_ADMIN)
    assert (await ask("trust add evil.example", 8)).startswith("Cette commande est réservée")
    assert await ask("bonjour", 9) == _(UNKNOWN) == (
        "Je n'ai pas compris. Tapez « aide » pour la liste des commandes."
    )


async def test_dm_opens_the_portal_through_the_portals_or_says_why_not(stores: Stores) -> None:
    hs = FakeHomeserver()
    portals = FakePortals()
    room = admin_room(stores, hs, portals)

    answer = await room.help_answer(f"dm {JEAN_ERIC[1:]}", "@doc:eimis.example")

    assert portals.asked == [("@doc:eimis.example", JEAN_ERIC)], "the RPPS stands for the IDNPS"
    assert answer.text == (
        "Conversation ouverte avec Jean-Éric DE LA FONTAINE : acceptez l'invitation, ou "
        "https://matrix.to/#/!portal:eimis.example"
    )
    again = await room.help_answer(f"dm {JEAN_ERIC}", "@doc:eimis.example")
    assert again.text == (
        "Vous avez déjà une conversation avec Jean-Éric DE LA FONTAINE : "
        "https://matrix.to/#/!portal:eimis.example"
    )
    refused = admin_room(
        stores, hs, FakePortals(PermanentFailure("Marie n'accepte pas de conversation avec vous"))
    )
    assert (await refused.help_answer(f"dm {MARIE}", "@doc:eimis.example")).text == (
        "Impossible d'ouvrir la conversation : Marie n'accepte pas de conversation avec vous."
    )
    assert (await room.help_answer("dm dupont", "@doc:eimis.example")).text.startswith(
        "Indiquez un identifiant"
    )


async def test_the_help_desk_answers_in_english_with_bridge_locale_en(
    stores: Stores, english: None
) -> None:
    hs = FakeHomeserver()
    portals = FakePortals()
    room = admin_room(stores, hs, portals)

    await room.on_bot_invite("!desk:eimis.example", "@doc:eimis.example")

    assert hs.sent[-1][1]["body"].startswith("Hello! I find the health professionals")
    assert (await room.help_answer("aide", "@doc:eimis.example")).text == HELP
    assert (await room.help_answer("status", "@doc:eimis.example")).text == NOT_ADMIN
    assert (await room.help_answer("bonjour", "@doc:eimis.example")).text == UNKNOWN
    opened = await room.help_answer(f"dm {JEAN_ERIC}", "@doc:eimis.example")
    assert opened.text == (
        "Conversation opened with Jean-Éric DE LA FONTAINE: accept the invitation, or "
        "https://matrix.to/#/!portal:eimis.example"
    )
    await room.on_bot_invite("!far:hopital.example", "@doc:hopital.example")
    assert str(hs.left[-1][1]).startswith(
        "Hello. I am the EIMIS bridge's bot of eimis.example: I answer this server's users only."
    )


async def test_a_non_operator_in_an_admin_room_is_refused_in_the_locale(stores: Stores) -> None:
    hs = FakeHomeserver()
    room = admin_room(stores, hs)
    await room.on_bot_invite("!admin:eimis.example", "@admin:eimis.example")

    assert await room.handles(message("!admin:eimis.example", "@guest:eimis.example", "status", 1))
    assert hs.sent[-1][1]["body"] == (
        "Bonjour. Je suis le robot du pont eimis-bridge : je ne reçois de commandes que des "
        "administrateurs de ce pont. Pour toute demande concernant le pont, écrivez à ses "
        "administrateurs."
    )
    set_locale("en")
    try:
        assert await room.handles(
            message("!admin:eimis.example", "@guest:eimis.example", "status", 2)
        )
    finally:
        set_locale("fr")
    assert hs.sent[-1][1]["body"].startswith("Hello. I am the eimis-bridge bot")


async def test_an_operator_still_gets_an_admin_room(stores: Stores) -> None:
    hs = FakeHomeserver()
    room = admin_room(stores, hs)

    await room.on_bot_invite("!admin:eimis.example", "@admin:eimis.example")

    assert "!admin:eimis.example" in await room.rooms()
    assert "!admin:eimis.example" not in await room.help_rooms()
    assert hs.sent[-1][1]["body"].startswith("eimis-bridge admin room")


async def test_users_of_other_homeservers_are_refused_in_french(stores: Stores) -> None:
    hs = FakeHomeserver()
    room = admin_room(stores, hs)

    await room.on_bot_invite("!far:hopital.example", "@doc:hopital.example")

    assert hs.joined == []
    assert hs.left[0][0] == "!far:hopital.example"
    assert "utilisateurs de ce serveur uniquement" in str(hs.left[0][1])


# Third-party lookups -----------------------------------------------------------------------------


@pytest.fixture
async def client(stores: Stores) -> AsyncIterator[TestClient]:
    app = web.Application(middlewares=[matrix_errors])
    app.add_routes(ThirdParty(HS_TOKEN, stores.directory, lambda: CONNECTORS).routes())
    async with TestClient(TestServer(app)) as client:
        yield client


async def test_the_protocol_describes_its_fields_and_one_instance_per_connector(
    client: TestClient,
) -> None:
    response = await client.get("/_matrix/app/v1/thirdparty/protocol/eimis", headers=AUTH)
    assert response.status == 200
    body = await response.json()
    assert body["user_fields"] == ["idnps", "name"]
    assert set(body["field_types"]) == {"idnps", "name"}
    assert [i["network_id"] for i in body["instances"]] == CONNECTORS
    assert [i["desc"] for i in body["instances"]] == [
        "Professionnels de santé joignables via pandalab",
        "Professionnels de santé joignables via medipeps",
    ]
    assert body["field_types"]["name"]["placeholder"] == "Nom et/ou prénom"
    set_locale("en")
    try:
        english = await (await client.get(
            "/_matrix/app/v1/thirdparty/protocol/eimis", headers=AUTH
        )).json()
    finally:
        set_locale("fr")
    assert english["instances"][0]["desc"] == "Health professionals reachable via pandalab"
    assert english["field_types"]["idnps"]["placeholder"] == "IDNPS, RPPS or ADELI"

    unknown = await client.get("/_matrix/app/v1/thirdparty/protocol/irc", headers=AUTH)
    assert unknown.status == 404 and (await unknown.json())["errcode"] == "M_NOT_FOUND"
    anonymous = await client.get("/_matrix/app/v1/thirdparty/protocol/eimis")
    assert anonymous.status == 401
    wrong = await client.get(
        "/_matrix/app/v1/thirdparty/protocol/eimis", headers={"Authorization": "Bearer nope"}
    )
    assert wrong.status == 403


async def test_user_lookup_by_name_or_identifier_and_reverse(client: TestClient) -> None:
    marie = {
        "userid": ghost("pandalab", MARIE),
        "protocol": "eimis",
        "fields": {"idnps": MARIE, "name": "Marie DUPONT - Médecin"},
    }
    by_name = await client.get(
        "/_matrix/app/v1/thirdparty/user/eimis", params={"name": "dupont"}, headers=AUTH
    )
    assert by_name.status == 200 and await by_name.json() == [marie]
    by_rpps = await client.get(
        "/_matrix/app/v1/thirdparty/user/eimis", params={"idnps": MARIE[1:]}, headers=AUTH
    )
    assert await by_rpps.json() == [marie]
    nobody = await client.get(
        "/_matrix/app/v1/thirdparty/user/eimis", params={"name": "zzz"}, headers=AUTH
    )
    assert nobody.status == 404 and (await nobody.json())["errcode"] == "M_NOT_FOUND"
    unknown = await client.get(
        "/_matrix/app/v1/thirdparty/user/irc", params={"name": "dupont"}, headers=AUTH
    )
    assert unknown.status == 404

    reverse = await client.get(
        "/_matrix/app/v1/thirdparty/user",
        params={"userid": ghost("pandalab", MARIE)},
        headers=AUTH,
    )
    assert await reverse.json() == [marie]
    stranger = await client.get(
        "/_matrix/app/v1/thirdparty/user", params={"userid": "@x:y.example"}, headers=AUTH
    )
    assert stranger.status == 404


async def test_the_migration_folds_the_names_already_in_the_directory(database_url: str) -> None:
    db = await open_database(DatabaseConfig(url=database_url))
    try:
        store = Stores.of(db).directory
        await store.upsert_batch([person(MARIE, "Marie", "DUPONT")], await store.next_stamp())
        # Back to the schema before v12, with the entry in it.
        await db.execute("DROP INDEX professional_family_key")
        await db.execute("DROP INDEX professional_given_key")
        await db.execute("ALTER TABLE professional DROP COLUMN family_key")
        await db.execute("ALTER TABLE professional DROP COLUMN given_key")
        await db.execute("DROP INDEX portal_participant_user")  # v13
        await db.execute("DROP INDEX professional_mxid_connector")  # v14
        await db.execute("ALTER TABLE professional_mxid DROP COLUMN listed_at")
        await db.execute("ALTER TABLE ghost DROP COLUMN former_at")
        await db.execute("DROP TABLE professional_mailbox")  # v15
        await db.execute("UPDATE eimis_version SET version = 11")
    finally:
        await db.stop()

    db = await open_database(DatabaseConfig(url=database_url))
    try:
        assert [p.idnps for p in await Stores.of(db).directory.search("dupont marie")] == [MARIE]
    finally:
        await db.stop()


async def test_a_direct_chat_they_already_have_is_found(stores: Stores) -> None:
    portals = stores.portals
    doc, nurse = "@doc:eimis.example", ghost("medipeps", JEAN_ERIC)
    for room_id, direct in (("!old:e", True), ("!group:e", False), ("!new:e", True)):
        await portals.create(Portal(room_id, None, direct, "@eimis_bot:eimis.example"))
        await portals.add_link(room_id, "medipeps", None)
        await portals.add_participants(room_id, "medipeps", [doc, nurse])
    await portals.close_link("!old:e", "medipeps")

    assert await portals.direct_with("medipeps", doc, nurse) == ["!new:e"]
    assert await portals.direct_with("pandalab", doc, nurse) == []
    assert await portals.direct_with("medipeps", "@someone:eimis.example", nurse) == []
