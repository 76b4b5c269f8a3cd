"""Plain text made inert in Markdown (issue 11, point 10): rendered by a permissive Markdown
renderer (raw HTML on, like a careless vendor), escaped text shows exactly as written, with no
link, image or HTML its sender did not format."""

from __future__ import annotations

import re

import pytest
from bs4 import BeautifulSoup
from hypothesis import given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt

from bridge.core.degradation import render_text
from bridge.formatting.convert import html_to_markdown
from connectors.base import Capabilities
from connectors.kit.markdown import escape_markdown

# A vendor that obeys raw HTML in Markdown: the worst case for what reaches it.
VENDOR = MarkdownIt("commonmark", {"html": True, "breaks": True}).enable(["table", "strikethrough"])
MARKDOWN = Capabilities(formatting="markdown")

HOSTILE = [
    "[x](javascript:alert(1))",
    "![](https://tracker.example/p.png)",
    "<img src=x onerror=alert(1)>",
    "<https://evil.example/autolink> and <mailto:a@evil.example>",
    "&lt;script&gt; &#60;img&#62; &amp; &copy;",
    "[x][1]\n\n[1]: https://evil.example/ref",
    "[x]\n\n[x]: https://evil.example/shortcut",
    "```js\nalert(1)\n```",
    "~~~\ncode\n~~~",
    "`code` **bold** *it* _it_ __b__ ~~s~~",
    "# Titre\n## Sous-titre",
    "1. un\n2) deux\n- puce\n+ plus\n* étoile",
    "> citation",
    "| a | b |\n|---|---|\n| 1 | 2 |",
    "texte\n===\nautre\n---",
    "***",
    "a \\[b\\] c \\\\ d",
    "<!-- commentaire --><script>alert(1)</script>",
    '<a href="https://evil.example">clic</a>',
    "Dose: 5 mg & 10 mg; 2*3*4 = 24; snake_case; a < b > c",
]


def visible(markdown: str) -> tuple[str, str]:
    """What a vendor renders: its HTML, and the text a reader sees (whitespace collapsed)."""
    html = VENDOR.render(markdown)
    text = BeautifulSoup(html, "html.parser").get_text()
    return html, " ".join(text.split())


def assert_inert(original: str, escaped: str) -> None:
    html, text = visible(escaped)
    # An indented line (a tab, 4 spaces) is shown verbatim as code: as written, and inert.
    indented = re.search(r"^(\t| {0,3}\t| {4})", original, re.MULTILINE) is not None
    for tag in ("<a", "<img", "<script", "<h1", "<h2", "<ul", "<ol", "<blockquote", "<code",
                "<strong", "<em", "<table", "<hr", "<s>", "<pre", "<!--"):  # fmt: skip
        if indented and tag in {"<code", "<pre"}:
            continue
        assert tag not in html, (original, escaped, html)
    assert text == " ".join(original.split()), (original, escaped, html)


@pytest.mark.parametrize("text", HOSTILE)
def test_escaped_plain_text_renders_as_written(text: str) -> None:
    assert_inert(text, escape_markdown(text))


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab1 .-+*_#>[]()!<>&;:/`~|=\\\n\t", max_size=40))
def test_any_punctuation_renders_as_written(text: str) -> None:
    assert_inert(text, escape_markdown(text))


@pytest.mark.parametrize(
    "text",
    [
        "[14:02] Bonjour, pouvez-vous passer voir le patient de la chambre 12 ?",
        "Oui, je passe vers 15 h. Tension 12/8 ; poids > 70 kg, a < b.",
        "Merci !\nJe prépare l'ordonnance.\n\nÀ demain",
        "I <3 ce service (vraiment) [sic]",
        "Compte rendu dans fichier_2024_v3.pdf, voir native_to_vendor",
    ],
)
def test_ordinary_text_that_renders_as_written_is_sent_unchanged(text: str) -> None:
    """Escaping what a renderer already shows as written would only put backslashes in the
    apps that show the source: ordinary clinical text reaches a Markdown vendor as typed."""
    assert escape_markdown(text) == text
    assert_inert(text, text)


def test_plain_text_is_escaped_for_a_markdown_vendor_and_kept_for_a_plain_one() -> None:
    body = "[x](javascript:alert(1)) ![](https://tracker.example/p.png) <img src=x onerror=y>"
    content = {"msgtype": "m.text", "body": body}
    (part,) = render_text(content, MARKDOWN, "Dr X", "pl").parts
    assert_inert(body, part)
    assert render_text(content, Capabilities(formatting="plain"), "Dr X", "md").parts == [body]


def test_an_emote_senders_free_name_is_escaped_too() -> None:
    caps = Capabilities(formatting="markdown", message_kinds=frozenset({"text"}))
    content = {"msgtype": "m.emote", "body": "arrive"}
    (part,) = render_text(content, caps, "[Dr](https://evil.example)", "pl").parts
    html, _ = visible(part)
    assert "<a" not in html and "https://evil.example" in part


def test_formatted_messages_keep_the_allowed_formatting_and_their_text_is_inert() -> None:
    html = (
        "<p><strong>5 mg</strong> <a href='https://example.org/x'>protocole</a> "
        "[x](javascript:alert(1)) ![](https://tracker.example/p.png) &lt;img src=x onerror=y&gt; "
        "<a href='javascript:alert(1)'>piège</a><img src='https://tracker.example/p.png'></p>"
    )
    markdown = html_to_markdown(html)
    rendered, text = visible(markdown)
    assert "<strong>5 mg</strong>" in rendered
    assert '<a href="https://example.org/x">protocole</a>' in rendered
    assert len(re.findall("<a ", rendered)) == 1 and "<img" not in rendered
    assert "javascript" not in re.sub(r"\[x\]\(javascript:alert\(1\)\)", "", text)
    assert "[x](javascript:alert(1)) ![](https://tracker.example/p.png)" in text
    assert "<img src=x onerror=y>" in text and "piège" in text


def test_a_mention_is_still_found_in_escaped_text() -> None:
    from connectors.base import Mention
    from connectors.pandalab.convert import to_markdown

    # "_Dr_" would be emphasis: the text is escaped, the name's "_" with it.
    content = {"msgtype": "m.text", "body": "@Jean_X _Dr_ vu", "m.mentions": {"user_ids": ["@j:s"]}}
    (part,) = render_text(content, MARKDOWN, "Dr X", "pl").parts
    assert to_markdown(part, None, [Mention("Jean_X", None, "@j:s")]) == (
        "@[Jean_X](@j:s) \\_Dr\\_ vu"
    )
