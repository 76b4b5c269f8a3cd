"""The key that seals secrets at rest (``bridge/secrets.py``): a new key, resealing everything
with the current key, and what each configured key sealed. The CLI's ``secrets ...`` (there is
no admin-room counterpart: keys stay on the bridge's host).

Rotation, in order: make a new key (``generate-key``); in the config, point ``secrets.key_file``
at it and list the old key's file in ``secrets.previous_key_files``; restart the bridge (it then
seals with the new key and opens with both); run ``rotate`` (everything is sealed again with the
new key); once ``status`` shows nothing left under the old key, drop it from the config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mautrix.util.async_db import Database

from bridge.commands import BadInput, Refused
from bridge.secrets import GENERATE_HINT, SecretBox, generate_key, key_id, parse_key, sealed_key_id


def write_key(path: Path, *, force: bool) -> str:
    """A new key in a file readable by its owner only; never over a key in use unless
    ``force``."""
    key = generate_key()
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise Refused(
            f"{path} exists; a key in use must not be overwritten (--force if it is not in use)"
        ) from None
    except OSError as error:
        raise BadInput(f"cannot write {path}: {error.strerror}") from None
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(key + "\n")
    os.chmod(path, 0o600)
    return f"Wrote a new key ({key_id(parse_key(key, 'the new key'))}) to {path}."


@dataclass
class KeyReport:
    lines: list[str]
    unknown_keys: bool
    """Values sealed under a key the config does not list (they cannot be opened)."""


class SecretCommands:
    def __init__(self, db: Database, box: SecretBox) -> None:
        from bridge.db.connector_registry import ConnectorRegistry
        from bridge.db.crypto import CryptoStore
        from bridge.db.outbox import OutboxStore

        self.box = box
        self.registry = ConnectorRegistry(db, box)
        self.crypto = CryptoStore(db)
        self.outbox = OutboxStore(db, box)

    async def rotate(self) -> list[str]:
        """Seal every stored secret, queued delivery and the encryption pickle key again with
        the current key."""
        from bridge.crypto.pickling import PickleKey

        box = self.box
        report = await self.registry.reseal()
        was = await PickleKey.reseal(self.crypto, box)
        queued, queued_current = await self.outbox.seal_all()
        lines = [
            f"{report.resealed} value(s) sealed again with key {box.key_id}; "
            f"{report.already_current} already were.",
            f"{queued} queued delivery(ies) sealed with key {box.key_id}; "
            f"{queued_current} already were.",
        ]
        if was is not None:
            lines.append(
                "The encryption pickle key is sealed with key "
                f"{box.key_id}{' (was ' + was + ')' if was != box.key_id else ''}."
            )
        return lines

    async def status(self, *, hint: bool) -> KeyReport:
        """How many stored values each key sealed (``hint``: how to rotate, when only one key
        is configured)."""
        from bridge.crypto.pickling import META_NAME as PICKLE_KEY

        box = self.box
        usage = await self.registry.key_usage()
        pickle_key = await self.crypto.meta(PICKLE_KEY)
        if pickle_key is not None:
            kid = sealed_key_id(pickle_key)
            usage[kid] = usage.get(kid, 0) + 1
        for kid, count in (await self.outbox.key_usage()).items():
            usage[kid] = usage.get(kid, 0) + count
        lines = []
        unsealed = usage.pop("", 0)
        if unsealed:
            lines.append(f"Queued deliveries in clear: {unsealed} ('secrets rotate' seals them)")
        lines.append(f"Current key: {box.key_id}: {usage.pop(box.key_id, 0)} value(s)")
        for kid in box.key_ids[1:]:
            lines.append(f"Previous key: {kid}: {usage.pop(kid, 0)} value(s)")
        for kid, count in sorted(usage.items()):
            lines.append(
                f"Unknown key {kid}: {count} value(s) (add its file to previous_key_files)"
            )
        if hint and not box.key_ids[1:]:
            lines.append(f"No previous keys configured. To rotate, {GENERATE_HINT}.")
        return KeyReport(lines, bool(usage))
