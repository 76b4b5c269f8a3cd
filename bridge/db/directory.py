"""The directory of professionals: who they are and the Matrix IDs at which they can be reached.

Tables (migration v3): ``professional`` (one row per valid IDNPS) and ``professional_mxid``
(ghosts of each connector, native accounts; ``preferred`` marks an operator's explicit choice);
(migration v15) ``professional_mailbox``: the personal secure-mail addresses the national
sources list for a professional, which a mail connector resolves to an IDNPS (``by_mailbox``).

Bulk imports go through ``upsert_batch``: one ``executemany`` per table and batch, in one
transaction. A row is only rewritten when something in it changed, and every rewritten row
gets the import's ``stamp`` as ``updated_at``, so "what changed in this import" and "what
changed since the bridge last looked" are one indexed-free comparison each.

Sources: ``ps`` (ANS bulk extract), ``fhir`` (FHIR Bundle or endpoint), ``connector:<id>`` (a
connector's user list). The ANS sources are authoritative: what a connector says about a
professional never overwrites an entry that came from them.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mautrix.util.async_db import Database

from bridge.db.clock import now_ms
from connectors import names

GHOST = "ghost"
NATIVE = "native"
CONNECTOR_SOURCE = "connector:"
PERSONAL_MAILBOX = "PER"
"""The kind of mailbox stored: a personal one (the national sources' type code)."""
SEARCH_WORDS = 4
"""At most this many words of a search are used (the rest is ignored)."""
SEARCH_LIMIT = 50
"""No search returns more rows than this, whatever the caller asks."""

_NOT_WORD = re.compile(r"[^0-9a-z]+")
_LIGATURES = str.maketrans({"œ": "oe", "Œ": "oe", "æ": "ae", "Æ": "ae", "ß": "ss"})


def search_key(name: str) -> str:
    """A name folded for search: lower case, no accents, words of letters and digits separated
    by one space (``"Jean-Éric"`` -> ``"jean eric"``, ``"DE LA FONTAINE"`` -> ``"de la
    fontaine"``). Only ``[0-9a-z ]`` remain, so a key never holds a LIKE wildcard."""
    decomposed = unicodedata.normalize("NFKD", name.translate(_LIGATURES))
    bare = "".join(c for c in decomposed if not unicodedata.combining(c)).lower()
    return _NOT_WORD.sub(" ", bare).strip()


def display_name(given: str, family: str, label: str | None) -> str:
    """``"<Given> <FAMILY> - <Profession>"`` (EIMIS's naming, French usage: ``connectors.names``),
    without the dash when the profession is unknown."""
    return names.display_name(given, family, label)


@dataclass(frozen=True)
class Professional:
    idnps: str
    given_name: str
    family_name: str
    profession_code: str | None
    profession_label: str | None
    source: str
    updated_at: int = 0

    @property
    def display_name(self) -> str:
        return display_name(self.given_name, self.family_name, self.profession_label)

    @property
    def national(self) -> bool:
        """From the ANS sources (extract, FHIR), not a connector's word."""
        return not self.source.startswith(CONNECTOR_SOURCE)


@dataclass(frozen=True)
class ProfessionalMxid:
    idnps: str
    mxid: str
    kind: str
    """``ghost`` (a connector's ghost) or ``native`` (an account on a homeserver)."""
    connector: str | None
    preferred: bool = False


@dataclass(frozen=True)
class Record:
    """One professional as a source describes them, with native Matrix IDs it lists."""

    professional: Professional
    native_mxids: tuple[str, ...] = field(default=())
    mailboxes: tuple[str, ...] = field(default=())
    """Personal secure-mail addresses, normalised (``bridge.directory.records.mailbox_address``)."""


@dataclass(frozen=True)
class ProfessionalMailbox:
    idnps: str
    address: str
    kind: str
    source: str


@dataclass(frozen=True)
class BatchResult:
    records: int
    """Distinct professionals in the batch."""
    mxids: int
    mailboxes: int = 0
    """Distinct (professional, mailbox address) pairs in the batch."""


@dataclass(frozen=True)
class Rename:
    """A ghost whose display name differs from its directory entry."""

    mxid: str
    connector: str
    idnps: str
    old_name: str | None
    new_name: str


def _upsert(only_over: str = "") -> str:
    """Insert, or rewrite a row only when something in it changed (``updated_at`` marks it)."""
    return f"""
INSERT INTO professional (idnps, given_name, family_name, profession_code, profession_label,
                          source, updated_at, given_key, family_key)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (idnps) DO UPDATE SET
    given_name = excluded.given_name,
    given_key = excluded.given_key,
    family_key = excluded.family_key,
    family_name = excluded.family_name,
    profession_code = excluded.profession_code,
    profession_label = excluded.profession_label,
    source = excluded.source,
    updated_at = excluded.updated_at
WHERE (professional.given_name <> excluded.given_name
   OR professional.family_name <> excluded.family_name
   OR COALESCE(professional.profession_code, '') <> COALESCE(excluded.profession_code, '')
   OR COALESCE(professional.profession_label, '') <> COALESCE(excluded.profession_label, '')
   OR professional.source <> excluded.source){only_over}
"""


_UPSERT = _upsert()
# A connector's word only fills gaps: it may replace the entry it wrote itself, never one from
# the ANS sources (PS_LibreAcces, FHIR) nor another connector's (a vendor speaks for its own
# users only: it cannot rename another vendor's ghost by claiming the same IDNPS).
_UPSERT_FROM_CONNECTOR = _upsert(" AND professional.source = excluded.source")

_ADD_MXID = """
INSERT INTO professional_mxid (idnps, mxid, kind, connector, preferred)
VALUES ($1, $2, $3, $4, false)
ON CONFLICT (idnps, mxid) DO NOTHING
"""

# A mailbox a source lists: added, or its kind and source follow the latest import that lists it.
_ADD_MAILBOX = """
INSERT INTO professional_mailbox (idnps, address, kind, source)
VALUES ($1, $2, $3, $4)
ON CONFLICT (idnps, address) DO UPDATE SET kind = excluded.kind, source = excluded.source
WHERE professional_mailbox.kind <> excluded.kind OR professional_mailbox.source <> excluded.source
"""

_COLUMNS = "idnps, given_name, family_name, profession_code, profession_label, source, updated_at"

# A ghost row seen by a connector's listing pass: added, or its ``listed_at`` moved to the pass.
_LIST_MXID = f"""
INSERT INTO professional_mxid (idnps, mxid, kind, connector, preferred, listed_at)
VALUES ($1, $2, '{GHOST}', $3, false, $4)
ON CONFLICT (idnps, mxid) DO UPDATE SET listed_at = excluded.listed_at
"""


class ListedUser(Protocol):
    """What a connector's listing says of one user (``connectors.base.RemoteUser`` fits)."""

    @property
    def idnps(self) -> str: ...
    @property
    def given_name(self) -> str: ...
    @property
    def family_name(self) -> str: ...
    @property
    def profession(self) -> str | None: ...


@dataclass(frozen=True)
class EntryPage:
    """A page of directory entries with their Matrix IDs (``chosen_ghosts``)."""

    entries: list[tuple[Professional, list[ProfessionalMxid]]]
    ghost_names: dict[str, str | None]
    """Display names in the ghost table of the page's ghosts (absent: never made)."""
    last_idnps: str | None
    """The keyset cursor of the next page; None: this was the last page."""


class DirectoryStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # Bulk import -------------------------------------------------------------------------------

    async def next_stamp(self) -> int:
        """An ``updated_at`` for a new import: now, and later than anything stored."""
        latest = await self.latest_stamp()
        return max(now_ms(), latest + 1)

    async def upsert_batch(self, records: Sequence[Record], stamp: int) -> BatchResult:
        """Store a batch in one transaction. The last record of an IDNPS in the batch wins,
        except for mailboxes: those of all its records are kept (an extract lists a person on
        one line per activity or per mailbox). Mailboxes are only added (or re-typed): one
        that a source stops listing stays until the person is forgotten."""
        by_idnps: dict[str, Record] = {}
        mailboxes: dict[tuple[str, str], tuple[str, str, str, str]] = {}
        for record in records:
            idnps = record.professional.idnps
            by_idnps[idnps] = record
            for address in record.mailboxes:
                mailboxes[(idnps, address.lower())] = (
                    idnps,
                    address,
                    PERSONAL_MAILBOX,
                    record.professional.source,
                )
        rows = [
            (
                p.idnps,
                p.given_name,
                p.family_name,
                p.profession_code,
                p.profession_label,
                p.source,
                stamp,
                search_key(p.given_name),
                search_key(p.family_name),
            )
            for p in (r.professional for r in by_idnps.values())
        ]
        mxids = list(
            dict.fromkeys(
                (idnps, mxid, NATIVE, None)
                for idnps, record in by_idnps.items()
                for mxid in record.native_mxids
            )
        )
        async with self.db.acquire() as conn, conn.transaction():
            if rows:
                await conn.executemany(_UPSERT, rows)
            if mxids:
                await conn.executemany(_ADD_MXID, mxids)
            if mailboxes:
                await conn.executemany(_ADD_MAILBOX, list(mailboxes.values()))
        return BatchResult(len(rows), len(mxids), len(mailboxes))

    async def count(self) -> int:
        return int(await self.db.fetchval("SELECT COUNT(*) FROM professional"))

    async def count_stamped(self, stamp: int) -> int:
        """Rows written (new or changed) by the import that used ``stamp``."""
        return int(
            await self.db.fetchval("SELECT COUNT(*) FROM professional WHERE updated_at = $1", stamp)
        )

    async def latest_stamp(self) -> int:
        value = await self.db.fetchval("SELECT MAX(updated_at) FROM professional")
        return int(value or 0)

    # One professional --------------------------------------------------------------------------

    async def get(self, idnps: str) -> Professional | None:
        row = await self.db.fetchrow(f"SELECT {_COLUMNS} FROM professional WHERE idnps = $1", idnps)
        return Professional(**dict(row)) if row else None

    async def by_mxid(self, mxid: str) -> Professional | None:
        row = await self.db.fetchrow(
            "SELECT p.idnps, p.given_name, p.family_name, p.profession_code, "
            "p.profession_label, p.source, p.updated_at "
            "FROM professional_mxid m JOIN professional p ON p.idnps = m.idnps "
            "WHERE m.mxid = $1 ORDER BY p.idnps LIMIT 1",
            mxid,
        )
        return Professional(**dict(row)) if row else None

    async def by_mailbox(self, address: str) -> Professional | None:
        """The professional whose personal secure mailbox this is: the exact address, whatever
        its case. None when no one has it, or when the sources give it to several people (an
        ambiguous address names no one: a mail connector must not guess who wrote)."""
        key = address.strip().lower()
        if not key:
            return None
        rows = await self.db.fetch(
            "SELECT DISTINCT p.idnps, p.given_name, p.family_name, p.profession_code, "
            "p.profession_label, p.source, p.updated_at "
            "FROM professional_mailbox m JOIN professional p ON p.idnps = m.idnps "
            f"WHERE lower(m.address) = $1 AND m.kind = '{PERSONAL_MAILBOX}' LIMIT 2",
            key,
        )
        return Professional(**dict(rows[0])) if len(rows) == 1 else None

    async def mailboxes(self, idnps: str) -> list[ProfessionalMailbox]:
        """A professional's secure mailboxes, by address."""
        rows = await self.db.fetch(
            "SELECT idnps, address, kind, source FROM professional_mailbox WHERE idnps = $1 "
            "ORDER BY lower(address), address",
            idnps,
        )
        return [ProfessionalMailbox(**dict(r)) for r in rows]

    async def count_mailboxes(self) -> int:
        return int(await self.db.fetchval("SELECT COUNT(*) FROM professional_mailbox"))

    async def search(self, query: str, limit: int = 10) -> list[Professional]:
        """Professionals whose names match ``query``, whatever the case and accents: the whole
        query starts the family or the given name (``"de la font"``, ``"jean-eric"``), or each
        of its words starts one of them (``"marie dup"``). At most ``SEARCH_WORDS`` words and
        ``SEARCH_LIMIT`` rows; ordered by family then given name. Prefix LIKEs on the folded,
        indexed columns (migration v12), so a search reads index ranges, not the table.
        """
        key = search_key(query)
        words = key.split()[:SEARCH_WORDS]
        if not words:
            return []
        limit = max(1, min(limit, SEARCH_LIMIT))
        phrase = " ".join(words)
        args: list[object] = [phrase + "%"]
        condition = "(family_key LIKE $1 OR given_key LIKE $1)"
        if len(words) > 1:
            each = []
            for word in words:
                args.append(word + "%")
                n = len(args)
                each.append(f"(family_key LIKE ${n} OR given_key LIKE ${n})")
            condition = f"({condition} OR ({' AND '.join(each)}))"
        args.append(limit)
        rows = await self.db.fetch(
            f"SELECT {_COLUMNS} FROM professional WHERE {condition} "
            f"ORDER BY family_key, given_key, idnps LIMIT ${len(args)}",
            *args,
        )
        return [Professional(**dict(row)) for row in rows]

    async def mxids_of(self, idnps: Sequence[str]) -> dict[str, list[ProfessionalMxid]]:
        """The Matrix IDs of several professionals at once (a search's results)."""
        found: dict[str, list[ProfessionalMxid]] = {i: [] for i in idnps}
        if not found:
            return found
        marks = ", ".join(f"${n}" for n in range(1, len(found) + 1))
        rows = await self.db.fetch(
            "SELECT idnps, mxid, kind, connector, preferred FROM professional_mxid "
            f"WHERE idnps IN ({marks}) ORDER BY idnps, mxid",
            *found,
        )
        for r in rows:
            found[r["idnps"]].append(
                ProfessionalMxid(
                    r["idnps"], r["mxid"], r["kind"], r["connector"], bool(r["preferred"])
                )
            )
        return found

    async def mxids(self, idnps: str) -> list[ProfessionalMxid]:
        rows = await self.db.fetch(
            "SELECT idnps, mxid, kind, connector, preferred FROM professional_mxid "
            "WHERE idnps = $1 ORDER BY mxid",
            idnps,
        )
        return [
            ProfessionalMxid(r["idnps"], r["mxid"], r["kind"], r["connector"], bool(r["preferred"]))
            for r in rows
        ]

    async def record_connector_user(
        self,
        connector: str,
        idnps: str,
        given_name: str,
        family_name: str,
        profession_label: str | None,
        ghost_mxid: str,
    ) -> Professional:
        """A connector described one of its users: note them (unless the ANS sources or another
        connector already did) and their ghost. Returns the directory's entry."""
        stamp = await self.next_stamp()
        source = f"{CONNECTOR_SOURCE}{connector}"
        async with self.db.acquire() as conn, conn.transaction():
            await conn.execute(
                _UPSERT_FROM_CONNECTOR,
                idnps,
                given_name,
                family_name,
                None,
                profession_label,
                source,
                stamp,
                search_key(given_name),
                search_key(family_name),
            )
            # The vendor just described this user: as good as a listing seeing them, so a listing
            # pass running meanwhile (which may have read past them) does not forget the row.
            await conn.execute(_LIST_MXID, idnps, ghost_mxid, connector, stamp)
        entry = await self.get(idnps)
        assert entry is not None
        return entry

    # A connector's user list, published in the homeserver's user directory ----------------

    async def record_listed_users(
        self,
        connector: str,
        users: Sequence[ListedUser],
        ghost_mxid_of: Callable[[str], str],
        pass_stamp: int,
    ) -> int:
        """One page of a connector's user listing, in one transaction: each user noted like
        ``record_connector_user`` (the connector's word only fills gaps) with their ghost row,
        stamped as seen by the listing pass ``pass_stamp``. Returns the users recorded."""
        by_idnps = {u.idnps: u for u in users}
        if not by_idnps:
            return 0
        stamp = await self.next_stamp()
        source = f"{CONNECTOR_SOURCE}{connector}"
        rows = [
            (
                u.idnps,
                u.given_name,
                u.family_name,
                None,
                u.profession,
                source,
                stamp,
                search_key(u.given_name),
                search_key(u.family_name),
            )
            for u in by_idnps.values()
        ]
        mxids = [(i, ghost_mxid_of(i), connector, pass_stamp) for i in by_idnps]
        async with self.db.acquire() as conn, conn.transaction():
            await conn.executemany(_UPSERT_FROM_CONNECTOR, rows)
            await conn.executemany(_LIST_MXID, mxids)
        return len(rows)

    async def forget_unlisted(self, connector: str, pass_stamp: int) -> list[tuple[str, str]]:
        """After a COMPLETE listing pass of ``connector``: its ghost rows the pass did not see
        are removed (the person left that vendor; the choice rule stops picking that ghost).
        Returns their (IDNPS, Matrix ID). Never call it for an interrupted pass."""
        where = f"kind = '{GHOST}' AND connector = $1 AND COALESCE(listed_at, 0) < $2"
        async with self.db.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                f"SELECT idnps, mxid FROM professional_mxid WHERE {where} ORDER BY idnps",
                connector,
                pass_stamp,
            )
            if rows:
                await conn.execute(
                    f"DELETE FROM professional_mxid WHERE {where}", connector, pass_stamp
                )
        return [(r["idnps"], r["mxid"]) for r in rows]

    async def count_with_ghosts(self, national_only: bool = False) -> int:
        """Directory entries with at least one ghost row (what a publication pass reads)."""
        national = f" AND p.source NOT LIKE '{CONNECTOR_SOURCE}%'" if national_only else ""
        return int(
            await self.db.fetchval(
                "SELECT COUNT(*) FROM professional p WHERE EXISTS (SELECT 1 FROM "
                f"professional_mxid m WHERE m.idnps = p.idnps AND m.kind = '{GHOST}'){national}"
            )
        )

    async def chosen_ghosts(
        self,
        after_idnps: str | None,
        limit: int,
        connectors_in_order: Sequence[str],
        national_only: bool = False,
    ) -> EntryPage:
        """One keyset page (IDNPS order, after ``after_idnps``) of the directory entries that
        have a ghost of one of these connectors, with all their Matrix IDs and the names the
        ghost table gives those ghosts, so the publisher applies ``bridge.directory.choice``.
        ``national_only``: only entries from the ANS sources."""
        if not connectors_in_order:
            return EntryPage([], {}, None)
        national = f" AND p.source NOT LIKE '{CONNECTOR_SOURCE}%'" if national_only else ""
        marks = ", ".join(f"${n}" for n in range(3, len(connectors_in_order) + 3))
        rows = await self.db.fetch(
            f"SELECT {', '.join('p.' + c.strip() for c in _COLUMNS.split(','))} "
            "FROM professional p WHERE p.idnps > $1 AND EXISTS (SELECT 1 FROM professional_mxid "
            # COALESCE keeps SQLite's planner on the (idnps, mxid) key: on the bare column it
            # scans the connector index for every entry, seconds a page at 100,000 entries.
            f"m WHERE m.idnps = p.idnps AND m.kind = '{GHOST}' "
            f"AND COALESCE(m.connector, '') IN ({marks}))"
            f"{national} ORDER BY p.idnps LIMIT $2",
            after_idnps or "",
            limit,
            *connectors_in_order,
        )
        entries = [Professional(**dict(r)) for r in rows]
        if not entries:
            return EntryPage([], {}, None)
        mxids = await self.mxids_of([e.idnps for e in entries])
        ghosts = [m.mxid for e in entries for m in mxids[e.idnps] if m.kind == GHOST]
        names: dict[str, str | None] = {}
        for start in range(0, len(ghosts), 500):
            chunk = ghosts[start : start + 500]
            marks = ", ".join(f"${n}" for n in range(1, len(chunk) + 1))
            for r in await self.db.fetch(
                f"SELECT mxid, display_name FROM ghost WHERE mxid IN ({marks})", *chunk
            ):
                names[r["mxid"]] = r["display_name"]
        last = entries[-1].idnps if len(entries) == limit else None
        return EntryPage([(e, mxids[e.idnps]) for e in entries], names, last)

    async def add_mxid(
        self, idnps: str, mxid: str, kind: str, connector: str | None = None
    ) -> None:
        await self.db.execute(_ADD_MXID, idnps, mxid, kind, connector)

    async def prefer(self, idnps: str, mxid: str) -> bool:
        """Make ``mxid`` the one chosen for this professional; False when it is not listed."""
        async with self.db.acquire() as conn, conn.transaction():
            found = await conn.fetchval(
                "SELECT COUNT(*) FROM professional_mxid WHERE idnps = $1 AND mxid = $2",
                idnps,
                mxid,
            )
            if not found:
                return False
            await conn.execute(
                "UPDATE professional_mxid SET preferred = (mxid = $2) WHERE idnps = $1",
                idnps,
                mxid,
            )
        return True

    # Ghosts named after the directory ----------------------------------------------------------

    async def backfill_ghosts(self) -> None:
        """Ghosts made before the directory existed are listed as ways to reach their person."""
        await self.db.execute(
            "INSERT INTO professional_mxid (idnps, mxid, kind, connector, preferred) "
            f"SELECT idnps, mxid, '{GHOST}', connector, false FROM ghost "
            # "WHERE true": SQLite's parser needs it between a SELECT and ON CONFLICT.
            "WHERE true ON CONFLICT (idnps, mxid) DO NOTHING"
        )

    async def renames(self, since: int = 0) -> list[Rename]:
        """Ghosts whose directory entry (written after ``since``) names them differently.

        An ANS entry names every ghost of the person; a connector's entry only that connector's.
        """
        rows = await self.db.fetch(
            "SELECT g.mxid, g.connector, g.idnps, g.display_name, p.given_name, p.family_name, "
            "p.profession_label FROM ghost g JOIN professional p ON p.idnps = g.idnps "
            f"WHERE p.updated_at > $1 AND (p.source NOT LIKE '{CONNECTOR_SOURCE}%' "
            f"OR p.source = '{CONNECTOR_SOURCE}' || g.connector) "
            # A ghost its person no longer has (forgotten by a listing) keeps its "former
            # account" name: the directory's publication gave it, a rename must not undo it.
            "AND g.former_at IS NULL",
            since,
        )
        renames = []
        for r in rows:
            new_name = display_name(r["given_name"], r["family_name"], r["profession_label"])
            if new_name and new_name != r["display_name"]:
                renames.append(
                    Rename(r["mxid"], r["connector"], r["idnps"], r["display_name"], new_name)
                )
        return renames
