"""The ANS bulk extract, "PS_LibreAcces_Personne_activite": ``|``-separated text, one line per
activity of a professional (so one person may be on several lines), a header line first.

The columns used are found by their header name, so their order (and the columns ANS adds or
drops between versions: 52 to 56 of them so far) does not matter:

==================================  ============================================
``Identification nationale PP``     the IDNPS (else ``Type d'identifiant PP`` +
                                    ``Identifiant PP``, which make the same)
``Nom d'exercice``                  family name (required on each line)
``Prénom d'exercice``               given name (may be empty)
``Code profession``                 TRE_G15 code, e.g. ``10``
``Libellé profession``              its label, e.g. ``Médecin``
``MXID`` (not ANS: this bridge's)   native Matrix IDs, separated by ``,`` or ``;``
``Adresse BAL`` (any header that    secure mailbox addresses (the ANS mailbox
starts so, e.g. ``Adresse BAL       extract's column; several separated by ``,``
MSSanté``)                          or ``;``)
``Type BAL`` (optional)             the mailbox's type: only ``PER`` (personal)
                                    mailboxes are kept when the column exists
==================================  ============================================

Lines end with a ``|`` in ANS's files (an empty last column); a line with a different number of
columns than the header is rejected, as are an invalid IDNPS (with the rule it fails), a
missing family name and an invalid mailbox address (a line of another mailbox type is imported
without its mailbox). Files are UTF-8 (older extracts: Windows-1252, read as such per line).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator

from bridge.db.directory import Professional
from bridge.directory.records import (
    DirectoryFormatError,
    Record,
    Rejected,
    mailbox_address,
    matrix_id,
)
from connectors.idnps import Idnps, InvalidIdnps

SOURCE = "ps"
SEPARATOR = "|"

IDNPS = "Identification nationale PP"
ID_TYPE = "Type d'identifiant PP"
ID = "Identifiant PP"
FAMILY = "Nom d'exercice"
GIVEN = "Prénom d'exercice"
CODE = "Code profession"
LABEL = "Libellé profession"
MXID_COLUMNS = ("MXID", "MXIDs", "Matrix ID", "Identifiant Matrix")
MAILBOX_COLUMN = "Adresse BAL"
"""The mailbox column: this header, or one that starts with it and a space (a qualifier)."""
MAILBOX_TYPE_COLUMN = "Type BAL"
PERSONAL = "PER"

_SPACES = re.compile(r"\s+")
_MXID_SPLIT = re.compile(r"[,;\s]+")


def _key(name: str) -> str:
    """Header names compared without case, accents' encoding, curly quotes or extra spaces."""
    name = unicodedata.normalize("NFC", name).replace("’", "'").replace("\ufeff", "")
    return _SPACES.sub(" ", name).strip().casefold()


def _bare(key: str) -> str:
    """A header key without accents (for the mailbox columns, named with or without them)."""
    decomposed = unicodedata.normalize("NFKD", key)
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def _decode(raw: bytes | str) -> str:
    if isinstance(raw, str):
        return raw.rstrip("\r\n")
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace").rstrip("\r\n")


class _Layout:
    def __init__(self, header: str) -> None:
        names = header.split(SEPARATOR)
        positions: dict[str, int] = {}
        for position, name in enumerate(names):
            positions.setdefault(_key(name), position)
        self.columns = len(names)
        # ANS ends every line with '|': a line without that last empty column is the same line.
        self.tolerated = {self.columns, self.columns - 1} if names[-1].strip() == "" else None

        def find(*wanted: str) -> int | None:
            for name in wanted:
                if _key(name) in positions:
                    return positions[_key(name)]
            return None

        self.idnps = find(IDNPS)
        self.id_type = find(ID_TYPE)
        self.id = find(ID)
        self.family = find(FAMILY)
        self.given = find(GIVEN)
        self.code = find(CODE)
        self.label = find(LABEL)
        self.mxid = find(*MXID_COLUMNS)

        def find_prefixed(wanted: str) -> int | None:
            bare = _bare(_key(wanted))
            for name, position in sorted(positions.items(), key=lambda item: item[1]):
                if _bare(name) == bare or _bare(name).startswith(bare + " "):
                    return position
            return None

        self.mailbox = find_prefixed(MAILBOX_COLUMN)
        self.mailbox_type = find_prefixed(MAILBOX_TYPE_COLUMN)
        has_idnps = self.idnps is not None or (self.id_type is not None and self.id is not None)
        missing = [
            name
            for name, found in (
                (IDNPS, has_idnps),
                (FAMILY, self.family is not None),
                (GIVEN, self.given is not None),
            )
            if not found
        ]
        if missing:
            raise DirectoryFormatError(
                "not a PS_LibreAcces file: its header (line 1) has no column "
                + ", ".join(repr(m) for m in missing)
                # What it has instead is never quoted: the file may be anything (a key file).
                + f" (it has {len(names)} column(s) separated by {SEPARATOR!r})"
            )

    def fits(self, count: int) -> bool:
        return count == self.columns or (self.tolerated is not None and count in self.tolerated)


