"""``eimis-bridge directory import|fetch|show|prefer|publish``: the directory of professionals."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bridge.cli.common import REFUSED, config_arg, on_database


def register(sub: Any) -> None:
    from bridge.directory.importer import FORMATS

    directory = sub.add_parser(
        "directory",
        help="the directory of professionals (import, fetch, show, prefer, publish)",
        description="The directory of professionals: who they are (IDNPS, name, profession) "
        "and the Matrix IDs at which they can be reached.",
    )
    actions = directory.add_subparsers(dest="directory_command", required=True, metavar="ACTION")

    imp = actions.add_parser(
        "import", help="import an ANS PS_LibreAcces extract or a FHIR Bundle of Practitioners"
    )
    config_arg(imp)
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

    fetch = actions.add_parser(
        "fetch", help="import Practitioners from the FHIR endpoint (directory.fhir_url)"
    )
    config_arg(fetch)
    fetch.add_argument(
        "--identifier",
        action="append",
        default=[],
        metavar="IDNPS",
        help="only this professional (repeatable); default: every page of the search",
    )
    fetch.add_argument("--max-pages", type=int, help="stop after this many pages")
    fetch.add_argument("--show-rejected", type=int, default=50, metavar="N")

    show = actions.add_parser("show", help="a professional and the Matrix IDs that reach them")
    config_arg(show)
    show.add_argument("idnps", help="national identifier (IDNPS)")

    prefer = actions.add_parser(
        "prefer", help="choose the Matrix ID that reaches a professional who has several"
    )
    config_arg(prefer)
    prefer.add_argument("idnps", help="national identifier (IDNPS)")
    prefer.add_argument(
        "mxid", help="one of their Matrix IDs (a native one not listed yet is added)"
    )
    publish = actions.add_parser(
        "publish",
        help="publish the directory's ghosts in the homeserver's user directory",
        description="Register (with their display names) the ghosts the directory chooses for "
        "its professionals, so any Matrix client's user search finds them. Talks to the "
        "homeserver with the appservice's token; a running bridge does it by itself at start, "
        "every directory.publish_interval_s and after imports.",
    )
    config_arg(publish)
    publish.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    for action in (imp, fetch, show, prefer, publish):
        action.set_defaults(handler=_directory)


def _directory(args: argparse.Namespace) -> int:
    """Exit status: 0 done, 1 nothing to do / not found / the endpoint failed, 2 bad input."""
    from bridge.commands import directory as commands
    from bridge.db.directory import DirectoryStore

    async def action(config: Any, db: Any) -> int:
        store = DirectoryStore(db)
        what = args.directory_command
        if what == "publish":
            return await _publish(config, db, args.progress)
        if what in ("show", "prefer"):
            if what == "show":
                lines = await commands.show(store, config, args.idnps)
            else:
                lines = await commands.prefer(store, config, args.idnps, args.mxid)
            print("\n".join(lines))
            return 0
        if what == "import":
            report = await commands.import_path(
                store, config, args.file, args.format, progress=args.progress
            )
            source = str(args.file)
        else:
            report = await commands.fetch(store, config, args.identifier, args.max_pages)
            source = config.directory.fhir_url
        summary = await commands.summary(store, report, source, args.show_rejected)
        print(summary.text())
        rejected_file = getattr(args, "rejected_file", None)
        if rejected_file is not None:
            rejected_file.write_text("".join(f"{r}\n" for r in summary.rejected), encoding="utf-8")
        return 0 if summary.ok else REFUSED

    return on_database(args, action, prefix=False)


async def _publish(config: Any, db: Any, show_progress: bool | None) -> int:
    from aiohttp import ClientSession, ClientTimeout

    from bridge.commands import directory as commands
    from bridge.config import load_tokens
    from bridge.core.connectors import ConnectorSet
    from bridge.core.discovery import Discovery
    from bridge.db.stores import Stores
    from bridge.directory.progress import Progress
    from bridge.matrix.homeserver import Homeserver

    as_token, _ = load_tokens(config)
    bar = Progress(None, label="publishing ", enabled=show_progress)
    async with ClientSession(timeout=ClientTimeout(total=60)) as session:
        homeserver = Homeserver(config, as_token, db, session)
        try:
            stores = Stores.of(db, secrets=config.secrets)
            discovery = Discovery(stores, homeserver, ConnectorSet(), config)

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done, done)

            report = await commands.publish(discovery, progress)
            bar.close(report.considered, report.considered)
        finally:
            await homeserver.close()
    print(report.summary())
    return 0 if not report.failed else REFUSED
