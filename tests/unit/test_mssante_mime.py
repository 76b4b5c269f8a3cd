"""Mail out (From naming the real sender, thread headers, X-MSS-NIL, MDN request, UTF-8,
attachments) and mail in (addresses, XDM subject, text from plain or HTML, attachments and
their limits, malformed MIME as an error object)."""

from __future__ import annotations

from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

import pytest

from connectors.mssante.mime import (
    IncomingMail,
    Limits,
    MailError,
    OutgoingAttachment,
    build_outgoing,
    clean_header_text,
    html_to_text,
    parse_incoming,
    sender_display_name,
)

BRIDGE = "eimis@bridge.mssante.test"


def build(**overrides) -> EmailMessage:
    args = dict(
        mailbox=BRIDGE,
        sender=("Claire", "Martin", "Infirmière"),
        to=["dr.durand@medecin.mssante.test"],
        subject="Suivi de Mme X",
        text="Bonjour docteur, voici les résultats.",
        reply_to="portal-abc@bridge.mssante.test",
        nil="EIMIS-0001",
    )
    args.update(overrides)
    return build_outgoing(**args)


def reparse(msg: EmailMessage) -> EmailMessage:
    return BytesParser(policy=policy.default).parsebytes(msg.as_bytes())  # type: ignore[return-value]


def test_from_names_the_real_sender_via_eimis_rfc2047_encoded() -> None:
    raw = build().as_bytes()
    assert raw.isascii()  # 7-bit on the wire
    assert b"=?utf-8?" in raw.split(b"\r\n\r\n")[0]
    got = reparse(build())
    assert got["From"].addresses[0].display_name == "Claire MARTIN - Infirmière via EIMIS"
    assert got["From"].addresses[0].addr_spec == BRIDGE
    assert str(got["Reply-To"]) == "portal-abc@bridge.mssante.test"
    assert str(got["X-MSS-NIL"]) == "EIMIS-0001"
    assert str(got["Message-ID"]).endswith("@bridge.mssante.test>")
    assert "Disposition-Notification-To" not in got
    assert got.get_body(("plain",)).get_content().strip() == "Bonjour docteur, voici les résultats."


@pytest.mark.parametrize(
    "given, family",
    [
        ("Eve\r\nBcc: victim@example.org", "X"),
        ("Eve", "X\nSubject: pwned"),
        ("Eve\x00\x1b[31m", "X\u2028Bcc: a@b.c"),
    ],
)
def test_header_injection_in_a_display_name_is_neutralised(given: str, family: str) -> None:
    msg = build(sender=(given, family, "Médecin\r\nX-Evil: 1"))
    head = msg.as_bytes().split(b"\r\n\r\n")[0]
    got = reparse(msg)
    assert "Bcc" not in got and "X-Evil" not in got and got["Subject"] == "Suivi de Mme X"
    assert b"\r\nBcc:" not in head and b"\r\nX-Evil:" not in head
    name = got["From"].addresses[0].display_name
    assert "\n" not in name and "\r" not in name and "\x00" not in name


def test_clean_header_text_and_display_name_rules() -> None:
    assert clean_header_text("a\r\n\tb\x00c  d") == "a b c d"
    assert sender_display_name("Jean", "Dupont", None) == "Jean DUPONT via EIMIS"
    assert sender_display_name("", "", "") == "via EIMIS"


def test_thread_headers_mdn_html_and_attachments() -> None:
    msg = build(
        message_id="<out-1@bridge.mssante.test>",
        in_reply_to="<m1@medecin.mssante.test>",
        references=["<m0@medecin.mssante.test>"],
        mdn_to=BRIDGE,
        html="<p>Bonjour <b>docteur</b></p>",
        attachments=[
            OutgoingAttachment("résultats.pdf", "application/pdf", b"%PDF-1.4 data"),
            OutgoingAttachment("photo.png", "image/png", b"\x89PNG..."),
        ],
        extra_headers=[("X-MSS-CODECDA", "11502-2")],
    )
    got = reparse(msg)
    assert got["Message-ID"] == "<out-1@bridge.mssante.test>"
    assert got["In-Reply-To"] == "<m1@medecin.mssante.test>"
    assert got["References"].split() == ["<m0@medecin.mssante.test>", "<m1@medecin.mssante.test>"]
    assert got["Disposition-Notification-To"] == BRIDGE
    assert got["X-MSS-CODECDA"] == "11502-2"
    assert got.get_body(("html",)).get_content().strip() == "<p>Bonjour <b>docteur</b></p>"
    files = {p.get_filename(): p.get_content() for p in got.iter_attachments()}
    assert files == {"résultats.pdf": b"%PDF-1.4 data", "photo.png": b"\x89PNG..."}


def test_bad_ids_and_addresses_are_refused() -> None:
    with pytest.raises(ValueError):
        build(in_reply_to="not-an-id")
    with pytest.raises(ValueError):
        build(to=["nobody"])
    with pytest.raises(ValueError):
        build(to=[])
    with pytest.raises(ValueError):
        build(extra_headers=[("Bad Name:", "x")])


# --- incoming ---------------------------------------------------------------------------------


