"""``eimis-bridge secrets ...``: the key that seals secrets at rest (``bridge/secrets.py``).

Rotation, in order: make a new key (``generate-key``); in the config, point ``secrets.key_file``
at it and list the old key's file in ``secrets.previous_key_files``; restart the bridge (it then
seals with the new key and opens with both); run ``rotate`` (everything is sealed again with the
new key); once ``status`` shows nothing left under the old key, drop it from the config.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from bridge.config import load_config
from bridge.secrets import (
    GENERATE_HINT,
    SecretBox,
    SecretsError,
    generate_key,
    key_id,
    parse_key,
    sealed_key_id,
)

USAGE_ERROR = 2
REFUSED = 1


def register(sub: Any) -> None:
    """Add ``secrets`` and its actions to the ``eimis-bridge`` parser."""
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
    generate.set_defaults(handler=_generate)
    for name, text in (
        ("rotate", "seal every stored secret again with the current key"),
        ("status", "the configured keys, and how many stored values each one sealed"),
    ):
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument("-c", "--config", type=Path, required=True, help="bridge config file")
        action.set_defaults(handler=_with_database)


def _generate(args: argparse.Namespace) -> int:
    key = generate_key()
    if args.out is None:
        print(key)
        print(
            "Keep it in a file (secrets.key_file, mode 0600) or in the environment variable "
            "secrets.key_env names (EIMIS_SECRETS_KEY by default).",
            file=sys.stderr,
        )
        return 0
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if args.force else os.O_EXCL)
    try:
        fd = os.open(args.out, flags, 0o600)
    except FileExistsError:
        print(
            f"eimis-bridge secrets generate-key: {args.out} exists; a key in use must not be "
            "overwritten (--force if it is not in use)",
            file=sys.stderr,
        )
        return REFUSED
    except OSError as error:
        print(
            f"eimis-bridge secrets generate-key: cannot write {args.out}: {error.strerror}",
            file=sys.stderr,
        )
        return USAGE_ERROR
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(key + "\n")
    os.chmod(args.out, 0o600)
    print(f"Wrote a new key ({key_id(parse_key(key, 'the new key'))}) to {args.out}.")
    return 0


def _with_database(args: argparse.Namespace) -> int:
    try:
        return int(asyncio.run(_database_action(args)))
    except SecretsError as error:
        print(f"eimis-bridge secrets {args.action}: {error}", file=sys.stderr)
        return REFUSED


async def _database_action(args: argparse.Namespace) -> int:
    from bridge.crypto.pickling import META_NAME as PICKLE_KEY
    from bridge.crypto.pickling import PickleKey
    from bridge.db.connector_registry import ConnectorRegistry
    from bridge.db.crypto import CryptoStore
    from bridge.db.database import open_database
    from bridge.db.outbox import OutboxStore

    config = load_config(args.config)
    box = SecretBox.from_config(config.secrets)
    db = await open_database(config.database)
    try:
        registry = ConnectorRegistry(db, box)
        crypto = CryptoStore(db)
        outbox = OutboxStore(db, box)
        if args.action == "rotate":
            report = await registry.reseal()
            was = await PickleKey.reseal(crypto, box)
            queued, queued_current = await outbox.seal_all()
            print(
                f"{report.resealed} value(s) sealed again with key {box.key_id}; "
                f"{report.already_current} already were."
            )
            print(
                f"{queued} queued delivery(ies) sealed with key {box.key_id}; "
                f"{queued_current} already were."
            )
            if was is not None:
                print(
                    "The encryption pickle key is sealed with key "
                    f"{box.key_id}{' (was ' + was + ')' if was != box.key_id else ''}."
                )
        usage = await registry.key_usage()
        pickle_key = await crypto.meta(PICKLE_KEY)
        if pickle_key is not None:
            kid = sealed_key_id(pickle_key)
            usage[kid] = usage.get(kid, 0) + 1
        for kid, count in (await outbox.key_usage()).items():
            usage[kid] = usage.get(kid, 0) + count
        unsealed = usage.pop("", 0)
        if unsealed:
            print(f"Queued deliveries in clear: {unsealed} ('secrets rotate' seals them)")
        print(f"Current key: {box.key_id}: {usage.pop(box.key_id, 0)} value(s)")
        for kid in box.key_ids[1:]:
            print(f"Previous key: {kid}: {usage.pop(kid, 0)} value(s)")
        for kid, count in sorted(usage.items()):
            print(f"Unknown key {kid}: {count} value(s) (add its file to previous_key_files)")
        if args.action == "status" and not box.key_ids[1:]:
            print(f"No previous keys configured. To rotate, {GENERATE_HINT}.")
        return REFUSED if usage else 0
    finally:
        await db.stop()
