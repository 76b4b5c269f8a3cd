"""Matrix content made fit for one vendor: formatting, limits, files, locations, degradation."""

from __future__ import annotations

import pytest

from bridge.config import MediaConfig
from bridge.core.degradation import (
    Undeliverable,
    check_file,
    file_ref,
    location,
    location_as_text,
    render_text,
    safe_filename,
)
from connectors.base import Capabilities, FileLimit

MARKDOWN = Capabilities(formatting="markdown", message_kinds=frozenset({"text", "emote"}))
PLAIN = Capabilities(
    formatting="plain",
    max_text_length=10,
    files={"m.file": FileLimit(1024, frozenset({"application/pdf"}))},
)
MEDIA = MediaConfig()


def html_message(html: str, body: str = "fallback", **extra: object) -> dict[str, object]:
    return {
        "msgtype": "m.text",
        "body": body,
        "format": "org.matrix.custom.html",
        "formatted_body": html,
        **extra,
    }


def test_html_becomes_markdown_for_a_markdown_vendor_without_notes() -> None:
    rendered = render_text(html_message("<b>5 mg</b> <i>le soir</i>"), MARKDOWN, "Dr X", "pl")
    assert rendered.parts == ["**5 mg** *le soir*"]
    assert rendered.notes == []


def test_html_becomes_plain_text_for_a_plain_vendor_and_the_sender_is_told() -> None:
    rendered = render_text(html_message("<b>5 mg</b>"), PLAIN, "Dr X", "mp")
    assert rendered.parts == ["5 mg"]
    assert any("texte brut" in note for note in rendered.notes)


def test_hostile_html_never_reaches_a_vendor() -> None:
    html = '<a href="javascript:alert(1)">x</a><script>steal()</script><img src=x onerror=y>'
    for caps in (MARKDOWN, PLAIN):
        text = " ".join(render_text(html_message(html), caps, "Dr X", "v").parts)
        assert "javascript" not in text and "steal" not in text and "onerror" not in text


def test_pills_become_at_names_and_are_listed() -> None:
    html = 'Voir <a href="https://matrix.to/#/@eimis_pl_810000001916:hs">Dr Y</a>'
    rendered = render_text(html_message(html), MARKDOWN, "Dr X", "pl")
    assert rendered.parts == ["Voir @Dr Y"]
    assert rendered.mention_mxids == ["@eimis_pl_810000001916:hs"]


def test_reply_fallbacks_are_stripped() -> None:
    content = html_message(
        "<mx-reply><blockquote>old</blockquote></mx-reply>new",
        body="> <@a:hs> old\n\nnew",
        **{"m.relates_to": {"m.in_reply_to": {"event_id": "$e"}}},
    )
    assert render_text(content, MARKDOWN, "Dr X", "pl").parts == ["new"]
    plain = {
        "msgtype": "m.text",
        "body": "> <@a:hs> old\n\nnew",
        "m.relates_to": {"m.in_reply_to": {"event_id": "$e"}},
    }
    assert render_text(plain, PLAIN, "Dr X", "mp").parts == ["new"]


def test_emote_is_written_out_where_the_vendor_has_none() -> None:
    content = {"msgtype": "m.emote", "body": "arrive"}
    assert render_text(content, Capabilities(), "Dr X", "mp").parts == ["* Dr X arrive"]
    assert render_text(content, MARKDOWN, "Dr X", "pl").parts == ["arrive"]


def test_long_text_is_split_or_refused_as_declared() -> None:
    content = {"msgtype": "m.text", "body": "un deux trois quatre"}
    rendered = render_text(content, PLAIN, "Dr X", "mp")
    assert all(len(part) <= 10 for part in rendered.parts) and len(rendered.parts) > 1
    assert any("découpé en" in note for note in rendered.notes)
    refusing = Capabilities(max_text_length=10, long_text="refuse")
    with pytest.raises(Undeliverable, match="10 au plus"):
        render_text(content, refusing, "Dr X", "mp")


@pytest.mark.parametrize("body", ["", "   ", "\n\n"])
def test_empty_messages_are_refused_with_a_reason(body: str) -> None:
    with pytest.raises(Undeliverable, match="vide"):
        render_text({"msgtype": "m.text", "body": body}, MARKDOWN, "Dr X", "pl")


def test_right_to_left_and_emoji_text_is_kept_exactly() -> None:
    text = "مرحبا שלום 👩🏽‍⚕️ 🇫🇷"
    assert render_text({"msgtype": "m.text", "body": text}, MARKDOWN, "X", "pl").parts == [text]


def file_content(mime: str, size: int, name: str = "scan.pdf") -> dict[str, object]:
    return {
        "msgtype": "m.file",
        "body": name,
        "url": "mxc://hs/abc",
        "info": {"mimetype": mime, "size": size},
    }


def test_files_within_every_limit_pass_with_the_tightest_ceiling() -> None:
    ref = file_ref(file_content("application/pdf", 100))
    assert ref is not None
    assert check_file(ref, PLAIN, "mp", MEDIA.max_file_size, MEDIA.allows) == 1024


@pytest.mark.parametrize(
    ("mime", "size", "reason"),
    [
        ("application/pdf", 4096, "en accepte 0.0 Mio au plus"),
        ("image/png", 10, "n'accepte pas les fichiers de type image/png"),
        ("application/x-msdownload", 10, "ne sont pas autorisés dans cet espace"),
    ],
)
def test_files_over_a_limit_or_of_a_refused_type_are_undeliverable(
    mime: str, size: int, reason: str
) -> None:
    ref = file_ref(file_content(mime, size))
    assert ref is not None
    with pytest.raises(Undeliverable, match=reason):
        check_file(ref, PLAIN, "mp", MEDIA.max_file_size, MEDIA.allows)


def test_a_vendor_without_files_refuses_them() -> None:
    ref = file_ref(file_content("application/pdf", 10))
    assert ref is not None
    with pytest.raises(Undeliverable, match="n'accepte pas les fichiers"):
        check_file(ref, MARKDOWN, "pl", MEDIA.max_file_size, MEDIA.allows)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\x\\bilan.pdf", "bilan.pdf"),
        ("a\x00b\nc.pdf", "a_b_c.pdf"),
        ("...", "file"),
        ("", "file"),
    ],
)
def test_file_names_are_sanitised(name: str, expected: str) -> None:
    assert safe_filename(name) == expected


def test_very_long_file_names_keep_their_extension() -> None:
    name = safe_filename("x" * 500 + ".pdf")
    assert len(name) <= 200 and name.endswith(".pdf")


def test_locations_are_parsed_and_rendered_as_a_readable_fallback() -> None:
    place = location({"msgtype": "m.location", "body": "Urgences", "geo_uri": "geo:48.85,2.35"})
    assert place is not None and place.latitude == 48.85 and place.longitude == 2.35
    text = location_as_text(place)
    assert "Urgences" in text and "geo:48.85,2.35" in text and "openstreetmap" in text
    assert location({"msgtype": "m.location", "body": "x", "geo_uri": "geo:91,0"}) is None
    assert location({"msgtype": "m.location", "body": "x", "geo_uri": "javascript:1"}) is None
