"""The MSSanté connector: a portal's conversation as a mail thread, through the bridge's mailbox.

Out (bridge -> mail): ``create_conversation`` records a thread (its MSSanté participants' mailboxes
from the directory, a subject) under a fresh token, the conversation id; ``send_message`` sends
one mail per message from the bridge's mailbox, ``From: "<sender> via EIMIS" <mailbox>``, to the
thread's participants, ``Reply-To`` the portal's own address (``<local>+<token>@<reply_domain>``),
``In-Reply-To``/``References`` the thread's earlier Message-IDs, ``X-MSS-NIL``, an MDN request when
configured, the file as a MIME part. Idempotent by ``request_id``: the Message-ID is stored before
the mail goes and marked sent after; a retry of a sent message sends nothing, a retry after a crash
in between sends the same mail again with the same Message-ID (at least once, never two ids).

In (mail -> bridge): one task reads the mailbox (``ImapReader``: stored cursor, IDLE or polling).
For each mail: a DSN/MDN is recognised and logged (mapping is the next step); a mail from outside
``trusted_domains``, from an address the directory does not know, unreadable, too large, or from
someone not in the thread it answers, is refused: logged without content, counted in ``refused``,
disposed of, never emitted. Otherwise its thread is found by the ``+<token>`` of a recipient, else
by In-Reply-To/References, and it becomes a ``MessageReceived``; a mail to the bridge's mailbox in
no known thread opens one (``ConversationCreated``, title = subject without the XDM prefix, then its
``MessageReceived``). Event ids derive from the Message-ID, so a mail read twice (a crash between
``emit`` and the cursor) is the same event. Only after ``emit`` returned is the cursor stored, then
the mail expunged or moved (``after_delivery``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import weakref
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.utils import make_msgid, parsedate_to_datetime
from typing import ClassVar

import aiohttp
from pydantic import BaseModel

from connectors.base import (
    Capabilities,
    Connector,
    ConnectorContext,
    ConnectorError,
    ConversationCreated,
    FileLimit,
    Idnps,
    InvalidIdnps,
    MessageReceived,
    NewConversation,
    OutboundAttachment,
    OutboundMessage,
    RemoteEvent,
    RemoteUser,
)
from connectors.http import LazySession
from connectors.kit.backoff import Backoff
from connectors.mssante import imap as imap_mod
from connectors.mssante import smtp as smtp_mod
from connectors.mssante.imap import ImapReader, TooLargeMail
from connectors.mssante.mime import (
    IncomingMail,
    MailError,
    OutgoingAttachment,
    build_outgoing,
    parse_incoming,
)
from connectors.mssante.receipts import Dsn, parse_receipt
from connectors.mssante.settings import MssanteSettings
from connectors.mssante.smtp import SmtpSender
from connectors.mssante.threads import SendRecord, Thread, ThreadStore, is_token, new_token
from connectors.mssante.tokens import CachedToken, PscTokenSource, TokenSource

CURSOR_KEY = "cursor"
DEFAULT_FILE_LIMIT = 7 * 1024 * 1024
"""Declared before the operator's SIZE is known (a 10 MB SIZE carries ~7.5 MB base64-encoded)."""
MIME_OVERHEAD = 64 * 1024
DEFAULT_SUBJECT = "Conversation EIMIS"


