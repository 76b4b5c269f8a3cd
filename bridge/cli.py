"""The ``eimis-bridge`` command line: run, generate-registration, sandbox, demo, and the
operators' commands on the database, from the bridge's host (the bridge may be running).

What an operator's command does lives in ``bridge.commands`` (one module per subject, shared with
the admin room); here are only its arguments, what is printed, and the exit status: 0 done,
1 refused or nothing found (``REFUSED``), 2 bad input (``USAGE_ERROR``), 3 ``forget`` whose
Matrix part waits for the homeserver.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import yaml

from bridge import __version__
from bridge.config import ConfigError, load_config
from bridge.logs import setup_logging

USAGE_ERROR = 2
"""Exit status of a command given bad input."""
REFUSED = 1
"""Exit status of a command that was not done, or found nothing."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eimis-bridge",
        description="Matrix application service joining health-sector messaging tools to EIMIS.",
    )
    parser.add_argument("--version", action="version", version=f"eimis-bridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    reg = sub.add_parser("generate-registration", help="write the appservice registration file")
    reg.add_argument("-c", "--config", type=Path, required=True, help="bridge config file")
    reg.add_argument(
        "-r",
        "--registration",
        type=Path,
        required=True,
        help="registration file to write (give it to the homeserver)",
    )

    run = sub.add_parser("run", help="check the homeserver, then bridge")
    run.add_argument("-c", "--config", type=Path, required=True, help="bridge config file")

    sandbox = sub.add_parser("sandbox", help="serve a vendor-style API emulator")
    sandbox.add_argument(
        "type", help="connector type (e.g. one listed by 'sandbox --list')", nargs="?"
    )
    sandbox.add_argument("--port", type=int, default=0, help="port to listen on")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--list", action="store_true", help="list the connector types")

    dead = sub.add_parser("dead-letters", help="list deliveries that spent their retry budget")
    dead.add_argument("-c", "--config", type=Path, required=True, help="bridge config file")
    dead.add_argument("--connector", help="only this connector's")

    retry = sub.add_parser("retry", help="put a dead letter (or all) back in its queue")
    retry.add_argument("-c", "--config", type=Path, required=True, help="bridge config file")
    retry.add_argument("id", help="dead letter id (from dead-letters), or 'all'")

    discard = sub.add_parser("discard", help="drop a dead letter; its conversation flows again")
    discard.add_argument("-c", "--config", type=Path, required=True, help="bridge config file")
    discard.add_argument("id", type=int, help="dead letter id (from dead-letters)")
    discard.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    demo = sub.add_parser("demo", help="local Synapse + bridge + sandboxes + a scripted chat")
    demo.add_argument(
        "--once",
        action="store_true",
        help="exit after the scripted conversation: 0 only if every side saw it",
    )
    demo.add_argument("--state-dir", type=Path, default=Path(".demo"))

    _register_secrets(sub)
    _register_connector(sub)
    _register_directory(sub)
    _register_audit(sub)
    _register_trust(sub)
    _register_permissions(sub)
    _register_forget(sub)
    _register_reports(sub)
    return parser


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", type=Path, required=True, help="bridge config file")


def _on_database(
    args: argparse.Namespace,
    action: Callable[[Any, Any], Awaitable[int]],
    *,
    prefix: bool = True,
) -> int:
    """Run ``action(config, db)`` on the configured database (the running bridge may be using
    it). A ``bridge.commands`` error is printed on stderr: bad input exits 2, a refusal 1."""
    from bridge.commands import BadInput, CommandFailed
    from bridge.db.database import open_database

    async def go() -> int:
        config = load_config(args.config)
        db = await open_database(config.database)
        try:
            return await action(config, db)
        finally:
            await db.stop()

    try:
        return asyncio.run(go())
    except CommandFailed as error:
        bad = isinstance(error, BadInput)
        print(f"eimis-bridge {args.command}: {error}" if bad and prefix else error, file=sys.stderr)
        return USAGE_ERROR if bad else REFUSED


def _operator() -> str:
    """Who runs the command, as stores record it (``cli:<login>``)."""
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no login name in some containers
        return "cli:unknown"


# --- trust, permissions -------------------------------------------------------------------------


def _register_trust(sub: Any) -> None:
    trust = sub.add_parser(
        "trust",
        help="the trust list: homeservers whose users may share conversations",
        description="Show or edit the run-time trust list. The config's trust.servers and the "
        "bridge's own server are always trusted; the running bridge applies a change to every "
        "portal's m.room.server_acl within trust.poll_interval_s.",
    )
    actions = trust.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (
        ("list", "the effective trust list and the ACL portals carry"),
        ("add", "trust a server"),
        ("remove", "stop trusting a server added with 'add'"),
    ):
        action = actions.add_parser(name, help=text)
        _config_arg(action)
        if name != "list":
            action.add_argument("server", help="server name, hostname[:port]")
        if name == "list":
            action.set_defaults(server=None)
        action.set_defaults(handler=_trust)


def _trust(args: argparse.Namespace) -> int:
    from bridge.commands import BadInput
    from bridge.commands.trust import TrustCommands, server_name
    from bridge.db.trust import TrustStore

    if args.action != "list":  # bad input is said before the config is read
        try:
            server_name(args.server, args.action)
        except BadInput as error:
            print(f"eimis-bridge trust: {error}", file=sys.stderr)
            return USAGE_ERROR

    async def action(config: Any, db: Any) -> int:
        trust = TrustCommands(TrustStore(db), config.homeserver.domain, config.trust.servers)
        if args.action == "list":
            print((await trust.listing()).text())
        elif args.action == "add":
            print(await trust.add(args.server, _operator()))
        else:
            print(await trust.remove(args.server))
        return 0

    return _on_database(args, action)


def _register_permissions(sub: Any) -> None:
    from bridge.values.permissions import DEFAULT_SETTINGS

    perms = sub.add_parser(
        "permissions",
        help="who may invite a vendor user (TI-Messenger permission concept)",
        description="Per-person permissions of a vendor user, by IDNPS: allow-all or block-all, "
        "with exceptions by server and by Matrix user (blocked under allow-all, allowed under "
        "block-all). No setting means allow-all.",
    )
    actions = perms.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (
        ("show", "the professional's setting"),
        ("set", "set the default (drops exceptions when it changes: their meaning flips)"),
        ("allow", "let servers or users invite this professional"),
        ("block", "refuse invitations of servers or users"),
        ("clear", "forget the setting (back to allow-all)"),
    ):
        action = actions.add_parser(name, help=text)
        _config_arg(action)
        action.add_argument("idnps", help="the professional's IDNPS")
        if name == "set":
            action.add_argument("setting", choices=DEFAULT_SETTINGS, help="the default")
        if name in ("allow", "block"):
            action.add_argument(
                "--server", action="append", default=[], help="server name (repeatable)"
            )
            action.add_argument(
                "--user", action="append", default=[], help="Matrix user id (repeatable)"
            )
        action.set_defaults(handler=_permissions)


def _permissions(args: argparse.Namespace) -> int:
    from bridge.commands import BadInput
    from bridge.commands.permissions import PermissionCommands, exceptions_of, idnps_of
    from bridge.db.permissions import PermissionStore

    try:  # bad input is said before the config is read
        idnps = idnps_of(args.idnps)
        exceptions = exceptions_of(
            args.action, getattr(args, "server", []), getattr(args, "user", [])
        )
    except BadInput as error:
        print(f"eimis-bridge permissions: {error}", file=sys.stderr)
        return USAGE_ERROR

    async def action(config: Any, db: Any) -> int:
        permissions = PermissionCommands(PermissionStore(db))
        if args.action == "show":
            lines = await permissions.show(idnps)
        elif args.action == "clear":
            lines = await permissions.clear(idnps)
        elif args.action == "set":
            lines = await permissions.set_default(idnps, args.setting)
        else:
            lines = await permissions.except_(idnps, args.action, exceptions)
        print("\n".join(lines))
        return 0

    return _on_database(args, action)


# --- audit --------------------------------------------------------------------------------------

AUDIT_TABLE_LIMIT = 100


def _register_audit(sub: Any) -> None:
    audit = sub.add_parser(
        "audit",
        help="the audit log of deliveries (metadata only), as a table, CSV or JSON",
        description="Who sent what kind of message to whom, when, how big, and what became of "
        "it: one row per delivery to a vendor and per vendor event sent into Matrix. Never "
        "content. Times are UTC. Rows are kept audit.retention_days after their conversation's "
        "last activity.",
    )
    _config_arg(audit)
    audit.add_argument(
        "--since",
        help="from this time: ISO 8601 (2025-01-31, 2025-01-31T08:00, ...; UTC unless an offset "
        "is given) or a duration back from now (90s, 15m, 24h, 7d, 2w)",
    )
    audit.add_argument("--until", help="up to this time (excluded), same forms as --since")
    audit.add_argument("--connector", help="only this connector's deliveries")
    audit.add_argument("--portal", help="only this portal room (Matrix room id)")
    audit.add_argument(
        "--format", choices=("table", "csv", "json"), default="table", help="default: table"
    )
    audit.add_argument("--output", type=Path, help="write to this file instead of stdout")
    audit.add_argument(
        "--limit",
        type=int,
        default=AUDIT_TABLE_LIMIT,
        help=f"table only: show the latest N rows (default {AUDIT_TABLE_LIMIT}); CSV and JSON "
        "hold every matching row",
    )
    audit.set_defaults(handler=_audit)


def _audit(args: argparse.Namespace) -> int:
    """Read straight from the database (the bridge may be running). CSV and JSON are streamed,
    so a six-month export needs no more memory than a day's."""
    from bridge.commands import BadInput
    from bridge.commands import audit as commands
    from bridge.db.audit import AuditLog

    try:  # bad input is said before the config is read
        since, until = commands.window(args.since, args.until)
        commands.check_limit(args.limit)
    except BadInput as error:
        print(f"eimis-bridge audit: {error}", file=sys.stderr)
        return USAGE_ERROR

    async def action(config: Any, db: Any) -> int:
        log = AuditLog(db, config.audit.retention_days)
        filters = {"connector": args.connector, "portal": args.portal}
        with _output(args.output) as out:
            if args.format == "table":
                latest = await commands.latest(log, since, until, limit=args.limit, **filters)
                out.write(latest.table())
            else:
                async for chunk in log.export(args.format, since, until, **filters):
                    out.write(chunk)
        return 0

    return _on_database(args, action)


@contextlib.contextmanager
def _output(path: Path | None) -> Iterator[TextIO]:
    if path is None:
        yield sys.stdout
        return
    with path.open("w", encoding="utf-8", newline="") as file:
        yield file


# --- directory ----------------------------------------------------------------------------------


def _register_directory(sub: Any) -> None:
    from bridge.directory.importer import FORMATS

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

    show = actions.add_parser("show", help="a professional and the Matrix IDs that reach them")
    _config_arg(show)
    show.add_argument("idnps", help="national identifier (IDNPS)")

    prefer = actions.add_parser(
        "prefer", help="choose the Matrix ID that reaches a professional who has several"
    )
    _config_arg(prefer)
    prefer.add_argument("idnps", help="national identifier (IDNPS)")
    prefer.add_argument(
        "mxid", help="one of their Matrix IDs (a native one not listed yet is added)"
    )
    for action in (imp, fetch, show, prefer):
        action.set_defaults(handler=_directory)


def _directory(args: argparse.Namespace) -> int:
    """Exit status: 0 done, 1 nothing to do / not found / the endpoint failed, 2 bad input."""
    from bridge.commands import directory as commands
    from bridge.db.directory import DirectoryStore

    async def action(config: Any, db: Any) -> int:
        store = DirectoryStore(db)
        what = args.directory_command
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

    return _on_database(args, action, prefix=False)


# --- connector ----------------------------------------------------------------------------------

DEFAULT_GRACE = "24h"


def _register_connector(sub: Any) -> None:
    connector = sub.add_parser(
        "connector",
        help="connector instances: list, add at run time, enable, disable, remove, rotate "
        "the shared secret, test",
        description="Connector instances of the config file and those registered at run time. "
        "Changes are stored in the database; the running bridge applies them within a few "
        "seconds, without a restart.",
    )
    actions = connector.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, text: str, *, with_name: bool = True) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(name, help=text, description=text)
        _config_arg(parser)
        if with_name:
            parser.add_argument("name", help="the connector id")
        parser.set_defaults(handler=_connector)
        return parser

    action("list", "every connector: origin, state, when its secret was set", with_name=False)
    add = action(
        "add",
        "register a connector instance (any installed type); prints its shared secret once",
    )
    add.add_argument(
        "--type", required=True, dest="type_name", metavar="TYPE", help="connector type"
    )
    add.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting (repeatable; a.b=... for nested keys; a value written ${VAR} is read "
        "from the environment, keep credentials out of the shell history that way)",
    )
    add.add_argument(
        "--settings-file", type=Path, help="YAML or JSON mapping of settings (--set wins)"
    )
    action("enable", "run a connector again (the database wins over the config file)")
    action("disable", "stop a connector: its webhooks answer 503, its deliveries wait")
    remove = action("remove", "forget a connector registered at run time, with its secrets")
    remove.add_argument(
        "--force", action="store_true", help="even if portal rooms are linked to it"
    )
    remove.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    rotate = action(
        "rotate-secret",
        "a new shared secret (printed once); the previous one is accepted for a grace period",
    )
    rotate.add_argument(
        "--grace",
        default=DEFAULT_GRACE,
        help=f"how long the previous secret is still accepted: 90s, 10m, 24h, 7d or 0 "
        f"(default {DEFAULT_GRACE})",
    )
    rotate.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    action("test", "ask the vendor something cheap: does it answer, are the credentials good")


