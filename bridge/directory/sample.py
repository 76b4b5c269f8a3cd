"""Synthetic PS_LibreAcces extracts for tests and benchmarks (made up people, valid IDNPS), with
the ANS mailbox extract's two columns (``Type BAL``, ``Adresse BAL``) after ANS's 56: some
people have a personal secure mailbox."""

from __future__ import annotations

import random
from pathlib import Path

from bridge.directory.fhir import NATIONAL_MAILBOX_DOMAINS
from connectors.idnps import luhn_check_digit

# ANS's column layout of PS_LibreAcces_Personne_activite (56 columns, each line ending in '|').
_LAYOUT = (
    "Type d'identifiant PP|Identifiant PP|Identification nationale PP|Code civilité d'exercice|"
    "Libellé civilité d'exercice|Code civilité|Libellé civilité|Nom d'exercice|Prénom d'exercice|"
    "Code profession|Libellé profession|Code catégorie professionnelle|"
    "Libellé catégorie professionnelle|Code type savoir-faire|Libellé type savoir-faire|"
    "Code savoir-faire|Libellé savoir-faire|Code mode exercice|Libellé mode exercice|"
    "Numéro SIRET site|Numéro SIREN site|Numéro FINESS site|"
    "Numéro FINESS établissement juridique|Identifiant technique de la structure|"
    "Raison sociale site|Enseigne commerciale site|Complément destinataire (coord. structure)|"
    "Complément point géographique (coord. structure)|Numéro Voie (coord. structure)|"
    "Indice répétition voie (coord. structure)|Code type de voie (coord. structure)|"
    "Libellé type de voie (coord. structure)|Libellé Voie (coord. structure)|"
    "Mention distribution (coord. structure)|Bureau cedex (coord. structure)|"
    "Code postal (coord. structure)|Code commune (coord. structure)|"
    "Libellé commune (coord. structure)|Code pays (coord. structure)|"
    "Libellé pays (coord. structure)|Téléphone (coord. structure)|"
    "Téléphone 2 (coord. structure)|Télécopie (coord. structure)|"
    "Adresse e-mail (coord. structure)|Code Département (structure)|"
    "Libellé Département (structure)|Ancien identifiant de la structure|"
    "Autorité d'enregistrement|Code secteur d'activité|Libellé secteur d'activité|"
    "Code section tableau pharmaciens|Libellé section tableau pharmaciens|Code rôle|Libellé rôle|"
    "Code genre activité|Libellé genre activité"
)
HEADER_COLUMNS = tuple(_LAYOUT.split("|"))
HEADER = "|".join(HEADER_COLUMNS) + "|"

_FAMILIES = ("MARTIN", "BERNARD", "DUBOIS", "THOMAS", "ROBERT", "RICHARD", "PETIT", "DURAND")
_GIVEN = ("CAMILLE", "LOUIS", "EMMA", "HUGO", "JADE", "LEO", "CHLOE", "NATHAN")
_PROFESSIONS = (
    ("10", "Médecin"),
    ("60", "Infirmier"),
    ("21", "Pharmacien"),
    ("50", "Sage-Femme"),
    ("70", "Masseur-Kinésithérapeute"),
)
_INDEX = {name: position for position, name in enumerate(HEADER_COLUMNS)}
MAILBOX_COLUMNS = "Type BAL|Adresse BAL|"
"""Appended to ``HEADER`` (and ``mailbox_fields`` to a line) for an extract with mailboxes."""


def rpps_idnps(n: int) -> str:
    """The n-th made-up RPPS-based IDNPS (``8`` + ``19`` + 8 digits + Luhn digit)."""
    partial = f"19{n:08d}"
    return "8" + partial + luhn_check_digit(partial)


def extract_line(idnps: str, family: str, given: str, code: str, label: str) -> str:
    fields = [""] * len(HEADER_COLUMNS)
    fields[0], fields[1], fields[2] = idnps[0], idnps[1:], idnps
    fields[_INDEX["Nom d'exercice"]] = family
    fields[_INDEX["Prénom d'exercice"]] = given
    fields[_INDEX["Code profession"]] = code
    fields[_INDEX["Libellé profession"]] = label
    fields[_INDEX["Code mode exercice"]] = "L"
    return "|".join(fields) + "|"


def mailbox_address(given: str, family: str, n: int) -> str:
    """A made-up personal secure mailbox in the national domain."""
    return f"{given.lower()}.{family.lower()}.{n}@medecin.{NATIONAL_MAILBOX_DOMAINS[0]}"


def mailbox_fields(address: str | None) -> str:
    """The ``MAILBOX_COLUMNS`` of a line: a personal mailbox, or none."""
    return f"PER|{address}|" if address else "||"


def write_extract(
    path: Path, lines: int, *, bad_every: int = 0, mailbox_every: int = 4, seed: int = 5
) -> int:
    """Write a header and ``lines`` data lines; every ``bad_every``-th has a broken IDNPS, every
    ``mailbox_every``-th a personal secure mailbox (0: no mailbox columns at all).
    Returns how many lines are bad."""
    rng = random.Random(seed)
    bad = 0
    with path.open("w", encoding="utf-8") as f:
        f.write(HEADER + (MAILBOX_COLUMNS if mailbox_every else "") + "\n")
        chunk: list[str] = []
        for n in range(1, lines + 1):
            idnps = rpps_idnps(n)
            if bad_every and n % bad_every == 0:
                idnps = idnps[:-1] + str((int(idnps[-1]) + 1) % 10)  # Luhn now fails
                bad += 1
            code, label = rng.choice(_PROFESSIONS)
            family, given = rng.choice(_FAMILIES), rng.choice(_GIVEN)
            line = extract_line(idnps, family, given, code, label)
            if mailbox_every:
                address = mailbox_address(given, family, n) if n % mailbox_every == 0 else None
                line += mailbox_fields(address)
            chunk.append(line)
            if len(chunk) >= 10_000:
                f.write("\n".join(chunk) + "\n")
                chunk = []
        if chunk:
            f.write("\n".join(chunk) + "\n")
    return bad