def file_limit_for(size_limit: int) -> int:
    """The largest file a mail of at most ``size_limit`` bytes carries (base64: 4/3, headers)."""
    return max(0, (size_limit - MIME_OVERHEAD) * 3 // 4)


def _files(limit: int) -> dict[str, FileLimit]:
    return {"m.image": FileLimit(limit), "m.file": FileLimit(limit)}


class MssanteConnector(Connector):
    """A thread per portal, over the bridge's MSSanté mailbox: plain text and files, no replies,
    edits, reactions, typing or receipts yet (the bridge degrades them)."""

    type_name: ClassVar[str] = "mssante"
    Settings: ClassVar[type[BaseModel]] = MssanteSettings
    capabilities: ClassVar[Capabilities] = Capabilities(
        formatting="plain", files=_files(DEFAULT_FILE_LIMIT), replies=False
    )

    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0

    def __init__(self, ctx: ConnectorContext, *, tokens: TokenSource | None = None) -> None:
        super().__init__(ctx)
        self.settings = _settings(ctx.settings)
        self._http = LazySession(aiohttp.ClientTimeout(total=self.settings.timeout_s))
        source = tokens or PscTokenSource(
            self.settings.token_url, self.settings.token_idnps, self._http
        )
        self.tokens = CachedToken(source)
        self.threads = ThreadStore(ctx.store)
        self.sender = SmtpSender(self.settings.server("smtp"), self.settings.mailbox, self.tokens)
        self.refused: Counter[str] = Counter()
        """Mail refused since start, by reason (``untrusted_domain``, ``unknown_sender`` ...)."""
        self.receipts: Counter[str] = Counter()
        self._reader: ImapReader | None = None
        self._task: asyncio.Task[None] | None = None
        self._send_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    # Lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start reading the mailbox from the stored cursor (in the background)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(
                self._read_forever(), name=f"mssante-read-{self.ctx.connector_id}"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        reader, self._reader = self._reader, None
        if reader is not None:
            await reader.close(logout=False)
        await self._http.close()

    @property
    def reading(self) -> bool:
        return self._task is not None and not self._task.done()

    # Bridge -> mail -----------------------------------------------------------------------------

    async def create_conversation(self, conversation: NewConversation) -> str:
        """A thread for the portal; no mail yet (the first message opens it in the mailboxes)."""
        known = await self.threads.conversation_for(conversation.request_id)
        if known is not None:
            return known
        participants: list[tuple[str, str]] = []
        for idnps in conversation.members:
            boxes = list(await self.ctx.directory.mailboxes_of(idnps))
            if not boxes:
                raise ConnectorError(
                    f"MSSanté: the directory lists no mailbox for {idnps}", retriable=False
                )
            participants.append((str(idnps), boxes[0].lower()))
        if not participants:
            raise ConnectorError("MSSanté: a conversation needs a professional", retriable=False)
        thread = Thread(new_token(), conversation.title or DEFAULT_SUBJECT, participants)
        await self.threads.save(thread)
        await self.threads.remember_conversation(conversation.request_id, thread.token)
        return thread.token

    async def send_message(self, conversation_id: str, message: OutboundMessage) -> str:
        """One mail to the thread's participants; returns its Message-ID (idempotent)."""
        # One send at a time per thread (its Message-ID list), threads in parallel.
        lock = self._send_locks.get(conversation_id)
        if lock is None:
            lock = self._send_locks[conversation_id] = asyncio.Lock()
        async with lock:
            return await self._send(conversation_id, message)

    async def _send(self, conversation_id: str, message: OutboundMessage) -> str:
        record = await self.threads.send_record(message.request_id)
        if record is not None and record.sent:
            return record.message_id
        thread = await self.threads.get(conversation_id)
        if thread is None:
            raise ConnectorError("MSSanté: unknown conversation", retriable=False)
        domain = self.settings.mailbox.rpartition("@")[2]
        message_id = record.message_id if record is not None else make_msgid(domain=domain)
        attachments = []
        if message.attachment is not None:
            attachments.append(await self._read_attachment(message.attachment))
        previous = [m for m in thread.message_ids if m != message_id]
        try:
            mail = build_outgoing(
                mailbox=self.settings.mailbox,
                sender=(message.sender.display_name, "", None),
                to=thread.addresses,
                subject=("Re: " if previous else "") + thread.subject,
                text=message.text,
                reply_to=self.settings.reply_address(thread.token),
                message_id=message_id,
                in_reply_to=previous[-1] if previous else None,
                references=previous,
                nil=self.settings.x_mss_nil,
                mdn_to=self.settings.mailbox if self.settings.request_mdn else None,
                attachments=attachments,
            )
        except ValueError as exc:
            raise ConnectorError(
                f"MSSanté: the mail cannot be built ({exc})", retriable=False
            ) from None
        await self.threads.record_send(message.request_id, SendRecord(message_id, sent=False))
        try:
            await self.sender.send(mail, envid=message_id.strip("<>")[:100])
        except smtp_mod.TooLarge as exc:
            raise ConnectorError(f"MSSanté: {exc}", retriable=False) from None
        except smtp_mod.TokenRefused as exc:
            raise ConnectorError(
                f"MSSanté: {exc}", retriable=True, credentials_rejected=True
            ) from None
        except smtp_mod.Unreachable as exc:
            raise ConnectorError(f"MSSanté: {exc}", retriable=True, unreachable=True) from None
        except smtp_mod.SendRefused as exc:
            transient = exc.code is not None and 400 <= exc.code < 500
            raise ConnectorError(f"MSSanté: {exc}", retriable=transient) from None
        except smtp_mod.SmtpError as exc:
            raise ConnectorError(f"MSSanté: {exc}", retriable=False) from None
        finally:
            self._learn_size()
        await self.threads.record_send(message.request_id, SendRecord(message_id, sent=True))
        thread.add_message_id(message_id)
        await self.threads.save(thread)
        return message_id

    def _learn_size(self) -> None:
        """The operator's SIZE (last EHLO) becomes this instance's file limits."""
        size = self.sender.size_limit
        if size is not None:
            limit = file_limit_for(size)
            self.capabilities = replace(type(self).capabilities, files=_files(limit))

    def _file_limit(self) -> int:
        size = self.sender.size_limit
        return file_limit_for(size) if size is not None else DEFAULT_FILE_LIMIT

    async def _read_attachment(self, attachment: OutboundAttachment) -> OutgoingAttachment:
        limit = self._file_limit()
        if attachment.size > limit:
            raise ConnectorError(
                f"MSSanté: the file is {attachment.size} bytes, over the {limit} a mail carries",
                retriable=False,
            )
        chunks: list[bytes] = []
        total = 0
        async with attachment.open() as stream:
            async for chunk in stream:
                total += len(chunk)
                if total > limit:
                    raise ConnectorError(
                        f"MSSanté: the file is over the {limit} bytes a mail carries",
                        retriable=False,
                    )
                chunks.append(chunk)
        return OutgoingAttachment(attachment.name, attachment.mime_type, b"".join(chunks))

    async def get_user(self, idnps: Idnps) -> RemoteUser | None:
        """The professional, when the directory lists a mailbox for them."""
        if not list(await self.ctx.directory.mailboxes_of(idnps)):
            return None
        return await self.ctx.directory.describe(idnps)

    async def probe(self) -> str:
        """Authenticate on SMTP (no mail sent) and on IMAP (INBOX selected)."""
        try:
            client = await self.sender._authenticated(0)  # noqa: SLF001 (same package)
            await smtp_mod._close(client)  # noqa: SLF001
            self._learn_size()
            reader = self._new_reader()
            try:
                await reader.connect()
            finally:
                await reader.close()
        except (smtp_mod.TokenRefused, imap_mod.TokenRefused) as exc:
            raise ConnectorError(
                f"MSSanté: {exc}", retriable=True, credentials_rejected=True
            ) from None
        except (smtp_mod.Unreachable, imap_mod.Unreachable) as exc:
            raise ConnectorError(f"MSSanté: {exc}", retriable=True, unreachable=True) from None
        except (smtp_mod.SmtpError, imap_mod.ImapError) as exc:
            raise ConnectorError(f"MSSanté: {exc}", retriable=False) from None
        size = self.sender.size_limit
        return (
            f"SMTP and IMAP accept the mailbox's token (SIZE {size if size else 'not announced'})"
        )

    # Mail -> bridge -----------------------------------------------------------------------------

    def _new_reader(self) -> ImapReader:
        return ImapReader(
            self.settings.server("imap"),
            self.settings.mailbox,
            self.tokens,
            poll_interval_s=min(self.settings.poll_interval_s, 30.0),
        )

    async def _read_forever(self) -> None:
        backoff = Backoff(self.backoff_initial_s, self.backoff_max_s)
        failures = 0
        while True:
            try:
                await self._read_session()
            except asyncio.CancelledError:
                raise
            except (imap_mod.ImapError, ConnectorError, ValueError) as exc:
                failures += 1
                # Our own errors' texts; a ValueError (a library's parsing) may quote data.
                said = (
                    exc
                    if isinstance(exc, (imap_mod.ImapError, ConnectorError))
                    else type(exc).__name__
                )
                self.log.warning(
                    "mssante %s: reading the mailbox failed (%s); again in a while",
                    self.ctx.connector_id,
                    said,
                )
            except Exception as exc:  # a storage error ...: its type only (may quote data)
                failures += 1
                self.log.error(
                    "mssante %s: reading the mailbox failed (%s)",
                    self.ctx.connector_id,
                    type(exc).__name__,
                )
            reader, self._reader = self._reader, None
            if reader is not None:
                await reader.close(logout=False)
            await asyncio.sleep(backoff.delay(max(1, failures)))

    async def _read_session(self) -> None:
        reader = self._new_reader()
        self._reader = reader
        await reader.connect()
        folder = self.settings.move_folder
        if folder is not None:
            with contextlib.suppress(Exception):  # exists already: NO, fine
                await reader.client.create(folder)
        resume = reader.resume(await self.ctx.store.get(CURSOR_KEY))
        if resume.uidvalidity_changed:
            self.log.warning(
                "mssante %s: the mailbox's UIDVALIDITY changed: reading it again (the bridge "
                "skips events it already has)",
                self.ctx.connector_id,
            )
        last = resume.last_uid
        while True:
            async for uid, raw in reader.fetch_since(last):
                await self._handle(uid, raw)
                await self.ctx.store.set(CURSOR_KEY, reader.cursor(uid))
                last = uid
                await self._dispose(reader, uid)
            await reader.idle_wait(self.settings.poll_interval_s)

    async def _dispose(self, reader: ImapReader, uid: int) -> None:
        folder = self.settings.move_folder
        if folder is None:
            await reader.expunge(uid)
        else:
            await reader.move(uid, folder)

    def _refuse(self, reason: str, uid: int, detail: str = "") -> None:
        self.refused[reason] += 1
        self.log.warning(
            "mssante %s: mail uid %d refused (%s)%s",
            self.ctx.connector_id,
            uid,
            reason,
            f": {detail}" if detail else "",
        )

    async def _handle(self, uid: int, raw: bytes | TooLargeMail) -> None:
        """Emit what this mail is to the bridge (or refuse it); returns once emitted."""
        if isinstance(raw, TooLargeMail):
            self._refuse("too_large", uid, f"{raw.size} bytes")
            return
        receipt = parse_receipt(raw)
        if receipt is not None:
            kind = "dsn" if isinstance(receipt, Dsn) else "mdn"
            self.receipts[kind] += 1
            self.log.info("mssante %s: a %s received (not mapped yet)", self.ctx.connector_id, kind)
            return
        mail = parse_incoming(raw)
        if isinstance(mail, MailError):
            self._refuse("unreadable", uid, mail.reason)
            return
        sender = mail.sender.lower()
        if sender == self.settings.mailbox:
            self._refuse("own_mail", uid)
            return
        if sender.rpartition("@")[2] not in self.settings.trusted_domains:
            self._refuse("untrusted_domain", uid)
            return
        idnps = await self.ctx.directory.idnps_for_mailbox(sender)
        if idnps is None:
            self._refuse("unknown_sender", uid)
            return
        message_id = mail.message_id or f"<uid-{self._uidvalidity()}-{uid}@mssante.invalid>"
        when = _date(raw)
        thread = await self._thread_of(mail)
        events: list[RemoteEvent] = []
        if thread is None:
            if not self._to_bridge(mail):
                self._refuse("not_for_bridge", uid)
                return
            thread, created = await self._new_thread(mail, Idnps(idnps), message_id, when)
            events.append(created)
        elif not thread.has(idnps):
            self._refuse("not_a_participant", uid)
            return
        thread.add_message_id(message_id)
        await self.threads.save(thread)
        events.append(
            MessageReceived(
                event_id=f"mail:{_digest(message_id)}",
                conversation_id=thread.token,
                timestamp=when,
                message_id=message_id,
                sender=Idnps(idnps),
                text=_text_of(mail),
            )
        )
        await self.ctx.emit_many(events)

    def _uidvalidity(self) -> int:
        if self._reader is None or self._reader.uidvalidity is None:
            return 0
        return self._reader.uidvalidity

    async def _thread_of(self, mail: IncomingMail) -> Thread | None:
        local, domain = self.settings.reply_parts
        for address in mail.recipients:
            box, _, dom = address.lower().rpartition("@")
            base, plus, token = box.partition("+")
            if plus and base == local and dom == domain and is_token(token):
                thread = await self.threads.get(token)
                if thread is not None:
                    return thread
        for message_id in (mail.in_reply_to, *reversed(mail.references)):
            if message_id:
                thread = await self.threads.by_message_id(message_id)
                if thread is not None:
                    return thread
        return None

    def _to_bridge(self, mail: IncomingMail) -> bool:
        local, domain = self.settings.reply_parts
        reply_base = f"{local}@{domain}"
        return any(
            a.lower() in (self.settings.mailbox, reply_base)
            or (a.lower().startswith(f"{local}+") and a.lower().endswith(f"@{domain}"))
            for a in mail.recipients
        )

    async def _new_thread(
        self, mail: IncomingMail, creator: Idnps, message_id: str, when: datetime
    ) -> tuple[Thread, ConversationCreated]:
        """The thread a mail to the bridge opens: its token derives from the Message-ID (a mail
        read twice opens the same one); its people are the sender and the recipients the
        directory knows (the bridge's own addresses left out)."""
        token = hashlib.sha256(f"{self.ctx.connector_id}\n{message_id}".encode()).hexdigest()[:16]
        existing = await self.threads.get(token)
        if existing is not None:
            thread = existing
        else:
            people = [(str(creator), mail.sender.lower())]
            local, domain = self.settings.reply_parts
            for address in mail.recipients:
                address = address.lower()
                box, _, dom = address.rpartition("@")
                if address == self.settings.mailbox or (
                    dom == domain and box.partition("+")[0] == local
                ):
                    continue
                if dom not in self.settings.trusted_domains:
                    continue
                other = await self.ctx.directory.idnps_for_mailbox(address)
                if other is not None and all(o != str(other) for o, _ in people):
                    people.append((str(other), address))
            thread = Thread(token, mail.subject or DEFAULT_SUBJECT, people)
        members = []
        for who, _ in thread.participants:
            with contextlib.suppress(InvalidIdnps):
                members.append(Idnps(who))
        created = ConversationCreated(
            event_id=f"thread:{_digest(message_id)}",
            conversation_id=thread.token,
            timestamp=when,
            creator=creator,
            members=tuple(members),
            participants=(),
            title=mail.subject or None,
        )
        return thread, created


def _digest(message_id: str) -> str:
    return hashlib.sha256(message_id.lower().encode()).hexdigest()[:32]


def _date(raw: bytes) -> datetime:
    try:
        value = BytesHeaderParser().parsebytes(raw).get("Date")
        if value:
            when = parsedate_to_datetime(str(value))
            return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    except (TypeError, ValueError, IndexError):
        pass
    return datetime.now(UTC)


def _text_of(mail: IncomingMail) -> str:
    text = mail.text
    files = len(mail.attachments) + len(mail.refused)
    if files:
        note = f"[{files} pièce(s) jointe(s) non transmise(s) par la passerelle]"
        text = f"{text}\n\n{note}" if text else note
    return text


def _settings(settings: BaseModel) -> MssanteSettings:
    if isinstance(settings, MssanteSettings):
        return settings
    return MssanteSettings.model_validate(settings.model_dump())
