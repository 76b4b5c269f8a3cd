"""Mail in and out, with the standard ``email`` package only.

``build_outgoing`` makes the mail the bridge sends for a message of a portal: From is the
bridge's mailbox with a display name naming the real sender (``"<Given> <FAMILY> -
<Profession> via EIMIS"``; control characters stripped so no header can be injected, RFC 2047
encoded when not ASCII), the portal's own Reply-To address, a Message-ID of the bridge's domain,
the thread's In-Reply-To/References, ``X-MSS-NIL`` (on every message), an MDN request when asked,
UTF-8 text (and an HTML alternative), attachments as MIME parts.

``parse_incoming`` reads a received mail into ``IncomingMail``, or ``MailError`` when it cannot
be read (malformed MIME, too large, no sender): no exception escapes it. The ``XDM/1.0/DDM+``
subject prefix is removed (and flagged); the text comes from text/plain, else from text/html
turned into text (quoted replies kept, as ``> `` lines); attachments beyond the count or total
size limits are listed in ``refused`` with the reason, never silently dropped.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from email import errors as email_errors
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.utils import getaddresses, make_msgid
from html.parser import HTMLParser

OUTGOING_POLICY = policy.SMTP.clone(cte_type="7bit")
"""CRLF lines, and 7-bit bodies (quoted-printable or base64): any operator accepts them."""
XDM_SUBJECT_PREFIX = "XDM/1.0/DDM+"
VIA = "via EIMIS"
_MSGID = re.compile(r"<[^<>\s]+>")


def clean_header_text(value: str, limit: int = 200) -> str:
    """``value`` made safe for one header: every control or line-separator character becomes a
    space (CR, LF, NUL, U+2028 ...), runs of spaces collapse, and it is cut to ``limit``."""
    out = "".join(" " if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") else c for c in value)
    return " ".join(out.split())[:limit]


def sender_display_name(given: str, family: str, profession: str | None) -> str:
    """``"<Given> <FAMILY> - <Profession> via EIMIS"`` (the profession part only when known)."""
    name = " ".join(p for p in (clean_header_text(given), clean_header_text(family).upper()) if p)
    prof = clean_header_text(profession or "")
    if prof:
        name = f"{name} - {prof}" if name else prof
    return clean_header_text(f"{name} {VIA}".strip(), 250)


@dataclass(frozen=True)
class OutgoingAttachment:
    filename: str
    mime_type: str
    data: bytes = field(repr=False)


def mail_address(address: str, display_name: str = "") -> Address:
    address = clean_header_text(address, 320)
    local, sep, domain = address.rpartition("@")
    if not sep or not local or not domain:
        raise ValueError("not a mail address")
    return Address(display_name=display_name, username=local, domain=domain)


def checked_message_id(value: str) -> str:
    value = clean_header_text(value, 998)
    if not _MSGID.fullmatch(value):
        raise ValueError("not a Message-ID (<id@domain>)")
    return value


def build_outgoing(
    *,
    mailbox: str,
    sender: tuple[str, str, str | None],
    to: Sequence[str],
    subject: str,
    text: str,
    reply_to: str | None = None,
    html: str | None = None,
    message_id: str | None = None,
    message_id_domain: str | None = None,
    in_reply_to: str | None = None,
    references: Sequence[str] = (),
    nil: str = "",
    mdn_to: str | None = None,
    attachments: Sequence[OutgoingAttachment] = (),
    extra_headers: Sequence[tuple[str, str]] = (),
) -> EmailMessage:
    """The mail for one message. ``sender`` is (given name, family name, profession) of the real
    author; ``mailbox`` the bridge's address it is sent from. ``message_id`` (``<id@domain>``) is
    made on ``message_id_domain`` (default: the mailbox's domain) when not given. ``mdn_to``
    asks for a read receipt (``Disposition-Notification-To``). ``extra_headers`` are MSSanté
    headers such as ``X-MSS-CODECDA``; their values are cleaned like every other."""
    msg = EmailMessage(policy=OUTGOING_POLICY)
    msg["From"] = mail_address(mailbox, sender_display_name(*sender))
    if not to:
        raise ValueError("no recipient")
    msg["To"] = [mail_address(a) for a in to]
    if reply_to:
        msg["Reply-To"] = mail_address(reply_to)
    msg["Subject"] = clean_header_text(subject, 900)
    domain = message_id_domain or mailbox.rpartition("@")[2]
    msg["Message-ID"] = checked_message_id(message_id) if message_id else make_msgid(domain=domain)
    if in_reply_to:
        msg["In-Reply-To"] = checked_message_id(in_reply_to)
    refs = [checked_message_id(r) for r in references]
    if in_reply_to and checked_message_id(in_reply_to) not in refs:
        refs.append(checked_message_id(in_reply_to))
    if refs:
        msg["References"] = " ".join(refs)
    msg["X-MSS-NIL"] = clean_header_text(nil, 200)
    if mdn_to:
        msg["Disposition-Notification-To"] = str(mail_address(mdn_to))
    for name, value in extra_headers:
        if not re.fullmatch(r"[A-Za-z0-9-]{1,76}", name):
            raise ValueError("bad header name")
        msg[name] = clean_header_text(value, 900)
    msg["MIME-Version"] = "1.0"
    msg.set_content(text, subtype="plain", charset="utf-8")
    if html is not None:
        msg.add_alternative(html, subtype="html", charset="utf-8")
    for att in attachments:
        maintype, _, subtype = att.mime_type.partition("/")
        if not maintype or not subtype:
            maintype, subtype = "application", "octet-stream"
        msg.add_attachment(
            att.data,
            maintype=maintype,
            subtype=subtype,
            filename=clean_header_text(att.filename, 200) or "file",
        )
    return msg


# --- Incoming ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 30 * 1024 * 1024
    """A raw mail larger than this is not parsed (``MailError``)."""
    max_attachments: int = 20
    max_attachments_bytes: int = 25 * 1024 * 1024
    max_text_chars: int = 200_000


@dataclass(frozen=True)
class IncomingAttachment:
    filename: str
    mime_type: str
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class RefusedAttachment:
    filename: str
    mime_type: str
    size: int
    reason: str


@dataclass(frozen=True)
class IncomingMail:
    sender: str
    sender_name: str
    recipients: tuple[str, ...]
    subject: str
    xdm_subject: bool
    """The subject had the ``XDM/1.0/DDM+`` prefix (removed from ``subject``)."""
    message_id: str | None
    in_reply_to: str | None
    references: tuple[str, ...]
    text: str = field(repr=False)
    attachments: tuple[IncomingAttachment, ...] = ()
    refused: tuple[RefusedAttachment, ...] = ()
    mdn_to: str | None = None
    """``Disposition-Notification-To``: the sender asked for a read receipt."""
    text_truncated: bool = False


@dataclass(frozen=True)
class MailError:
    """A mail that cannot be read, and why (a sentence without content)."""

    reason: str
    message_id: str | None = None
    sender: str | None = None


_FATAL_DEFECTS = (
    email_errors.NoBoundaryInMultipartDefect,
    email_errors.StartBoundaryNotFoundDefect,
    email_errors.MultipartInvariantViolationDefect,
)


def _all_defects(msg: Message) -> list[email_errors.MessageDefect]:
    found = []
    for part in msg.walk():
        found.extend(getattr(part, "defects", []))
    return found


def _header(msg: Message, name: str) -> str | None:
    value = msg.get(name)
    return None if value is None else clean_header_text(str(value), 998)


def _first_msgid(value: str | None) -> str | None:
    if not value:
        return None
    match = _MSGID.search(value)
    return match.group(0) if match else None


def _addresses(msg: Message, *names: str) -> list[tuple[str, str]]:
    values = [str(v) for n in names for v in (msg.get_all(n) or [])]
    return [(clean_header_text(n), a.strip()) for n, a in getaddresses(values) if "@" in a]


def parse_incoming(raw: bytes, limits: Limits = Limits()) -> IncomingMail | MailError:
    """Read one received mail. Never raises: a mail that cannot be read is a ``MailError``."""
    if len(raw) > limits.max_bytes:
        return MailError(f"the mail is {len(raw)} bytes, over the {limits.max_bytes} accepted")
    try:
        return _parse(raw, limits)
    except Exception as exc:  # the email package raises many types on broken input
        return MailError(f"the mail cannot be read ({type(exc).__name__})")


def _parse(raw: bytes, limits: Limits) -> IncomingMail | MailError:
    msg = BytesParser(policy=policy.default).parsebytes(raw)
    message_id = _first_msgid(_header(msg, "Message-ID"))
    senders = _addresses(msg, "From")
    if not senders:
        return MailError("the mail has no readable sender (From)", message_id)
    sender_name, sender = senders[0]
    fatal = [d for d in _all_defects(msg) if isinstance(d, _FATAL_DEFECTS)]
    if fatal:
        names = ", ".join(sorted({type(d).__name__ for d in fatal}))
        return MailError(f"malformed MIME structure ({names})", message_id, sender)

    subject = _header(msg, "Subject") or ""
    xdm = subject.upper().startswith(XDM_SUBJECT_PREFIX)
    if xdm:
        subject = subject[len(XDM_SUBJECT_PREFIX) :].strip()

    text, truncated = _text_of(msg, limits.max_text_chars)
    attachments: list[IncomingAttachment] = []
    refused: list[RefusedAttachment] = []
    total = 0
    for part in _attachment_parts(msg):
        name = clean_header_text(part.get_filename() or "", 200) or "attachment"
        ctype = part.get_content_type()
        data = part.get_payload(decode=True) or b""
        if len(attachments) >= limits.max_attachments:
            refused.append(RefusedAttachment(name, ctype, len(data), "too many attachments"))
        elif total + len(data) > limits.max_attachments_bytes:
            refused.append(RefusedAttachment(name, ctype, len(data), "attachments too large"))
        else:
            total += len(data)
            attachments.append(IncomingAttachment(name, ctype, data))

    mdn = _addresses(msg, "Disposition-Notification-To")
    return IncomingMail(
        sender=sender,
        sender_name=sender_name,
        recipients=tuple(a for _, a in _addresses(msg, "To", "Cc")),
        subject=subject,
        xdm_subject=xdm,
        message_id=message_id,
        in_reply_to=_first_msgid(_header(msg, "In-Reply-To")),
        references=tuple(_MSGID.findall(_header(msg, "References") or "")),
        text=text,
        attachments=tuple(attachments),
        refused=tuple(refused),
        mdn_to=mdn[0][1] if mdn else None,
        text_truncated=truncated,
    )


def _attachment_parts(msg: Message) -> list[Message]:
    """Every leaf part that is a file, at any depth: marked ``attachment``, named, or not text
    (an image inline in a multipart/related is a file too). The body's text parts are not."""
    if not msg.is_multipart():
        return []
    found = []
    for part in msg.walk():
        if part.is_multipart() or part is msg:
            continue
        disposition = part.get_content_disposition()
        if (
            disposition == "attachment"
            or part.get_filename()
            or part.get_content_maintype() not in ("text", "message")
        ):
            found.append(part)
    return found


def _text_of(msg: Message, max_chars: int) -> tuple[str, bool]:
    assert isinstance(msg, EmailMessage)
    body = msg.get_body(preferencelist=("plain",))
    text = None
    if body is not None:
        text = _decoded(body)
    else:
        body = msg.get_body(preferencelist=("html",))
        if body is not None:
            text = html_to_text(_decoded(body))
    text = (text or "").replace("\r\n", "\n").strip()
    if len(text) > max_chars:
        return text[:max_chars], True
    return text, False


def _decoded(part: Message) -> str:
    try:
        content = part.get_content()  # type: ignore[attr-defined]
        if isinstance(content, str):
            return content
    except (LookupError, UnicodeError, KeyError):
        pass
    payload = part.get_payload(decode=True) or b""
    return payload.decode(part.get_content_charset() or "utf-8", "replace")


# --- HTML to text (stdlib html.parser) -----------------------------------------------------------

_BLOCKS = {"p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol", "pre"}
_SKIP = {"script", "style", "head", "title"}


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = [""]
        self.quote = 0
        self.skip = 0

    def _newline(self) -> None:
        if self.lines[-1].strip():
            self.lines.append("")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            self.skip += 1
        elif tag == "br":
            self.lines.append("")
        elif tag == "blockquote":
            self._newline()
            self.quote += 1
        elif tag in _BLOCKS:
            self._newline()
        if tag == "li":
            self.lines[-1] += "- "

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag == "blockquote":
            self.quote = max(0, self.quote - 1)
            self._newline()
        elif tag in _BLOCKS:
            self._newline()

    def handle_data(self, data: str) -> None:
        if self.skip:
            return
        chunk = " ".join(data.split())
        if not chunk:
            return
        line = self.lines[-1]
        prefix = "> " * self.quote
        if not line:
            self.lines[-1] = prefix + chunk
        else:
            self.lines[-1] = line + ("" if line.endswith(" ") else " ") + chunk


def html_to_text(html: str) -> str:
    """Readable text from HTML: blocks and ``<br>`` become lines, ``<blockquote>`` (a quoted
    reply) becomes ``> `` lines, scripts and styles are dropped, entities decoded."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    out: list[str] = []
    for line in parser.lines:
        line = line.rstrip()
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip()
