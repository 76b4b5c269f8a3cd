"""``eimis-bridge secrets generate-key|rotate|status``: the key sealing secrets at rest."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bridge.cli.common import REFUSED, USAGE_ERROR, config_arg, on_database
from bridge.config import load_config


def register(sub: Any) -> None:
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
        config_arg(action)
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
        return on_database(args, action)
    except SecretsError as error:
        print(f"eimis-bridge secrets {args.action}: {error}", file=sys.stderr)
        return REFUSED
