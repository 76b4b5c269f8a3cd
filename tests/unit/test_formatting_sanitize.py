"""bridge.formatting.sanitize: the Matrix HTML subset, XSS vectors, reply fallbacks."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.formatting.sanitize import (
    TAGS,
    sanitize_html,
    strip_plain_reply_fallback,
    strip_reply_fallback,
)

TAG = re.compile(r"<(/?)([a-z0-9-]+)((?:\s+[a-z-]+=\"[^\"]*\")*)\s*/?>")
ATTRIBUTE = re.compile(r'\s+([a-z-]+)="([^"]*)"')


def assert_safe(html: str) -> None:
    """Every tag of ``html`` is in the Matrix subset, with no event handler, script URL or
    non-mxc image (nh3 escapes ``<`` in text, so each ``<`` starts a tag)."""
    assert "<script" not in html.lower()
    assert html.count("<") == len(TAG.findall(html)), html
    for _closing, name, attrs in TAG.findall(html):
        assert name in TAGS, html
        values = dict(ATTRIBUTE.findall(attrs))
        assert not any(a.startswith("on") for a in values), html
        assert re.match(r"(https?|ftp|mailto|magnet):", values.get("href", "https:")), html
        if name == "img":
            assert values["src"].startswith("mxc://"), html
        else:
            assert "src" not in values


@pytest.mark.parametrize(
    "vector",
    [
        "<script>alert(1)</script>",
        "<SCRIPT SRC=//evil.example/x.js></SCRIPT>",
        '<img src="mxc://a/b" onerror="alert(1)">',
        "<img src=x onerror=alert(1)//",
        '<a href="javascript:alert(1)">x</a>',
        '<a href="JaVaScRiPt:alert(1)">x</a>',
        '<a href="  javascript:alert(1)">x</a>',
        '<a href="java\tscript:alert(1)">x</a>',
        '<a href="&#106;&#97;&#118;&#97;&#115;&#99;&#114;&#105;&#112;&#116;&#58;alert(1)">x</a>',
        '<a href="javascript&colon;alert(1)">x</a>',
        '<a href="&#x6A;avascript:alert(1)">x</a>',
        '<a href="vbscript:msgbox(1)">x</a>',
        '<a href="VBScript:msgbox(1)">x</a>',
        '<a href="data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==">x</a>',
        '<img src="data:image/png;base64,AAAA">',
        "<svg onload=alert(1)><circle r=1></circle></svg>",
        "<svg><script>alert(1)</script></svg>",
        "<math><mtext><script>alert(1)</script></mtext></math>",
        "<style>body{background:url(javascript:alert(1))}</style>",
        '<p style="background:url(javascript:alert(1))">x</p>',
        '<iframe src="javascript:alert(1)"></iframe>',
        '<object data="javascript:alert(1)"></object><embed src="x.swf">',
        '<div onclick="alert(1)" onmouseover="alert(2)">x</div>',
        '<body onload="alert(1)">x</body>',
        '<form action="javascript:alert(1)"><input type=submit></form>',
        '<meta http-equiv="refresh" content="0;url=javascript:alert(1)">',
        '<base href="javascript:alert(1)//">',
        "<!--<script>alert(1)</script>-->",
        "<<script>script>alert(1)<</script>/script>",
        '<a href="x" onfocus="alert(1)" autofocus>x</a>',
        '<details open ontoggle="alert(1)"><summary>s</summary></details>',
        '<font color="red" onmouseover="alert(1)">x</font>',
        '<noscript><p title="</noscript><img src=x onerror=alert(1)>">',
        "<template><script>alert(1)</script></template>",
    ],
)
def test_xss_vectors_are_neutralised(vector: str) -> None:
    clean = sanitize_html(vector)
    assert_safe(clean)
    assert sanitize_html(clean) == clean


def test_allowed_subset_is_kept() -> None:
    html = (
        "<p>Hi <b>bold</b> <i>it</i> <u>u</u> <strong>s</strong> <em>e</em> <del>d</del> "
        "<s>s</s> <strike>st</strike> <sup>2</sup> <sub>2</sub> <code>c</code></p>"
        "<h1>h1</h1><h6>h6</h6><blockquote>q</blockquote><hr><br>"
        '<ol start="3"><li>x</li></ol><ul><li>y</li></ul>'
        "<table><caption>c</caption><thead><tr><th>a</th></tr></thead>"
        "<tbody><tr><td>1</td></tr></tbody></table>"
        '<pre><code class="language-python">x = 1</code></pre>'
        "<details><summary>more</summary>hidden</details>"
        '<span data-mx-spoiler="why">secret</span>'
        '<span data-mx-color="#ff0000" data-mx-bg-color="#00ff00">c</span>'
        '<font data-mx-color="#abcdef">f</font>'
    )
    assert sanitize_html(html) == html


@pytest.mark.parametrize(
    "href",
    [
        "https://example.org/a?b=c#d",
        "http://example.org",
        "ftp://example.org/file",
        "mailto:someone@example.org",
        "magnet:?xt=urn:btih:abc",
        "https://matrix.to/#/@alice:example.org",
        "https://matrix.to/#/!room:example.org/$event?via=example.org",
    ],
)
def test_safe_links_are_kept(href: str) -> None:
    clean = sanitize_html(f'<a href="{href}">x</a>')
    assert clean == f'<a href="{href.replace("&", "&amp;")}">x</a>'


@pytest.mark.parametrize("href", ["/relative", "#fragment", "mxc://s/id", "tel:123", "file:///etc"])
def test_other_links_lose_their_href(href: str) -> None:
    assert sanitize_html(f'<a href="{href}">x</a>') == "<a>x</a>"


def test_remote_images_are_removed_entirely_mxc_images_kept() -> None:
    html = (
        '<img src="https://evil.example/track.png" alt="remote">'
        '<img src="//evil.example/x.png"><img alt="no src">'
        '<img src="mxc://example.org/abc" alt="ok" title="t" width="10" height="20">'
    )
    assert sanitize_html(html) == (
        '<img src="mxc://example.org/abc" alt="ok" title="t" width="10" height="20">'
    )


def test_attribute_values_are_checked() -> None:
    html = (
        '<code class="language-rust evil other">x</code><code class="evil">y</code>'
        '<ol start="x1">a</ol><span data-mx-color="red; x:y">c</span>'
        '<img src="mxc://s/i" width="100%" height="1e9">'
        '<p class="a" id="b" style="color:red" title="t">p</p>'
    )
    assert sanitize_html(html) == (
        '<code class="language-rust">x</code><code>y</code><ol>a</ol><span>c</span>'
        '<img src="mxc://s/i"><p>p</p>'
    )


def test_unknown_tags_keep_their_text_dangerous_ones_do_not() -> None:
    assert sanitize_html("<marquee>hi</marquee><custom-tag>there</custom-tag>") == "hithere"
    assert sanitize_html("a<script>b</script><style>c</style><svg><text>d</text></svg>e") == "ae"


def test_text_is_preserved() -> None:
    text = "مرحبا بالعالم — שלום עולם — 👩‍⚕️👨‍👩‍👧 🇫🇷 e\u0301"
    assert sanitize_html(f"<p>{text}</p>") == f"<p>{text}</p>"
    assert sanitize_html("a < b & c > d") == "a &lt; b &amp; c &gt; d"


def test_lone_surrogates_become_replacement_characters() -> None:
    assert sanitize_html("a\ud800b") == "a\ufffdb"
    assert sanitize_html("\ud83d\ude00") == "😀"  # a UTF-16 pair is joined


def test_reply_fallback_is_kept_unless_stripped() -> None:
    html = (
        '<mx-reply><blockquote><a href="https://matrix.to/#/!r:s/$e">In reply to</a> '
        '<a href="https://matrix.to/#/@a:s">@a:s</a><br>original</blockquote></mx-reply>'
        "<p>answer <script>x</script></p>"
    )
    assert sanitize_html(html).startswith("<mx-reply><blockquote>")
    assert strip_reply_fallback(html) == "<p>answer </p>"
    assert strip_reply_fallback("no fallback") == "no fallback"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("> <@alice:s> hello\n> second\n\nanswer\nmore", "answer\nmore"),
        ("> <@alice:s> hello\n>\n> after empty\n\nanswer", "answer"),
        ("> a quote without an empty line\nanswer", "> a quote without an empty line\nanswer"),
        ("> only a quote", "> only a quote"),
        ("> only a quote\n", ""),
        ("no fallback\n\n> quote", "no fallback\n\n> quote"),
        (">not a fallback\n\nx", ">not a fallback\n\nx"),
        ("", ""),
    ],
)
def test_strip_plain_reply_fallback(body: str, expected: str) -> None:
    assert strip_plain_reply_fallback(body) == expected


# --- Properties -----------------------------------------------------------------------------------

TAG_NAMES = [
    "a", "b", "i", "p", "img", "script", "style", "svg", "iframe", "math", "div", "span", "code",
    "pre", "font", "table", "td", "mx-reply", "noscript", "template", "textarea", "SCRIPT", "ImG",
]  # fmt: skip
ATTR_NAMES = [
    "href",
    "src",
    "onerror",
    "onclick",
    "ONLOAD",
    "style",
    "class",
    "alt",
    "data-mx-color",
]
ATTR_VALUES = [
    "javascript:alert(1)", "JaVaScRiPt:x", "java&#x73;cript:x", "&#106;avascript:x",
    "data:text/html,<script>alert(1)</script>", "vbscript:x", "https://e.org/x.png",
    "mxc://s/id", "language-py", "#ff00ff", "x onerror=alert(1)", '"><script>alert(1)</script>',
]  # fmt: skip


@st.composite
def attributes(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(ATTR_NAMES))
    value = draw(st.one_of(st.sampled_from(ATTR_VALUES), st.text(max_size=10)))
    quote = draw(st.sampled_from(['"', "'", ""]))
    return f" {name}={quote}{value}{quote}"


@st.composite
def html_ish(draw: st.DrawFn) -> str:
    pieces = draw(
        st.lists(
            st.one_of(
                st.text(max_size=12),
                st.sampled_from(["<", ">", "&", "&#", "<!--", "-->", "</", "/>", "javascript:"]),
                st.builds(
                    lambda t, attrs, close: f"<{'/' if close else ''}{t}{''.join(attrs)}>",
                    st.sampled_from(TAG_NAMES),
                    st.lists(attributes(), max_size=3),
                    st.booleans(),
                ),
            ),
            max_size=25,
        )
    )
    return "".join(pieces)


@settings(max_examples=200, deadline=None)
@given(st.one_of(html_ish(), st.text()))
def test_sanitize_is_safe_and_idempotent(html: str) -> None:
    clean = sanitize_html(html)
    assert_safe(clean)
    assert sanitize_html(clean) == clean
    stripped = strip_reply_fallback(html)
    assert_safe(stripped)
    assert "<mx-reply" not in stripped


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_strip_plain_reply_fallback_only_removes_a_leading_quote(body: str) -> None:
    stripped = strip_plain_reply_fallback(body)
    assert body.endswith(stripped)