def _connector(args: argparse.Namespace) -> int:
    from bridge.commands import BadInput, CommandFailed
    from bridge.commands import connectors as commands
    from bridge.core.connector_manager import ConnectorManager
    from bridge.db.connector_registry import ConnectorRegistry

    try:  # bad input is said before the config is read
        settings = _connector_settings(args) if args.action == "add" else {}
        try:
            grace_s = commands.parse_duration(args.grace) if args.action == "rotate-secret" else 0
        except ValueError as error:
            raise BadInput(f"--grace: {error}") from None
    except BadInput as error:
        print(f"eimis-bridge connector {args.action}: {error}", file=sys.stderr)
        return USAGE_ERROR

    async def action(config: Any, db: Any) -> int:
        manager = ConnectorManager(config, ConnectorRegistry(db, config.secrets))
        connectors = commands.ConnectorCommands(manager)
        name = getattr(args, "name", "")
        try:
            if args.action == "list":
                print(commands.table(await connectors.listing()))
            elif args.action == "add":
                print(await connectors.add(name, args.type_name, settings))
            elif args.action == "enable":
                print(await connectors.enable(name))
            elif args.action == "disable":
                print(await connectors.disable(name))
            elif args.action == "remove":
                if not args.yes and not _confirm(connectors.remove_question(name)):
                    print("Nothing removed.")
                    return REFUSED
                print(await connectors.remove(name, force=args.force))
            elif args.action == "rotate-secret":
                if not args.yes and not _confirm(connectors.rotate_question(name, grace_s)):
                    print("Nothing changed.")
                    return REFUSED
                print(await connectors.rotate_secret(name, grace_s))
            else:
                print(await connectors.test(name))
        except CommandFailed as error:
            print(f"eimis-bridge connector {args.action}: {error}", file=sys.stderr)
            return USAGE_ERROR if isinstance(error, BadInput) else REFUSED
        return 0

    return _on_database(args, action)