def parse(
    lines: Iterable[bytes | str],
    *,
    foreign_mxid: Callable[[str], str | None] | None = None,
) -> Iterator[Record | Rejected]:
    """Records and rejections, line by line (line 1 is the header).

    ``foreign_mxid(mxid)``: a reason to refuse a listed Matrix ID (e.g. it is in the bridge's
    own ghost namespace), or None to accept it.
    """
    iterator = iter(lines)
    layout: _Layout | None = None
    number = 0
    for raw in iterator:
        number += 1
        header = _decode(raw)
        if header.strip():
            layout = _Layout(header)
            break
    if layout is None:
        raise DirectoryFormatError("the file is empty (a PS_LibreAcces file starts with a header)")
    for raw in iterator:
        number += 1
        line = _decode(raw)
        if not line.strip():
            continue
        fields = line.split(SEPARATOR)
        if not layout.fits(len(fields)):
            yield Rejected(
                number, f"has {len(fields)} columns where the header has {layout.columns}"
            )
            continue
        if layout.idnps is not None:
            value = fields[layout.idnps].strip()
        else:
            assert layout.id_type is not None and layout.id is not None
            value = fields[layout.id_type].strip() + fields[layout.id].strip()
        try:
            idnps = Idnps(value)
        except InvalidIdnps as error:
            yield Rejected(number, f"invalid IDNPS: {error}")
            continue
        family = fields[layout.family].strip()  # type: ignore[index]
        if not family:
            yield Rejected(number, f"missing name: {FAMILY!r} is empty (IDNPS {idnps})")
            continue
        given = fields[layout.given].strip()  # type: ignore[index]
        code = fields[layout.code].strip() or None if layout.code is not None else None
        label = fields[layout.label].strip() or None if layout.label is not None else None
        mxids: list[str] = []
        refused = None
        if layout.mxid is not None:
            items = [i for i in _MXID_SPLIT.split(fields[layout.mxid].strip()) if i]
            for index, item in enumerate(items, start=1):
                mxid = matrix_id(item)
                if mxid is None:
                    refused = (
                        f"column {layout.mxid + 1}, Matrix ID {index}: not a Matrix user ID "
                        "(@user:server)"
                    )
                    break
                reason = foreign_mxid(mxid) if foreign_mxid is not None else None
                if reason is not None:
                    refused = f"{mxid}: {reason}"
                    break
                mxids.append(mxid)
        mailboxes: list[str] = []
        if refused is None and layout.mailbox is not None:
            personal = layout.mailbox_type is None or (
                fields[layout.mailbox_type].strip().upper() == PERSONAL
            )
            items = [i for i in _MXID_SPLIT.split(fields[layout.mailbox].strip()) if i]
            for index, item in enumerate(items if personal else [], start=1):
                address, reason = mailbox_address(item)
                if address is None:
                    refused = f"column {layout.mailbox + 1}, mailbox {index}: {reason}"
                    break
                mailboxes.append(address)
        if refused is not None:
            yield Rejected(number, refused)
            continue
        yield Record(
            Professional(idnps, given, family, code, label, SOURCE),
            tuple(mxids),
            tuple(dict.fromkeys(mailboxes)),
        )
