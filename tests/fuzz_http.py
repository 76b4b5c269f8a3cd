"""Helpers of the HTTP fuzz tests (``test_fuzz_http.py``): a raw HTTP/1.1 client that sends
exactly the bytes it is given, and a tally of what was sent and answered."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

ANSWER_TIMEOUT_S = 30.0
"""A request unanswered for this long counts as a hang (a failure, like a 5xx)."""


@dataclass(frozen=True)
class RawResponse:
    status: int
    """0: the connection was closed without an answer."""
    headers: dict[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_request(
    port: int,
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes = b"",
    *,
    chunked: bool = False,
    declared: int | None = None,
    endless: bool = False,
) -> RawResponse:
    """Send one request on a fresh connection (``Connection: close``) and read the answer.

    Nothing is checked or encoded: ``target`` and ``headers`` go on the wire as given, so
    requests no HTTP client library would send (bytes that are not UTF-8 in a header, control
    characters in the path) reach the server. ``Content-Length`` (or chunked framing) and
    ``Host`` are added.

    A stalled upload: ``declared`` (a ``Content-Length`` larger than ``body``) or ``endless``
    (chunked, without the last chunk) sends ``body`` and then nothing more, and reads the
    answer the server gives meanwhile (by its ``Content-Length``): only a server that answers
    without the rest of the body answers at all.
    """
    stalled = declared is not None or endless
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    lines += [name + b": " + value for name, value in headers]
    if chunked:
        lines.append(b"Transfer-Encoding: chunked")
        framed = b"".join(
            f"{len(body[i : i + 4096]):x}\r\n".encode() + body[i : i + 4096] + b"\r\n"
            for i in range(0, len(body), 4096)
        )
        payload = framed if endless else framed + b"0\r\n\r\n"
    else:
        lines.append(f"Content-Length: {len(body) if declared is None else declared}".encode())
        payload = body
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    raw = bytearray()
    try:
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + payload)
        # Refused before the body was read (too large): the answer may be there all the same.
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        async with asyncio.timeout(ANSWER_TIMEOUT_S):
            while chunk := await reader.read(65536):
                raw += chunk
                if stalled and _complete(raw):
                    break
    except ConnectionError:
        pass  # reset after (or instead of) an answer: what was read is what there is
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    if not raw:
        return RawResponse(0, {}, b"")
    return parse_response(bytes(raw))


def _complete(raw: bytearray) -> bool:
    """Whether ``raw`` holds a whole answer with a ``Content-Length`` (what every refusal of
    a stalled upload has)."""
    head, found, rest = bytes(raw).partition(b"\r\n\r\n")
    if not found:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(rest) >= int(value.strip())
    return False


def parse_response(raw: bytes) -> RawResponse:
    head, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise AssertionError(f"not an HTTP answer: {raw[:200]!r}")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(b":")
        headers[name.strip().decode("latin-1").lower()] = value.strip().decode("latin-1")
    if headers.get("transfer-encoding", "").lower() == "chunked":
        rest = _unchunk(rest)
    elif "content-length" in headers:
        rest = rest[: int(headers["content-length"])]
    return RawResponse(int(parts[1]), headers, rest)


def _unchunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)


@dataclass
class Tally:
    """What one API was sent and answered: statuses, and requests by kind."""

    name: str
    statuses: Counter[int] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    protocol_errors: int = 0
    """Requests aiohttp's HTTP parser refused itself (400 before any handler ran)."""

    def add(self, kind: str, status: int) -> None:
        self.kinds[kind] += 1
        self.statuses[status] += 1

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    def by_class(self, hundred: int) -> int:
        return sum(n for status, n in self.statuses.items() if status // 100 == hundred)

    def summary(self) -> str:
        codes = " ".join(f"{status}:{n}" for status, n in sorted(self.statuses.items()))
        kinds = " ".join(f"{kind}:{n}" for kind, n in sorted(self.kinds.items()))
        return (
            f"fuzz {self.name}: {self.requests} requests, 2xx={self.by_class(2)}, "
            f"4xx={self.by_class(4)}, 5xx={self.by_class(5)} "
            f"(parser-level 400: {self.protocol_errors}) [{codes}] kinds [{kinds}]"
        )