def _connector_settings(args: argparse.Namespace) -> dict[str, Any]:
    from bridge.commands import BadInput
    from bridge.commands.connectors import settings_of

    base: dict[str, Any] = {}
    if args.settings_file is not None:
        try:
            loaded = yaml.safe_load(args.settings_file.read_text(encoding="utf-8"))
        except OSError as error:
            raise BadInput(f"cannot read {args.settings_file}: {error.strerror}") from None
        except (yaml.YAMLError, UnicodeDecodeError):
            raise BadInput(f"{args.settings_file} is not a YAML or JSON file") from None
        if not isinstance(loaded, dict):
            raise BadInput(f"{args.settings_file} must hold a mapping of settings")
        base = loaded
    return settings_of(args.set, base, environment=os.environ)


# --- secrets ------------------------------------------------------------------------------------


def _register_secrets(sub: Any) -> None:
    secrets = sub.add_parser(
        "secrets",
        help="the key sealing connector credentials and shared secrets at rest",
        description="AES-256-GCM key management. Rotation: generate-key, point secrets.key_file "
        "at the new key and list the old one in secrets.previous_key_files, restart the bridge, "
        "run 'secrets rotate', then drop the old key once 'secrets status' shows nothing under it.",
    )
    actions = secrets.add_subparsers(dest="action", required=True, metavar="ACTION")
    generate = actions.add_parser(
        "generate-key",
        help="a new random key (32 bytes, base64)",
        description="Print a new key, or write it to a file readable by its owner only.",
    )
    generate.add_argument("--out", type=Path, help="write the key to this file (mode 0600)")
    generate.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    generate.set_defaults(handler=_generate_key)
    for name, text in (
        ("rotate", "seal every stored secret again with the current key"),
        ("status", "the configured keys, and how many stored values each one sealed"),
    ):
        action = actions.add_parser(name, help=text, description=text)
        _config_arg(action)
        action.set_defaults(handler=_secrets)


