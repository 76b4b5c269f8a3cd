"""The admin room's commands: what each does, on the running bridge's own state.

Every command is a subparser of one ``AdminParser`` (``help`` lists them, ``<command> -h``
explains one) and an async handler returning a ``Reply``. Destructive commands return a reply
that asks for confirmation; the action runs only when the same operator answers ``yes``.
Replies name ids, counts and times: never message content.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mautrix.errors import MatrixRequestError

from bridge import __version__
from bridge.admin.parser import AdminParser
from bridge.commands import CommandFailed, reports
from bridge.commands import audit as audit_commands
from bridge.commands import connectors as connector_commands
from bridge.commands import dead_letters as dead_letter_commands
from bridge.commands import directory as directory_commands
from bridge.commands import erasure as erasure_commands
from bridge.commands.connectors import ConnectorCommands
from bridge.commands.dead_letters import DeadLetterCommands
from bridge.commands.reports import ConnectorState
from bridge.commands.trust import TrustCommands
from bridge.config import Config
from bridge.core.connectors import ConnectorSet
from bridge.core.discovery import Discovery
from bridge.core.erasure import Erasure
from bridge.core.ghost_ids import GhostIds
from bridge.core.health import ConnectorHealth
from bridge.db.stores import Stores
from bridge.matrix.homeserver import Homeserver
from bridge.matrix.media import MediaError, MediaRepository


@dataclass
class Reply:
    text: str
    """Plain text, sent in a code block when ``pre``."""
    pre: bool = False
    confirm: Callable[[], Awaitable[Reply]] | None = None
    """A destructive action waiting for the operator's ``yes``."""


@dataclass
class AdminContext:
    """The running bridge, as the admin commands see it."""

    config: Config
    stores: Stores
    homeserver: Homeserver
    connectors: ConnectorSet
    health: ConnectorHealth
    media: MediaRepository
    ids: GhostIds
    started_at: float = field(default_factory=time.monotonic)
    manager: Any = None
    """The run-time connector manager (``connector add|...``), when the bridge has one."""
    audit: Any = None
    """The audit log (``audit``), when the bridge has one."""
    erasure: Any = None
    """The running bridge's erasure (``forget``; ``bridge.core.erasure``)."""
    crypto: Any = None
    """End-to-bridge encryption (``bridge.crypto``), when enabled."""
    portals: Any = None
    """The portals (``bridge.core.portals``): the help desk's ``dm`` opens one."""
    discovery: Any = None
    """The directory's publication in the user directory (``directory publish``)."""
    extra_status: Callable[[], Awaitable[list[str]]] | None = None
    """More status lines (inbox ordering, metrics ...)."""
    uploads: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    """(room, sender) -> (mxc URI, file name) of the last file an operator sent."""


Handler = Callable[[AdminContext, argparse.Namespace, str], Awaitable[Reply]]
"""(context, parsed arguments, the operator's Matrix ID and room, as 'room|sender')."""


