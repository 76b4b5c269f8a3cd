"""Read what a LocalSynapse stored, straight from its SQLite database.

The client-server API shows a user what they may see, decrypted by their client; proving that
the homeserver itself only holds ciphertext for an encrypted room needs the homeserver's own
tables: ``events`` (one row per event: ``type``, ``room_id``) and ``event_json`` (the event's
JSON as stored, ``json``).
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path

import yaml

from bridge.devtools.synapse import LocalSynapse

__all__ = ["database_path", "event_types_in_room", "room_holds_text"]


def database_path(synapse: LocalSynapse) -> Path:
    """The SQLite file named in the homeserver.yaml LocalSynapse wrote (database.args)."""
    config = yaml.safe_load(synapse.config_path.read_text())
    database = config["database"]
    if database.get("name") != "sqlite3":
        raise ValueError(f"{synapse.config_path} uses {database.get('name')!r}, not sqlite3")
    return Path(database["args"]["database"])


def _connect(synapse: LocalSynapse) -> sqlite3.Connection:
    # Read-only: Synapse is running and owns the file; the tests must never write to it.
    return sqlite3.connect(f"{database_path(synapse).as_uri()}?mode=ro", uri=True, timeout=10)


def event_types_in_room(synapse: LocalSynapse, room_id: str) -> list[str]:
    """The type of every event Synapse stored for ``room_id``, in stream order (duplicates
    kept): an encrypted room's messages show up as m.room.encrypted only."""
    with closing(_connect(synapse)) as db:
        rows = db.execute(
            "SELECT type FROM events WHERE room_id = ? ORDER BY stream_ordering", (room_id,)
        ).fetchall()
    return [str(row[0]) for row in rows]


def room_holds_text(synapse: LocalSynapse, room_id: str, text: str) -> bool:
    """True if the JSON of any event Synapse stored for ``room_id`` contains ``text`` in
    clear (the plain ``event_json`` rows, as written to disk), as is or JSON-escaped: Synapse
    may store "é" as "\\u00e9", and a search for the text alone would then miss it."""
    forms = {text, json.dumps(text)[1:-1], json.dumps(text, ensure_ascii=False)[1:-1]}
    with closing(_connect(synapse)) as db:
        rows = db.execute("SELECT json FROM event_json WHERE room_id = ?", (room_id,)).fetchall()
    return any(form in str(row[0]) for row in rows for form in forms)