def _generate_key(args: argparse.Namespace) -> int:
    from bridge.commands import BadInput, CommandFailed
    from bridge.commands.secrets import write_key
    from bridge.secrets import generate_key

    if args.out is None:
        print(generate_key())
        print(
            "Keep it in a file (secrets.key_file, mode 0600) or in the environment variable "
            "secrets.key_env names (EIMIS_SECRETS_KEY by default).",
            file=sys.stderr,
        )
        return 0
    try:
        print(write_key(args.out, force=args.force))
    except CommandFailed as error:
        print(f"eimis-bridge secrets generate-key: {error}", file=sys.stderr)
        return USAGE_ERROR if isinstance(error, BadInput) else REFUSED
    return 0


def _secrets(args: argparse.Namespace) -> int:
    from bridge.commands.secrets import SecretCommands
    from bridge.secrets import SecretBox, SecretsError

    async def action(config: Any, db: Any) -> int:
        secrets = SecretCommands(db, box)
        if args.action == "rotate":
            print("\n".join(await secrets.rotate()))
        report = await secrets.status(hint=args.action == "status")
        print("\n".join(report.lines))
        return REFUSED if report.unknown_keys else 0

    try:
        box = SecretBox.from_config(load_config(args.config).secrets)
        return _on_database(args, action)
    except SecretsError as error:
        print(f"eimis-bridge secrets {args.action}: {error}", file=sys.stderr)
        return REFUSED


