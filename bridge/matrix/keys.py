"""The client-server key APIs, called as one of the bridge's users and, where it matters, as one
of its devices (application-service device masquerading: ``?user_id=...&device_id=...``).

Devices are created the MSC4190 way (``PUT /devices/{id}`` with the appservice token): no
access token exists for any ghost.
"""

from __future__ import annotations

from typing import Any

from mautrix.api import Method, Path
from mautrix.appservice import AppServiceAPI
from mautrix.types import UserID

TO_DEVICE_ONLY = '{"room":{"rooms":[]},"presence":{"types":[]},"account_data":{"types":[]}}'
"""A /sync filter leaving only what is not filterable: to-device messages, key counts."""


class KeysApi:
    """Over the appservice API (``Homeserver.api``, or one of its own): the keys need no more
    of the homeserver client than its requests as a user."""

    def __init__(self, api: AppServiceAPI) -> None:
        self.api = api

    async def _call(
        self,
        user_id: str,
        method: Method,
        path: Any,
        content: dict[str, Any] | None = None,
        *,
        device_id: str | None = None,
        retry_count: int | None = None,
    ) -> dict[str, Any]:
        query = {"device_id": device_id} if device_id else None
        answer = await self.api.user(UserID(user_id)).request(
            method, path, content, query_params=query, retry_count=retry_count
        )
        return answer if isinstance(answer, dict) else {}

    async def create_device(self, user_id: str, device_id: str, display_name: str) -> None:
        """Create (or find again) the device; the user is registered first if need be."""
        await self.api.intent(UserID(user_id)).ensure_registered()
        await self._call(
            user_id, Method.PUT, Path.v3.devices[device_id], {"display_name": display_name}
        )

    async def device_ids(self, user_id: str) -> list[str]:
        answer = await self._call(user_id, Method.GET, Path.v3.devices)
        devices = answer.get("devices")
        return [
            str(d["device_id"])
            for d in devices or ()
            if isinstance(d, dict) and isinstance(d.get("device_id"), str)
        ]

    async def delete_device(self, user_id: str, device_id: str) -> None:
        """Without user-interactive auth: appservices may (MSC4190)."""
        await self._call(user_id, Method.DELETE, Path.v3.devices[device_id])

    async def upload_keys(
        self, user_id: str, device_id: str, body: dict[str, Any]
    ) -> dict[str, int]:
        """Device keys and/or one-time keys; returns the one-time key counts."""
        answer = await self._call(
            user_id, Method.POST, Path.v3.keys.upload, body, device_id=device_id
        )
        counts = answer.get("one_time_key_counts")
        return {str(k): int(v) for k, v in counts.items()} if isinstance(counts, dict) else {}

    async def upload_cross_signing(self, user_id: str, body: dict[str, Any]) -> None:
        await self._call(user_id, Method.POST, Path.v3.keys.device_signing.upload, body)

    async def upload_signatures(self, user_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._call(user_id, Method.POST, Path.v3.keys.signatures.upload, body)

    async def query(self, as_user: str, user_ids: list[str]) -> dict[str, Any]:
        return await self._call(
            as_user, Method.POST, Path.v3.keys.query, {"device_keys": {u: [] for u in user_ids}}
        )

    async def claim(
        self, as_user: str, devices: dict[str, list[str]], algorithm: str = "signed_curve25519"
    ) -> dict[str, Any]:
        body = {
            "one_time_keys": {u: {d: algorithm for d in ds} for u, ds in devices.items()},
        }
        return await self._call(as_user, Method.POST, Path.v3.keys.claim, body)

    async def to_device_inbox(
        self, user_id: str, device_id: str, since: str | None
    ) -> tuple[list[dict[str, Any]], str]:
        """The device's to-device messages since ``since`` (a ``/sync`` as the device, rooms
        filtered out); the messages up to ``since`` are deleted by the homeserver now."""
        query: dict[str, Any] = {"timeout": "0", "filter": TO_DEVICE_ONLY, "device_id": device_id}
        if since:
            query["since"] = since
        answer = await self.api.user(UserID(user_id)).request(
            Method.GET, Path.v3.sync, query_params=query
        )
        if not isinstance(answer, dict):
            return [], since or ""
        section = answer.get("to_device")
        events = section.get("events") if isinstance(section, dict) else None
        found = [e for e in events or () if isinstance(e, dict)]
        return found, str(answer.get("next_batch") or since or "")

    async def send_to_device(
        self,
        user_id: str,
        device_id: str,
        event_type: str,
        messages: dict[str, dict[str, dict[str, Any]]],
        txn_id: str,
    ) -> None:
        await self._call(
            user_id,
            Method.PUT,
            Path.v3.sendToDevice[event_type][txn_id],
            {"messages": messages},
            device_id=device_id,
        )
