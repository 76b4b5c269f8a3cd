"""bridge.formatting.convert and the render facade: Markdown, HTML and plain text."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.formatting import render
from bridge.formatting._text import scrub
from bridge.formatting.convert import (
    html_to_markdown,
    html_to_plain,
    markdown_to_html,
    markdown_to_plain,
    plain_to_html,
)
from bridge.formatting.sanitize import sanitize_html

RTL = "مرحبا بالعالم — שלום עולם"
EMOJI = "👩‍⚕️ 👨‍👩‍👧‍👦 🇫🇷 👍🏽 e\u0301"

# --- Markdown to HTML -----------------------------------------------------------------------------


def test_markdown_raw_html_is_escaped() -> None:
    html = markdown_to_html('<script>alert(1)</script>\n\nhi <img src=x onerror="alert(1)">')
    assert "<script" not in html and "<img" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_markdown_links_are_sanitised() -> None:
    html = markdown_to_html("[x](javascript:alert(1)) [y](https://e.org) ![i](https://e.org/i.png)")
    assert 'href="javascript' not in html and "<img" not in html
    assert html == '<p>[x](javascript:alert(1)) <a href="https://e.org">y</a> </p>'


def test_markdown_is_not_linkified() -> None:
    assert markdown_to_html("see https://e.org") == "<p>see https://e.org</p>"


def test_markdown_formatting() -> None:
    assert markdown_to_html("**b** *i* `c` ~~s~~") == (
        "<p><strong>b</strong> <em>i</em> <code>c</code> <s>s</s></p>"
    )
    assert markdown_to_html("line one\nline two") == "<p>line one<br>\nline two</p>"
    assert markdown_to_html("# Title") == "<h1>Title</h1>"


def test_markdown_nested_lists() -> None:
    html = markdown_to_html("- a\n  - b\n    - c\n- d\n\n3. x\n4. y")
    assert re.sub(r"\s", "", html) == (
        "<ul><li>a<ul><li>b<ul><li>c</li></ul></li></ul></li><li>d</li></ul>"
        '<olstart="3"><li>x</li><li>y</li></ol>'
    )


def test_markdown_code_block_keeps_its_language_and_escapes() -> None:
    html = markdown_to_html("```python\nif a < b:\n    print('<b>')\n```")
    assert html == (
        "<pre><code class=\"language-python\">if a &lt; b:\n    print('&lt;b&gt;')\n</code></pre>"
    )


def test_markdown_table() -> None:
    html = markdown_to_html("| a | b |\n|---|---|\n| 1 | 2 |")
    assert re.sub(r"\s", "", html) == (
        "<table><thead><tr><th>a</th><th>b</th></tr></thead>"
        "<tbody><tr><td>1</td><td>2</td></tr></tbody></table>"
    )


def test_markdown_rtl_and_emoji_survive() -> None:
    assert markdown_to_html(f"{RTL} {EMOJI}") == f"<p>{RTL} {EMOJI}</p>"
    assert markdown_to_plain(f"**{RTL}** {EMOJI}") == f"{RTL} {EMOJI}"


def test_markdown_very_long_and_deep() -> None:
    text = "word " * 50_000
    assert markdown_to_html(text).startswith("<p>word word")
    deep = ">" * 5000 + " x\n" + "- " * 5000 + "y"
    assert sanitize_html(markdown_to_html(deep)) == markdown_to_html(deep)


# --- HTML to Markdown -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("html", "markdown"),
    [
        ("<p>a<br>b</p><p>c</p>", "a\nb\n\nc"),
        ("<b>bold</b> <em>it</em> <del>old</del> <code>x*y</code>", "**bold** *it* ~~old~~ `x*y`"),
        ("<h2>Title</h2><p>text</p>", "## Title\n\ntext"),
        (
            "<ul><li>one<ul><li>nested</li></ul></li><li>two</li></ul>",
            "- one\n  - nested\n- two",
        ),
        ('<ol start="3"><li>x</li><li>y</li></ol>', "3. x\n4. y"),
        ("<blockquote><p>q1</p><p>q2</p></blockquote><p>after</p>", "> q1\n>\n> q2\n\nafter"),
        (
            '<pre><code class="language-python">def f():\n    return 1\n</code></pre>',
            "```python\ndef f():\n    return 1\n```",
        ),
        (
            "<table><thead><tr><th>a</th><th>b</th></tr></thead>"
            "<tbody><tr><td>1</td><td>2</td></tr></tbody></table>",
            "| a | b |\n| --- | --- |\n| 1 | 2 |",
        ),
        ('<a href="https://e.org">site</a>', "[site](https://e.org)"),
        ('<img src="mxc://s/i" alt="a scan">', "a scan"),
        ('<img src="mxc://s/i">', "\\[image\\]"),  # escaped: it renders as "[image]"
        ("snake_case 2*3", "snake\\_case 2\\*3"),
        ("<p>   spaced    out   </p>\n\n\n<p>b</p>  ", "spaced out\n\nb"),
        (f"<p>{RTL}</p><p>{EMOJI}</p>", f"{RTL}\n\n{EMOJI}"),
        ("<script>alert(1)</script>ok", "ok"),
    ],
)
def test_html_to_markdown(html: str, markdown: str) -> None:
    assert html_to_markdown(html) == markdown


def test_markdown_round_trip_is_stable() -> None:
    md = "# T\n\n- a\n  - b\n\n> q\n\n**b** ~~s~~ `c`\nnext line\n\n```py\nx = 1\n```"
    once = html_to_markdown(markdown_to_html(md))
    assert html_to_markdown(markdown_to_html(once)) == once


# --- HTML to plain text ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("html", "plain"),
    [
        ("<p>a<br>b</p><p>c</p>", "a\nb\n\nc"),
        ("<b>bold</b> <i>it</i> <code>x*y</code>", "bold it x*y"),
        ("<del>20 mg</del> 2 mg", "~~20 mg~~ 2 mg"),
        ("<h1>Title</h1>text", "Title\n\ntext"),
        (
            "<ul><li>one<ul><li>nested<ol><li>deep</li></ol></li></ul></li><li>two</li></ul>",
            "- one\n  - nested\n    1. deep\n- two",
        ),
        ('<ol start="9"><li>nine</li><li>ten</li></ol>', "9. nine\n10. ten"),
        (
            "<blockquote><p>q1<br>q2</p><blockquote>inner</blockquote></blockquote><p>after</p>",
            "> q1\n> q2\n>\n> > inner\n\nafter",
        ),
        ("<pre><code>  indented\n\n  code  &lt;b&gt;\n</code></pre>", "  indented\n\n  code  <b>"),
        (
            "<table><tr><th>a</th><th>b</th></tr><tr><td>1</td><td>2</td></tr></table>",
            "a | b\n1 | 2",
        ),
        ('<a href="https://e.org/x">the site</a>', "the site (https://e.org/x)"),
        ('<a href="https://e.org/x">https://e.org/x</a>', "https://e.org/x"),
        ('<a href="https://e.org/">e.org</a>', "e.org"),
        ('<a href="mailto:a@e.org">a@e.org</a>', "a@e.org"),
        ('<img src="mxc://s/i" alt="scan">', "scan"),
        ('<img src="mxc://s/i">', "[image]"),
        ('<img src="https://e.org/track.png" alt="remote">', ""),
        ("a<hr>b", "a\n\n---\n\nb"),
        ("<details><summary>More</summary>hidden</details>", "More\n\nhidden"),
        ("a &amp; b &lt;c&gt;", "a & b <c>"),
        ("<script>alert(1)</script><style>x</style>ok", "ok"),
        (f"<p>{RTL}</p><p>{EMOJI}</p>", f"{RTL}\n\n{EMOJI}"),
        ("", ""),
    ],
)
def test_html_to_plain(html: str, plain: str) -> None:
    assert html_to_plain(html) == plain


def test_html_to_plain_deep_nesting() -> None:
    html = "<blockquote>" * 2000 + "x" + "</blockquote>" * 2000
    assert html_to_plain(html).endswith("> x")
    assert html_to_markdown("<b>" * 3000 + "x").strip("*") == "x"


# --- Plain text to HTML, render -------------------------------------------------------------------


def test_plain_to_html() -> None:
    assert plain_to_html("a < b & c\nd\r\ne\rf") == "a &lt; b &amp; c<br>d<br>e<br>f"
    assert plain_to_html("<script>x</script>\u00a0") == "&lt;script&gt;x&lt;/script&gt;&nbsp;"
    assert plain_to_html(f"{RTL} {EMOJI}") == f"{RTL} {EMOJI}"
    assert html_to_plain(plain_to_html("x\ny <z>")) == "x\ny <z>"


def test_render_picks_the_path() -> None:
    html = "<mx-reply><blockquote>orig</blockquote></mx-reply><b>new</b><script>x</script>"
    assert render(html, "body", "html") == (
        "<mx-reply><blockquote>orig</blockquote></mx-reply><b>new</b>"
    )
    assert render(html, "body", "html", reply=True) == "<b>new</b>"
    assert render(html, "body", "markdown", reply=True) == "**new**"
    assert render(html, "body", "plain", reply=True) == "new"
    body = "> <@a:s> orig\n\n2*3 <b>"
    assert render(None, body, "plain", reply=True) == "2*3 <b>"
    assert render(None, body, "markdown", reply=True) == "2\\*3 \\<b\\>"  # inert (issue 11)
    assert render(None, body, "html", reply=True) == "2*3 &lt;b&gt;"
    assert render(None, body, "plain") == body


# --- Properties -----------------------------------------------------------------------------------

HTML_PIECES = st.sampled_from(
    [
        "<p>", "</p>", "<b>", "</b>", "<ul>", "<ol start=2>", "<li>", "</li>", "</ul>", "<br>",
        "<blockquote>", "</blockquote>", "<pre><code>", "</code></pre>", "<a href=https://e.org>",
        "</a>", "<img src=mxc://s/i alt=pic>", "<img src=https://e.org/x>", "<table><tr><td>",
        "</td><td>", "</td></tr></table>", "<script>", "</script>", "&amp;", "&lt;", "<",
        "<del>", "<h1>", "</h1>", "<mx-reply>", "<hr>", "\n", "  ",
    ]
)  # fmt: skip
HTML_ISH = st.lists(st.one_of(st.text(max_size=8), HTML_PIECES), max_size=30).map("".join)
MARKDOWN_PIECES = st.sampled_from(
    [
        "*", "**", "_", "`", "```", "\n", "\n\n", "# ", "> ", "- ", "1. ", "[", "](", ")", "~~",
        "<script>", "<b>", "javascript:", "![", "|", "|---|", "    ", "\\", "&", "<https://e.org>",
    ]
)  # fmt: skip
MARKDOWN_ISH = st.lists(st.one_of(st.text(max_size=8), MARKDOWN_PIECES), max_size=30).map("".join)


@settings(max_examples=200, deadline=None)
@given(st.one_of(MARKDOWN_ISH, st.text()))
def test_markdown_to_html_is_sanitised(md: str) -> None:
    html = markdown_to_html(md)
    assert sanitize_html(html) == html
    assert "<script" not in html and "<img" not in html
    assert isinstance(markdown_to_plain(md), str)


@settings(max_examples=200, deadline=None)
@given(st.one_of(HTML_ISH, st.text()))
def test_html_conversions_never_raise(html: str) -> None:
    plain = html_to_plain(html)
    if "&lt;" not in sanitize_html(html):  # text "<" is escaped: any other "<" was a tag
        assert "<" not in plain
    markdown = html_to_markdown(html)
    assert markdown == markdown.strip("\n")
    assert all(line == line.rstrip(" \t") for line in markdown.split("\n"))


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_text_survives_plain_html_plain(text: str) -> None:
    assert sanitize_html(plain_to_html(text)) == plain_to_html(text)
    plain = html_to_plain(plain_to_html(text))
    # Whitespace is HTML's to collapse (and NUL the parser's to drop); the rest comes back.
    squeeze = re.compile(r"[\s\x00]+")
    assert squeeze.sub("", plain) == squeeze.sub("", scrub(text))
