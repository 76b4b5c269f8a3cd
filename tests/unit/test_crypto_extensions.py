"""What an appservice transaction carries for the bridge's devices (MSC2409 to-device events,
MSC3202 device lists and one-time key counts): parsed by
bridge/values/crypto_extensions.parse_crypto, malformed entries dropped, and stored once in
the durable inbox (bridge/db/inbox.InboxStore.store_transaction), in one lane per device.

The parsing tests need no database; the storing tests run on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from mautrix.util.async_db import Database

from bridge.db.inbox import CRYPTO_ORIGIN, MATRIX_ORIGIN, PENDING, InboxStore, crypto_rows
from bridge.values.crypto_extensions import (
    DEVICE_LISTS,
    KEY_COUNTS,
    LOW_KEY_COUNT,
    TO_DEVICE,
    lane_of,
    parse_crypto,
)

GHOST = "@pl_ghost:a.example"
GHOST_DEVICE = "EIMISGHOST01"
BOT = "@bot:a.example"
BOT_DEVICE = "EIMISBOT0001"
ROOM = "!room:a.example"


def to_device(
    n: int, user_id: str = GHOST, device_id: str = GHOST_DEVICE, **extra: Any
) -> dict[str, Any]:
    return {
        "type": "m.room.encrypted",
        "sender": "@alice:c.example",
        "to_user_id": user_id,
        "to_device_id": device_id,
        "content": {
            "algorithm": "m.olm.v1.curve25519-aes-sha2",
            "sender_key": "curve",
            "ciphertext": {"k": {"type": 0, "body": f"body{n}"}},
        },
        **extra,
    }


def room_event(n: int) -> dict[str, Any]:
    return {
        "event_id": f"$event{n}",
        "room_id": ROOM,
        "type": "m.room.message",
        "sender": "@alice:c.example",
        "content": {"msgtype": "m.text", "body": f"message {n}"},
    }


# --- Parsing --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["to_device", "de.sorunome.msc2409.to_device", "org.matrix.msc2409.to_device"]
)
def test_to_device_events_are_read_under_the_stable_and_unstable_names(name: str) -> None:
    events = [to_device(1), to_device(2, BOT, BOT_DEVICE)]
    items = parse_crypto({"events": [], name: events})
    assert items == [{"kind": TO_DEVICE, "event": event} for event in events]


def test_the_stable_to_device_name_wins_over_the_unstable_one() -> None:
    items = parse_crypto(
        {"to_device": [to_device(1)], "de.sorunome.msc2409.to_device": [to_device(2)]}
    )
    assert [item["event"]["content"]["ciphertext"]["k"]["body"] for item in items] == ["body1"]


@pytest.mark.parametrize("name", ["device_lists", "org.matrix.msc3202.device_lists"])
def test_device_list_changes_are_read(name: str) -> None:
    items = parse_crypto({name: {"changed": ["@a:x", "@b:y"], "left": ["@c:z"]}})
    assert items == [{"kind": DEVICE_LISTS, "changed": ["@a:x", "@b:y"], "left": ["@c:z"]}]
    only_changed = parse_crypto({name: {"changed": ["@a:x"]}})
    assert only_changed == [{"kind": DEVICE_LISTS, "changed": ["@a:x"], "left": []}]


def test_empty_device_lists_make_no_item() -> None:
    assert parse_crypto({"org.matrix.msc3202.device_lists": {"changed": [], "left": []}}) == []
    assert parse_crypto({"org.matrix.msc3202.device_lists": {}}) == []


@pytest.mark.parametrize(
    "counts_name",
    [
        "device_one_time_keys_count",
        "org.matrix.msc3202.device_one_time_keys_count",
        "org.matrix.msc3202.device_one_time_key_counts",
    ],
)
def test_a_low_one_time_key_count_is_kept_and_a_high_one_skipped(counts_name: str) -> None:
    body = {
        counts_name: {
            GHOST: {GHOST_DEVICE: {"signed_curve25519": LOW_KEY_COUNT - 1}},
            BOT: {BOT_DEVICE: {"signed_curve25519": LOW_KEY_COUNT}},
        },
        "org.matrix.msc3202.device_unused_fallback_key_types": {
            GHOST: {GHOST_DEVICE: ["signed_curve25519"]},
            BOT: {BOT_DEVICE: ["signed_curve25519"]},
        },
    }
    assert parse_crypto(body) == [
        {
            "kind": KEY_COUNTS,
            "user_id": GHOST,
            "device_id": GHOST_DEVICE,
            "counts": {"signed_curve25519": LOW_KEY_COUNT - 1},
            "fallback": ["signed_curve25519"],
        }
    ]


def test_a_missing_count_is_a_low_count() -> None:
    body = {"org.matrix.msc3202.device_one_time_keys_count": {GHOST: {GHOST_DEVICE: {}}}}
    [item] = parse_crypto(body)
    assert item["counts"] == {} and item["fallback"] is None


@pytest.mark.parametrize(
    "fallback_name",
    ["device_unused_fallback_key_types", "org.matrix.msc3202.device_unused_fallback_key_types"],
)
def test_a_used_fallback_key_is_kept_even_with_enough_one_time_keys(fallback_name: str) -> None:
    body = {
        "org.matrix.msc3202.device_one_time_keys_count": {
            GHOST: {GHOST_DEVICE: {"signed_curve25519": 50}},
            BOT: {BOT_DEVICE: {"signed_curve25519": 50}},
        },
        fallback_name: {GHOST: {GHOST_DEVICE: []}, BOT: {BOT_DEVICE: ["signed_curve25519"]}},
    }
    assert parse_crypto(body) == [
        {
            "kind": KEY_COUNTS,
            "user_id": GHOST,
            "device_id": GHOST_DEVICE,
            "counts": {"signed_curve25519": 50},
            "fallback": [],
        }
    ]


def test_unknown_fallback_types_are_passed_on_and_junk_in_them_dropped() -> None:
    body = {
        "org.matrix.msc3202.device_one_time_keys_count": {GHOST: {GHOST_DEVICE: {"x": 1}}},
        "org.matrix.msc3202.device_unused_fallback_key_types": {
            GHOST: {GHOST_DEVICE: ["org.example.other", 5, None]}
        },
    }
    [item] = parse_crypto(body)
    assert item["fallback"] == ["org.example.other"] and item["counts"] == {"x": 1}


def test_all_kinds_together_in_their_order() -> None:
    body = {
        "events": [room_event(1)],
        "de.sorunome.msc2409.to_device": [to_device(1)],
        "org.matrix.msc3202.device_lists": {"changed": ["@a:x"]},
        "org.matrix.msc3202.device_one_time_keys_count": {
            GHOST: {GHOST_DEVICE: {"signed_curve25519": 3}}
        },
    }
    assert [item["kind"] for item in parse_crypto(body)] == [TO_DEVICE, DEVICE_LISTS, KEY_COUNTS]


def test_a_transaction_without_crypto_fields_has_no_items() -> None:
    assert parse_crypto({"events": [room_event(1)], "ephemeral": []}) == []


MALFORMED_TO_DEVICE: list[Any] = [
    None,
    "event",
    5,
    [],
    {},
    {**to_device(1), "to_user_id": None},
    {**to_device(1), "to_device_id": 7},
    {**to_device(1), "type": None},
    {**to_device(1), "sender": ["@a:x"]},
    {**to_device(1), "content": "text"},
    {k: v for k, v in to_device(1).items() if k != "content"},
    {k: v for k, v in to_device(1).items() if k != "to_device_id"},
]


def test_malformed_to_device_events_are_dropped_and_the_good_ones_kept() -> None:
    good = to_device(2)
    items = parse_crypto({"to_device": [*MALFORMED_TO_DEVICE, good]})
    assert items == [{"kind": TO_DEVICE, "event": good}]


@pytest.mark.parametrize(
    "body",
    [
        {"to_device": {"not": "a list"}},
        {"to_device": "text"},
        {"to_device": None},
        {"org.matrix.msc3202.device_lists": ["@a:x"]},
        {"org.matrix.msc3202.device_lists": {"changed": [5, None, {"u": 1}], "left": [[]]}},
        {"org.matrix.msc3202.device_lists": {"changed": None, "left": None}},
        {"org.matrix.msc3202.device_one_time_keys_count": ["@a:x"]},
        {"org.matrix.msc3202.device_one_time_keys_count": {GHOST: ["device"]}},
        {"org.matrix.msc3202.device_one_time_keys_count": {GHOST: {GHOST_DEVICE: [1]}}},
        {"org.matrix.msc3202.device_one_time_keys_count": {GHOST: None}},
        {"org.matrix.msc3202.device_unused_fallback_key_types": {GHOST: {GHOST_DEVICE: []}}},
    ],
)
def test_malformed_crypto_fields_are_dropped_without_raising(body: dict[str, Any]) -> None:
    assert parse_crypto(body) == []


def test_malformed_counts_keep_what_is_readable() -> None:
    body = {
        "org.matrix.msc3202.device_one_time_keys_count": {
            GHOST: {GHOST_DEVICE: {"signed_curve25519": "3", "other": 2}, "BAD": None},
        },
        "org.matrix.msc3202.device_unused_fallback_key_types": {GHOST: {GHOST_DEVICE: "x"}},
        "org.matrix.msc3202.device_lists": {"changed": ["@a:x", 5], "left": [None]},
    }
    items = parse_crypto(body)
    lists = [item for item in items if item["kind"] == DEVICE_LISTS]
    assert lists == [{"kind": DEVICE_LISTS, "changed": ["@a:x"], "left": []}]
    counts = [item for item in items if item["kind"] == KEY_COUNTS]
    # A count that is not a number is no count: the device looks low and is topped up.
    assert counts == [
        {
            "kind": KEY_COUNTS,
            "user_id": GHOST,
            "device_id": GHOST_DEVICE,
            "counts": {"other": 2},
            "fallback": None,
        }
    ]


def test_device_lists_given_as_a_string_are_dropped() -> None:
    body = {"org.matrix.msc3202.device_lists": {"changed": "@a:x", "left": "@b:y"}}
    assert parse_crypto(body) == []


def test_lanes_are_one_per_device_and_one_for_device_lists() -> None:
    ghost_event, bot_event = (
        {"kind": TO_DEVICE, "event": to_device(1)},
        {"kind": TO_DEVICE, "event": to_device(2, BOT, BOT_DEVICE)},
    )
    counts = {"kind": KEY_COUNTS, "user_id": GHOST, "device_id": GHOST_DEVICE, "counts": {}}
    lists = {"kind": DEVICE_LISTS, "changed": ["@a:x"], "left": []}
    assert lane_of(ghost_event) == lane_of(counts) == f"{GHOST}\x1f{GHOST_DEVICE}"
    assert lane_of(bot_event) == f"{BOT}\x1f{BOT_DEVICE}"
    assert lane_of(lists) == "device-lists"
    assert len({lane_of(ghost_event), lane_of(bot_event), lane_of(lists), ROOM}) == 4


def test_crypto_rows_have_stable_keys_that_depend_on_content_and_place() -> None:
    items = [{"kind": TO_DEVICE, "event": to_device(1)}, {"kind": TO_DEVICE, "event": to_device(2)}]
    rows = crypto_rows("txn1", items)
    assert crypto_rows("txn1", json.loads(json.dumps(items))) == rows
    assert [row[0] for row in rows] == [CRYPTO_ORIGIN, CRYPTO_ORIGIN]
    assert len({row[1] for row in rows}) == 2
    assert crypto_rows("txn2", items)[0][1] != rows[0][1]
    assert json.loads(rows[0][3]) == items[0]


# --- Storing --------------------------------------------------------------------------------------


async def inbox_rows(db: Database) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT seq, origin, dedup_key, lane, payload, state FROM inbox ORDER BY seq"
    )
    return [dict(row) for row in rows]


async def test_crypto_items_are_stored_once_in_lanes_per_device(db: Database) -> None:
    inbox = InboxStore(db)
    body = {
        "events": [room_event(1)],
        "de.sorunome.msc2409.to_device": [
            to_device(1),
            to_device(2, BOT, BOT_DEVICE),
            to_device(3),
        ],
        "org.matrix.msc3202.device_lists": {"changed": ["@a:x"], "left": []},
        "org.matrix.msc3202.device_one_time_keys_count": {
            GHOST: {GHOST_DEVICE: {"signed_curve25519": 2}}
        },
    }
    items = parse_crypto(body)

    assert await inbox.store_transaction("t1", body["events"], crypto=items)

    rows = await inbox_rows(db)
    assert [(row["origin"], row["lane"]) for row in rows] == [
        (MATRIX_ORIGIN, ROOM),
        (CRYPTO_ORIGIN, f"{GHOST}\x1f{GHOST_DEVICE}"),
        (CRYPTO_ORIGIN, f"{BOT}\x1f{BOT_DEVICE}"),
        (CRYPTO_ORIGIN, f"{GHOST}\x1f{GHOST_DEVICE}"),
        (CRYPTO_ORIGIN, "device-lists"),
        (CRYPTO_ORIGIN, f"{GHOST}\x1f{GHOST_DEVICE}"),
    ]
    assert all(row["state"] == PENDING for row in rows)
    assert [json.loads(row["payload"]) for row in rows[1:]] == items

    # The homeserver sends the transaction again (no answer reached it): nothing new.
    assert not await inbox.store_transaction("t1", body["events"], crypto=parse_crypto(body))
    assert await inbox_rows(db) == rows

    lane = await inbox.pending_in_lane(f"{GHOST}\x1f{GHOST_DEVICE}", 0, 10)
    assert [item.payload for item in lane] == [items[0], items[2], items[4]]
    assert all(item.origin == CRYPTO_ORIGIN for item in lane)


async def test_a_transaction_with_only_crypto_items_is_stored_and_deduplicated(
    db: Database,
) -> None:
    inbox = InboxStore(db)
    items = parse_crypto({"to_device": [to_device(1)]})
    assert await inbox.store_transaction("t7", [], crypto=items)
    assert await inbox.transaction_seen("t7")
    assert not await inbox.store_transaction("t7", [], crypto=items)
    assert await inbox.count(PENDING) == 1
    # A later transaction with a new to-device event stores only that one.
    more = parse_crypto({"to_device": [to_device(2)]})
    assert await inbox.store_transaction("t8", [], crypto=more)
    assert [json.loads(row["payload"]) for row in await inbox_rows(db)] == items + more


async def test_crypto_items_and_room_events_do_not_collide(db: Database) -> None:
    inbox = InboxStore(db)
    items = parse_crypto({"to_device": [to_device(1)]})
    [(_, key, _, _)] = crypto_rows("t1", items)
    # A room event whose id happens to equal a crypto item's key is another row.
    clash = {**room_event(1), "event_id": key}
    assert await inbox.store_transaction("t1", [clash], crypto=items)
    rows = await inbox_rows(db)
    assert sorted(row["origin"] for row in rows) == [CRYPTO_ORIGIN, MATRIX_ORIGIN]


async def test_an_empty_crypto_list_stores_nothing_more(db: Database) -> None:
    inbox = InboxStore(db)
    assert await inbox.store_transaction("t1", [room_event(1)], crypto=[])
    assert not await inbox.store_transaction("t2", [], crypto=[])
    assert [row["origin"] for row in await inbox_rows(db)] == [MATRIX_ORIGIN]
