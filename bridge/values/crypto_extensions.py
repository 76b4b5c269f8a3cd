"""What an appservice transaction carries for the bridge's devices, beside room events:
to-device events (MSC2409), device list changes and one-time key counts (MSC3202).

Each becomes an item of the durable inbox (origin ``crypto``), stored with the transaction
before the homeserver's 200, like every event: a room key that arrived is never lost.
Malformed entries are dropped here (the specification asks receivers to ignore what they
cannot read), never a reason to refuse the transaction and its room events.
"""

from __future__ import annotations

from typing import Any

TO_DEVICE = "to_device"
DEVICE_LISTS = "device_lists"
KEY_COUNTS = "key_counts"

LOW_KEY_COUNT = 25
"""One-time key counts at or above this need nothing: not stored (they come in most
transactions)."""

_TO_DEVICE = ("to_device", "de.sorunome.msc2409.to_device", "org.matrix.msc2409.to_device")
_DEVICE_LISTS = ("device_lists", "org.matrix.msc3202.device_lists")
_KEY_COUNTS = (
    "device_one_time_keys_count",
    "org.matrix.msc3202.device_one_time_keys_count",
    "org.matrix.msc3202.device_one_time_key_counts",
)
_FALLBACK = (
    "device_unused_fallback_key_types",
    "org.matrix.msc3202.device_unused_fallback_key_types",
)


def _first(body: dict[str, Any], names: tuple[str, ...]) -> Any:
    for name in names:
        if name in body:
            return body[name]
    return None


def parse_crypto(body: dict[str, Any]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    to_device = _first(body, _TO_DEVICE)
    for event in to_device if isinstance(to_device, list) else ():
        if (
            isinstance(event, dict)
            and all(isinstance(event.get(k), str) for k in ("to_user_id", "to_device_id"))
            and all(isinstance(event.get(k), str) for k in ("type", "sender"))
            and isinstance(event.get("content"), dict)
        ):
            items.append({"kind": TO_DEVICE, "event": event})
    lists = _first(body, _DEVICE_LISTS)
    if isinstance(lists, dict):
        changed = _user_ids(lists.get("changed"))
        left = _user_ids(lists.get("left"))
        if changed or left:
            items.append({"kind": DEVICE_LISTS, "changed": changed, "left": left})
    counts = _first(body, _KEY_COUNTS)
    fallback = _first(body, _FALLBACK)
    for user_id, devices in counts.items() if isinstance(counts, dict) else ():
        for device_id, by_algorithm in devices.items() if isinstance(devices, dict) else ():
            if not isinstance(by_algorithm, dict):
                continue
            numbers = {k: v for k, v in by_algorithm.items() if isinstance(v, int)}
            unused = _unused_fallback(fallback, user_id, device_id)
            low = numbers.get("signed_curve25519", 0) < LOW_KEY_COUNT
            if low or (unused is not None and "signed_curve25519" not in unused):
                items.append(
                    {
                        "kind": KEY_COUNTS,
                        "user_id": user_id,
                        "device_id": device_id,
                        "counts": numbers,
                        "fallback": unused,
                    }
                )
    return items


def _user_ids(value: Any) -> list[str]:
    """A list of user ids; anything else (a string, an object) is dropped, not iterated."""
    return [u for u in value if isinstance(u, str)] if isinstance(value, list) else []


def _unused_fallback(fallback: Any, user_id: str, device_id: str) -> list[str] | None:
    if not isinstance(fallback, dict) or not isinstance(fallback.get(user_id), dict):
        return None
    types = fallback[user_id].get(device_id)
    return [t for t in types if isinstance(t, str)] if isinstance(types, list) else None


def lane_of(item: dict[str, Any]) -> str:
    """To-device events and key counts of one device in order; device lists in their own."""
    if item["kind"] == TO_DEVICE:
        return f"{item['event']['to_user_id']}\x1f{item['event']['to_device_id']}"
    if item["kind"] == KEY_COUNTS:
        return f"{item['user_id']}\x1f{item['device_id']}"
    return "device-lists"
