"""A native Matrix user over the raw client-server API, and the bridge's readiness, for benches."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, ClientTimeout

CHUNK = 1024 * 1024


async def file_chunks(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as source:
        while chunk := source.read(CHUNK):
            yield chunk


async def bridge_ready(http: ClientSession, url: str) -> bool:
    try:
        async with http.get(f"{url}/ready") as resp:
            return resp.status == 200
    except OSError:
        return False


class NativeUser:
    def __init__(self, http: ClientSession, url: str, user_id: str, token: str) -> None:
        self.http, self.url, self.user_id = http, url, user_id
        self.headers = {"Authorization": f"Bearer {token}"}
        self.since: str | None = None
        self.txn = 0

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        async with self.http.request(
            method, f"{self.url}{path}", headers=self.headers, **kwargs
        ) as resp:
            body = await resp.json(content_type=None)
            if resp.status >= 400:
                raise RuntimeError(f"{method} {path}: {resp.status}")
            return body

    async def join_invites(self) -> list[str]:
        params = {"timeout": "1000", **({"since": self.since} if self.since else {})}
        sync = await self.call("GET", "/_matrix/client/v3/sync", params=params)
        self.since = sync.get("next_batch")
        rooms = list((sync.get("rooms") or {}).get("invite", {}))
        for room in rooms:
            await self.call("POST", f"/_matrix/client/v3/rooms/{room}/join", json={})
        return rooms

    async def send(self, room: str, text: str) -> None:
        self.txn += 1
        await self.call(
            "PUT",
            f"/_matrix/client/v3/rooms/{room}/send/m.room.message/s{self.txn}",
            json={"msgtype": "m.text", "body": text},
        )

    async def bodies(self, room: str) -> list[str]:
        found: list[str] = []
        token = None
        while True:
            params = {"dir": "f", "limit": "500", **({"from": token} if token else {})}
            page = await self.call(
                "GET", f"/_matrix/client/v3/rooms/{room}/messages", params=params
            )
            found += [
                e["content"].get("body", "")
                for e in page.get("chunk", [])
                if e.get("type") == "m.room.message"
            ]
            token = page.get("end")
            if not page.get("chunk") or not token:
                return found

    async def upload(self, path: Path, mime: str) -> str:
        async with self.http.post(
            f"{self.url}/_matrix/media/v3/upload",
            params={"filename": path.name},
            data=file_chunks(path),
            timeout=ClientTimeout(total=None),
            headers={
                **self.headers,
                "Content-Type": mime,
                "Content-Length": str(path.stat().st_size),
            },
        ) as resp:
            body = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"upload: {resp.status}")
            return str(body["content_uri"])