def incoming(**overrides) -> bytes:
    msg = build(**overrides)
    del msg["From"]
    msg["From"] = "Dr Paul Durand <dr.durand@medecin.mssante.test>"
    return msg.as_bytes()


def test_a_round_trip_reads_everything() -> None:
    raw = incoming(
        subject="XDM/1.0/DDM+CR d'examens biologiques VIAL Paul 26/11/1978",
        in_reply_to="<out-1@bridge.mssante.test>",
        mdn_to="dr.durand@medecin.mssante.test",
        attachments=[OutgoingAttachment("IHE_XDM.zip", "application/zip", b"PK..")],
    )
    got = parse_incoming(raw)
    assert isinstance(got, IncomingMail)
    assert (got.sender, got.sender_name) == ("dr.durand@medecin.mssante.test", "Dr Paul Durand")
    assert got.recipients == ("dr.durand@medecin.mssante.test",)
    assert got.subject == "CR d'examens biologiques VIAL Paul 26/11/1978" and got.xdm_subject
    assert got.in_reply_to == "<out-1@bridge.mssante.test>"
    assert got.references == ("<out-1@bridge.mssante.test>",)
    assert got.text == "Bonjour docteur, voici les résultats."
    assert [(a.filename, a.mime_type, a.data) for a in got.attachments] == [
        ("IHE_XDM.zip", "application/zip", b"PK..")
    ]
    assert got.mdn_to == "dr.durand@medecin.mssante.test"
    assert "résultats" not in repr(got)  # content stays out of reprs (and so of logs)


def test_html_only_mail_is_turned_into_text_with_quotes_kept() -> None:
    raw = (
        b"From: a@b.fr\r\nTo: c@d.fr\r\nSubject: Re: x\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/html; charset=utf-8\r\n\r\n"
        b"<html><head><style>p{}</style></head><body><p>Merci&nbsp;!</p>"
        b"<p>Ligne 1<br>Ligne 2</p><blockquote><p>Le message d'avant</p></blockquote>"
        b"<script>alert(1)</script></body></html>"
    )
    got = parse_incoming(raw)
    assert isinstance(got, IncomingMail)
    assert got.text == "Merci !\nLigne 1\nLigne 2\n> Le message d'avant"


def test_html_to_text_lists_and_nesting() -> None:
    text = html_to_text(
        "<ul><li>un</li><li>deux</li></ul><blockquote>a<blockquote>b</blockquote></blockquote>"
    )
    assert text == "- un\n- deux\n> a\n> > b"


def test_attachment_limits_list_what_was_refused() -> None:
    attachments = [
        OutgoingAttachment(f"f{n}.bin", "application/octet-stream", b"x" * 100) for n in range(4)
    ]
    raw = incoming(attachments=attachments)
    got = parse_incoming(raw, Limits(max_attachments=2))
    assert isinstance(got, IncomingMail)
    assert [a.filename for a in got.attachments] == ["f0.bin", "f1.bin"]
    assert [(r.filename, r.reason) for r in got.refused] == [
        ("f2.bin", "too many attachments"),
        ("f3.bin", "too many attachments"),
    ]
    got = parse_incoming(raw, Limits(max_attachments_bytes=250))
    assert isinstance(got, IncomingMail)
    assert len(got.attachments) == 2 and {r.reason for r in got.refused} == {
        "attachments too large"
    }


def test_a_mail_over_the_size_limit_is_an_error() -> None:
    got = parse_incoming(b"x" * 2000, Limits(max_bytes=1000))
    assert isinstance(got, MailError) and "over the 1000" in got.reason


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"To: c@d.fr\r\nSubject: x\r\n\r\nbody", "no readable sender"),
        (
            b"From: a@b.fr\r\nMessage-ID: <bad@b.fr>\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed\r\n\r\n--x\r\nContent-Type: text/plain\r\n\r\nhi\r\n",
            "malformed MIME",
        ),
        (
            b"From: a@b.fr\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=zz\r\n"
            b"\r\nno boundary ever\r\n",
            "malformed MIME",
        ),
        (b"\xff\xfe\x00garbage", "no readable sender"),
    ],
)
def test_malformed_mail_gives_an_error_object(raw: bytes, reason: str) -> None:
    got = parse_incoming(raw)
    assert isinstance(got, MailError) and reason in got.reason


def test_malformed_mail_keeps_what_identifies_it() -> None:
    raw = (
        b"From: a@b.fr\r\nMessage-ID: <bad@b.fr>\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed\r\n\r\nbody\r\n"
    )
    got = parse_incoming(raw)
    assert isinstance(got, MailError)
    assert (got.message_id, got.sender) == ("<bad@b.fr>", "a@b.fr")


def test_a_plain_non_mime_mail_is_read() -> None:
    got = parse_incoming(
        b"From: a@b.fr\r\nTo: c@d.fr\r\nSubject: =?utf-8?q?R=C3=A9ponse?=\r\n\r\nOui.\r\n"
    )
    assert isinstance(got, IncomingMail)
    assert (got.subject, got.text, got.xdm_subject, got.attachments) == (
        "Réponse",
        "Oui.",
        False,
        (),
    )
