"""Reading vendor JSON safely: typed field readers whose errors name the field, never content."""

from __future__ import annotations

import json
from typing import Any

from connectors.base import Mention, Participant
from connectors.idnps import Idnps, InvalidIdnps


def parse_json(raw: bytes) -> Any:
    """JSON from a vendor. Invalid UTF-8 inside it (a vendor bug) becomes U+FFFD instead of
    costing the whole event or feed page; a body that is not JSON still raises ValueError."""
    return json.loads(raw.decode("utf-8", errors="replace"))


class InvalidPayload(ValueError):
    """A vendor payload the connector cannot turn into a bridge type; the message says why.

    Messages name fields and rules, never message content.
    """


def obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidPayload(f"{where} is missing or not an object")
    return value


def list_field(container: dict[str, Any], key: str, where: str) -> list[Any]:
    value = container.get(key)
    if not isinstance(value, list):
        raise InvalidPayload(f"{where}.{key} is missing or not a list")
    return value


def str_field(container: dict[str, Any], key: str, where: str) -> str:
    """A non-empty string field."""
    value = container.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidPayload(f"{where}.{key} is missing or not a non-empty string")
    return value


def text_field(container: dict[str, Any], key: str, where: str) -> str:
    """A string field that may be empty (message text)."""
    value = container.get(key)
    if not isinstance(value, str):
        raise InvalidPayload(f"{where}.{key} is missing or not a string")
    return value


def optional_str(container: dict[str, Any], key: str, where: str) -> str | None:
    """A string field that may be absent or null."""
    value = container.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidPayload(f"{where}.{key} is not a string")
    return value


def optional_obj(container: dict[str, Any], key: str, where: str) -> dict[str, Any] | None:
    """An object field that may be absent or null."""
    value = container.get(key)
    if value is None:
        return None
    return obj(value, f"{where}.{key}")


def number_field(container: dict[str, Any], key: str, where: str) -> float:
    value = container.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise InvalidPayload(f"{where}.{key} is missing or not a number")
    return float(value)


def bool_field(container: dict[str, Any], key: str, where: str) -> bool:
    value = container.get(key)
    if not isinstance(value, bool):
        raise InvalidPayload(f"{where}.{key} is missing or not a boolean")
    return value


def int_field(container: dict[str, Any], key: str, where: str) -> int:
    value = container.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidPayload(f"{where}.{key} is missing or not an integer")
    return value


def idnps(value: Any, where: str) -> Idnps:
    if not isinstance(value, str):
        raise InvalidPayload(f"{where} is missing or not a string IDNPS")
    try:
        return Idnps(value)
    except InvalidIdnps as exc:
        raise InvalidPayload(f"{where} is not a valid IDNPS: {exc}") from exc


def participant(ref: str, where: str) -> Participant:
    """Someone outside the vendor: a Matrix user id (``@user:server``) or an IDNPS."""
    if ref.startswith("@"):
        localpart, sep, server = ref[1:].partition(":")
        if not (localpart and sep and server):
            raise InvalidPayload(f"{where} starting with '@' is not a Matrix user id")
        return Participant(mxid=ref)
    return Participant(idnps=idnps(ref, where))


def mention(ref: str, display_name: str, where: str) -> Mention:
    """A mentioned person by their reference (an IDNPS or a Matrix user id)."""
    person = participant(ref, where)
    return Mention(display_name=display_name, idnps=person.idnps, mxid=person.mxid)
