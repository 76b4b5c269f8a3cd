"""Reading the bridge's mailbox, through ``aioimaplib`` (a maintained asyncio IMAP client with
IDLE).

``ImapReader.connect()`` opens the connection (implicit TLS, or STARTTLS which the server must
offer: credentials never go in clear; the TLS context of ``tlsconfig``: CA bundle only, TLS >=
1.2), authenticates by XOAUTH2 WITHOUT initial response, and selects INBOX, reading its
UIDVALIDITY. aioimaplib's own ``xoauth2()`` sends the token as an initial response (too long for
Dovecot) and logs the base64 credentials at DEBUG; it is not used: this module sends
``AUTHENTICATE XOAUTH2`` alone and answers the server's continuations itself (the credentials,
then an empty line to an error challenge), writing to the transport without logging. aioimaplib
has no STARTTLS either: the upgrade is done here with ``loop.start_tls``. aioimaplib logs whole
protocol lines (mail content) at DEBUG and INFO: its logger is raised to WARNING on import.

The cursor the connector stores is ``"<uidvalidity>:<last uid>"`` (``Cursor``). ``resume(cursor)``
says where to read from; when the mailbox's UIDVALIDITY is no longer the cursor's, the old UIDs
mean nothing: it reports ``uidvalidity_changed`` and starts from UID 0, so the caller re-reads
the whole mailbox and skips what it already has by Message-ID (nothing lost, nothing doubled).
``fetch_since(uid)`` yields ``(uid, raw bytes)`` in UID order, one message at a time (a message
over ``max_bytes`` is not downloaded: it yields a ``TooLargeMail`` with its headers instead).
``idle_wait(timeout)`` returns when new mail may have arrived (IDLE, or polling when the server
has no IDLE). ``move(uid, folder)`` / ``expunge(uid)`` dispose of a processed message.
A reader is one IMAP connection: one task uses it at a time (the connector's reading loop).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aioimaplib import aioimaplib

from connectors.mssante.tlsconfig import ServerSettings, client_context
from connectors.mssante.tokens import CachedToken, Token, TokenError
from connectors.mssante.xoauth2 import ErrorChallenge, Exchange

for _name in ("aioimaplib", "aioimaplib.aioimaplib"):
    logging.getLogger(_name).setLevel(logging.WARNING)

_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]", re.I)
_UID = re.compile(rb"\bUID (\d+)", re.I)
_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)", re.I)
_EXISTS = re.compile(rb"^\*?\s*\d+ EXISTS", re.I)


class ImapError(Exception):
    """Reading failed; ``str()`` names the cause, never content or credential."""


class Unreachable(ImapError):
    """The server could not be reached, or the connection broke (try later)."""


class TokenRefused(ImapError):
    def __init__(self, message: str, challenge: ErrorChallenge | None = None) -> None:
        super().__init__(message)
        self.challenge = challenge


@dataclass(frozen=True)
class Cursor:
    uidvalidity: int
    last_uid: int

    def __str__(self) -> str:
        return f"{self.uidvalidity}:{self.last_uid}"

    @classmethod
    def parse(cls, value: str | None) -> Cursor | None:
        if not value:
            return None
        validity, sep, uid = value.strip().partition(":")
        if not sep or not validity.isdigit() or not uid.isdigit():
            raise ValueError("an IMAP cursor is '<uidvalidity>:<uid>'")
        return cls(int(validity), int(uid))


@dataclass(frozen=True)
class Resume:
    last_uid: int
    """Read the UIDs above this one."""
    uidvalidity_changed: bool
    """The stored cursor belongs to another UIDVALIDITY: everything is read again from UID 0,
    and the caller must skip the messages it already has (by Message-ID)."""


@dataclass(frozen=True)
class TooLargeMail:
    """A message over the reader's ``max_bytes``: not downloaded. ``headers`` are its header
    block, so the caller can answer or report it by sender and Message-ID."""

    size: int
    headers: bytes = field(repr=False)


class _Protocol(aioimaplib.IMAP4ClientProtocol):
    """aioimaplib's protocol, plus SASL without initial response and STARTTLS."""

    sasl: Exchange | None = None

    def _continuation(self, line: bytes) -> None:
        command = self.pending_sync_command
        if command is not None and command.name == "AUTHENTICATE" and self.sasl is not None:
            challenge = line[1:].strip()  # after "+"
            self.transport.write(self.sasl.next_response(challenge) + b"\r\n")  # no logging
            return
        super()._continuation(line)

    @aioimaplib.change_state
    async def authenticate_xoauth2(self, exchange: Exchange) -> aioimaplib.Response:
        self.sasl = exchange
        try:
            response = await self.execute(
                aioimaplib.Command("AUTHENTICATE", self.new_tag(), "XOAUTH2", loop=self.loop)
            )
        finally:
            self.sasl = None
        if response.result == "OK":
            self.state = aioimaplib.AUTH
        return response

    async def starttls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        response = await self.execute(
            aioimaplib.Command("STARTTLS", self.new_tag(), loop=self.loop)
        )
        if response.result != "OK":
            raise Unreachable(f"the IMAP server refused STARTTLS ({response.result})")
        loop = asyncio.get_running_loop()
        self.transport = await loop.start_tls(
            self.transport, self, context, server_hostname=server_hostname
        )
        await self.capability()  # what the server offers may change once in TLS (RFC 3501)