def build_parser() -> AdminParser:
    parser = AdminParser(
        prog="",
        add_help=False,
        description="Commands of the eimis-bridge admin room. '<command> -h' explains one.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=AdminParser)

    def command(name: str, text: str, handler: Handler) -> AdminParser:
        p = sub.add_parser(name, help=text, description=text, prog=name)
        p.set_defaults(handler=handler)
        return p

    command("help", "list the commands", _help)
    command("version", "the bridge's version", _version)
    command("status", "bridge, homeserver, connectors, queues, dead letters, last errors", _status)
    command("connectors", "the connectors and their state", _connectors)
    c = command("connector", "manage one connector (run-time registry)", _connector)
    c.add_argument(
        "action", choices=("add", "enable", "disable", "remove", "rotate-secret", "test")
    )
    c.add_argument("name", help="connector id")
    c.add_argument("--type", help="connector type (add)")
    c.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a setting (add)"
    )
    c.add_argument("--grace", type=float, default=24.0, help="hours the old secret stays valid")
    c.add_argument("--force", action="store_true", help="remove even if portals use it")
    q = command("queue", "the next deliveries waiting for one connector", _queue)
    q.add_argument("name", help="connector id")
    d = command("dead-letters", "deliveries that spent their retry budget", _dead_letters)
    d.add_argument("name", nargs="?", help="only this connector's")
    r = command("retry", "put a dead letter (or all) back in its queue", _retry)
    r.add_argument("id", help="dead letter id, or 'all'")
    x = command("discard", "drop a dead letter (asks for confirmation)", _discard)
    x.add_argument("id", type=int, help="dead letter id")
    p = command("portals", "the portal rooms (20 most recent matching)", _portals)
    p.add_argument("filter", nargs="?", default="", help="part of a room id, title or connector")
    o = command("portal", "one portal: its links, queue and dead letters", _portal)
    o.add_argument("room", help="room id, or a vendor conversation id")
    w = command("whois", "a professional (IDNPS) or a Matrix ID", _whois)
    w.add_argument("who", help="IDNPS or @user:server")
    t = command("trust", "the trust list", _trust)
    t.add_argument("action", choices=("list", "add", "remove"))
    t.add_argument("server", nargs="?", help="server name (add, remove)")
    i = command("directory", "the directory of professionals", _directory)
    i.add_argument("action", choices=("import", "show", "publish"))
    i.add_argument(
        "source",
        nargs="?",
        help="import: a file path on the bridge's host (default: the last file you sent "
        "here); show: an IDNPS",
    )
    i.add_argument("--format", choices=("ps", "fhir"), help="import: the file's format")
    a = command("audit", "the audit log (metadata of deliveries)", _audit)
    a.add_argument(
        "--since", default="24h", help="how far back (30m, 24h, 7d) or an ISO time; default 24h"
    )
    a.add_argument("--connector", help="only this connector's")
    a.add_argument("--portal", help="only this room's")
    a.add_argument("--limit", type=int, default=20, help="rows shown (default 20)")
    f = command("forget", "erase a professional's data (RGPD; asks for confirmation)", _forget)
    f.add_argument("idnps", help="the professional's IDNPS")
    return parser


# --- Handlers ------------------------------------------------------------------------------------


async def _help(ctx: AdminContext, args: argparse.Namespace, who: str) -> Reply:
    return Reply(build_parser().format_help().strip(), pre=True)


async def _version(ctx: AdminContext, args: argparse.Namespace, who: str) -> Reply:
    return Reply(f"eimis-bridge {__version__}")


async def _status(ctx: AdminContext, args: argparse.Namespace, who: str) -> Reply:
    up = reports.duration(time.monotonic() - ctx.started_at)
    lines = [f"eimis-bridge {__version__}, up {up}"]
    try:
        await ctx.homeserver.bot.versions()
        lines.append(f"Homeserver {ctx.config.homeserver.url}: answering")
    except Exception as error:  # any failure is the answer here
        lines.append(
            f"Homeserver {ctx.config.homeserver.url}: NOT answering ({type(error).__name__})"
        )
    running = [
        ConnectorState(cid, type(connector).type_name, ctx.health.state(cid))
        for cid, connector in ctx.connectors
    ]
    try:
        report = await reports.database_status(ctx.stores, running)
    except Exception as error:
        lines.append(f"Database: NOT answering ({type(error).__name__})")
        return Reply("\n".join(lines), pre=True)
    lines.append(report.database_line())
    lines.append(_encryption_status(ctx))
    lines.extend(report.connector_lines())
    if ctx.extra_status is not None:
        lines.extend(await ctx.extra_status())
    return Reply("\n".join(lines), pre=True)


def _encryption_status(ctx: AdminContext) -> str:
    crypto = ctx.crypto
    if crypto is None:
        return "Encryption: off (encrypted rooms are not bridged)"
    mode = "required" if ctx.config.encryption.require else "allowed"
    portals = "encrypted" if ctx.homeserver.encrypt_new_portals else "plain"
    counts = crypto.counts()
    return (
        f"Encryption: on (new portals {portals}, unencrypted rooms {mode}); since start "
        f"{counts['decrypted']} decrypted, {counts['encrypted']} encrypted, "
        f"{counts['undecryptable']} undecryptable, {counts['room_keys']} room key(s) received"
    )


async def _connectors(ctx: AdminContext, args: argparse.Namespace, who: str) -> Reply:
    if ctx.manager is not None:
        infos = await ConnectorCommands(ctx.manager).listing()
        lines = [
            connector_commands.line(info, ctx.health.state(info.connector_id)) for info in infos
        ]
        return Reply("\n".join(lines) or "No connector.", pre=True)
    lines = [f"{cid} ({type(c).type_name}): {ctx.health.state(cid)}" for cid, c in ctx.connectors]
    return Reply("\n".join(lines) or "No connector.", pre=True)


