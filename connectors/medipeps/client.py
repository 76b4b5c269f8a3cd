"""HTTP client of the Medipeps-style vendor API (API key header, integer ids, event feed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
from pydantic import SecretStr

from connectors import http
from connectors.base import ConnectorError

_DEFAULT_TIMEOUT_S = 15.0
MAX_EVENTS_PAGE_BYTES = 32 * 1024 * 1024
"""Longest events page read: Medipeps cuts a page once its inline files pass about 8 MiB of
base64, after a file of at most 1 MiB (1.4 MiB of base64), and every event's text is bounded."""


@dataclass(frozen=True)
class EventsPage:
    """One ``GET /mp/events`` answer: raw events in ``seq`` order and the cursor after them."""

    events: list[Any]
    cursor: int


class MedipepsClient:
    """One connector's session with the vendor.

    Every failure surfaces as a ``ConnectorError``: connection errors, timeouts, 5xx and 429 are
    retriable; other 4xx (a refused key included) are permanent. Error messages carry the status
    and the vendor's error code, never the API key or message content.
    """

    def __init__(
        self, api_url: str, api_key: SecretStr, *, timeout_s: float = _DEFAULT_TIMEOUT_S
    ) -> None:
        self._base = api_url.rstrip("/")
        self._api_key = api_key
        self._http = http.LazySession(aiohttp.ClientTimeout(total=timeout_s))

    async def close(self) -> None:
        await self._http.close()

    # Typed API ------------------------------------------------------------------------------------

    async def get_professional(self, idnps: str) -> dict[str, Any] | None:
        """``GET /mp/professionals/{idnps}``: the professional's JSON, or None when unknown."""
        status, body = await self._call(
            "GET", f"/mp/professionals/{http.segment(idnps)}", allow_404=True
        )
        return None if status == 404 else http.response_object(body, "Medipeps", "professional")

    async def professionals(self, after: str | None, limit: int) -> tuple[list[Any], str | None]:
        """``GET /mp/professionals?after=&limit=``: the raw professional objects of one page, by
        IDNPS, and ``after`` (the IDNPS to list after; None on the last page)."""
        params = {"limit": str(limit)}
        if after is not None:
            params["after"] = after
        _, data = await self._call("GET", "/mp/professionals", params=params)
        page = http.response_object(data, "Medipeps", "professional list")
        professionals, after_last = page.get("professionals"), page.get("after")
        if not isinstance(professionals, list):
            raise ConnectorError(
                "Medipeps answered a professional list without a 'professionals' list",
                retriable=False,
            )
        if not (after_last is None or (isinstance(after_last, str) and after_last)):
            raise ConnectorError(
                "Medipeps answered a professional list whose 'after' is neither a string nor null",
                retriable=False,
            )
        return professionals, after_last

    async def create_conversation(self, body: dict[str, Any]) -> int:
        """``POST /mp/conversations``; returns ``conv`` (the same for a repeated request_ref)."""
        _, data = await self._call("POST", "/mp/conversations", json=body)
        return _int_field(data, "conv", "conversation")

    async def post_message(self, conv: int, body: dict[str, Any]) -> int:
        """``POST /mp/conversations/{conv}/messages``; returns ``msg``."""
        _, data = await self._call("POST", f"/mp/conversations/{conv}/messages", json=body)
        return _int_field(data, "msg", "message")

    async def delete_message(self, conv: int, msg: int) -> bool:
        """``DELETE /mp/conversations/{conv}/messages/{msg}``; False when Medipeps has no such
        message (404), which is no error."""
        status, _ = await self._call(
            "DELETE", f"/mp/conversations/{conv}/messages/{msg}", allow_404=True
        )
        return status != 404

    async def mark_read(self, conv: int, body: dict[str, Any]) -> None:
        """``POST /mp/conversations/{conv}/read``."""
        await self._call("POST", f"/mp/conversations/{conv}/read", json=body)

    async def report_status(self, conv: int, msg: int, body: dict[str, Any]) -> None:
        """``POST /mp/conversations/{conv}/messages/{msg}/status``, shown to the author."""
        await self._call("POST", f"/mp/conversations/{conv}/messages/{msg}/status", json=body)

    async def add_participants(self, conv: int, body: dict[str, Any]) -> None:
        """``POST /mp/conversations/{conv}/participants`` (``request_ref`` makes a repeat
        harmless)."""
        await self._call("POST", f"/mp/conversations/{conv}/participants", json=body)

    async def guests_leave(self, conv: int, body: dict[str, Any]) -> None:
        """``POST /mp/conversations/{conv}/guests/leave``: guests only."""
        await self._call("POST", f"/mp/conversations/{conv}/guests/leave", json=body)

    async def update_conversation(self, conv: int, body: dict[str, Any]) -> None:
        """``PATCH /mp/conversations/{conv}`` (the subject)."""
        await self._call("PATCH", f"/mp/conversations/{conv}", json=body)

    async def messages(self, conv: int, after: int, limit: int) -> EventsPage:
        """``GET /mp/conversations/{conv}/messages?after=&limit=``: the conversation's own
        feed, raw ``msg`` objects oldest first, and the cursor after them."""
        _, data = await self._call(
            "GET",
            f"/mp/conversations/{conv}/messages",
            params={"after": str(after), "limit": str(limit)},
            limit=MAX_EVENTS_PAGE_BYTES,
        )
        messages = http.response_object(data, "Medipeps", "messages page").get("messages")
        if not isinstance(messages, list):
            raise ConnectorError(
                "Medipeps answered a messages page without a list", retriable=False
            )
        return EventsPage(events=messages, cursor=_int_field(data, "cursor", "messages page"))

    async def events(self, after: int, limit: int) -> EventsPage:
        """``GET /mp/events?after=&limit=``: the events with ``seq > after``, oldest first."""
        _, data = await self._call(
            "GET",
            "/mp/events",
            params={"after": str(after), "limit": str(limit)},
            limit=MAX_EVENTS_PAGE_BYTES,
        )
        events = http.response_object(data, "Medipeps", "events page").get("events")
        if not isinstance(events, list):
            raise ConnectorError("Medipeps answered an events page without a list", retriable=False)
        return EventsPage(events=events, cursor=_int_field(data, "cursor", "events page"))

    # Plumbing -------------------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        allow_404: bool = False,
        limit: int = http.MAX_ANSWER_BYTES,
    ) -> tuple[int, Any]:
        headers = {"X-Api-Key": self._api_key.get_secret_value(), "Accept": "application/json"}
        what = f"Medipeps {method} {path}"
        try:
            async with self._http().request(
                method,
                self._base + path,
                json=json,
                params=params,
                headers=headers,
                allow_redirects=False,  # the key never follows a redirect to another origin
            ) as resp:
                body = await http.read_json(resp, what, limit=limit)
                if not (resp.status == 404 and allow_404):
                    http.raise_for_status(what, resp.status, body, _vendor_error, resp.headers)
                return resp.status, body
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise http.transport_error(what, exc) from exc


# --- Helpers --------------------------------------------------------------------------------------


def _int_field(body: Any, key: str, what: str) -> int:
    value = http.response_object(body, "Medipeps", what).get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConnectorError(
            f"Medipeps answered a {what} without an integer {key!r}", retriable=False
        )
    return value


def _vendor_error(body: Any) -> str:
    return http.error_fields(body, "code", "detail")
