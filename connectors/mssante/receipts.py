"""Delivery and read receipts: DSN (RFC 3464) and MDN (RFC 8098), with the ``email`` package.

``parse_receipt(raw)`` reads a ``multipart/report`` mail into a ``Dsn`` (per recipient: Action,
Status, Diagnostic-Code; the Original-Envelope-Id the bridge gave as ``ENVID`` and the original
Message-ID from the returned headers) or an ``Mdn`` (Disposition, Original-Message-ID), or
returns None for any other mail. It never raises. ``build_mdn`` makes the answer to a mail that
asked for one (``Disposition-Notification-To``): ``multipart/report;
report-type=disposition-notification``, ``automatic-action/MDN-sent-automatically; processed``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage, Message
from email.mime.nonmultipart import MIMENonMultipart
from email.parser import BytesParser, HeaderParser
from email.utils import formatdate, make_msgid
from typing import Literal

from connectors.mssante.mime import (
    OUTGOING_POLICY,
    checked_message_id,
    clean_header_text,
    mail_address,
)

_MSGID = re.compile(r"<[^<>\s]+>")

DsnAction = Literal["failed", "delayed", "delivered", "relayed", "expanded"]


@dataclass(frozen=True)
class DsnRecipient:
    recipient: str
    """The Final-Recipient address (``rfc822;`` removed), or Original-Recipient when absent."""
    action: str
    status: str
    diagnostic: str | None

    @property
    def delivered(self) -> bool:
        return self.action in ("delivered", "relayed", "expanded")

    @property
    def failed(self) -> bool:
        return self.action == "failed"


@dataclass(frozen=True)
class Dsn:
    envelope_id: str | None
    original_message_id: str | None
    recipients: tuple[DsnRecipient, ...]
    reporting_mta: str | None = None


@dataclass(frozen=True)
class Mdn:
    original_message_id: str | None
    disposition: str
    """The whole Disposition field, e.g. ``manual-action/MDN-sent-manually; displayed``."""
    disposition_type: str
    """``displayed``, ``processed``, ``deleted`` ... (the word after ``;``, before any ``/``)."""
    final_recipient: str | None
    error: str | None = None

    @property
    def read(self) -> bool:
        return self.disposition_type in ("displayed", "processed") and not self.error


def _field_blocks(part: Message) -> list[dict[str, str]]:
    """The header-style field groups of a message/delivery-status or
    message/disposition-notification part (names lower-cased, values unfolded)."""
    payload = part.get_payload()
    texts: list[str] = []
    if isinstance(payload, list):
        for sub in payload:
            if isinstance(sub, Message):
                texts.append("".join(f"{k}: {v}\n" for k, v in sub.items()))
    elif isinstance(payload, str):
        texts.extend(re.split(r"\r?\n\s*\r?\n", payload))
    blocks = []
    for text in texts:
        if not text.strip():
            continue
        headers = HeaderParser(policy=policy.compat32).parsestr(text.strip() + "\n")
        block = {k.lower(): " ".join(str(v).split()) for k, v in headers.items()}
        if block:
            blocks.append(block)
    return blocks


def _address_field(value: str | None) -> str | None:
    if not value:
        return None
    _, sep, addr = value.partition(";")
    return clean_header_text(addr if sep else value).strip() or None


def _original_message_id(report: Message) -> str | None:
    for part in report.walk():
        ctype = part.get_content_type()
        if ctype in ("message/rfc822", "message/rfc822-headers", "text/rfc822-headers"):
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                value = payload[0].get("Message-ID")
            else:
                raw = part.get_payload(decode=True) or b""
                value = HeaderParser().parsestr(raw.decode("utf-8", "replace")).get("Message-ID")
            if value:
                match = _MSGID.search(str(value))
                if match:
                    return match.group(0)
    return None


def parse_receipt(raw: bytes) -> Dsn | Mdn | None:
    """A DSN, an MDN, or None (not a receipt, or one that cannot be read)."""
    try:
        msg = BytesParser(policy=policy.default).parsebytes(raw)
        if msg.get_content_type() != "multipart/report":
            return None
        report_type = (msg.get_param("report-type") or "").lower()
        if report_type == "delivery-status":
            return _dsn(msg)
        if report_type == "disposition-notification":
            return _mdn(msg)
    except Exception:  # malformed reports are "not a receipt" for the caller
        return None
    return None


def _dsn(msg: Message) -> Dsn | None:
    part = next((p for p in msg.walk() if p.get_content_type() == "message/delivery-status"), None)
    if part is None:
        return None
    blocks = _field_blocks(part)
    if not blocks:
        return None
    head, per_recipient = blocks[0], blocks[1:]
    recipients = []
    for block in per_recipient:
        recipient = _address_field(block.get("final-recipient") or block.get("original-recipient"))
        if not recipient or "action" not in block:
            continue
        recipients.append(
            DsnRecipient(
                recipient=recipient,
                action=block["action"].lower(),
                status=block.get("status", ""),
                diagnostic=_address_field(block.get("diagnostic-code")),
            )
        )
    envid = head.get("original-envelope-id")
    return Dsn(
        envelope_id=envid.strip() if envid else None,
        original_message_id=_original_message_id(msg),
        recipients=tuple(recipients),
        reporting_mta=_address_field(head.get("reporting-mta")),
    )


def _mdn(msg: Message) -> Mdn | None:
    part = next(
        (p for p in msg.walk() if p.get_content_type() == "message/disposition-notification"),
        None,
    )
    if part is None:
        return None
    fields: dict[str, str] = {}
    for block in _field_blocks(part):
        fields.update(block)
    disposition = fields.get("disposition")
    if not disposition:
        return None
    _, _, kind = disposition.partition(";")
    kind, _, error = kind.strip().partition("/")
    original = fields.get("original-message-id")
    match = _MSGID.search(original or "") or _MSGID.search(_original_message_id(msg) or "")
    return Mdn(
        original_message_id=match.group(0) if match else None,
        disposition=disposition,
        disposition_type=kind.strip().lower(),
        final_recipient=_address_field(fields.get("final-recipient")),
        error=error.strip() or None,
    )


def build_mdn(
    *,
    mailbox: str,
    to: str,
    original_message_id: str,
    original_subject: str = "",
    reporting_ua: str = "EIMIS bridge",
    human_text: str | None = None,
) -> EmailMessage:
    """The MDN ``mailbox`` (the bridge's, the final recipient) sends to ``to`` (the address of
    the original's ``Disposition-Notification-To``): the mail was processed (delivered on
    Matrix). RFC 8098: multipart/report with a text part and message/disposition-notification."""
    original = checked_message_id(original_message_id)
    msg = EmailMessage(policy=OUTGOING_POLICY)
    msg["From"] = mail_address(mailbox)
    msg["To"] = mail_address(to)
    subject = clean_header_text(original_subject, 800)
    msg["Subject"] = f"Accusé de lecture : {subject}" if subject else "Accusé de lecture"
    msg["Message-ID"] = make_msgid(domain=mailbox.rpartition("@")[2])
    msg["Date"] = formatdate(localtime=False)
    msg["In-Reply-To"] = original
    msg["References"] = original
    msg["Auto-Submitted"] = "auto-replied"
    msg.set_content(
        human_text or "Votre message a été remis à son destinataire par la passerelle EIMIS.\n",
        charset="utf-8",
    )
    msg.make_mixed()
    msg.set_type("multipart/report")
    msg.set_param("report-type", "disposition-notification")
    notification = MIMENonMultipart("message", "disposition-notification", policy=OUTGOING_POLICY)
    ua = clean_header_text(reporting_ua, 200)
    notification.set_payload(
        f"Reporting-UA: {ua}\r\n"
        f"Final-Recipient: rfc822; {mail_address(mailbox).addr_spec}\r\n"
        f"Original-Message-ID: {original}\r\n"
        "Disposition: automatic-action/MDN-sent-automatically; processed\r\n"
    )
    msg.attach(notification)
    return msg
