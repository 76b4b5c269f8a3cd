"""A vendor's user list, one page at a time (``UserListing``): the checks every connector makes
of a page its vendor answered, written once."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from connectors.base import ConnectorError, RemoteUser, UserPage
from connectors.payload import InvalidPayload, obj

MAX_USER_PAGE = 1000
"""Most users asked of a vendor in one page."""


def page_size(limit: int) -> int:
    """``limit`` within 1 .. ``MAX_USER_PAGE``."""
    return max(1, min(limit, MAX_USER_PAGE))


def user_page(
    raw: Sequence[Any],
    next_cursor: str | None,
    cursor: str | None,
    parse: Callable[[dict[str, Any]], RemoteUser],
    *,
    field: str,
    vendor: str,
    log: logging.Logger | logging.LoggerAdapter[Any],
) -> UserPage:
    """The page's users; a malformed entry is left out and logged (its index and the rule, never
    its content). A page whose cursor does not move past the one asked would make the listing
    loop forever: refused (not retriable)."""
    if next_cursor is not None and next_cursor == cursor:
        raise ConnectorError(
            f"{vendor} answered a user list page that does not move past its cursor",
            retriable=False,
        )
    users: list[RemoteUser] = []
    for i, item in enumerate(raw):
        try:
            users.append(parse(obj(item, f"{field}[{i}]")))
        except InvalidPayload as exc:
            log.warning(
                "%s: left out a malformed user of the list (%s[%d]: %s)", vendor, field, i, exc
            )
    return UserPage(tuple(users), next_cursor)
