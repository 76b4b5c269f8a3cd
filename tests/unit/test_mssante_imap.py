"""Reading through aioimaplib against a tiny scripted IMAP server (asyncio, deterministic):
STARTTLS, AUTHENTICATE XOAUTH2 without initial response and its error challenge, UIDVALIDITY
cursor, fetch in UID order, IDLE and the polling fallback, MOVE / EXPUNGE."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
from dataclasses import dataclass, field

import pytest

from connectors.mssante.imap import (
    Cursor,
    ImapError,
    ImapReader,
    TokenRefused,
    TooLargeMail,
    Unreachable,
)
from connectors.mssante.tlsconfig import ServerSettings, client_context
from connectors.mssante.tokens import CachedToken, Token

from .test_mssante_tls import TestPki, make_pki

MAILBOX = "eimis@bridge.mssante.test"
ERROR = base64.b64encode(b'{"status":"401","schemes":"bearer","scope":"mail"}')


def mail(n: int, size: int = 0) -> bytes:
    body = ("x" * size) if size else f"Bonjour {n}"
    return (
        f"From: dr{n}@medecin.mssante.test\r\nTo: {MAILBOX}\r\nSubject: mail {n}\r\n"
        f"Message-ID: <m{n}@medecin.mssante.test>\r\n\r\n{body}\r\n"
    ).encode()


@dataclass
class Box:
    uidvalidity: int = 1000
    messages: dict[int, bytes] = field(default_factory=dict)  # uid -> raw
    folders: dict[str, list[bytes]] = field(default_factory=dict)
    next_uid: int = 1
    capabilities: tuple[str, ...] = ("IDLE", "MOVE", "UIDPLUS")
    starttls: bool = True
    valid_tokens: set[str] = field(default_factory=set)
    auth_commands: list[str] = field(default_factory=list)
    error_answers: list[bytes] = field(default_factory=list)
    deleted: set[int] = field(default_factory=set)
    idlers: list[asyncio.Queue] = field(default_factory=list)

    def deliver(self, raw: bytes) -> int:
        uid = self.next_uid
        self.next_uid += 1
        self.messages[uid] = raw
        for queue in self.idlers:
            queue.put_nowait(len(self.messages))
        return uid


class ScriptedImap:
    """Just enough IMAP4rev1 for the reader, one connection at a time per client."""

    def __init__(self, box: Box, pki: TestPki) -> None:
        self.box = box
        self.pki = pki
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    def caps(self, tls: bool, authed: bool) -> str:
        caps = ["IMAP4rev1", *self.box.capabilities]
        if not tls and self.box.starttls:
            caps.append("STARTTLS")
        if tls or not self.box.starttls:
            caps.append("AUTH=XOAUTH2")
        return " ".join(caps)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tls = False
        box = self.box

        async def send(line: str | bytes) -> None:
            writer.write(line.encode() if isinstance(line, str) else line)
            writer.write(b"\r\n")
            await writer.drain()

        try:
            await send(f"* OK [CAPABILITY {self.caps(tls, False)}] scripted ready")
            while True:
                raw = await reader.readline()
                if not raw:
                    return
                tag, _, rest = raw.decode().rstrip("\r\n").partition(" ")
                cmd, _, args = rest.partition(" ")
                cmd = cmd.upper()
                if cmd == "UID":
                    sub, _, args = args.partition(" ")
                    cmd = "UID " + sub.upper()
                if cmd == "CAPABILITY":
                    await send(f"* CAPABILITY {self.caps(tls, False)}")
                    await send(f"{tag} OK done")
                elif cmd == "STARTTLS":
                    await send(f"{tag} OK begin TLS")
                    await writer.start_tls(self.pki.server_context())
                    tls = True
                elif cmd == "AUTHENTICATE":
                    box.auth_commands.append(args)
                    if args.upper() != "XOAUTH2":
                        await send(f"{tag} BAD initial response refused (line too long)")
                        continue
                    await send("+ ")
                    blob = base64.b64decode((await reader.readline()).strip())
                    token = blob.decode().partition("auth=Bearer ")[2].rstrip("\x01")
                    if token in box.valid_tokens:
                        await send(f"{tag} OK [CAPABILITY {self.caps(tls, True)}] logged in")
                    else:
                        await send(b"+ " + ERROR)
                        box.error_answers.append((await reader.readline()).rstrip(b"\r\n"))
                        await send(f"{tag} NO [AUTHENTICATIONFAILED] failed")
                elif cmd == "SELECT":
                    await send(f"* {len(box.messages)} EXISTS")
                    await send(f"* OK [UIDVALIDITY {box.uidvalidity}] UIDs valid")
                    await send(f"* OK [UIDNEXT {box.next_uid}] next")
                    await send(f"{tag} OK [READ-WRITE] selected")
                elif cmd == "UID SEARCH":
                    low = int(re.search(r"UID (\d+):\*", args).group(1))  # type: ignore[union-attr]
                    uids = sorted(box.messages)
                    found = [u for u in uids if u >= low] or uids[-1:]  # "n:*" names the last
                    await send("* SEARCH " + " ".join(map(str, found)))
                    await send(f"{tag} OK search done")
                elif cmd == "UID FETCH":
                    uid_text, _, items = args.partition(" ")
                    uid = int(uid_text)
                    if uid in box.messages:
                        seq = sorted(box.messages).index(uid) + 1
                        data = box.messages[uid]
                        if "RFC822.SIZE" in items:
                            await send(f"* {seq} FETCH (UID {uid} RFC822.SIZE {len(data)})")
                        else:
                            if "HEADER" in items:
                                data = data.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
                            # BODY[] first and UID after: the reader must not rely on order.
                            await send(f"* {seq} FETCH (BODY[] {{{len(data)}}}")
                            writer.write(data)
                            await send(f" UID {uid})")
                    await send(f"{tag} OK fetch done")
                elif cmd == "UID MOVE":
                    uid_text, _, folder = args.partition(" ")
                    if folder == "Missing":
                        await send(f"{tag} NO [TRYCREATE] no such mailbox")
                        continue
                    box.folders.setdefault(folder, []).append(box.messages.pop(int(uid_text)))
                    await send(f"{tag} OK moved")
                elif cmd == "UID COPY":
                    uid_text, _, folder = args.partition(" ")
                    box.folders.setdefault(folder, []).append(box.messages[int(uid_text)])
                    await send(f"{tag} OK copied")
                elif cmd == "UID STORE":
                    box.deleted.add(int(args.split()[0]))
                    await send(f"{tag} OK stored")
                elif cmd in ("UID EXPUNGE", "EXPUNGE"):
                    for uid in sorted(box.deleted):
                        box.messages.pop(uid, None)
                    box.deleted.clear()
                    await send(f"{tag} OK expunged")
                elif cmd == "IDLE":
                    queue: asyncio.Queue = asyncio.Queue()
                    box.idlers.append(queue)
                    await send("+ idling")
                    done = asyncio.ensure_future(reader.readline())
                    while True:
                        pushed = asyncio.ensure_future(queue.get())
                        finished, _ = await asyncio.wait(
                            {done, pushed}, return_when=asyncio.FIRST_COMPLETED
                        )
                        if pushed in finished:
                            await send(f"* {pushed.result()} EXISTS")
                        else:
                            pushed.cancel()
                            break
                    box.idlers.remove(queue)
                    await send(f"{tag} OK idle done")
                elif cmd == "NOOP":
                    await send(f"{tag} OK noop")
                elif cmd == "LOGOUT":
                    await send("* BYE bye")
                    await send(f"{tag} OK logout")
                    return
                else:
                    await send(f"{tag} BAD unknown {cmd}")
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


class FakeSource:
    def __init__(self) -> None:
        self.calls = 0

    async def token(self) -> Token:
        self.calls += 1
        return Token(f"tok-{self.calls}-" + "y" * 1500, time.time() + 300)


def tok(n: int) -> str:
    return f"tok-{n}-" + "y" * 1500


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def served(pki: TestPki):
    servers: list[ScriptedImap] = []
    readers: list[ImapReader] = []

    async def serve(box: Box, source=None, *, tls: str = "starttls", **kwargs):  # noqa: ANN001
        server = ScriptedImap(box, pki)
        servers.append(server)
        port = await server.start()
        settings = ServerSettings("localhost", port, tls=tls, ca_file=pki.ca_file, timeout_s=5)  # type: ignore[arg-type]
        reader = ImapReader(settings, MAILBOX, CachedToken(source or FakeSource()), **kwargs)
        readers.append(reader)
        return reader

    yield serve
    for reader in readers:
        await reader.close()
    for server in servers:
        await server.stop()


async def test_starttls_then_xoauth2_without_initial_response(served) -> None:
    box = Box(valid_tokens={tok(1)})
    reader = await served(box)
    await reader.connect()
    assert box.auth_commands == ["XOAUTH2"]  # no initial response on the command line
    assert reader.uidvalidity == 1000
    assert reader.cursor(7) == "1000:7"


async def test_a_refused_token_is_acked_empty_then_refreshed_once(served) -> None:
    box = Box(valid_tokens={tok(2)})
    source = FakeSource()
    reader = await served(box, source)
    await reader.connect()
    assert source.calls == 2 and box.error_answers == [b""]


async def test_a_token_refused_twice_raises(served) -> None:
    box = Box()
    reader = await served(box)
    with pytest.raises(TokenRefused) as caught:
        await reader.connect()
    assert caught.value.challenge is not None and caught.value.challenge.scope == "mail"
    assert "tok-" not in str(caught.value)


async def test_no_starttls_offered_means_no_credentials_sent(served) -> None:
    box = Box(starttls=False, valid_tokens={tok(1)})
    reader = await served(box)
    with pytest.raises(Unreachable, match="STARTTLS"):
        await reader.connect()
    assert box.auth_commands == []


async def test_a_server_under_another_ca_is_unreachable(served, tmp_path) -> None:
    box = Box(valid_tokens={tok(1)})
    reader = await served(box)
    other = make_pki(tmp_path / "other", ca_cn="Another CA")
    reader._tls = client_context(other.ca_file)
    with pytest.raises(Unreachable):
        await reader.connect()
    assert box.auth_commands == []


async def test_fetch_since_yields_in_uid_order_from_the_cursor(served) -> None:
    box = Box(valid_tokens={tok(1)})
    for n in range(1, 5):
        box.deliver(mail(n))
    reader = await served(box)
    await reader.connect()
    got = [(uid, raw) async for uid, raw in reader.fetch_since(2)]
    assert [uid for uid, _ in got] == [3, 4]
    assert got[0][1] == mail(3)
    # Nothing new: "5:*" names message 4 on the server, the reader skips it.
    assert [uid async for uid, _ in reader.fetch_since(4)] == []


async def test_a_message_over_the_limit_yields_its_headers_only(served) -> None:
    box = Box(valid_tokens={tok(1)})
    box.deliver(mail(1, size=5000))
    reader = await served(box, max_bytes=1000)
    await reader.connect()
    [(uid, item)] = [x async for x in reader.fetch_since(0)]
    assert isinstance(item, TooLargeMail) and item.size > 5000
    assert b"Message-ID: <m1@medecin.mssante.test>" in item.headers and b"xxxx" not in item.headers


async def test_resume_reports_a_uidvalidity_change(served) -> None:
    box = Box(uidvalidity=2000, valid_tokens={tok(1)})
    reader = await served(box)
    await reader.connect()
    assert reader.resume(None).last_uid == 0
    same = reader.resume("2000:17")
    assert same.last_uid == 17 and not same.uidvalidity_changed
    changed = reader.resume("1999:17")
    assert changed.last_uid == 0 and changed.uidvalidity_changed
    with pytest.raises(ValueError):
        reader.resume("garbage")
    assert Cursor.parse("5:6") == Cursor(5, 6) and str(Cursor(5, 6)) == "5:6"


async def test_idle_returns_when_mail_arrives_and_on_timeout(served) -> None:
    box = Box(valid_tokens={tok(1)})
    reader = await served(box)
    await reader.connect()
    assert await reader.idle_wait(0.3) is False
    asyncio.get_running_loop().call_later(0.2, box.deliver, mail(9))
    assert await asyncio.wait_for(reader.idle_wait(10), 5) is True
    assert [uid async for uid, _ in reader.fetch_since(0)] == [1]


async def test_without_idle_the_reader_polls(served) -> None:
    box = Box(capabilities=("UIDPLUS",), valid_tokens={tok(1)})
    reader = await served(box, poll_interval_s=0.05)
    await reader.connect()
    assert await reader.idle_wait(0.15) is False
    asyncio.get_running_loop().call_later(0.1, box.deliver, mail(1))
    assert await asyncio.wait_for(reader.idle_wait(10), 5) is True


async def test_move_and_expunge(served) -> None:
    box = Box(valid_tokens={tok(1)})
    for n in range(1, 4):
        box.deliver(mail(n))
    reader = await served(box)
    await reader.connect()
    await reader.move(1, "Processed")
    await reader.expunge(2)
    assert sorted(box.messages) == [3] and box.folders == {"Processed": [mail(1)]}


async def test_move_without_the_move_extension_copies_then_expunges(served) -> None:
    box = Box(capabilities=("UIDPLUS",), valid_tokens={tok(1)})
    box.deliver(mail(1))
    reader = await served(box)
    await reader.connect()
    await reader.move(1, "Processed")
    assert box.messages == {} and box.folders == {"Processed": [mail(1)]}


async def test_a_refused_command_is_a_clear_error(served) -> None:
    box = Box(valid_tokens={tok(1)})
    reader = await served(box)
    await reader.connect()
    with pytest.raises(ImapError, match="refused MOVE"):
        await reader.move(1, "Missing")


async def test_nothing_listening_is_unreachable(pki: TestPki) -> None:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    settings = ServerSettings("localhost", port, ca_file=pki.ca_file, timeout_s=2)
    reader = ImapReader(settings, MAILBOX, CachedToken(FakeSource()))
    with pytest.raises(Unreachable):
        await reader.connect()


async def test_no_token_or_mail_content_reaches_the_logs(served, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    box = Box(valid_tokens={tok(2)})
    box.deliver(mail(1))
    reader = await served(box)
    await reader.connect()  # one refused token, then a good one
    assert [uid async for uid, _ in reader.fetch_since(0)] == [1]
    secret = base64.b64encode(f"user={MAILBOX}\x01auth=Bearer {tok(2)}".encode())[:40]
    for leak in ("yyyyyyyy", "Bonjour 1", secret.decode()):
        assert leak not in caplog.text
