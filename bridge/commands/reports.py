"""Reports on the bridge's state, read from the database: ``status`` (its database part),
``queue``, ``portals``, ``portal``, ``whois``. The admin room and the CLI give the same text (the
CLI works from the host when Matrix is down), and the CLI the same data as JSON.

Each report is a small dataclass: ``text()`` is what the operator reads, ``to_json()`` the same
content for a program. Only ids, counts and times: never message content.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from bridge.commands import BadInput, Refused
from bridge.core.ghost_ids import GhostIds
from bridge.db.clock import now_ms
from bridge.db.reports import PortalSummary, QueueDepth, ReportStore
from bridge.db.stores import Stores
from connectors.idnps import Idnps, InvalidIdnps


def age(ms: int | None) -> str:
    """How long ago, for people: 42 s, 3 min, 2 h, 5 d."""
    if ms is None:
        return "-"
    return duration((now_ms() - ms) / 1000)


def duration(seconds: float) -> str:
    """A duration for people: 42 s, 3 min, 2 h, 5 d."""
    whole = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if whole >= size:
            return f"{whole // size} {unit}"
    return f"{whole} s"


class _Report:
    def to_json(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload, no-any-return]


# --- status --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectorState:
    """One connector as a front end knows it: the running bridge says its health state, the
    CLI whether it is enabled."""

    connector_id: str
    type_name: str
    state: str


@dataclass
class DatabaseStatus(_Report):
    """The database's part of ``status``: inbox counts, and per connector its queue, what dead
    letters hold back, the oldest delivery waiting and the last error."""

    inbox: dict[str, int]
    queues: dict[str, QueueDepth]
    dead_letters: dict[str, int]
    connectors: list[ConnectorState] = field(default_factory=list)

    def database_line(self) -> str:
        inbox = self.inbox
        return (
            f"Database: answering; inbox {inbox.get('pending', 0)} pending, "
            f"{inbox.get('waiting', 0)} waiting for earlier events, {inbox.get('failed', 0)} failed"
        )

    def connector_lines(self) -> list[str]:
        lines = ["Connectors:"]
        for connector in self.connectors:
            depth = self.queues.get(connector.connector_id)
            line = (
                f"  {connector.connector_id} ({connector.type_name}): {connector.state}, "
                f"{depth.pending if depth else 0} queued"
            )
            if depth and depth.held:
                line += f" ({depth.held} held behind dead letters)"
            if depth and depth.pending:
                line += f", oldest {age(depth.oldest_ms)}"
            line += f", {self.dead_letters.get(connector.connector_id, 0)} dead letter(s)"
            if depth and depth.last_error:
                line += f"; last error: {depth.last_error[:160]}"
            lines.append(line)
        return lines

    def text(self) -> str:
        return "\n".join([self.database_line(), *self.connector_lines()])


async def database_status(stores: Stores, connectors: Iterable[ConnectorState]) -> DatabaseStatus:
    """Raises whatever the database raises when it does not answer (the caller says so)."""
    inbox = await stores.reports.inbox_counts()
    queues = await stores.reports.queue_depths()
    dead: dict[str, int] = {}
    for letter in await stores.dead_letters.list():
        dead[letter.connector] = dead.get(letter.connector, 0) + 1
    return DatabaseStatus(inbox, queues, dead, list(connectors))


# --- queue ---------------------------------------------------------------------------------------


@dataclass
class QueueItem:
    id: int
    room_id: str
    operation: str
    attempts: int
    queued_at_ms: int


@dataclass
class Queue(_Report):
    connector: str
    items: list[QueueItem]

    def text(self) -> str:
        if not self.items:
            return f"Nothing waits for {self.connector}."
        lines = [f"{'id':>8}  {'queued':>8}  {'tries':>5}  operation          room"]
        for item in self.items:
            lines.append(
                f"{item.id:>8}  {age(item.queued_at_ms):>8}  {item.attempts:>5}  "
                f"{item.operation:<18} {item.room_id}"
            )
        return "\n".join(lines)


async def queue(reports: ReportStore, connector: str, known: Iterable[str], what: str) -> Queue:
    """The next deliveries waiting for ``connector``, one of ``known`` (``what``: how the front
    end calls those, e.g. "running connector")."""
    known = list(known)
    if connector not in known:
        raise Refused(f"No {what} {connector!r}: {', '.join(known)}.")
    items = [QueueItem(*row) for row in await reports.queue(connector)]
    return Queue(connector, items)


# --- portals / portal ----------------------------------------------------------------------------


@dataclass
class Portals(_Report):
    filter: str
    total: int
    portals: list[PortalSummary]

    def text(self) -> str:
        if not self.portals:
            return "No portal matches." if self.filter else "No portal yet."
        lines = [f"{self.total} portal(s){' matching' if self.filter else ''}; newest first:"]
        for portal in self.portals:
            links = ", ".join(connector for connector, _ in portal.connectors) or "no vendor"
            kind = "direct" if portal.is_direct else "group"
            lines.append(f"{portal.room_id}  {kind}  [{links}]  {portal.title or ''}".rstrip())
        return "\n".join(lines)


async def portals(reports: ReportStore, needle: str = "") -> Portals:
    """The 20 most recent portals whose room id, title or connector contains ``needle``."""
    total, found = await reports.portals(needle)
    return Portals(needle, total, found)


@dataclass
class Portal(_Report):
    portal: PortalSummary
    pending: int
    dead_letters: int

    def text(self) -> str:
        portal = self.portal
        lines = [
            f"{portal.room_id} ({'direct' if portal.is_direct else 'group'}): {portal.title or ''}",
            f"voice: {portal.voice}",
        ]
        for connector, conversation in portal.connectors:
            lines.append(f"  {connector}: conversation {conversation or '(being opened)'}")
        lines.append(f"deliveries waiting: {self.pending}; dead letters: {self.dead_letters}")
        return "\n".join(lines)


async def portal(reports: ReportStore, room: str) -> Portal:
    """One portal, by its room id or by a vendor conversation id linked to it."""
    summary = await reports.portal(room)
    if summary is None:
        room_id = await reports.portal_of_conversation(room)
        summary = await reports.portal(room_id) if room_id is not None else None
    if summary is None:
        raise Refused(f"{room[:80]} is not a portal room.")
    pending, dead = await reports.portal_queue(summary.room_id)
    return Portal(summary, pending, dead)


# --- whois ---------------------------------------------------------------------------------------


@dataclass
class Reached:
    mxid: str
    kind: str
    connector: str | None
    preferred: bool


@dataclass
class Ghost:
    mxid: str
    connector: str
    display_name: str | None


@dataclass
class Whois(_Report):
    idnps: str
    display_name: str | None
    source: str | None
    reached_at: list[Reached]
    ghosts: list[Ghost]
    permissions: str | None

    def text(self) -> str:
        lines = [f"IDNPS {self.idnps}"]
        if self.display_name is not None:
            lines.append(f"name: {self.display_name} (source: {self.source})")
        else:
            lines.append("not in the directory")
        for mxid in self.reached_at:
            mark = " (preferred)" if mxid.preferred else ""
            where = f"{mxid.kind}, {mxid.connector}" if mxid.connector else mxid.kind
            lines.append(f"  reached at {mxid.mxid} [{where}]{mark}")
        for ghost in self.ghosts:
            lines.append(f"  ghost {ghost.mxid} ({ghost.connector}): {ghost.display_name or ''}")
        if self.permissions is not None:
            lines.append(f"permissions: {self.permissions}")
        return "\n".join(lines)


async def whois(stores: Stores, ids: GhostIds, who: str) -> Whois:
    """A professional by IDNPS, by one of the bridge's ghosts or by a Matrix ID the directory
    lists: directory entry, Matrix IDs, ghosts, permissions."""
    value = who.strip()
    directory = stores.directory
    if value.startswith("@"):
        ref = ids.parse(value)
        if ref is not None:
            idnps = str(ref.idnps)
        else:
            found = await directory.by_mxid(value)
            if found is None:
                raise Refused(f"{value[:80]} is not in the directory and is not a ghost.")
            idnps = found.idnps
    else:
        try:
            idnps = str(Idnps(value))
        except InvalidIdnps as error:
            raise BadInput(f"Invalid IDNPS: {error}") from None
    entry = await directory.get(idnps)
    permission = await stores.permissions.get(idnps)
    return Whois(
        idnps,
        entry.display_name if entry is not None else None,
        entry.source if entry is not None else None,
        [
            Reached(m.mxid, m.kind, m.connector, bool(m.preferred))
            for m in await directory.mxids(idnps)
        ],
        [
            Ghost(g.mxid, g.connector, g.display_name)
            for g in await stores.ghosts.of_professional(idnps)
        ],
        permission.default_setting if permission is not None else None,
    )