# --- forget -------------------------------------------------------------------------------------

MATRIX_PENDING = 3
"""Exit status of ``forget`` when the Matrix part waits for the homeserver (the database part
is done)."""


def _register_forget(sub: Any) -> None:
    forget = sub.add_parser(
        "forget",
        help="erase a professional's data, on the bridge and on Matrix (right to erasure)",
        description="Erase what the bridge holds of a professional: directory entry, "
        "permissions, ghosts, what they sent that still waits in queues, crypto material; "
        "redact what their ghosts sent in every portal, make the ghosts leave and clear their "
        "profiles. When the homeserver does not answer, the Matrix part is queued and the "
        f"running bridge finishes it (exit status {MATRIX_PENDING}). An audit record of the "
        "erasure is kept (no content).",
    )
    _config_arg(forget)
    forget.add_argument("idnps", help="the professional's IDNPS")
    forget.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    forget.set_defaults(handler=_forget)


def _forget(args: argparse.Namespace) -> int:
    from aiohttp import ClientSession, ClientTimeout

    from bridge.commands import BadInput
    from bridge.commands import erasure as commands
    from bridge.config import load_tokens
    from bridge.core.erasure import Erasure
    from bridge.db.stores import Stores
    from bridge.matrix.homeserver import Homeserver

    try:  # bad input is said before the config is read
        commands.idnps_of(args.idnps)
    except BadInput as error:
        print(f"eimis-bridge forget: {error}", file=sys.stderr)
        return USAGE_ERROR

    async def action(config: Any, db: Any) -> int:
        stores = Stores.of(db, secrets=config.secrets)
        plan = await commands.plan(stores, args.idnps)
        if not args.yes and not _confirm(f"{plan.question()} This cannot be undone."):
            print("Nothing erased.")
            return REFUSED
        as_token, _ = load_tokens(config)
        async with ClientSession(timeout=ClientTimeout(total=30)) as session:
            homeserver = Homeserver(config, as_token, db, session)
            homeserver.api.default_retry_count = 0  # an answer now, or the part is queued
            try:
                report = await commands.forget(Erasure(stores, homeserver), plan, _operator())
            finally:
                await homeserver.close()
        print("\n".join(report.lines()))
        return MATRIX_PENDING if report.matrix.pending else 0

    return _on_database(args, action)


