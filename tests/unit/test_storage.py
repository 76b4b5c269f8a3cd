"""Durable storage on both engines: what the bridge relies on to lose nothing and do nothing twice.

Every test runs on a SQLite file and on a fresh PostgreSQL database.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from mautrix.util.async_db import Database

from bridge.config import DatabaseConfig
from bridge.db.connector_state import ConnectorStateStore
from bridge.db.database import open_database
from bridge.db.inbox import MATRIX_ORIGIN
from bridge.db.portal import Portal
from bridge.db.stores import Stores
from bridge.db.upgrade import upgrade_table

from helpers import wait_until

Open = Callable[[], Awaitable[Database]]


@pytest.fixture
async def open_db(database_url: str) -> AsyncIterator[Open]:
    """Open the test database (as many times as a test restarts); all are closed afterwards."""
    opened: list[Database] = []

    async def open_() -> Database:
        db = await open_database(DatabaseConfig(url=database_url))
        opened.append(db)
        return db

    yield open_
    for db in reversed(opened):
        await close(db)


async def close(db: Database) -> None:
    if not getattr(db, "_eimis_closed", False):
        db._eimis_closed = True  # type: ignore[attr-defined]
        await db.stop()


@pytest.fixture
async def stores(open_db: Open) -> Stores:
    return Stores.of(await open_db())


def event(n: int, room: str = "!room:eimis.example", **extra: Any) -> dict[str, Any]:
    return {
        "event_id": f"$event{n}",
        "room_id": room,
        "type": "m.room.message",
        "sender": "@alice:eimis.example",
        "content": {"msgtype": "m.text", "body": f"message {n}"},
        **extra,
    }


async def row(db: Database, table: str, seq: int) -> dict[str, Any]:
    found = await db.fetchrow(
        f"SELECT state, payload, attempts, last_error FROM {table} WHERE seq = $1", seq
    )
    assert found is not None
    return dict(found)


# --- Migrations ----------------------------------------------------------------------------------


async def test_migrations_run_on_a_fresh_database_and_record_the_version(open_db: Open) -> None:
    db = await open_db()
    version = await db.fetchval("SELECT version FROM eimis_version")
    assert version == len(upgrade_table.upgrades)
    for table in (
        "as_transaction",
        "inbox",
        "outbox",
        "portal",
        "portal_link",
        "ghost",
        "message_map",
        "connector_state",
    ):
        assert await db.fetchval(f"SELECT COUNT(*) FROM {table}") == 0


async def test_reopening_a_migrated_database_keeps_its_data_and_version(open_db: Open) -> None:
    db = await open_db()
    await Stores.of(db).ghosts.upsert("@eimis_pl_810000001916:x", "pl", "810000001916", "Dr A")
    await close(db)

    db = await open_db()

    assert await db.fetchval("SELECT version FROM eimis_version") == len(upgrade_table.upgrades)
    assert await db.fetchval("SELECT COUNT(*) FROM eimis_version") == 1
    ghost = await Stores.of(db).ghosts.get("@eimis_pl_810000001916:x")
    assert ghost is not None and ghost.display_name == "Dr A"


async def test_sqlite_database_uses_write_ahead_logging(tmp_path: Path) -> None:
    db = await open_database(DatabaseConfig(url=f"sqlite:{tmp_path / 'wal.db'}"))
    try:
        assert (await db.fetchval("PRAGMA journal_mode")).lower() == "wal"
        assert await db.fetchval("PRAGMA foreign_keys") == 1
    finally:
        await db.stop()
    assert (tmp_path / "wal.db").exists()


# --- Inbox: homeserver transactions --------------------------------------------------------------


async def test_transaction_stores_all_its_events_in_order(stores: Stores) -> None:
    assert await stores.inbox.store_transaction("txn1", [event(1), event(2), event(3, "!b:x")])

    items = await stores.inbox.pending(0, 100)

    assert [i.payload["event_id"] for i in items] == ["$event1", "$event2", "$event3"]
    assert [i.lane for i in items] == ["!room:eimis.example", "!room:eimis.example", "!b:x"]
    assert all(i.origin == MATRIX_ORIGIN and i.attempts == 0 for i in items)
    assert items[0].payload == event(1)
    assert await stores.inbox.transaction_seen("txn1")
    assert not await stores.inbox.transaction_seen("txn2")


async def test_transaction_replayed_is_not_stored_twice(stores: Stores) -> None:
    assert await stores.inbox.store_transaction("txn1", [event(1), event(2)])
    assert not await stores.inbox.store_transaction("txn1", [event(1), event(2)])
    assert await stores.inbox.count("pending") == 2


async def test_reused_transaction_id_with_new_events_stores_them(stores: Stores) -> None:
    # Synapse on SQLite numbers its transactions from 1 again after a restart: the id is no
    # proof that the events were seen.
    assert await stores.inbox.store_transaction("1", [event(1), event(2)])
    assert await stores.inbox.store_transaction("1", [event(2), event(3)])

    items = await stores.inbox.pending(0, 10)
    assert [i.payload["event_id"] for i in items] == ["$event1", "$event2", "$event3"]
    assert await stores.inbox.transaction_check("1", [event(3)]) == (True, True)
    assert await stores.inbox.transaction_check("1", [event(4)]) == (True, False)
    assert await stores.inbox.transaction_check("2", [event(1)]) == (False, True)


async def test_ephemeral_events_are_stored_once_per_transaction_and_content(
    stores: Stores,
) -> None:
    typing = {"type": "m.typing", "room_id": "!room:eimis.example", "content": {"user_ids": []}}
    receipt = {
        "type": "m.receipt",
        "room_id": "!room:eimis.example",
        "content": {"$event1": {"m.read": {"@alice:eimis.example": {"ts": 1}}}},
    }
    assert await stores.inbox.store_transaction("1", [], [typing])
    assert not await stores.inbox.store_transaction("1", [], [typing])  # sent again
    assert await stores.inbox.store_transaction("1", [], [receipt])  # the id reused
    assert await stores.inbox.store_transaction("2", [], [typing])

    payloads = [i.payload for i in await stores.inbox.pending(0, 10)]
    assert payloads == [typing, receipt, typing]


async def test_transaction_replayed_after_restart_is_not_stored_twice(open_db: Open) -> None:
    db = await open_db()
    assert await Stores.of(db).inbox.store_transaction("txn1", [event(1), event(2)])
    await close(db)

    db = await open_db()
    inbox = Stores.of(db).inbox

    assert not await inbox.store_transaction("txn1", [event(1), event(2)])
    assert [i.payload["event_id"] for i in await inbox.pending(0, 10)] == ["$event1", "$event2"]


async def test_empty_transaction_is_recorded(stores: Stores) -> None:
    assert not await stores.inbox.store_transaction("empty", [])  # nothing new in it
    assert await stores.inbox.transaction_seen("empty")
    assert await stores.inbox.pending(0, 10) == []


async def test_transaction_that_fails_midway_stores_nothing_and_can_be_retried(
    stores: Stores,
) -> None:
    # The second event's id is NULL: the database refuses it after the first was inserted.
    broken = [event(1), {**event(2), "event_id": None}]
    with pytest.raises(Exception):  # noqa: B017 - any driver's integrity error
        await stores.inbox.store_transaction("txn1", broken)

    assert await stores.inbox.pending(0, 10) == []
    assert not await stores.inbox.transaction_seen("txn1")
    # Not recorded as seen, so the homeserver's retry is stored.
    assert await stores.inbox.store_transaction("txn1", [event(1), event(2)])
    assert len(await stores.inbox.pending(0, 10)) == 2


async def test_event_sent_in_two_transactions_is_stored_once(stores: Stores) -> None:
    assert await stores.inbox.store_transaction("txn1", [event(1)])
    assert await stores.inbox.store_transaction("txn2", [event(1), event(2)])
    # And twice within one transaction.
    assert await stores.inbox.store_transaction("txn3", [event(3), event(3)])

    ids = [i.payload["event_id"] for i in await stores.inbox.pending(0, 10)]
    assert ids == ["$event1", "$event2", "$event3"]


async def test_missed_events_are_stored_like_a_transaction_would_and_only_once(
    stores: Stores,
) -> None:
    inbox = stores.inbox
    assert await inbox.store_transaction("1", [event(1)])
    # Found in the room's timeline: stored in the order given, what is held is skipped.
    assert await inbox.store_missed([event(1), event(2), event(3)]) == 2
    assert await inbox.store_missed([event(2)]) == 0
    # The transaction that brings them late changes nothing.
    assert not await inbox.store_transaction("2", [event(2), event(3)])

    items = await inbox.pending(0, 10)
    assert [(i.payload["event_id"], i.lane) for i in items] == [
        ("$event1", "!room:eimis.example"),
        ("$event2", "!room:eimis.example"),
        ("$event3", "!room:eimis.example"),
    ]
    held = await inbox.held_events(["$event3", "$event1", "$nope"])
    assert set(held) == {"$event1", "$event3"} and held["$event1"] < held["$event3"]
    assert await inbox.max_seq() == held["$event3"]


async def test_active_rooms_are_those_with_recent_homeserver_events_newest_first(
    stores: Stores,
) -> None:
    inbox = stores.inbox
    await inbox.store_transaction("1", [event(1, "!old:x")])
    await stores.db.execute("UPDATE inbox SET received_at = 1000")
    await inbox.store_transaction("2", [event(2, "!a:x"), event(3, "!b:x")])
    await inbox.store_remote("pandalab", "ev1", "pandalab\x1fc1", {"text": "a"})
    await inbox.store_transaction("3", [event(4, "!a:x")])

    assert await inbox.active_rooms(since_ms=2000, limit=10) == ["!a:x", "!b:x"]
    assert await inbox.active_rooms(since_ms=0, limit=1) == ["!a:x"]
    assert await inbox.active_rooms(since_ms=0, limit=10, scan=1) == ["!a:x"]


async def test_latest_transaction_ids_follow_a_reused_id(stores: Stores) -> None:
    inbox = stores.inbox
    await inbox.store_transaction("1", [event(1)])
    await inbox.store_transaction("2", [event(2)])
    await stores.db.execute("UPDATE as_transaction SET received_at = 1000 WHERE txn_id = '1'")
    await stores.db.execute("UPDATE as_transaction SET received_at = 2000 WHERE txn_id = '2'")
    await inbox.store_transaction("1", [event(1)])  # sent again: not news
    assert [t for t, _ in await inbox.latest_transaction_ids()][:1] == ["2"]
    await inbox.store_transaction("1", [event(3)])  # reused with news: the latest
    assert [t for t, _ in await inbox.latest_transaction_ids()][:1] == ["1"]
    await inbox.forget_transactions(before_ms=10**15)
    assert await inbox.latest_transaction_ids() == []


# --- Inbox: vendor events ------------------------------------------------------------------------


async def test_remote_event_is_stored_once_per_connector_and_event_id(stores: Stores) -> None:
    inbox = stores.inbox
    assert await inbox.store_remote("pandalab", "ev1", "pandalab:c1", {"text": "a"})
    assert not await inbox.store_remote("pandalab", "ev1", "pandalab:c1", {"text": "a again"})
    # The same vendor event id from another connector is another event.
    assert await inbox.store_remote("medipeps", "ev1", "medipeps:c1", {"text": "b"})
    # A Matrix event id never collides with a vendor's.
    assert await inbox.store_transaction("t", [{**event(1), "event_id": "ev1"}])

    items = await inbox.pending(0, 10)
    assert [(i.origin, i.payload.get("text")) for i in items] == [
        ("pandalab", "a"),
        ("medipeps", "b"),
        (MATRIX_ORIGIN, None),
    ]


async def test_pending_returns_items_after_a_seq_in_seq_order_with_a_limit(stores: Stores) -> None:
    inbox = stores.inbox
    for n in range(10):
        await inbox.store_remote("pl", f"ev{n}", f"lane{n % 3}", {"n": n})
    everything = await inbox.pending(0, 100)
    seqs = [i.seq for i in everything]
    assert seqs == sorted(seqs) and len(set(seqs)) == 10
    assert [i.payload["n"] for i in everything] == list(range(10))

    page = await inbox.pending(seqs[3], 4)

    assert [i.seq for i in page] == seqs[4:8]
    assert await inbox.pending(seqs[-1], 100) == []


async def test_done_item_is_no_longer_pending_and_its_content_is_gone(stores: Stores) -> None:
    inbox = stores.inbox
    await inbox.store_transaction("t", [event(1), event(2)])
    first, second = await inbox.pending(0, 10)
    await inbox.record_attempt(first.seq, "homeserver down")

    await inbox.mark_done(first.seq)

    assert [i.seq for i in await inbox.pending(0, 10)] == [second.seq]
    stored = await row(stores.db, "inbox", first.seq)
    assert stored["state"] == "done"
    assert stored["payload"] is None
    assert stored["last_error"] is None
    assert await inbox.count("done") == 1
    # Still deduplicated after its content is gone: a later resend is not processed again.
    assert not await inbox.store_transaction("t2", [event(1)])
    assert await inbox.count("pending") == 1


async def test_failed_item_keeps_its_content_and_reason_for_operators(stores: Stores) -> None:
    inbox = stores.inbox
    await inbox.store_remote("pl", "ev1", "pl:c1", {"text": "hello"})
    (item,) = await inbox.pending(0, 10)

    await inbox.mark_failed(item.seq, "unknown conversation")

    assert await inbox.pending(0, 10) == []
    stored = await row(stores.db, "inbox", item.seq)
    assert stored["state"] == "failed"
    assert stored["payload"] is not None and "hello" in stored["payload"]
    assert stored["last_error"] == "unknown conversation"
    assert await inbox.count("failed") == 1


async def test_attempts_are_counted(stores: Stores) -> None:
    inbox = stores.inbox
    await inbox.store_remote("pl", "ev1", "pl:c1", {})
    (item,) = await inbox.pending(0, 10)
    await inbox.record_attempt(item.seq, "first")
    await inbox.record_attempt(item.seq, "second")

    (item,) = await inbox.pending(0, 10)

    assert item.attempts == 2
    assert (await row(stores.db, "inbox", item.seq))["last_error"] == "second"


# --- Outbox --------------------------------------------------------------------------------------


async def test_outbox_enqueue_is_deduplicated_per_connector(stores: Stores) -> None:
    outbox = stores.outbox
    assert await outbox.enqueue("pl", "!r:x", "send", "$ev1", {"text": "a"})
    assert not await outbox.enqueue("pl", "!r:x", "send", "$ev1", {"text": "a"})
    assert await outbox.enqueue("mp", "!r:x", "send", "$ev1", {"text": "a"})
    assert await outbox.enqueue("pl", "!r:x", "send", "$ev2", {"text": "b"})

    items = await outbox.pending(0, 10)

    assert [(i.connector, i.dedup_key) for i in items] == [
        ("pl", "$ev1"),
        ("mp", "$ev1"),
        ("pl", "$ev2"),
    ]
    assert items[0].payload == {"text": "a"}
    assert items[0].operation == "send"
    assert items[0].lane != items[1].lane  # one FIFO per (connector, room)
    assert items[0].lane == items[2].lane


async def test_outbox_depth_counts_pending_deliveries(stores: Stores) -> None:
    outbox = stores.outbox
    for n in range(3):
        await outbox.enqueue("pl", "!r:x", "send", f"$pl{n}", {})
    await outbox.enqueue("mp", "!r:x", "send", "$mp", {})
    assert await outbox.depth() == 4
    assert await outbox.depth("pl") == 3
    assert await outbox.depth("mp") == 1
    assert await outbox.depth("nobody") == 0

    first = (await outbox.pending(0, 10))[0]
    await outbox.mark_done(first.seq)
    last = (await outbox.pending(0, 10))[-1]
    await outbox.mark_failed(last.seq, "vendor refused")

    assert await outbox.depth() == 2
    assert await outbox.depth("pl") == 2
    assert await outbox.depth("mp") == 0


async def test_outbox_done_clears_content_and_failed_keeps_it(stores: Stores) -> None:
    outbox = stores.outbox
    await outbox.enqueue("pl", "!r:x", "send", "$a", {"text": "secret A"})
    await outbox.enqueue("pl", "!r:x", "send", "$b", {"text": "secret B"})
    done, failed = await outbox.pending(0, 10)
    await outbox.record_attempt(done.seq, "timeout")

    await outbox.mark_done(done.seq)
    await outbox.mark_failed(failed.seq, "permanent")

    assert await outbox.pending(0, 10) == []
    done_row = await row(stores.db, "outbox", done.seq)
    assert done_row == {"state": "done", "payload": None, "attempts": 1, "last_error": None}
    failed_row = await row(stores.db, "outbox", failed.seq)
    assert failed_row["state"] == "failed" and "secret B" in failed_row["payload"]
    assert failed_row["last_error"] == "permanent"


async def test_outbox_enqueue_in_a_rolled_back_transaction_leaves_nothing(stores: Stores) -> None:
    class Abort(Exception):
        pass

    with pytest.raises(Abort):
        async with stores.db.acquire() as conn, conn.transaction():
            assert await stores.outbox.enqueue("pl", "!r:x", "send", "$a", {}, conn=conn)
            raise Abort

    assert await stores.outbox.depth() == 0
    assert await stores.outbox.enqueue("pl", "!r:x", "send", "$a", {})


async def test_outbox_pending_after_seq_with_limit(stores: Stores) -> None:
    outbox = stores.outbox
    for n in range(6):
        await outbox.enqueue("pl", f"!r{n % 2}:x", "send", f"$e{n}", {"n": n})
    seqs = [i.seq for i in await outbox.pending(0, 100)]
    assert seqs == sorted(seqs)
    assert [i.payload["n"] for i in await outbox.pending(seqs[1], 3)] == [2, 3, 4]


# --- Portals, ghosts, message map ----------------------------------------------------------------


async def test_portal_create_and_get(stores: Stores) -> None:
    portals = stores.portals
    assert await portals.get("!p:x") is None
    await portals.create(Portal("!p:x", "Staff", True, "@eimis_bot:x"))
    await portals.create(Portal("!q:x", None, False, "@eimis_pl_810000001916:x"))
    # A second create for the same room changes nothing.
    await portals.create(Portal("!p:x", "Other", False, "@someone:x"))

    assert await portals.get("!p:x") == Portal("!p:x", "Staff", True, "@eimis_bot:x")
    assert await portals.get("!q:x") == Portal("!q:x", None, False, "@eimis_pl_810000001916:x")
    assert await portals.count() == 2


async def test_portal_links_find_the_room_of_a_vendor_conversation(stores: Stores) -> None:
    portals = stores.portals
    await portals.create(Portal("!p:x", None, False, "@eimis_bot:x"))
    await portals.add_link("!p:x", "pl", None)  # conversation being opened
    await portals.add_link("!p:x", "mp", "mp-conv-1")

    assert await portals.link("!p:x", "pl") is not None
    assert (await portals.link("!p:x", "pl")).conversation_id is None  # type: ignore[union-attr]
    assert await portals.link("!p:x", "other") is None
    assert [(lk.connector, lk.conversation_id) for lk in await portals.links("!p:x")] == [
        ("mp", "mp-conv-1"),
        ("pl", None),
    ]
    assert await portals.by_conversation("mp", "mp-conv-1") == "!p:x"
    assert await portals.by_conversation("pl", "mp-conv-1") is None

    await portals.set_conversation("!p:x", "pl", "pl-conv-9")

    assert await portals.by_conversation("pl", "pl-conv-9") == "!p:x"
    assert (await portals.link("!p:x", "pl")).conversation_id == "pl-conv-9"  # type: ignore[union-attr]
    # Linking again does not overwrite the known conversation.
    await portals.add_link("!p:x", "pl", None)
    assert (await portals.link("!p:x", "pl")).conversation_id == "pl-conv-9"  # type: ignore[union-attr]


async def test_a_vendor_conversation_is_bridged_to_one_room_only(stores: Stores) -> None:
    portals = stores.portals
    await portals.create(Portal("!p:x", None, False, "@eimis_bot:x"))
    await portals.create(Portal("!q:x", None, False, "@eimis_bot:x"))
    await portals.add_link("!p:x", "pl", "conv")
    with pytest.raises(Exception):  # noqa: B017 - any driver's unique violation
        await portals.add_link("!q:x", "pl", "conv")
    assert await portals.by_conversation("pl", "conv") == "!p:x"


async def test_a_link_needs_its_portal(stores: Stores) -> None:
    with pytest.raises(Exception):  # noqa: B017 - any driver's foreign key violation
        await stores.portals.add_link("!nowhere:x", "pl", "conv")
    assert await stores.portals.by_conversation("pl", "conv") is None


async def test_ghost_upsert_updates_the_display_name(stores: Stores) -> None:
    ghosts = stores.ghosts
    mxid = "@eimis_pl_810000001916:x"
    assert await ghosts.get(mxid) is None
    await ghosts.upsert(mxid, "pl", "810000001916", "Alice MARTIN - Médecin")
    await ghosts.upsert(mxid, "pl", "810000001916", "Alice MARTIN-DURAND - Médecin")

    ghost = await ghosts.get(mxid)

    assert ghost is not None
    assert (ghost.connector, ghost.idnps) == ("pl", "810000001916")
    assert ghost.display_name == "Alice MARTIN-DURAND - Médecin"
    assert await stores.db.fetchval("SELECT COUNT(*) FROM ghost") == 1


async def test_message_map_works_both_directions_per_connector(stores: Stores) -> None:
    messages = stores.messages
    await messages.add("pl", "pl-msg-1", "!p:x", "$ev1")
    await messages.add("mp", "mp-msg-1", "!p:x", "$ev1")
    # The first mapping of a vendor message wins.
    await messages.add("pl", "pl-msg-1", "!p:x", "$ev-other")

    assert await messages.event_for("pl", "pl-msg-1", room_id="!p:x") == "$ev1"
    assert await messages.remote_for("pl", "$ev1", room_id="!p:x") == "pl-msg-1"
    assert await messages.remote_for("mp", "$ev1", room_id="!p:x") == "mp-msg-1"
    assert await messages.event_for("mp", "pl-msg-1", room_id="!p:x") is None
    assert await messages.remote_for("pl", "$unknown", room_id="!p:x") is None


async def test_message_map_lookups_stay_in_their_portal(stores: Stores) -> None:
    """An id of another portal is not found: a relation across portals finds nothing to act on."""
    messages = stores.messages
    await messages.add("pl", "pl-a", "!a:x", "$in-a")
    await messages.add("pl", "pl-a#1", "!a:x", "$in-a")
    await messages.add("pl", "pl-b", "!b:x", "$in-b")

    assert await messages.remotes_for("pl", "$in-a", room_id="!a:x") == ["pl-a", "pl-a#1"]
    assert await messages.remotes_for("pl", "$in-a", room_id="!b:x") == []
    assert await messages.remote_for("pl", "$in-b", room_id="!a:x") is None
    assert await messages.event_for("pl", "pl-b", room_id="!a:x") is None
    assert await messages.event_for("pl", "pl-b", room_id="!b:x") == "$in-b"
    assert await messages.rooms_of("$in-a") == {"!a:x"}
    assert await messages.rooms_of("$unknown") == set()


# --- Connector state -----------------------------------------------------------------------------


async def test_connector_state_is_kept_per_connector(stores: Stores) -> None:
    pandalab = ConnectorStateStore(stores.db, "pandalab")
    medipeps = ConnectorStateStore(stores.db, "medipeps")
    assert await pandalab.get("cursor") is None

    await pandalab.set("cursor", "10")
    await medipeps.set("cursor", "abc")
    await pandalab.set("cursor", "11")
    await pandalab.set("webhook_id", "wh-1")

    assert await pandalab.get("cursor") == "11"
    assert await pandalab.get("webhook_id") == "wh-1"
    assert await medipeps.get("cursor") == "abc"
    assert await medipeps.get("webhook_id") is None


async def test_connector_state_survives_a_restart(open_db: Open) -> None:
    db = await open_db()
    await ConnectorStateStore(db, "pandalab").set("cursor", "42")
    await close(db)

    db = await open_db()
    assert await ConnectorStateStore(db, "pandalab").get("cursor") == "42"


async def test_appends_become_visible_in_seq_order_on_postgresql(postgres_url: str) -> None:
    """A reader that moved past seq N must never find a lower seq appearing later."""
    import asyncio
    import contextvars

    from bridge.db.ordering import serialize_appends

    db = await open_database(DatabaseConfig(url=postgres_url))
    stores = Stores.of(db)
    try:
        async with db.acquire() as conn, conn.transaction():
            await serialize_appends(conn, "inbox")
            await conn.execute(
                "INSERT INTO inbox (origin, dedup_key, lane, payload, received_at) "
                "VALUES ('pandalab', 'first', 'lane', '{}', 0)"
            )
            # A fresh context: mautrix reuses the connection of the enclosing acquire() otherwise.
            second = asyncio.create_task(
                stores.inbox.store_remote("pandalab", "second", "lane", {}),
                context=contextvars.Context(),
            )
            waiting = "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"

            async def second_waits() -> bool:
                return await db.fetchval(waiting) == 1

            await wait_until(second_waits, 5, "the second append to wait its turn")
            assert await db.fetchval(waiting) == 1, "the second append did not wait its turn"
            assert not second.done()
        assert await second
        pending = await stores.inbox.pending(0, 10)
        keys = await db.fetch("SELECT dedup_key FROM inbox ORDER BY seq")
        assert [r["dedup_key"] for r in keys] == ["first", "second"]
        assert [p.seq for p in pending] == sorted(p.seq for p in pending)
    finally:
        await db.stop()


async def test_items_of_one_lane_are_read_back_by_lane(stores: Stores) -> None:
    for n in range(6):
        await stores.inbox.store_remote("pandalab", f"e{n}", f"lane-{n % 2}", {"n": n})
    lane0 = await stores.inbox.pending_in_lane("lane-0", 0, 10)
    assert [i.payload["n"] for i in lane0] == [0, 2, 4]
    after = await stores.inbox.pending_in_lane("lane-0", lane0[0].seq, 1)
    assert [i.payload["n"] for i in after] == [2]

    for n in range(4):
        await stores.outbox.enqueue("medipeps", f"!room{n % 2}", "send_message", f"$e{n}", {"n": n})
    items = await stores.outbox.pending(0, 10)
    room0 = await stores.outbox.pending_in_lane(items[0].lane, 0, 10)
    assert [i.payload["n"] for i in room0] == [0, 2]


# -- group commit -----------------------------------------------------------------------------


async def test_group_commit_stores_every_concurrent_write_in_few_transactions(
    stores: Stores,
) -> None:
    """Workers committing at once share transactions, and each one's appends keep its order."""
    import asyncio

    async def worker(lane: int) -> None:
        for n in range(10):
            write = stores.outbox.enqueue_write("pl", f"!r{lane}:x", "send", f"$e{lane}-{n}", {})
            await stores.commit.commit([write])

    await asyncio.gather(*(worker(lane) for lane in range(20)))
    assert await stores.outbox.depth() == 200
    assert stores.commit.batches < 200 / 2, "commits were not grouped"
    for lane in range(20):
        items = await stores.outbox.pending_in_lane(f"pl\x1f!r{lane}:x", 0, 50)
        assert [i.dedup_key for i in items] == [f"$e{lane}-{n}" for n in range(10)]


