"""Synthetic PS_LibreAcces extracts for tests and benchmarks (made up people, valid IDNPS)."""

from __future__ import annotations

import random
from pathlib import Path

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


def write_extract(path: Path, lines: int, *, bad_every: int = 0, seed: int = 5) -> int:
    """Write a header and ``lines`` data lines; every ``bad_every``-th has a broken IDNPS.
    Returns how many lines are bad."""
    rng = random.Random(seed)
    bad = 0
    with path.open("w", encoding="utf-8") as f:
        f.write(HEADER + "\n")
        chunk: list[str] = []
        for n in range(1, lines + 1):
            idnps = rpps_idnps(n)
            if bad_every and n % bad_every == 0:
                idnps = idnps[:-1] + str((int(idnps[-1]) + 1) % 10)  # Luhn now fails
                bad += 1
            code, label = rng.choice(_PROFESSIONS)
            chunk.append(
                extract_line(idnps, rng.choice(_FAMILIES), rng.choice(_GIVEN), code, label)
            )
            if len(chunk) >= 10_000:
                f.write("\n".join(chunk) + "\n")
                chunk = []
        if chunk:
            f.write("\n".join(chunk) + "\n")
    return bad
