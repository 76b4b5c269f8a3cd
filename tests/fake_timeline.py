"""A homeserver that answers only ``/messages``, for the tests of what reads room timelines.

Subclasses hold the timelines and implement ``messages``; the request itself is the bridge's
own (``Homeserver.timeline_page``, through this fake's ``intent``).
"""

from __future__ import annotations

from typing import Any

from bridge.matrix.homeserver import Homeserver


class TimelineServer:
    timeline_page = Homeserver.timeline_page  # the real request, to the fake's ``intent``

    def intent(self, mxid: str) -> Any:
        homeserver = self

        class Api:
            async def request(
                self, method: Any, path: Any, *, query_params: dict[str, str], **_: Any
            ) -> dict[str, Any]:
                return await homeserver.messages(mxid, str(path), query_params)

        class Intent:
            api = Api()

        return Intent()

    async def messages(self, viewer: str, path: str, query: dict[str, str]) -> dict[str, Any]:
        raise NotImplementedError


def page_backwards(timeline: list[dict[str, Any]], query: dict[str, str]) -> dict[str, Any]:
    """One ``/messages`` page of ``timeline`` (oldest first), newest first, from ``from``
    (an index; none: the live end), with ``end`` while older events remain."""
    assert query["dir"] == "b"
    start = int(query.get("from", len(timeline)))
    low = max(0, start - int(query["limit"]))
    page: dict[str, Any] = {"chunk": [dict(e) for e in reversed(timeline[low:start])]}
    if low > 0:
        page["end"] = str(low)
    return page