def _confirm(question: str) -> bool:
    """The operator's answer to a question on the terminal (no answer: no)."""
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


# --- reports ------------------------------------------------------------------------------------


def _register_reports(sub: Any) -> None:
    """The admin room's reports, from the host: read from the database only, so they answer
    when Matrix (or the bridge) is down. Same text as the room's; ``--json`` for a program."""
    for name, text, argument, argument_help in (
        ("status", "the database's view: inbox, each connector's queue and dead letters", None, ""),
        ("queue", "the next deliveries waiting for one connector", "name", "connector id"),
        ("portals", "the portal rooms (20 most recent matching)", "filter", "part of a room "
         "id, title or connector"),
        ("portal", "one portal: its links, queue and dead letters", "room", "room id, or a "
         "vendor conversation id"),
        ("whois", "a professional: directory entry, Matrix IDs, ghosts, permissions", "who",
         "IDNPS or @user:server"),
    ):  # fmt: skip
        report = sub.add_parser(name, help=text, description=text)
        report.add_argument("-c", "--config", type=Path, required=True, help="bridge config file")
        if argument == "filter":
            report.add_argument(argument, nargs="?", default="", help=argument_help)
        elif argument is not None:
            report.add_argument(argument, help=argument_help)
        report.add_argument("--json", action="store_true", help="the same content as JSON")
        report.set_defaults(handler=lambda args: asyncio.run(_report(args)))


