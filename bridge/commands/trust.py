"""``eimis-bridge trust ...`` and ``eimis-bridge permissions ...``: the trust list and the
per-person permissions of vendor users, edited straight on the database (the running bridge
picks trust-list changes up within ``trust.poll_interval_s``, and reads permissions at each
invite)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from pathlib import Path
from typing import Any

from bridge.config import load_config
from bridge.values.permissions import ALLOW_ALL, DEFAULT_SETTINGS, Permission, exception_change
from bridge.values.trust import InvalidServerName, TrustList, valid_mxid, validate_server_name
from connectors.idnps import Idnps, InvalidIdnps

USAGE_ERROR = 2


def register(sub: Any) -> None:
    """Add this module's subcommands to the ``eimis-bridge`` parser."""
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
        action.add_argument("-c", "--config", type=Path, required=True, help="bridge config file")
        if name != "list":
            action.add_argument("server", help="server name, hostname[:port]")
        if name == "list":
            action.set_defaults(server=None)
        action.set_defaults(handler=_trust)

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
        action.add_argument("-c", "--config", type=Path, required=True, help="bridge config file")
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


class _Usage(Exception):
    """Bad input: the message is printed and the exit status is 2."""


def _run(coro_fn: Any, args: argparse.Namespace) -> int:
    try:
        return int(asyncio.run(coro_fn(args)))
    except _Usage as error:
        print(f"eimis-bridge {args.command}: {error}", file=sys.stderr)
        return USAGE_ERROR


def _trust(args: argparse.Namespace) -> int:
    return _run(_trust_async, args)


def _permissions(args: argparse.Namespace) -> int:
    return _run(_permissions_async, args)


def _server(value: str | None, action: str) -> str:
    if value is None:
        raise _Usage(f"'{action}' needs a server name (hostname[:port])")
    try:
        return validate_server_name(value)
    except InvalidServerName as error:
        raise _Usage(f"invalid server name: {error}") from None


async def _open(config_path: Path) -> tuple[Any, Any]:
    from bridge.db.database import open_database

    config = load_config(config_path)
    return config, await open_database(config.database)


async def _trust_async(args: argparse.Namespace) -> int:
    from bridge.db.trust import TrustStore

    server = _server(args.server, args.action) if args.action != "list" else None
    config, db = await _open(args.config)
    try:
        store = TrustStore(db)
        own = config.homeserver.domain
        configured = set(config.trust.servers)
        if args.action == "list":
            rows = await store.list()
            effective = TrustList(own, config.trust.servers, [r.server_name for r in rows])
            print(f"{own}  (this bridge's homeserver)")
            for name in config.trust.servers:
                if name != own:
                    print(f"{name}  (config trust.servers)")
            for row in rows:
                if row.server_name != own and row.server_name not in configured:
                    print(f"{row.server_name}  (added by {row.added_by})")
            print(f"ACL allow: {', '.join(effective.acl()['allow'])}")
            return 0
        assert server is not None
        if args.action == "add":
            if server == own or server in configured:
                print(f"{server} is already trusted (config).")
                return 0
            if await store.add(server, f"cli:{_operator()}"):
                print(f"{server} added; the running bridge updates every portal's ACL.")
            else:
                print(f"{server} was already in the trust list.")
            return 0
        if server == own:
            raise _Usage(f"{server} is this bridge's own homeserver: always trusted")
        if server in configured:
            raise _Usage(f"{server} is in the config file's trust.servers: remove it there")
        if await store.remove(server):
            print(f"{server} removed; the running bridge updates every portal's ACL.")
            return 0
        print(f"{server} is not in the run-time trust list.", file=sys.stderr)
        return 1
    finally:
        await db.stop()


def _operator() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"


async def _permissions_async(args: argparse.Namespace) -> int:
    from bridge.db.permissions import PermissionStore

    try:
        idnps = Idnps(args.idnps)
    except InvalidIdnps as error:
        raise _Usage(f"invalid IDNPS: {error}") from None
    exceptions: list[tuple[str, str]] = []
    for value in getattr(args, "server", []):
        exceptions.append(("server", _server(value, args.action)))
    for value in getattr(args, "user", []):
        try:
            exceptions.append(("user", valid_mxid(value)))
        except ValueError as error:
            raise _Usage(f"invalid --user: {error}") from None
    if args.action in ("allow", "block") and not exceptions:
        raise _Usage(f"'{args.action}' needs --server SERVER and/or --user MXID")
    _config, db = await _open(args.config)
    try:
        store = PermissionStore(db)
        current = await store.effective(idnps)
        if args.action == "show":
            _print(current, stored=await store.get(idnps) is not None)
            return 0
        if args.action == "clear":
            cleared = await store.clear(idnps)
            print(f"{idnps}: " + ("cleared, now allow-all." if cleared else "nothing stored."))
            return 0
        if args.action == "set":
            flips = current.default_setting != args.setting
            await store.set_default(idnps, args.setting, keep_exceptions=not flips)
            if flips and (current.servers or current.users):
                print("The default changed, so the previous exceptions were dropped.")
        else:
            change = exception_change(current, args.action)
            for kind, value in exceptions:
                if change == "add":
                    await store.add_exception(idnps, kind, value)
                else:
                    await store.remove_exception(idnps, kind, value)
        _print(await store.effective(idnps), stored=True)
        return 0
    finally:
        await db.stop()


def _print(permission: Permission, *, stored: bool) -> None:
    for line in permission.describe():
        print(line)
    if not stored and permission.default_setting == ALLOW_ALL:
        print("  (nothing stored: the default)")
