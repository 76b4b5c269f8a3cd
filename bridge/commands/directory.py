"""The directory of professionals: who they are (IDNPS, name, profession) and the Matrix IDs at
which they can be reached. ``import`` (a PS_LibreAcces extract or a FHIR Bundle), ``fetch`` (the
configured FHIR endpoint), ``show`` (one professional and the Matrix ID chosen for them),
``prefer`` (choose it), ``publish`` (the directory's ghosts in the homeserver's user directory).
They work on the database; a running bridge applies the changes (ghost
names) by itself. One behaviour for the CLI's ``directory`` and the admin room's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bridge.commands import BadInput, Refused
from bridge.config import Config
from bridge.core.discovery import Discovery, PublishReport
from bridge.core.ghost_ids import GhostIds
from bridge.db.directory import GHOST, NATIVE, DirectoryStore
from bridge.directory.choice import reachable
from bridge.directory.fhir import FhirFetchError
from bridge.directory.importer import ImportReport, import_fhir_endpoint, import_file
from bridge.directory.records import DirectoryFormatError, matrix_id
from connectors.idnps import Idnps, InvalidIdnps


def idnps_of(value: str) -> Idnps:
    try:
        return Idnps(value)
    except InvalidIdnps as error:
        raise BadInput(f"Invalid IDNPS {value[:40]!r}: {error}") from None


def ghost_ids(config: Config) -> GhostIds:
    a = config.appservice
    return GhostIds(a.user_prefix, config.homeserver.domain, a.bot_username)


def foreign_mxid_check(config: Config) -> Callable[[str], str | None]:
    """What an import says of a Matrix ID in the bridge's own namespace: it is refused."""
    ids = ghost_ids(config)

    def check(mxid: str) -> str | None:
        if ids.in_namespace(mxid):
            return "is in the bridge's own namespace (the bridge lists its ghosts itself)"
        return None

    return check


def _connector_order(config: Config) -> list[str]:
    return [cid for cid, connector in config.connectors.items() if connector.enabled]


# import / fetch ----------------------------------------------------------------------------------


@dataclass
class ImportSummary:
    """What an import did, for the operator; ``ok``: something valid was read, or nothing
    was rejected."""

    lines: list[str]
    rejected: list[str] = field(default_factory=list)
    ok: bool = True

    def text(self) -> str:
        return "\n".join(self.lines)


async def import_path(
    store: DirectoryStore,
    config: Config,
    path: Path,
    fmt: str | None,
    *,
    shown: str | None = None,
    progress: bool | None = False,
) -> ImportReport:
    """Import a file on the bridge's host (``shown``: its name for the operator)."""
    shown = shown or str(path)
    try:
        return await import_file(
            store,
            path,
            format=fmt,
            foreign_mxid=foreign_mxid_check(config),
            progress=progress,
            mailbox_domains=config.directory.mailbox_domains,
        )
    except OSError as error:
        raise BadInput(f"Cannot read {shown}: {error.strerror or error}") from None
    except DirectoryFormatError as error:
        raise BadInput(f"Cannot import {shown}: {error}") from None


async def fetch(
    store: DirectoryStore, config: Config, identifiers: Iterable[str], max_pages: int | None
) -> ImportReport:
    """Import Practitioners from the configured FHIR endpoint (``directory.fhir_url``)."""
    settings = config.directory
    if not settings.fhir_url:
        raise BadInput("Set directory.fhir_url (and directory.fhir_api_key) in the config first.")
    wanted = [idnps_of(value) for value in identifiers]
    key = settings.fhir_api_key.get_secret_value() if settings.fhir_api_key else None
    try:
        return await import_fhir_endpoint(
            store,
            settings.fhir_url,
            key,
            identifiers=wanted,
            page_size=settings.fhir_page_size,
            max_pages=max_pages,
            foreign_mxid=foreign_mxid_check(config),
            mailbox_domains=settings.mailbox_domains,
        )
    except FhirFetchError as error:
        raise Refused(f"Fetch failed: {error}") from None


