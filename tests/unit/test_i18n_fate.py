"""What senders read about their messages' fate comes from the catalogs: French by default,
English after ``set_locale("en")`` (send-status reasons, degradation notes, refusals)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bridge.core import matrix_content
from bridge.core.authority import NOT_YOUR_MESSAGE
from bridge.core.degradation import Undeliverable, check_file, file_ref, render_text
from bridge.core.delivery import _unfetchable
from bridge.core.filetypes import refusal
from bridge.i18n import _, set_locale
from bridge.matrix.media import MediaError
from connectors.base import Capabilities, FileLimit

PLAIN = Capabilities(
    formatting="plain",
    max_text_length=10,
    long_text="split",
    files={"m.file": FileLimit(1024 * 1024, frozenset({"application/pdf"}))},
)
HTML = {
    "msgtype": "m.text",
    "body": "5 mg",
    "format": "org.matrix.custom.html",
    "formatted_body": "<b>5 mg</b>",
}


@pytest.fixture
def english() -> Iterator[None]:
    set_locale("en")
    yield
    set_locale("fr")


def notes() -> list[str]:
    return (
        render_text(HTML, PLAIN, "Dr X", "mp").notes
        + render_text({"msgtype": "m.text", "body": "abcdefgh ijklmnop"}, PLAIN, "Dr X", "mp").notes
    )


def unknown_type() -> str:
    return matrix_content.unsupported("com.example.vital_signs")


def too_big() -> str:
    ref = file_ref(
        {
            "msgtype": "m.file",
            "url": "mxc://x/y",
            "body": "a.pdf",
            "info": {"mimetype": "application/pdf", "size": 2 * 1024 * 1024},
        }
    )
    assert ref is not None
    with pytest.raises(Undeliverable) as refused:
        check_file(ref, PLAIN, "mp", 10 * 1024 * 1024, lambda mime: True)
    return str(refused.value)


def test_senders_read_french_by_default() -> None:
    assert notes() == [
        "mise en forme retirée : mp n'affiche que du texte brut",
        "découpé en 2 messages (mp accepte 10 caractères)",
    ]
    assert unknown_type() == (
        "ce type de contenu (com.example.vital_signs) ne peut pas être transmis aux autres "
        "participants"
    )
    assert too_big() == "le fichier fait 2.0 Mio ; mp en accepte 1.0 Mio au plus"
    assert _(NOT_YOUR_MESSAGE) == "seul l'auteur d'un message peut le modifier"
    assert refusal("image/png", "text/html", lambda mime: True, "mp") == (
        "le contenu du fichier est de type text/html et non image/png comme annoncé : "
        "un contenu actif (script, page web, SVG) n'est pas transmis"
    )
    assert _unfetchable(MediaError("x", retriable=True, status=502), 3) == (
        "le fichier n'a pas pu être récupéré par le serveur Matrix après 3 essais (serveur "
        "d'origine injoignable ou refusé, réponse 502) : ce message n'est pas transmis, la "
        "conversation continue"
    )
    assert matrix_content.note({"eimis.converted": "poll"}, "mp") == (
        "sondage envoyé sous forme de texte : mp n'a pas de sondages"
    )


def test_senders_read_english_when_the_bridge_speaks_it(english: None) -> None:
    assert notes() == [
        "formatting removed: mp shows plain text only",
        "split into 2 messages (mp accepts 10 characters)",
    ]
    assert unknown_type() == (
        "this type of content (com.example.vital_signs) cannot be passed on to the other "
        "participants"
    )
    assert too_big() == "the file is 2.0 MiB; mp accepts 1.0 MiB at most"
    assert _(NOT_YOUR_MESSAGE) == "only the author of a message may edit it"
    assert refusal("image/png", "text/html", lambda mime: True, "mp") == (
        "the file's content is of type text/html, not image/png as announced: active content "
        "(a script, a web page, an SVG) is not passed on"
    )
    assert _unfetchable(MediaError("x", retriable=True, status=502), 1) == (
        "the Matrix server could not fetch the file after 1 try (origin server unreachable or "
        "refused, response 502): this message is not passed on, the conversation goes on"
    )
    assert matrix_content.note({"eimis.converted": "poll"}, "mp") == (
        "poll sent as text: mp has no polls"
    )
