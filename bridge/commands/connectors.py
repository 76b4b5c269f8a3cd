"""``eimis-bridge connector ...``: connector instances registered at run time, edited straight
on the database. The running bridge applies every change within a few seconds (it polls the
registry): a connector added here starts there without a restart or a new registration."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from bridge.config import load_config
from bridge.core.connector_manager import ConnectorAdminError, ConnectorManager

USAGE_ERROR = 2
REFUSED = 1
DEFAULT_GRACE = "24h"
_ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def register(sub: Any) -> None:
    """Add ``connector`` and its actions to the ``eimis-bridge`` parser."""
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
        parser.add_argument("-c", "--config", type=Path, required=True, help="bridge config file")
        if with_name:
            parser.add_argument("name", help="the connector id")
        parser.set_defaults(handler=_handler)
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


class _Usage(Exception):
    """Bad input: the message is printed and the exit status is 2."""


def _handler(args: argparse.Namespace) -> int:
    try:
        return int(asyncio.run(_run(args)))
    except _Usage as error:
        print(f"eimis-bridge connector {args.action}: {error}", file=sys.stderr)
        return USAGE_ERROR


async def _run(args: argparse.Namespace) -> int:
    from bridge.db.connector_registry import ConnectorRegistry
    from bridge.db.database import open_database

    settings = _settings(args) if args.action == "add" else {}
    try:
        grace_s = parse_duration(args.grace) if args.action == "rotate-secret" else 0.0
    except ValueError as error:
        raise _Usage(f"--grace: {error}") from None
    config = load_config(args.config)
    db = await open_database(config.database)
    try:
        manager = ConnectorManager(config, ConnectorRegistry(db, config.secrets))
        actions: dict[str, Callable[[], Awaitable[int]]] = {
            "list": lambda: _list(manager),
            "add": lambda: _add(manager, args.name, args.type_name, settings),
            "enable": lambda: _enable(manager, args.name, True),
            "disable": lambda: _enable(manager, args.name, False),
            "remove": lambda: _remove(manager, args.name, args.force, args.yes),
            "rotate-secret": lambda: _rotate(manager, args.name, grace_s, args.yes),
            "test": lambda: _test(manager, args.name),
        }
        try:
            return await actions[args.action]()
        except ConnectorAdminError as error:
            print(f"eimis-bridge connector {args.action}: {error}", file=sys.stderr)
            return REFUSED
    finally:
        await db.stop()


async def _list(manager: ConnectorManager) -> int:
    infos = await manager.list()
    if not infos:
        print("No connectors.")
        return 0
    print(f"{'id':<14}{'type':<12}{'origin':<9}{'enabled':<9}{'secret set':<19}grace until")
    for info in infos:
        print(
            f"{info.connector_id:<14}{info.type_name:<12}{info.origin:<9}"
            f"{'yes' if info.enabled else 'no':<9}{_when(info.secret_rotated_at):<19}"
            f"{_when(info.secret_grace_until)}"
        )
        if info.problem:
            print(f"{'':<14}problem: {info.problem}")
    return 0


async def _add(manager: ConnectorManager, name: str, type_name: str, settings: Any) -> int:
    result = await manager.add(name, type_name, settings)
    print(
        f"Connector {result.connector_id} ({result.type_name}) registered; the running bridge "
        "starts it within a few seconds."
    )
    print(f"Its web routes (webhooks): {result.webhook_base_url}/...")
    print("Shared secret, shown this once (it is stored sealed; give it to the vendor):")
    print(result.secret)
    return 0


async def _enable(manager: ConnectorManager, name: str, enabled: bool) -> int:
    info = await (manager.enable(name) if enabled else manager.disable(name))
    if enabled:
        print(f"{name} enabled; the running bridge starts it within a few seconds.")
        if info.problem:
            print(f"But it cannot run yet: {info.problem}")
    else:
        print(
            f"{name} disabled; the running bridge stops it within a few seconds. Its webhooks "
            "answer 503 and what its conversations send it waits until it is enabled again."
        )
    return 0


async def _remove(manager: ConnectorManager, name: str, force: bool, yes: bool) -> int:
    if not yes and not _confirm(
        f"Remove connector {name}? Its settings and secrets are deleted; vendors using it are "
        "refused."
    ):
        print("Nothing removed.")
        return REFUSED
    await manager.remove(name, force=force)
    print(f"{name} removed; the running bridge stops it within a few seconds.")
    return 0


async def _rotate(manager: ConnectorManager, name: str, grace_s: float, yes: bool) -> int:
    if not yes and not _confirm(
        f"Rotate the shared secret of {name}? The current one stays accepted for "
        f"{grace_s:g} s, then requests signed with it are refused."
    ):
        print("Nothing changed.")
        return REFUSED
    secret = await manager.rotate_secret(name, grace_s)
    print(
        f"New shared secret of {name}, shown this once (give it to the vendor; the previous one "
        f"is accepted {grace_s:g} s more):"
    )
    print(secret)
    return 0


async def _test(manager: ConnectorManager, name: str) -> int:
    print(await manager.test(name))
    return 0


# --- Input -------------------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``10m``, ``24h`` or ``7d`` (ValueError saying so)."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"{text!r} is not a duration: write one like 90s, 10m, 24h, 7d or 0")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    if args.settings_file is not None:
        try:
            loaded = yaml.safe_load(args.settings_file.read_text(encoding="utf-8"))
        except OSError as error:
            raise _Usage(f"cannot read {args.settings_file}: {error.strerror}") from None
        except (yaml.YAMLError, UnicodeDecodeError):
            raise _Usage(f"{args.settings_file} is not a YAML or JSON file") from None
        if not isinstance(loaded, dict):
            raise _Usage(f"{args.settings_file} must hold a mapping of settings")
        settings = _expand(loaded, "settings")
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise _Usage(f"--set {item.split('=')[0]!r}: write KEY=VALUE")
        path = key.strip().split(".")
        holder = settings
        for part in path[:-1]:
            holder = holder.setdefault(part, {})
            if not isinstance(holder, dict):
                raise _Usage(f"--set {key}: {part} is not a mapping")
        holder[path[-1]] = _expand(value, f"--set {key}")
    return settings


def _expand(node: Any, where: str) -> Any:
    """``${VAR}`` values read from the environment, as in the config file."""
    if isinstance(node, dict):
        return {k: _expand(v, f"{where}.{k}") for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v, f"{where}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str) and (match := _ENV_REF.match(node)):
        if match.group(1) not in os.environ:
            raise _Usage(f"{where}: environment variable {match.group(1)} is not set")
        return os.environ[match.group(1)]
    return node


def _confirm(question: str) -> bool:
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
