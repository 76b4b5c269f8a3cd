"""Filling the directory from a file (PS_LibreAcces or FHIR Bundle) or a FHIR endpoint.

Records are stored in batches (``BATCH`` professionals, one transaction and one ``executemany``
per table each), so a file of millions of lines streams through in bounded memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from bridge.db.directory import BatchResult, DirectoryStore, Record
from bridge.directory import fhir, ps_libreacces
from bridge.directory.progress import Progress
from bridge.directory.records import DirectoryFormatError, Rejected

BATCH = 20_000
FORMATS = ("ps", "fhir")


@dataclass
class ImportReport:
    source: str
    lines: int = 0
    """Lines read (PS) or Bundle entries seen (FHIR)."""
    records: int = 0
    """Valid records read (a professional on several lines counts each time)."""
    written: int = 0
    """Professionals new or changed."""
    added: int = 0
    """Of them, new to the directory."""
    mxids: int = 0
    mailboxes: int = 0
    """Secure mailboxes listed (a professional's mailbox counts once per batch it is in)."""
    rejected: list[Rejected] = field(default_factory=list)
    seconds: float = 0.0
    stamp: int = 0

    @property
    def changed(self) -> int:
        return self.written - self.added

    @property
    def lines_per_s(self) -> float:
        return self.lines / self.seconds if self.seconds > 0 else 0.0


async def store_records(
    store: DirectoryStore,
    items: Iterable[Record | Rejected],
    report: ImportReport,
    *,
    stamp: int,
    batch: int = BATCH,
) -> None:
    pending: list[Record] = []
    for item in items:
        if isinstance(item, Rejected):
            report.rejected.append(item)
            continue
        report.records += 1
        pending.append(item)
        if len(pending) >= batch:
            _count(report, await store.upsert_batch(pending, stamp))
            pending = []
    if pending:
        _count(report, await store.upsert_batch(pending, stamp))


def _count(report: ImportReport, result: BatchResult) -> None:
    report.mxids += result.mxids
    report.mailboxes += result.mailboxes


def detect_format(path: Path) -> str:
    """``fhir`` for a JSON document, ``ps`` otherwise."""
    if path.suffix.lower() in (".json", ".ndjson"):
        return "fhir"
    with path.open("rb") as f:
        start = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    return "fhir" if start.startswith(b"{") else "ps"


def _counted(lines: IO[bytes], report: ImportReport, progress: Progress) -> Iterator[bytes]:
    done = 0
    for line in lines:
        done += len(line)
        report.lines += 1
        if report.lines % 2048 == 0:
            progress.update(done, report.lines)
        yield line
    progress.close(done, report.lines)


async def import_file(
    store: DirectoryStore,
    path: Path,
    *,
    format: str | None = None,
    foreign_mxid: Callable[[str], str | None] | None = None,
    progress: bool | None = None,
    batch: int = BATCH,
    mailbox_domains: Sequence[str] = (),
) -> ImportReport:
    """Import a file; raises ``DirectoryFormatError`` (or ``OSError``) when it cannot be read.
    ``mailbox_domains``: secure-mail domains besides the national one (FHIR telecoms)."""
    kind = format or detect_format(path)
    if kind not in FORMATS:
        raise DirectoryFormatError(f"unknown format {kind!r}; use one of {', '.join(FORMATS)}")
    report = ImportReport(source=kind)
    started = time.monotonic()
    before = await store.count()
    stamp = await store.next_stamp()
    report.stamp = stamp
    if kind == "ps":
        bar = Progress(path.stat().st_size, label=f"{path.name}: ", enabled=progress)
        with path.open("rb") as f:
            items = ps_libreacces.parse(_counted(f, report, bar), foreign_mxid=foreign_mxid)
            await store_records(store, items, report, stamp=stamp, batch=batch)
    else:
        bundle = fhir.load_bundle(path.read_bytes())
        report.lines = len(bundle.get("entry") or []) if isinstance(bundle, dict) else 0
        items = fhir.parse_bundle(
            bundle, foreign_mxid=foreign_mxid, mailbox_domains=mailbox_domains
        )
        await store_records(store, items, report, stamp=stamp, batch=batch)
    await _finish(store, report, before, started)
    return report


async def import_fhir_endpoint(
    store: DirectoryStore,
    base_url: str,
    api_key: str | None,
    *,
    identifiers: Iterable[str] = (),
    page_size: int = 100,
    max_pages: int | None = None,
    foreign_mxid: Callable[[str], str | None] | None = None,
    mailbox_domains: Sequence[str] = (),
) -> ImportReport:
    """Fetch Practitioners and their roles from a FHIR endpoint and import them."""
    report = ImportReport(source="fhir")
    started = time.monotonic()
    before = await store.count()
    stamp = await store.next_stamp()
    report.stamp = stamp
    offset = 0
    async for bundle in fhir.fetch_bundles(
        base_url,
        api_key,
        identifiers=list(identifiers),
        page_size=page_size,
        max_pages=max_pages,
    ):
        entries = len(bundle.get("entry") or [])
        items = [
            Rejected(r.position + offset, r.reason, r.unit) if isinstance(r, Rejected) else r
            for r in fhir.parse_bundle(
                bundle, foreign_mxid=foreign_mxid, mailbox_domains=mailbox_domains
            )
        ]
        await store_records(store, items, report, stamp=stamp)
        offset += entries
        report.lines += entries
    await _finish(store, report, before, started)
    return report


async def _finish(store: DirectoryStore, report: ImportReport, before: int, started: float) -> None:
    report.written = await store.count_stamped(report.stamp)
    report.added = await store.count() - before
    report.seconds = time.monotonic() - started