async def _connector(ctx: AdminContext, args: argparse.Namespace, who: str) -> Reply:
    if ctx.manager is None:
        return Reply("This bridge has no run-time connector registry.")
    commands = ConnectorCommands(ctx.manager)
    name, action = args.name, args.action
    if action in ("add", "rotate-secret") and not await _encrypted_room(ctx, who):
        return Reply(_SECRET_NOT_HERE.format(action=action, name=name))
    try:
        if action == "add":
            if not args.type:
                return Reply("connector add needs --type (one of the installed connector types).")
            settings = connector_commands.settings_of(args.set)
            return Reply(await commands.add(name, args.type, settings), pre=True)
        if action == "enable":
            return Reply(await commands.enable(name))
        if action == "test":
            return Reply(await commands.test(name))
    except CommandFailed as error:
        return Reply(str(error))
    grace_s = args.grace * 3600

    async def run() -> Reply:
        try:
            if action == "disable":
                return Reply(await commands.disable(name))
            if action == "remove":
                return Reply(await commands.remove(name, force=args.force))
            return Reply(await commands.rotate_secret(name, grace_s), pre=True)
        except CommandFailed as error:
            return Reply(str(error))

    question = {
        "disable": commands.disable_question(name),
        "remove": commands.remove_question(name),
        "rotate-secret": commands.rotate_question(name, grace_s),
    }[action]
    return Reply(f"{question} Answer 'yes' to confirm.", confirm=run)


_SECRET_NOT_HERE = (
    "Not done: 'connector {action}' shows a shared secret, and this room is not end-to-end "
    "encrypted (the homeserver would store the secret in clear). Run it on the bridge's host: "
    "eimis-bridge connector {action} {name} -c CONFIG ... ; or ask here from an encrypted "
    "direct chat with the bot."
)


async def _encrypted_room(ctx: AdminContext, who: str) -> bool:
    """Whether the command's room is end-to-end encrypted (the bot's answer then is too)."""
    room_id = who.split("|", 1)[0]
    return await ctx.homeserver.follow_encryption(room_id, ctx.config.bot_mxid)


async def _queue(ctx: AdminContext, args: argparse.Namespace, who: str) -> Reply:
    try:
        report = await reports.queue(
            ctx.stores.reports, args.name, ctx.connectors.ids(), "running connector"
        )
    except CommandFailed as error:
        return Reply(str(error))
    return Reply(report.text(), pre=bool(report.items))


async def _dead_letters(ctx: AdminContext, args: argparse.Namespace, who: str) -> Reply:
    letters = await DeadLetterCommands(ctx.stores.dead_letters).listing(args.name)
    return Reply(dead_letter_commands.room_table(letters), pre=bool(letters))


async def _retry(ctx: AdminContext, args: argparse.Namespace, who: str) -> Reply:
    try:
        return Reply(await DeadLetterCommands(ctx.stores.dead_letters).retry(args.id))
    except CommandFailed as error:
        return Reply(str(error))


async def _discard(ctx: AdminContext, args: argparse.Namespace, who: str) -> Reply:
    letters = DeadLetterCommands(ctx.stores.dead_letters)
    try:
        letter = await letters.find(args.id)
    except CommandFailed as error:
        return Reply(str(error))

    async def run() -> Reply:
        try:
            return Reply(await letters.discard(args.id))
        except CommandFailed as error:
            return Reply(str(error))

    return Reply(f"{letters.discard_question(letter)} Answer 'yes' to confirm.", confirm=run)


async def _portals(ctx: AdminContext, args: argparse.Namespace, who: str) -> Reply:
    report = await reports.portals(ctx.stores.reports, args.filter)
    return Reply(report.text(), pre=bool(report.portals))


async def _portal(ctx: AdminContext, args: argparse.Namespace, who: str) -> Reply:
    try:
        report = await reports.portal(ctx.stores.reports, args.room)
    except CommandFailed as error:
        return Reply(str(error))
    return Reply(report.text(), pre=True)


