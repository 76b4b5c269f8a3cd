"""Remote ids (event, conversation, message and reaction ids a vendor chose): the one rule every
id meets before it is stored, whatever the connector.

An id is non-empty text of at most ``MAX_ID_BYTES`` bytes of UTF-8, without control characters:
what the inbox and the id maps can key on any database (PostgreSQL refuses NUL and over-long
index rows; an event that failed there was a 503, redelivered for ever) and what a log line can
quote. The bridge's intake checks every emitted event with ``check_event_ids``; a connector
catches ``InvalidRemoteId`` around its emit to refuse the delivery (a 400), or calls the check
itself first to skip an event it polled.
"""

from __future__ import annotations

import re
from typing import Any

MAX_ID_BYTES = 1024
"""Longest id stored, in bytes of UTF-8."""

ID_FIELDS = ("event_id", "conversation_id", "message_id", "reply_to", "reaction_id")
"""The fields of a ``RemoteEvent`` that hold remote ids (``reply_to`` may be None)."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class InvalidRemoteId(ValueError):
    """An event holds an id the bridge cannot store; the message names the field and the rule,
    never the id itself."""


def id_refusal(value: object) -> str | None:
    """Why ``value`` is no storable remote id, or None when it is one."""
    if not isinstance(value, str) or not value:
        return "must be a non-empty string"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate: no character at all
        return "must be valid Unicode text"
    if size > MAX_ID_BYTES:
        return f"must be at most {MAX_ID_BYTES} bytes"
    if _CONTROL.search(value):
        return "must not contain control characters"
    return None


def check_id(value: object, where: str) -> None:
    """Raise ``InvalidRemoteId`` naming ``where`` unless ``value`` is a storable remote id."""
    reason = id_refusal(value)
    if reason is not None:
        raise InvalidRemoteId(f"{where} {reason}")


def check_event_ids(event: Any) -> None:
    """Check every remote id an event holds (see ``ID_FIELDS``)."""
    for name in ID_FIELDS:
        if not hasattr(event, name):
            continue
        value = getattr(event, name)
        if value is None and name == "reply_to":
            continue
        check_id(value, name)