async def _report(args: argparse.Namespace) -> int:
    from bridge.commands import BadInput, CommandFailed, reports
    from bridge.core.connector_manager import ConnectorManager
    from bridge.core.ghost_ids import GhostIds
    from bridge.db.database import open_database
    from bridge.db.stores import Stores

    config = load_config(args.config)
    db = await open_database(config.database)
    try:
        stores = Stores.of(db, secrets=config.secrets)
        known = await ConnectorManager(config, stores.connector_registry).list()
        report: Any
        try:
            if args.command == "status":
                states = [
                    reports.ConnectorState(
                        c.connector_id, c.type_name, "enabled" if c.enabled else "disabled"
                    )
                    for c in known
                ]
                report = await reports.database_status(stores, states)
            elif args.command == "queue":
                ids = [c.connector_id for c in known]
                report = await reports.queue(stores.reports, args.name, ids, "connector")
            elif args.command == "portals":
                report = await reports.portals(stores.reports, args.filter)
            elif args.command == "portal":
                report = await reports.portal(stores.reports, args.room)
            else:
                a = config.appservice
                ids = GhostIds(a.user_prefix, config.homeserver.domain, a.bot_username)
                report = await reports.whois(stores, ids, args.who)
        except CommandFailed as error:
            print(error, file=sys.stderr)
            return 2 if isinstance(error, BadInput) else 1
        if args.json:
            print(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
        elif args.command == "status":
            print(f"eimis-bridge {__version__}: {STATUS_FROM_THE_HOST}")
            print(report.text())
        else:
            print(report.text())
        return 0
    finally:
        await db.stop()


STATUS_FROM_THE_HOST = (
    "read from the database only (the homeserver, encryption and each connector's health are "
    "the running bridge's: see 'status' in the admin room)"
)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        handler = getattr(args, "handler", None)
        if handler is not None:
            return int(handler(args))
        if args.command == "generate-registration":
            return _generate_registration(args.config, args.registration)
        if args.command == "run":
            return _run(args.config)
        if args.command == "sandbox":
            return _sandbox(args.type, args.host, args.port, args.list)
        if args.command in ("dead-letters", "retry", "discard"):
            return asyncio.run(_dead_letter_command(args))
        if args.command == "demo":
            from bridge.devtools.demo import run_demo

            return asyncio.run(run_demo(args.state_dir, once=args.once))
    except ConfigError as error:
        print(f"Configuration error:\n{error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


async def _dead_letter_command(args: argparse.Namespace) -> int:
    """Operator commands on dead letters, straight on the database (the bridge may be running:
    it picks released work up on its next idle rescan)."""
    from bridge.commands import BadInput, CommandFailed
    from bridge.commands.dead_letters import DeadLetterCommands, table
    from bridge.db.database import open_database
    from bridge.db.dead_letters import DeadLetterStore

    config = load_config(args.config)
    db = await open_database(config.database)
    try:
        letters = DeadLetterCommands(DeadLetterStore(db))
        if args.command == "dead-letters":
            print(table(await letters.listing(args.connector)))
            return 0
        if args.command == "retry":
            print(await letters.retry(args.id))
            return 0
        letter = await letters.find(args.id)
        if not args.yes and not _confirm(letters.discard_question(letter)):
            print("Nothing discarded.")
            return REFUSED
        print(await letters.discard(args.id))
        return 0
    except CommandFailed as error:
        print(error, file=sys.stderr)
        return USAGE_ERROR if isinstance(error, BadInput) else REFUSED
    finally:
        await db.stop()


def _generate_registration(config_path: Path, registration_path: Path) -> int:
    from bridge.registration import write_registration

    config = load_config(config_path)
    registration = write_registration(config, registration_path)
    print(
        f"Wrote {registration_path} (appservice id {registration['id']!r}, users "
        f"{registration['namespaces']['users'][0]['regex']}). Add it to the homeserver's "
        "app_service_config_files and point appservice.registration at it."
    )
    return 0


def _run(config_path: Path) -> int:
    from bridge.app import Bridge
    from bridge.matrix.homeserver import HomeserverCheckFailed

    config = load_config(config_path)
    setup_logging(config.logging.level, config.logging.json_format)

    async def serve() -> None:
        bridge = Bridge(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await bridge.start()
            await stop.wait()
        finally:
            await bridge.stop()

    try:
        with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
            runner.run(serve())
    except HomeserverCheckFailed as error:
        print(f"Homeserver check failed: {error}", file=sys.stderr)
        return 3
    return 0


def _event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when installed (about twice asyncio's for the HTTP both ways), else
    asyncio's own. ``EIMIS_EVENT_LOOP=asyncio`` forces the latter."""
    if os.environ.get("EIMIS_EVENT_LOOP", "").lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _sandbox(type_name: str | None, host: str, port: int, list_only: bool) -> int:
    from aiohttp import web

    from bridge.devtools.sandboxes import vendor_sandboxes

    with_sandbox = vendor_sandboxes()
    if list_only or type_name is None:
        print("Connector types with a sandbox: " + ", ".join(sorted(with_sandbox)))
        return 0 if list_only else 2
    sandbox = with_sandbox.get(type_name)
    if sandbox is None:
        print(
            f"No sandbox for {type_name!r}; choose one of: {', '.join(sorted(with_sandbox))}",
            file=sys.stderr,
        )
        return 2
    app = sandbox.app()

    async def serve() -> None:
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        url = f"http://{host}:{bound}"
        print(f"{type_name}-style sandbox (an emulator, not the vendor's API) on {url}")
        print("Connector settings for the bridge config:")
        print(yaml.safe_dump({"settings": sandbox.settings(url)}, sort_keys=False))
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