async def summary(
    store: DirectoryStore, report: ImportReport, what: str, show_rejected: int
) -> ImportSummary:
    """The operator's account of an import: counts, renamed ghosts, the first rejected lines."""
    unit = "lines" if report.source == "ps" else "entries"
    lines = [
        f"Read {report.lines:,} {unit} of {what} in {report.seconds:.1f} s "
        f"({report.lines_per_s:,.0f} {unit}/s): {report.records:,} valid, "
        f"{len(report.rejected):,} rejected.",
        f"Directory: {report.added:,} professional(s) added, {report.changed:,} changed, "
        f"{report.mxids:,} native Matrix ID(s) and {report.mailboxes:,} secure mailbox(es) "
        f"listed; {await store.count():,} in all.",
    ]
    renames = await store.renames(report.stamp - 1)
    if renames:
        lines.append(
            f"{len(renames)} ghost(s) get a new display name (the running bridge applies it)."
        )
    shown = report.rejected[: max(show_rejected, 0)]
    if shown:
        lines.append("Rejected:")
        lines += [f"  {rejected}" for rejected in shown]
        if len(report.rejected) > len(shown):
            lines.append(f"  ... and {len(report.rejected) - len(shown):,} more")
    ok = bool(report.records or not report.rejected)
    return ImportSummary(lines, [str(r) for r in report.rejected], ok)


# show / prefer -----------------------------------------------------------------------------------


async def show(store: DirectoryStore, config: Config, value: str) -> list[str]:
    """A professional, their secure mailboxes and the Matrix IDs that reach them; ``->`` marks
    the one a conversation goes to."""
    idnps = idnps_of(value)
    entry = await store.get(idnps)
    mxids = await store.mxids(idnps)
    mailboxes = await store.mailboxes(idnps)
    if entry is None and not mxids and not mailboxes:
        raise Refused(f"No professional {idnps} in the directory.")
    lines = []
    if entry is not None:
        updated = datetime.fromtimestamp(entry.updated_at / 1000, UTC).strftime("%Y-%m-%d %H:%M")
        lines.append(f"{idnps} ({idnps.kind})  {entry.display_name}")
        lines.append(f"  profession: {entry.profession_code or '-'} {entry.profession_label or ''}")
        lines.append(f"  source: {entry.source}, updated {updated} UTC")
    else:
        lines.append(f"{idnps} ({idnps.kind})  (no name: only Matrix IDs are known)")
    if mailboxes:
        lines.append("  secure mailboxes:")
        lines += [f"     {m.address}  ({m.kind}, from {m.source})" for m in mailboxes]
    else:
        lines.append("  secure mailboxes: none")
    if not mxids:
        lines.append(
            "  Matrix IDs: none (a vendor user who names them is asked about on each connector)"
        )
        return lines
    ranked = reachable(mxids, _connector_order(config))
    chosen = ranked[0].mxid if ranked else None
    lines.append("  Matrix IDs (-> the one a conversation goes to):")
    for m in ranked + [m for m in mxids if m not in ranked]:
        marks = [m.kind + (f" of {m.connector}" if m.connector else "")]
        if m.preferred:
            marks.append("preferred")
        if m not in ranked:
            marks.append("connector not configured")
        lines.append(f"  {'->' if m.mxid == chosen else '  '} {m.mxid}  ({', '.join(marks)})")
    return lines


async def prefer(store: DirectoryStore, config: Config, value: str, typed: str) -> list[str]:
    """Choose the Matrix ID that reaches a professional who has several (a native one not
    listed yet is added)."""
    idnps = idnps_of(value)
    mxid = matrix_id(typed)
    if mxid is None:
        raise BadInput(f"{typed[:80]!r} is not a Matrix user ID (@user:server).")
    if await store.get(idnps) is None:
        raise Refused(f"No professional {idnps} in the directory; import them first.")
    lines = []
    listed = {m.mxid for m in await store.mxids(idnps)}
    if mxid not in listed:
        ids = ghost_ids(config)
        if ids.in_namespace(mxid):
            ref = ids.parse(mxid)
            if ref is None or ref.idnps != idnps:
                raise BadInput(f"{mxid} is a bridge ID that does not stand for {idnps}.")
            await store.add_mxid(idnps, mxid, GHOST, ref.connector)
        else:
            await store.add_mxid(idnps, mxid, NATIVE)
            lines.append(f"Added {mxid} as a native Matrix account of {idnps}.")
    await store.prefer(idnps, mxid)
    lines.append(f"Conversations with {idnps} now go to {mxid}.")
    return lines


# publish -----------------------------------------------------------------------------------------


async def publish(
    discovery: Discovery, progress: Callable[[int, int], object] | None = None
) -> PublishReport:
    """Publish what the directory holds in the homeserver's user directory (ghosts registered
    with their names: README, "Found from any Matrix client"); the report's ``summary()`` is
    the line shown to the operator."""
    return await discovery.publish(progress=progress)
