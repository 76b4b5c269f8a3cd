"""``eimis-bridge directory ...``: fill and inspect the directory of professionals.

``import`` (a PS_LibreAcces extract or a FHIR Bundle), ``fetch`` (the configured FHIR endpoint),
``show`` (one professional and the Matrix ID chosen for them), ``prefer`` (choose it). They work
on the database directly; a running bridge applies the changes (ghost names) by itself.
Exit status: 0 done, 1 nothing to do / not found / the endpoint failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bridge.config import Config, load_config
from bridge.core.ghost_ids import GhostIds
from bridge.db.directory import GHOST, NATIVE, DirectoryStore
from bridge.directory.choice import reachable
from bridge.directory.fhir import FhirFetchError
from bridge.directory.importer import FORMATS, ImportReport, import_fhir_endpoint, import_file
from bridge.directory.records import DirectoryFormatError, matrix_id
from connectors.idnps import Idnps, InvalidIdnps

BAD_INPUT = 2


def register(sub: Any) -> None:
    """Add this module's subcommands to the ``eimis-bridge`` parser."""
    directory = sub.add_parser(
        "directory",
        help="the directory of professionals (import, fetch, show, prefer)",
        description="The directory of professionals: who they are (IDNPS, name, profession) "
        "and the Matrix IDs at which they can be reached.",
    )
    actions = directory.add_subparsers(dest="directory_command", required=True, metavar="ACTION")

    imp = actions.add_parser(
        "import", help="import an ANS PS_LibreAcces extract or a FHIR Bundle of Practitioners"
    )
    _config_arg(imp)
    imp.add_argument("file", type=Path, help="the file to import")
    imp.add_argument(
        "--format",
        choices=FORMATS,
        help="ps: PS_LibreAcces ('|'-separated text), fhir: FHIR R4 Bundle (JSON); "
        "default: guessed from the file",
    )
    imp.add_argument(
        "--show-rejected",
        type=int,
        default=50,
        metavar="N",
        help="print at most N rejected lines (default 50; all go to --rejected-file)",
    )
    imp.add_argument(
        "--rejected-file", type=Path, help="write every rejected line and its reason here"
    )
    imp.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    imp.set_defaults(handler=lambda args: _run(args, _import))

    fetch = actions.add_parser(
        "fetch", help="import Practitioners from the FHIR endpoint (directory.fhir_url)"
    )
    _config_arg(fetch)
    fetch.add_argument(
        "--identifier",
        action="append",
        default=[],
        metavar="IDNPS",
        help="only this professional (repeatable); default: every page of the search",
    )
    fetch.add_argument("--max-pages", type=int, help="stop after this many pages")
    fetch.add_argument("--show-rejected", type=int, default=50, metavar="N")
    fetch.set_defaults(handler=lambda args: _run(args, _fetch))

    show = actions.add_parser("show", help="a professional and the Matrix IDs that reach them")
    _config_arg(show)
    show.add_argument("idnps", help="national identifier (IDNPS)")
    show.set_defaults(handler=lambda args: _run(args, _show))

    prefer = actions.add_parser(
        "prefer", help="choose the Matrix ID that reaches a professional who has several"
    )
    _config_arg(prefer)
    prefer.add_argument("idnps", help="national identifier (IDNPS)")
    prefer.add_argument(
        "mxid", help="one of their Matrix IDs (a native one not listed yet is added)"
    )
    prefer.set_defaults(handler=lambda args: _run(args, _prefer))


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", type=Path, required=True, help="bridge config file")


Action = Callable[[argparse.Namespace, Config, DirectoryStore], Awaitable[int]]


def _run(args: argparse.Namespace, action: Action) -> int:
    config = load_config(args.config)  # a ConfigError is reported by the CLI (exit 2)

    async def go() -> int:
        from bridge.db.database import open_database

        db = await open_database(config.database)
        try:
            return await action(args, config, DirectoryStore(db))
        finally:
            await db.stop()

    return asyncio.run(go())


def _fail(message: str, status: int = BAD_INPUT) -> int:
    print(message, file=sys.stderr)
    return status


def _idnps(value: str) -> Idnps | None:
    try:
        return Idnps(value)
    except InvalidIdnps as error:
        print(f"Invalid IDNPS {value[:40]!r}: {error}", file=sys.stderr)
        return None


def _ghost_ids(config: Config) -> GhostIds:
    a = config.appservice
    return GhostIds(a.user_prefix, config.homeserver.domain, a.bot_username)


def foreign_mxid_check(config: Config) -> Callable[[str], str | None]:
    ids = _ghost_ids(config)

    def check(mxid: str) -> str | None:
        if ids.in_namespace(mxid):
            return "is in the bridge's own namespace (the bridge lists its ghosts itself)"
        return None

    return check


def _connector_order(config: Config) -> list[str]:
    return [cid for cid, connector in config.connectors.items() if connector.enabled]


# import / fetch ----------------------------------------------------------------------------------


