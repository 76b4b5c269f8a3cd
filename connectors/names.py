"""How the bridge writes a person's name: French usage, one rule for the bridge and the connectors.

The given name in title case (each part separated by a space, a hyphen or an apostrophe starts
with a capital, the rest in small letters), the family name in capitals, accents kept:
``MARIE`` / ``DUPONT`` and ``marie`` / ``Dupont`` both give ``Marie DUPONT``; ``JEAN-ÉRIC`` gives
``Jean-Éric``, ``d'alembert`` ``D'Alembert``, ``de la Fontaine`` ``DE LA FONTAINE``. A display
name is ``"<Given> <FAMILY> - <Profession>"``, without the dash when the profession is unknown.

Text is NFC-normalised and runs of spaces become one. A character whose case mapping is not a
single character (``ß`` → ``SS``, ``İ`` → ``i̇``) is kept as it is, except ``ß`` written in
capitals (family names) as ``ẞ``: a name keeps its length, and applying the rule twice changes
nothing.

A leaf module (standard library only): ``bridge`` and the connectors both import it.
"""

from __future__ import annotations

import unicodedata

__all__ = ["RULE", "display_name", "family_name", "given_name", "person_name"]

RULE = "fr-1"
"""This rule's version: when it changes, the bridge renames every ghost once (``ghost_names``)."""

_CAPITALS = {"ß": "ẞ"}


def _clean(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text or "").split())


def _upper(char: str, capitals: dict[str, str] = _CAPITALS) -> str:
    mapped = capitals.get(char) or char.upper()
    return mapped if len(mapped) == 1 else char


def _lower(char: str) -> str:
    mapped = char.lower()
    return mapped if len(mapped) == 1 else char


def _in_word(char: str) -> bool:
    """A letter (or an accent combining with one): the next letter continues the same part."""
    return char.isalpha() or unicodedata.category(char).startswith("M")


def given_name(text: str) -> str:
    """``JEAN-ÉRIC`` → ``Jean-Éric``: each part in title case (a letter after anything but a
    letter, so after a space, a hyphen, an apostrophe or the dot of ``J.-P.``, is a capital)."""
    out = []
    previous = ""
    for char in _clean(text):
        out.append(_lower(char) if previous and _in_word(previous) else _upper(char, {}))
        previous = char
    return "".join(out)


def family_name(text: str) -> str:
    """``de la Fontaine`` → ``DE LA FONTAINE``."""
    return "".join(_upper(char) for char in _clean(text))


def person_name(given: str, family: str) -> str:
    """``"<Given> <FAMILY>"`` (either may be empty)."""
    return " ".join(part for part in (given_name(given), family_name(family)) if part)


def display_name(given: str, family: str, profession: str | None) -> str:
    """``"<Given> <FAMILY> - <Profession>"``, without the dash when the profession is unknown."""
    name = person_name(given, family)
    label = _clean(profession or "")
    return f"{name} - {label}" if name and label else name or label