async def _whois(ctx: AdminContext, args: argparse.Namespace, who: str) -> Reply:
    try:
        report = await reports.whois(ctx.stores, ctx.ids, args.who)
    except CommandFailed as error:
        return Reply(str(error))
    return Reply(report.text(), pre=True)


async def _trust(ctx: AdminContext, args: argparse.Namespace, who: str) -> Reply:
    trust = TrustCommands(
        ctx.stores.trusted_servers, ctx.config.homeserver.domain, ctx.config.trust.servers
    )
    try:
        if args.action == "list":
            return Reply((await trust.listing()).text(), pre=True)
        if args.action == "add":
            return Reply(await trust.add(args.server, who.partition("|")[2]))
        server = trust.removable(args.server)
    except CommandFailed as error:
        return Reply(str(error))

    async def run() -> Reply:
        try:
            return Reply(await trust.remove(server))
        except CommandFailed as error:
            return Reply(str(error))

    return Reply(
        f"Stop trusting {server}? Its users' events stop reaching vendors and portals' ACLs "
        "shut it out. Answer 'yes' to confirm.",
        confirm=run,
    )


async def _directory(ctx: AdminContext, args: argparse.Namespace, who: str) -> Reply:
    store = ctx.stores.directory
    if args.action == "publish":
        discovery = ctx.discovery or Discovery(
            ctx.stores, ctx.homeserver, ctx.connectors, ctx.config
        )
        report = await directory_commands.publish(discovery)
        return Reply(report.summary())
    try:
        if args.action == "show":
            if not args.source:
                return Reply("directory show needs an IDNPS.")
            lines = await directory_commands.show(store, ctx.config, args.source)
            return Reply("\n".join(lines), pre=True)
        if args.source:
            return await _import_path(ctx, Path(args.source), args.format, args.source)
    except CommandFailed as error:
        return Reply(str(error))
    upload = ctx.uploads.get(tuple(who.split("|", 1)))  # type: ignore[arg-type]
    if upload is None:
        return Reply(
            "Send the file here first (PS_LibreAcces text or a FHIR Bundle), then "
            "'directory import'; or give a path on the bridge's host."
        )
    mxc, name = upload
    with tempfile.TemporaryDirectory(prefix="eimis-import-") as tmp:
        path = Path(tmp) / (Path(name).name or "directory.txt")
        try:
            async with ctx.media.download(mxc) as chunks:
                with path.open("wb") as out:
                    async for chunk in chunks:
                        out.write(chunk)
        except (MediaError, MatrixRequestError) as error:
            return Reply(f"Could not download {name}: {error}")
        try:
            return await _import_path(ctx, path, args.format, name)
        except CommandFailed as error:
            return Reply(str(error))


async def _import_path(ctx: AdminContext, path: Path, fmt: str | None, shown: str) -> Reply:
    store = ctx.stores.directory
    report = await directory_commands.import_path(store, ctx.config, path, fmt, shown=shown)
    summary = await directory_commands.summary(store, report, shown, show_rejected=10)
    return Reply(summary.text(), pre=True)


async def _audit(ctx: AdminContext, args: argparse.Namespace, who: str) -> Reply:
    if ctx.audit is None:
        return Reply("This bridge keeps no audit log.")
    try:
        since_ms = audit_commands.parse_moment(args.since)
    except CommandFailed as error:
        return Reply(f"--since: {error}")
    latest = await audit_commands.latest(
        ctx.audit,
        since_ms,
        connector=args.connector,
        portal=args.portal,
        limit=max(1, min(args.limit, 200)),
    )
    if not latest.records:
        return Reply("No audit record in that window.")
    lines = latest.lines()
    lines.append("The full log: eimis-bridge audit --format csv|json (on the bridge's host).")
    return Reply("\n".join(lines), pre=True)


async def _forget(ctx: AdminContext, args: argparse.Namespace, who: str) -> Reply:
    try:
        plan = await erasure_commands.plan(ctx.stores, args.idnps)
    except CommandFailed as error:
        return Reply(str(error))

    async def run() -> Reply:
        erasure = ctx.erasure or Erasure(ctx.stores, ctx.homeserver, crypto=ctx.crypto)
        report = await erasure_commands.forget(erasure, plan, who.partition("|")[2] or who)
        return Reply("\n".join(report.lines()), pre=True)

    return Reply(f"{plan.question()} Answer 'yes' to confirm.", confirm=run)
