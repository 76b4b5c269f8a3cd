"""bridge.formatting.mentions: Matrix pills to ``@Name`` text and back."""

from __future__ import annotations

from html import escape

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bridge.formatting.mentions import (
    mention_text,
    mentions_to_pills,
    mxids_in,
    pill,
    pills_to_mentions,
)
from bridge.formatting.sanitize import sanitize_html

JEAN = ("Jean DUPONT - Médecin", "@jean.dupont:hopital.example")
AMAL = ("أمل - ممرضة", "@amal:clinique.example")


def test_pill() -> None:
    assert pill("@alice:example.org", "Alice <A&B>") == (
        '<a href="https://matrix.to/#/@alice:example.org">Alice &lt;A&amp;B&gt;</a>'
    )
    assert pill("@we/ird?#:example.org", "W") == (
        '<a href="https://matrix.to/#/@we%2Fird%3F%23:example.org">W</a>'
    )
    assert sanitize_html(pill(*reversed(JEAN))) == pill(*reversed(JEAN))
    assert mention_text("Jean") == "@Jean"


def test_pills_to_mentions() -> None:
    html = (
        f"Bonjour {pill(JEAN[1], JEAN[0])}, {pill(AMAL[1], AMAL[0])} et "
        f'<a href="https://matrix.to/#/@bob:s.example?via=s.example">@bob</a> '
        f"{pill(JEAN[1], JEAN[0])} "
        '<a href="https://matrix.to/#/!room:s.example">a room</a> '
        '<a href="https://example.org/#/@x:y">not a pill</a> '
        '<a href="https://matrix.to/#/%40enc%3As.example"></a>'
    )
    text, mxids = pills_to_mentions(html)
    assert text == (
        f"Bonjour @{JEAN[0]}, @{AMAL[0]} et @bob @{JEAN[0]} "
        '<a href="https://matrix.to/#/!room:s.example">a room</a> '
        '<a href="https://example.org/#/@x:y">not a pill</a> @enc:s.example'
    )
    assert mxids == [JEAN[1], AMAL[1], "@bob:s.example", "@enc:s.example"]
    assert mxids_in(html) == mxids


def test_pills_to_mentions_sanitises() -> None:
    text, mxids = pills_to_mentions(f"<script>x</script>{pill('@a:s', '<b>A</b>')}<b>!</b>")
    assert text == "@&lt;b&gt;A&lt;/b&gt;<b>!</b>"
    assert mxids == ["@a:s"]


def test_mentions_to_pills() -> None:
    html = f"<p>@{JEAN[0]} et @{AMAL[0]}, merci</p>"
    assert mentions_to_pills(html, [JEAN, AMAL]) == (
        f"<p>{pill(JEAN[1], JEAN[0])} et {pill(AMAL[1], AMAL[0])}, merci</p>"
    )


def test_mentions_to_pills_longest_name_and_word_boundaries() -> None:
    mentions = [("Jean", "@j:s"), ("Jean Dupont", "@jd:s")]
    html = "@Jean Dupont, @Jean, @Jeanne, jean@Jean.org, (@Jean)"
    assert mentions_to_pills(html, mentions) == (
        f"{pill('@jd:s', 'Jean Dupont')}, {pill('@j:s', 'Jean')}, @Jeanne, jean@Jean.org, "
        f"({pill('@j:s', 'Jean')})"
    )


def test_mentions_to_pills_leaves_links_and_code_alone() -> None:
    html = (
        '<a href="https://e.org">@Jean</a> <code>@Jean</code> '
        "<pre><code>@Jean</code></pre> <b>@Jean</b>"
    )
    assert mentions_to_pills(html, [("Jean", "@j:s")]) == (
        '<a href="https://e.org">@Jean</a> <code>@Jean</code> '
        f"<pre><code>@Jean</code></pre> <b>{pill('@j:s', 'Jean')}</b>"
    )


def test_mentions_to_pills_special_characters() -> None:
    mentions = [("A&B <x>", "@ab:s"), ("Dr. (Who?)", "@who:s"), ("", "@empty:s")]
    html = "hi @A&amp;B &lt;x&gt; and @Dr. (Who?) and @"
    assert mentions_to_pills(html, mentions) == (
        f"hi {pill('@ab:s', 'A&B <x>')} and {pill('@who:s', 'Dr. (Who?)')} and @"
    )
    assert mentions_to_pills("<b>no</b>", []) == "<b>no</b>"


# --- Properties -----------------------------------------------------------------------------------

NAME_CHARS = st.characters(
    codec="utf-8", exclude_categories=("Cs", "Cc", "Zl", "Zp"), exclude_characters="@\x00"
)
NAMES = st.text(NAME_CHARS, min_size=1, max_size=20).filter(lambda n: n.strip() == n and n)
MXIDS = st.builds(
    lambda local, server: f"@{local}:{server}",
    st.text("abcdefghijklmnopqrstuvwxyz0123456789._=-/", min_size=1, max_size=12),
    st.from_regex(r"[a-z0-9-]{1,10}(\.[a-z]{2,5})?(:[0-9]{1,5})?", fullmatch=True),
)
FILLER = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc"), exclude_characters="@"),
    max_size=10,
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(NAMES, MXIDS), min_size=1, max_size=4, unique_by=lambda m: m[0]),
    st.lists(st.tuples(st.integers(0, 3), FILLER), max_size=8),
)
def test_pills_round_trip(people: list[tuple[str, str]], layout: list[tuple[int, str]]) -> None:
    names = [name for name, _ in people]
    # A name that starts another one, followed by the rest of it, is the longer one.
    assume(not any(a != b and b.startswith(a) for a in names for b in names))
    html = " ".join(
        f"{pill(people[i % len(people)][1], people[i % len(people)][0])} {escape(filler)}"
        for i, filler in layout
    )
    html = sanitize_html(html)
    text, mxids = pills_to_mentions(html)
    used = list(dict.fromkeys(people[i % len(people)][1] for i, _ in layout))
    assert mxids == used
    assert mentions_to_pills(text, people) == html
