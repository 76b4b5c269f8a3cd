"""How the bridge writes a person's name (``connectors.names``): French usage, the given name in
title case and the family name in capitals, and everywhere the bridge names someone."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge.config import DatabaseConfig
from bridge.core.ghost_names import NAMING_RULE_KEY, SEEN_KEY, GhostNames
from bridge.core.portals import Portals
from bridge.db.connector_state import BRIDGE_STATE, ConnectorStateStore
from bridge.db.database import open_database
from bridge.db.directory import Professional
from bridge.db.directory import display_name as directory_display_name
from bridge.db.stores import Stores
from bridge.directory.importer import import_file
from connectors.base import RemoteUser
from connectors.idnps import Idnps
from connectors.names import RULE, display_name, family_name, given_name, person_name
from tests.unit.test_vendor_identity import IDS, FakeConnectors, FakeHomeserver, FakeVendor

DATA = Path(__file__).parents[1] / "data" / "directory"
MARIE = Idnps("810099000019")

GIVEN = [
    ("MARIE", "Marie"),
    ("marie", "Marie"),
    ("Marie", "Marie"),
    ("JEAN-ÉRIC", "Jean-Éric"),
    ("jean-éric", "Jean-Éric"),
    ("jean eric", "Jean Eric"),
    ("MARIE-HÉLÈNE", "Marie-Hélène"),
    ("marie-hélène", "Marie-Hélène"),
    ("d'Alembert", "D'Alembert"),
    ("D'ALEMBERT", "D'Alembert"),
    ("d’alembert", "D’Alembert"),  # typographic apostrophe, kept
    ("ÉLODIE", "Élodie"),
    ("ÇA", "Ça"),
    ("ANNE  MARIE ", "Anne Marie"),  # spaces: one between parts, none around
    ("J.-P.", "J.-P."),
    ("JOËL", "Joël"),
    ("CHLOÉ", "Chloé"),
    ("e\u0301lise", "Élise"),  # decomposed accent: composed (NFC)
    ("weiß", "Weiß"),  # ß stays (its capital would lengthen the name)
    ("İNCE", "İnce"),  # İ has no one-character small letter: kept
    ("", ""),
    ("   ", ""),
]

FAMILY = [
    ("DUPONT", "DUPONT"),
    ("Dupont", "DUPONT"),
    ("dupont", "DUPONT"),
    ("de la Fontaine", "DE LA FONTAINE"),
    ("Lefèvre", "LEFÈVRE"),
    ("Martin-Durand", "MARTIN-DURAND"),
    ("d'Alembert", "D'ALEMBERT"),
    ("Weiß", "WEIẞ"),  # the capital sharp s: one character, like the small one
    ("ﬁnot", "ﬁNOT"),  # a ligature whose capitals are two letters: kept
    ("  le   Goff ", "LE GOFF"),
    ("", ""),
]


@pytest.mark.parametrize(("raw", "expected"), GIVEN)
def test_given_name_in_title_case(raw: str, expected: str) -> None:
    assert given_name(raw) == expected
    assert given_name(expected) == expected, "already right: unchanged (idempotent)"


@pytest.mark.parametrize(("raw", "expected"), FAMILY)
def test_family_name_in_capitals(raw: str, expected: str) -> None:
    assert family_name(raw) == expected
    assert family_name(expected) == expected, "already right: unchanged (idempotent)"


@pytest.mark.parametrize(
    ("given", "family", "profession", "expected"),
    [
        ("MARIE", "DUPONT", "Médecin", "Marie DUPONT - Médecin"),  # the national extract
        ("marie", "Dupont", "Médecin", "Marie DUPONT - Médecin"),  # a vendor
        ("Marie", "DUPONT", "Médecin", "Marie DUPONT - Médecin"),  # already right
        ("JEAN-ÉRIC", "de la Fontaine", "Infirmier", "Jean-Éric DE LA FONTAINE - Infirmier"),
        ("", "NOEL", "Masseur-Kinésithérapeute", "NOEL - Masseur-Kinésithérapeute"),
        ("Paul", "LEROY", None, "Paul LEROY"),
        ("Paul", "LEROY", "  ", "Paul LEROY"),
        ("paul", "", "Infirmier", "Paul - Infirmier"),
        ("", "", None, ""),
    ],
)
def test_display_name(given: str, family: str, profession: str | None, expected: str) -> None:
    assert display_name(given, family, profession) == expected
    assert directory_display_name(given, family, profession) == expected
    assert person_name(given, family) == expected.split(" - ")[0]


def test_the_directory_and_the_connectors_name_people_alike() -> None:
    entry = Professional("810099000019", "MARIE-HÉLÈNE", "de la Fontaine", "10", "Médecin", "ps")
    user = RemoteUser(Idnps("810099000019"), "marie-hélène", "De La Fontaine", "Médecin")

    assert entry.display_name == user.display_name == "Marie-Hélène DE LA FONTAINE - Médecin"


# --- Where the bridge names people -----------------------------------------------------------


@pytest.fixture
async def stores(database_url: str) -> AsyncIterator[Stores]:
    db = await open_database(DatabaseConfig(url=database_url))
    try:
        yield Stores.of(db)
    finally:
        await db.stop()


async def test_the_national_extract_in_capitals_is_named_the_french_way(stores: Stores) -> None:
    await import_file(stores.directory, DATA / "ps_sample.txt", progress=False)

    names = {
        p: (await stores.directory.get(p)).display_name for p in ("810099000019", "0009900010")
    }  # type: ignore[union-attr]
    assert names == {
        "810099000019": "Marie DUPONT - Médecin",
        "0009900010": "Paul LEROY - Infirmier",
    }
    marie = await stores.directory.get("810099000019")
    assert marie is not None and (marie.given_name, marie.family_name) == ("MARIE", "DUPONT")


async def test_a_connectors_user_names_its_ghost_the_french_way(stores: Stores) -> None:
    hs = FakeHomeserver()
    vendor = FakeVendor({MARIE: RemoteUser(MARIE, "marie-hélène", "de la Fontaine", "Médecin")})
    portals = Portals(stores, hs, FakeConnectors(pandalab=vendor), IDS)  # type: ignore[arg-type]

    ghost = await portals.ghost("pandalab", MARIE)

    wanted = "Marie-Hélène DE LA FONTAINE - Médecin"
    assert ghost.display_name == wanted and hs.ghost_names == {ghost.mxid: wanted}
    entry = await stores.directory.get(MARIE)
    assert entry is not None and entry.display_name == wanted


async def test_a_native_user_the_directory_lists_is_shown_the_french_way(stores: Stores) -> None:
    native = "@marie:hs.example"
    await import_file(stores.directory, DATA / "ps_sample.txt", progress=False)
    await stores.directory.add_mxid(MARIE, native, "native")
    portals = Portals(stores, FakeHomeserver(), FakeConnectors(), IDS)  # type: ignore[arg-type]

    shown = await portals.sender("!room:hs.example", native, IDS.bot_mxid)

    assert shown.display_name == "Marie DUPONT - Médecin"


async def test_ghosts_named_the_old_way_are_renamed_once_by_a_new_rule(stores: Stores) -> None:
    """Ghosts of a bridge that wrote "MARIE DUPONT - Médecin": the directory has not changed,
    but the rule has; the first start after the upgrade renames them, the next compares nothing."""
    hs = FakeHomeserver()
    ghost = IDS.mxid("pandalab", MARIE)
    await import_file(stores.directory, DATA / "ps_sample.txt", progress=False)
    await stores.ghosts.upsert(ghost, "pandalab", MARIE, "MARIE DUPONT - Médecin")
    state = ConnectorStateStore(stores.db, BRIDGE_STATE)
    await state.set(SEEN_KEY, str(await stores.directory.latest_stamp()))  # all applied, then

    names = GhostNames(stores, hs, 3600)  # type: ignore[arg-type]
    await names.start()
    await names.stop()

    assert hs.ghost_names == {ghost: "Marie DUPONT - Médecin"}
    row = await stores.ghosts.get(ghost)
    assert row is not None and row.display_name == "Marie DUPONT - Médecin"
    assert await state.get(NAMING_RULE_KEY) == RULE
    assert names.seen == await stores.directory.latest_stamp()

    hs.ghost_names.clear()
    again = GhostNames(stores, hs, 3600)  # type: ignore[arg-type]
    await again.start()
    await again.stop()
    assert hs.ghost_names == {}
