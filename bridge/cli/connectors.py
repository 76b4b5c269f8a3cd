"""``eimis-bridge connector list|add|enable|disable|remove|rotate-secret|test``: connector
instances, from the host (the running bridge applies a change within a few seconds)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from bridge.cli.common import REFUSED, USAGE_ERROR, config_arg, confirm, on_database

DEFAULT_GRACE = "24h"


def register(sub: Any) -> None:
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
        config_arg(parser)
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
                if not args.yes and not confirm(connectors.remove_question(name)):
                    print("Nothing removed.")
                    return REFUSED
                print(await connectors.remove(name, force=args.force))
            elif args.action == "rotate-secret":
                if not args.yes and not confirm(connectors.rotate_question(name, grace_s)):
                    print("Nothing changed.")
                    return REFUSED
                print(await connectors.rotate_secret(name, grace_s))
            else:
                print(await connectors.test(name))
        except CommandFailed as error:
            print(f"eimis-bridge connector {args.action}: {error}", file=sys.stderr)
            return USAGE_ERROR if isinstance(error, BadInput) else REFUSED
        return 0

    return on_database(args, action)


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