async def _import(args: argparse.Namespace, config: Config, store: DirectoryStore) -> int:
    path: Path = args.file
    try:
        report = await import_file(
            store,
            path,
            format=args.format,
            foreign_mxid=foreign_mxid_check(config),
            progress=args.progress,
        )
    except OSError as error:
        return _fail(f"Cannot read {path}: {error.strerror or error}")
    except DirectoryFormatError as error:
        return _fail(f"Cannot import {path}: {error}")
    return await _report(args, store, report, str(path))


async def _fetch(args: argparse.Namespace, config: Config, store: DirectoryStore) -> int:
    settings = config.directory
    if not settings.fhir_url:
        return _fail("Set directory.fhir_url (and directory.fhir_api_key) in the config first.")
    identifiers = []
    for value in args.identifier:
        idnps = _idnps(value)
        if idnps is None:
            return BAD_INPUT
        identifiers.append(idnps)
    key = settings.fhir_api_key.get_secret_value() if settings.fhir_api_key else None
    try:
        report = await import_fhir_endpoint(
            store,
            settings.fhir_url,
            key,
            identifiers=identifiers,
            page_size=settings.fhir_page_size,
            max_pages=args.max_pages,
            foreign_mxid=foreign_mxid_check(config),
        )
    except FhirFetchError as error:
        return _fail(f"Fetch failed: {error}", 1)
    return await _report(args, store, report, settings.fhir_url)


async def _report(
    args: argparse.Namespace, store: DirectoryStore, report: ImportReport, what: str
) -> int:
    unit = "lines" if report.source == "ps" else "entries"
    print(
        f"Read {report.lines:,} {unit} of {what} in {report.seconds:.1f} s "
        f"({report.lines_per_s:,.0f} {unit}/s): {report.records:,} valid, "
        f"{len(report.rejected):,} rejected."
    )
    print(
        f"Directory: {report.added:,} professional(s) added, {report.changed:,} changed, "
        f"{report.mxids:,} native Matrix ID(s) listed; {await store.count():,} in all."
    )
    renames = await store.renames(report.stamp - 1)
    if renames:
        print(f"{len(renames)} ghost(s) get a new display name (the running bridge applies it).")
    shown = report.rejected[: max(args.show_rejected, 0)]
    if shown:
        print("Rejected:")
        for rejected in shown:
            print(f"  {rejected}")
        if len(report.rejected) > len(shown):
            print(f"  ... and {len(report.rejected) - len(shown):,} more")
    rejected_file = getattr(args, "rejected_file", None)
    if rejected_file is not None:
        rejected_file.write_text("".join(f"{r}\n" for r in report.rejected), encoding="utf-8")
    return 0 if report.records or not report.rejected else 1


# show / prefer -----------------------------------------------------------------------------------


async def _show(args: argparse.Namespace, config: Config, store: DirectoryStore) -> int:
    idnps = _idnps(args.idnps)
    if idnps is None:
        return BAD_INPUT
    entry = await store.get(idnps)
    mxids = await store.mxids(idnps)
    if entry is None and not mxids:
        return _fail(f"No professional {idnps} in the directory.", 1)
    if entry is not None:
        updated = datetime.fromtimestamp(entry.updated_at / 1000, UTC).strftime("%Y-%m-%d %H:%M")
        print(f"{idnps} ({idnps.kind})  {entry.display_name}")
        print(f"  profession: {entry.profession_code or '-'} {entry.profession_label or ''}")
        print(f"  source: {entry.source}, updated {updated} UTC")
    else:
        print(f"{idnps} ({idnps.kind})  (no name: only Matrix IDs are known)")
    if not mxids:
        print("  Matrix IDs: none (a vendor user who names them is asked about on each connector)")
        return 0
    ranked = reachable(mxids, _connector_order(config))
    chosen = ranked[0].mxid if ranked else None
    print("  Matrix IDs (-> the one a conversation goes to):")
    for m in ranked + [m for m in mxids if m not in ranked]:
        marks = [m.kind + (f" of {m.connector}" if m.connector else "")]
        if m.preferred:
            marks.append("preferred")
        if m not in ranked:
            marks.append("connector not configured")
        print(f"  {'->' if m.mxid == chosen else '  '} {m.mxid}  ({', '.join(marks)})")
    return 0


async def _prefer(args: argparse.Namespace, config: Config, store: DirectoryStore) -> int:
    idnps = _idnps(args.idnps)
    if idnps is None:
        return BAD_INPUT
    mxid = matrix_id(args.mxid)
    if mxid is None:
        return _fail(f"{args.mxid[:80]!r} is not a Matrix user ID (@user:server).")
    if await store.get(idnps) is None:
        return _fail(f"No professional {idnps} in the directory; import them first.", 1)
    listed = {m.mxid for m in await store.mxids(idnps)}
    if mxid not in listed:
        ids = _ghost_ids(config)
        if ids.in_namespace(mxid):
            ref = ids.parse(mxid)
            if ref is None or ref.idnps != idnps:
                return _fail(f"{mxid} is a bridge ID that does not stand for {idnps}.")
            await store.add_mxid(idnps, mxid, GHOST, ref.connector)
        else:
            await store.add_mxid(idnps, mxid, NATIVE)
            print(f"Added {mxid} as a native Matrix account of {idnps}.")
    await store.prefer(idnps, mxid)
    print(f"Conversations with {idnps} now go to {mxid}.")
    return 0
