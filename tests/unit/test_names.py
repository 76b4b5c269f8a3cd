"""How the bridge writes a person's name (``connectors.names``): French usage, the given name in
title case and the family name in capitals, and everywhere the bridge names someone."""

from __future__ import annotations

import pytest

from bridge.db.directory import Professional
from bridge.db.directory import display_name as directory_display_name
from connectors.base import RemoteUser
from connectors.idnps import Idnps
from connectors.names import display_name, family_name, given_name, person_name

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
