"""DSN (RFC 3464) and MDN (RFC 8098): reading them, and building the MDN the bridge answers."""

from __future__ import annotations

import pytest

from connectors.mssante.receipts import Dsn, Mdn, build_mdn, parse_receipt

DSN_FAILED = b"""From: MAILER-DAEMON@relay.mssante.test\r
To: eimis@bridge.mssante.test\r
Subject: Undelivered Mail Returned to Sender\r
MIME-Version: 1.0\r
Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r
\r
--B\r
Content-Type: text/plain\r
\r
Your message could not be delivered.\r
--B\r
Content-Type: message/delivery-status\r
\r
Reporting-MTA: dns; relay.mssante.test\r
Original-Envelope-Id: out-42\r
Arrival-Date: Mon, 1 Jan 2024 10:00:00 +0100\r
\r
Final-Recipient: rfc822; dr.absent@medecin.mssante.test\r
Original-Recipient: rfc822;dr.absent@medecin.mssante.test\r
Action: failed\r
Status: 5.1.1\r
Diagnostic-Code: smtp; 550 5.1.1 <dr.absent@medecin.mssante.test>: Recipient address\r
 rejected: User unknown\r
\r
Final-Recipient: rfc822; dr.durand@medecin.mssante.test\r
Action: delivered\r
Status: 2.0.0\r
--B\r
Content-Type: text/rfc822-headers\r
\r
From: "Claire MARTIN - Infirmiere via EIMIS" <eimis@bridge.mssante.test>\r
Message-ID: <out-42@bridge.mssante.test>\r
Subject: Suivi\r
--B--\r
"""

MDN_DISPLAYED = b"""From: dr.durand@medecin.mssante.test\r
To: eimis@bridge.mssante.test\r
Subject: Read: Suivi\r
MIME-Version: 1.0\r
Content-Type: multipart/report; report-type=disposition-notification; boundary="M"\r
\r
--M\r
Content-Type: text/plain; charset=utf-8\r
\r
The message was displayed.\r
--M\r
Content-Type: message/disposition-notification\r
\r
Reporting-UA: Thunderbird\r
Final-Recipient: rfc822;dr.durand@medecin.mssante.test\r
Original-Message-ID: <out-42@bridge.mssante.test>\r
Disposition: manual-action/MDN-sent-manually; displayed\r
--M--\r
"""


def test_a_dsn_gives_each_recipient_its_fate() -> None:
    dsn = parse_receipt(DSN_FAILED)
    assert isinstance(dsn, Dsn)
    assert dsn.envelope_id == "out-42"
    assert dsn.original_message_id == "<out-42@bridge.mssante.test>"
    assert dsn.reporting_mta == "relay.mssante.test"
    failed, delivered = dsn.recipients
    assert (failed.recipient, failed.action, failed.status) == (
        "dr.absent@medecin.mssante.test",
        "failed",
        "5.1.1",
    )
    assert failed.failed and not failed.delivered
    assert failed.diagnostic is not None and "User unknown" in failed.diagnostic
    assert delivered.delivered and delivered.diagnostic is None


def test_a_dsn_returning_the_whole_message_gives_its_message_id() -> None:
    raw = DSN_FAILED.replace(b"Content-Type: text/rfc822-headers", b"Content-Type: message/rfc822")
    dsn = parse_receipt(raw)
    assert isinstance(dsn, Dsn) and dsn.original_message_id == "<out-42@bridge.mssante.test>"


def test_an_mdn_is_read() -> None:
    mdn = parse_receipt(MDN_DISPLAYED)
    assert isinstance(mdn, Mdn)
    assert mdn.original_message_id == "<out-42@bridge.mssante.test>"
    assert mdn.disposition_type == "displayed" and mdn.read and mdn.error is None
    assert mdn.final_recipient == "dr.durand@medecin.mssante.test"


def test_an_mdn_with_an_error_is_not_a_read() -> None:
    raw = MDN_DISPLAYED.replace(
        b"manual-action/MDN-sent-manually; displayed",
        b"automatic-action/MDN-sent-automatically; processed/Error: 12^Document illisible",
    )
    mdn = parse_receipt(raw)
    assert isinstance(mdn, Mdn) and not mdn.read and mdn.error == "Error: 12^Document illisible"


@pytest.mark.parametrize(
    "raw",
    [
        b"From: a@b.fr\r\nSubject: hi\r\n\r\nnot a report",
        b"From: a@b.fr\r\nContent-Type: multipart/report; report-type=other; boundary=x\r\n\r\n",
        b"From: a@b.fr\r\nContent-Type: multipart/report; report-type=delivery-status\r\n\r\n--",
        b"\x00\xff garbage",
    ],
)
def test_anything_else_is_not_a_receipt(raw: bytes) -> None:
    assert parse_receipt(raw) is None


def test_the_bridge_builds_an_mdn_that_reads_back() -> None:
    msg = build_mdn(
        mailbox="eimis@bridge.mssante.test",
        to="dr.durand@medecin.mssante.test",
        original_message_id="<m1@medecin.mssante.test>",
        original_subject="Résultats\r\nBcc: x@y.z",
    )
    raw = msg.as_bytes()
    assert raw.isascii() and b"\r\nBcc:" not in raw
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "disposition-notification"
    assert msg["In-Reply-To"] == "<m1@medecin.mssante.test>"
    mdn = parse_receipt(raw)
    assert isinstance(mdn, Mdn)
    assert mdn.original_message_id == "<m1@medecin.mssante.test>"
    assert mdn.disposition == "automatic-action/MDN-sent-automatically; processed"
    assert mdn.final_recipient == "eimis@bridge.mssante.test" and mdn.read