async def test_group_commit_fails_only_the_worker_whose_write_fails(stores: Stores) -> None:
    import asyncio

    from bridge.db.group_commit import Write

    good = [
        stores.commit.commit([stores.outbox.enqueue_write("pl", "!r:x", "send", f"$g{n}", {})])
        for n in range(5)
    ]
    bad = stores.commit.commit([Write("INSERT INTO no_such_table (x) VALUES ($1)", (1,))])
    results = await asyncio.gather(*good, bad, return_exceptions=True)
    assert results[:5] == [None] * 5
    assert isinstance(results[5], Exception)
    assert await stores.outbox.depth() == 5


async def test_a_repeated_delivery_key_in_a_group_commit_queues_it_once(stores: Stores) -> None:
    write = stores.outbox.enqueue_write("pl", "!r:x", "send", "$same", {"text": "a"})
    await stores.commit.commit([write, write])
    await stores.commit.commit([write])
    assert await stores.outbox.depth() == 1


async def test_cached_portal_links_follow_every_write(stores: Stores) -> None:
    """Links are cached; a conversation opened later or a link added is seen at once."""
    await stores.portals.create(Portal("!p:x", None, True, "@bot:x"))
    await stores.portals.add_link("!p:x", "pl", None)
    assert [
        (link.connector, link.conversation_id) for link in await stores.portals.links("!p:x")
    ] == [("pl", None)]
    await stores.portals.set_conversation("!p:x", "pl", "c1")
    assert (await stores.portals.link("!p:x", "pl")).conversation_id == "c1"  # type: ignore[union-attr]
    await stores.portals.add_link("!p:x", "mp", "c2")
    assert {link.connector for link in await stores.portals.links("!p:x")} == {"pl", "mp"}
    assert await stores.portals.by_conversation("mp", "c2") == "!p:x"
    assert await stores.portals.get("!nope:x") is None
    await stores.portals.create(Portal("!nope:x", "t", False, "@bot:x"))
    assert (await stores.portals.get("!nope:x")) is not None