class _Client(aioimaplib.IMAP4):
    def create_client(self, host, port, loop, conn_lost_cb=None, ssl_context=None):  # noqa: ANN001
        local_loop = loop if loop is not None else asyncio.get_running_loop()
        self.protocol = _Protocol(local_loop, conn_lost_cb)
        self._client_task = local_loop.create_task(
            local_loop.create_connection(lambda: self.protocol, host, port, ssl=ssl_context)
        )


def _ok(response: aioimaplib.Response, what: str) -> aioimaplib.Response:
    if response.result != "OK":
        raise ImapError(f"the IMAP server refused {what} ({response.result})")
    return response


class ImapReader:
    def __init__(
        self,
        settings: ServerSettings,
        mailbox: str,
        tokens: CachedToken,
        *,
        folder: str = "INBOX",
        max_bytes: int = 30 * 1024 * 1024,
        poll_interval_s: float = 30.0,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        self.mailbox = mailbox
        self.tokens = tokens
        self.folder = folder
        self.max_bytes = max_bytes
        self.poll_interval_s = poll_interval_s
        self._tls = tls_context or client_context(
            settings.ca_file, settings.client_cert, settings.client_key
        )
        self._client: _Client | None = None
        self.uidvalidity: int | None = None
        self.last_seen_uid = 0

    # --- connection -----------------------------------------------------------------------

    @property
    def client(self) -> _Client:
        if self._client is None:
            raise ImapError("not connected")
        return self._client

    @property
    def capabilities(self) -> set[str]:
        return {c.upper() for c in self.client.protocol.capabilities}

    async def connect(self) -> None:
        """Connect, authenticate (a refused token is refreshed once) and select the folder."""
        challenge: ErrorChallenge | None = None
        for _attempt in range(2):
            try:
                token = await self.tokens.token()
            except TokenError as exc:
                raise TokenRefused(f"no access token: {exc}") from None
            await self._open()
            challenge = await self._authenticate(token)
            if challenge is None:
                await self._select()
                return
            self.tokens.invalidate(token)
            await self.close()
        assert challenge is not None
        raise TokenRefused(challenge.describe() + ", twice (once with a fresh token)", challenge)

    async def _open(self) -> None:
        implicit = self.settings.tls == "implicit"
        try:
            client = _Client(
                host=self.settings.host,
                port=self.settings.port,
                timeout=self.settings.timeout_s,
                ssl_context=self._tls if implicit else None,
            )
            self._client = client
            await client.wait_hello_from_server()
            if not implicit:
                if "STARTTLS" not in self.capabilities:
                    raise Unreachable("the IMAP server does not offer STARTTLS")
                await asyncio.wait_for(
                    client.protocol.starttls(self._tls, self.settings.host),
                    self.settings.timeout_s,
                )
        except ssl.SSLError as exc:
            await self.close(logout=False)
            raise Unreachable(f"TLS with the IMAP server failed ({exc.reason})") from None
        except (OSError, TimeoutError, aioimaplib.AioImapException) as exc:
            await self.close(logout=False)
            raise Unreachable(f"IMAP server unreachable ({type(exc).__name__})") from None
        except Unreachable:
            await self.close(logout=False)
            raise

    async def _authenticate(self, token: Token) -> ErrorChallenge | None:
        if "AUTH=XOAUTH2" not in self.capabilities:
            raise ImapError("the IMAP server does not offer AUTH=XOAUTH2")
        exchange = Exchange(self.mailbox, token.access_token)
        try:
            response = await asyncio.wait_for(
                self.client.protocol.authenticate_xoauth2(exchange), self.settings.timeout_s
            )
        except (OSError, TimeoutError, aioimaplib.AioImapException) as exc:
            if exchange.error is not None:
                return exchange.error
            raise Unreachable(f"IMAP AUTHENTICATE failed ({type(exc).__name__})") from None
        if response.result == "OK":
            await asyncio.wait_for(self.client.protocol.capability(), self.settings.timeout_s)
            return None
        return exchange.error or ErrorChallenge(response.result, None, None, "")

    async def _select(self) -> None:
        response = _ok(await self._call(self.client.select(self.folder)), "SELECT")
        for line in response.lines:
            match = _UIDVALIDITY.search(bytes(line))
            if match:
                self.uidvalidity = int(match.group(1))
        if self.uidvalidity is None:
            raise ImapError("the IMAP server gave no UIDVALIDITY")

    async def close(self, *, logout: bool = True) -> None:
        """Log out (unless the connection is known broken) and close the connection."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            if logout and client.protocol.state in (
                aioimaplib.AUTH,
                aioimaplib.SELECTED,
                aioimaplib.NONAUTH,
            ):
                await asyncio.wait_for(client.logout(), 5)
        except (OSError, TimeoutError, aioimaplib.AioImapException):
            pass
        finally:
            transport = client.protocol.transport
            if transport is not None:
                transport.close()

    async def _call(self, awaitable):  # noqa: ANN001, ANN202
        try:
            return await awaitable
        except (OSError, TimeoutError, aioimaplib.AioImapException) as exc:
            raise Unreachable(f"the IMAP connection failed ({type(exc).__name__})") from None

    # --- cursor ---------------------------------------------------------------------------

    def cursor(self, last_uid: int) -> str:
        if self.uidvalidity is None:
            raise ImapError("not connected")
        return str(Cursor(self.uidvalidity, last_uid))

    def resume(self, stored: str | None) -> Resume:
        cursor = Cursor.parse(stored)
        if cursor is None:
            return Resume(0, False)
        if cursor.uidvalidity != self.uidvalidity:
            return Resume(0, True)
        return Resume(cursor.last_uid, False)

    # --- reading --------------------------------------------------------------------------

    async def uids_since(self, uid: int) -> list[int]:
        response = _ok(
            await self._call(self.client.uid_search(f"UID {uid + 1}:*", charset=None)),
            "UID SEARCH",
        )
        found: set[int] = set()
        # aioimaplib gives the untagged SEARCH data without its "SEARCH" word (and the
        # tagged status text last).
        for line in response.lines[:-1]:
            words = bytes(line).split()
            if words and words[0].upper() == b"SEARCH":
                words = words[1:]
            if words and all(w.isdigit() for w in words):
                found.update(int(w) for w in words)
        return sorted(u for u in found if u > uid)  # "n:*" always names the last message

    async def fetch_since(self, uid: int) -> AsyncIterator[tuple[int, bytes | TooLargeMail]]:
        for found in await self.uids_since(uid):
            size = await self._size(found)
            if size is None:
                continue  # expunged meanwhile
            if size > self.max_bytes:
                headers = await self._fetch(found, "BODY.PEEK[HEADER]")
                self.last_seen_uid = max(self.last_seen_uid, found)
                yield found, TooLargeMail(size, headers or b"")
                continue
            raw = await self._fetch(found, "BODY.PEEK[]")
            if raw is None:
                continue
            self.last_seen_uid = max(self.last_seen_uid, found)
            yield found, raw

    async def _size(self, uid: int) -> int | None:
        response = _ok(
            await self._call(self.client.uid("fetch", str(uid), "(UID RFC822.SIZE)")), "FETCH"
        )
        for line in response.lines:
            line = bytes(line)
            uid_match, size_match = _UID.search(line), _SIZE.search(line)
            if uid_match and size_match and int(uid_match.group(1)) == uid:
                return int(size_match.group(1))
        return None

    async def _fetch(self, uid: int, item: str) -> bytes | None:
        response = _ok(
            await self._call(self.client.uid("fetch", str(uid), f"(UID {item})")), "FETCH"
        )
        literal: bytes | None = None
        uid_ok = False
        for line in response.lines:
            if isinstance(line, bytearray):
                if literal is None:
                    literal = bytes(line)
                continue
            match = _UID.search(line)
            if match and int(match.group(1)) == uid:
                uid_ok = True
        return literal if uid_ok else None

    async def idle_wait(self, timeout: float) -> bool:
        """Wait until new mail may have arrived (True) or ``timeout`` passed (False)."""
        if "IDLE" not in self.capabilities:
            return await self._poll(timeout)
        client = self.client
        try:
            idle = await client.idle_start(timeout=timeout)
            arrived = False
            try:
                while not arrived:
                    pushed = await client.wait_server_push(timeout=timeout + 5)
                    if pushed == aioimaplib.STOP_WAIT_SERVER_PUSH:
                        break
                    arrived = any(_EXISTS.match(bytes(line)) for line in pushed)
            finally:
                if client.has_pending_idle():
                    client.idle_done()
                await asyncio.wait_for(idle, self.settings.timeout_s)
            return arrived
        except (OSError, TimeoutError, aioimaplib.AioImapException) as exc:
            raise Unreachable(f"IMAP IDLE failed ({type(exc).__name__})") from None

    async def _poll(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if await self.uids_since(self.last_seen_uid):
                return True
            left = deadline - loop.time()
            if left <= 0:
                return False
            await asyncio.sleep(min(self.poll_interval_s, left))

    # --- disposal -------------------------------------------------------------------------

    async def move(self, uid: int, folder: str) -> None:
        if "MOVE" in self.capabilities:
            _ok(await self._call(self.client.uid("move", str(uid), folder)), "MOVE")
            return
        _ok(await self._call(self.client.uid("copy", str(uid), folder)), "COPY")
        await self.expunge(uid)

    async def expunge(self, uid: int) -> None:
        """Delete one message. Without UIDPLUS, EXPUNGE removes every message flagged deleted
        in the folder (the bridge's own mailbox: only what it already processed)."""
        _ok(
            await self._call(self.client.uid("store", str(uid), "+FLAGS.SILENT", r"(\Deleted)")),
            "STORE",
        )
        if "UIDPLUS" in self.capabilities:
            _ok(await self._call(self.client.uid("expunge", str(uid))), "UID EXPUNGE")
        else:
            _ok(await self._call(self.client.expunge()), "EXPUNGE")