async def test_a_sqlite_transaction_that_reads_then_writes_survives_another_process_writing(
    tmp_path: Path,
) -> None:
    """Two processes on one SQLite file (the running bridge and a CLI command): a transaction
    that reads, then writes, while the other writes in between, waits for the write lock
    instead of failing "database is locked" (its transactions begin IMMEDIATE)."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    bridge = await open_database(DatabaseConfig(url=url))
    command = await open_database(DatabaseConfig(url=url))
    try:
        await bridge.execute("CREATE TABLE tally (n INTEGER)")
        async with command.acquire() as conn, conn.transaction():
            assert await conn.fetchval("SELECT COUNT(*) FROM tally") == 0
            # Another process: its own context (mautrix keeps the acquired connection in one).
            other = asyncio.create_task(
                bridge.execute("INSERT INTO tally VALUES (1)"), context=contextvars.Context()
            )
            # Deferred transactions let the other's write through at once (then ours failed);
            # immediate ones make it wait for our commit. Either way the outcome below is fixed.
            await asyncio.wait({other}, timeout=0.2)
            await conn.execute("INSERT INTO tally VALUES (2)")
        await other
        rows = await bridge.fetch("SELECT n FROM tally ORDER BY rowid")
        assert [r["n"] for r in rows] == [2, 1]
    finally:
        await bridge.stop()
        await command.stop()
