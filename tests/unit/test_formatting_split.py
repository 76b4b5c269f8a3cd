"""bridge.formatting.split: long text in parts, cut at natural places."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.formatting.split import split_text


def rejoins(text: str, parts: list[str]) -> bool:
    """The parts are ``text`` in order, with only whitespace between them."""
    position = 0
    for part in parts:
        found = text.find(part, position)
        if found < 0 or text[position:found].strip():
            return False
        position = found + len(part)
    return not text[position:].strip()


def test_fitting_text_is_whole_and_empty_text_gives_nothing() -> None:
    assert split_text("  short  ", 9) == ["  short  "]
    assert split_text("", 10) == []
    assert split_text(" \n\t ", 2) == []


def test_max_chars_must_be_positive() -> None:
    with pytest.raises(ValueError):
        split_text("x", 0)


def test_cuts_at_the_last_paragraph_break() -> None:
    text = "First paragraph.\n\nSecond one,\nwith lines.\n\nThird."
    assert split_text(text, 41) == ["First paragraph.\n\nSecond one,\nwith lines.", "Third."]
    assert split_text(text, 40) == ["First paragraph.", "Second one,\nwith lines.\n\nThird."]


def test_cuts_at_a_line_break_when_no_paragraph_break_fits() -> None:
    assert split_text("one two\nthree four five", 16) == ["one two", "three four five"]


def test_cuts_at_whitespace_then_hard() -> None:
    assert split_text("alpha beta gamma delta", 11) == ["alpha beta", "gamma delta"]
    assert split_text("abcdefghij", 4) == ["abcd", "efgh", "ij"]
    assert split_text("ab\u00a0cd ef", 5) == ["ab\u00a0cd", "ef"]  # no cut at a no-break space


@pytest.mark.parametrize(
    "cluster",
    [
        "e\u0301",  # e + combining acute
        "\u0915\u094d\u0937",  # Devanagari conjunct (virama)
        "👩\u200d⚕\ufe0f",  # ZWJ sequence with a variation selector
        "👨\u200d👩\u200d👧\u200d👦",
        "👍🏽",  # skin tone
        "🇫🇷",  # flag
        "🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f",  # Scotland
        "\r\n",
    ],
)
def test_never_cuts_inside_a_cluster(cluster: str) -> None:
    text = "x" + cluster * 20
    for max_chars in range(len(cluster), len(cluster) * 3):
        parts = split_text(text, max_chars)
        assert all(len(p) <= max_chars for p in parts)
        assert "".join(parts).replace("\r\n", "") == text.replace("\r\n", "")
        for part in parts:
            assert not part or not unicodedata.combining(part[0])
            assert part.replace("x", "").replace("\r\n", "") in (
                "",
                *[cluster * n for n in range(21)],
            )


def test_an_overlong_cluster_is_cut_anyway() -> None:
    zalgo = "a" + "\u0301" * 10
    assert split_text(zalgo, 4) == ["a\u0301\u0301\u0301", "\u0301" * 4, "\u0301" * 3]


def test_rtl_and_emoji_text() -> None:
    text = "مرحبا بالعالم 👩‍⚕️ שלום עולם " * 50
    parts = split_text(text, 37)
    assert all(len(p) <= 37 for p in parts)
    assert rejoins(text, parts)
    assert all(p == p.strip() for p in parts[1:-1])


def test_very_long_text_is_fast_and_complete() -> None:
    text = ("word " * 30 + "\n") * 20_000
    parts = split_text(text, 4000)
    assert all(len(p) <= 4000 for p in parts)
    assert rejoins(text, parts)
    assert len(parts) == len(text) // 3900 + 1 or len(parts) < len(text) // 3000


# --- Properties -----------------------------------------------------------------------------------

TEXT = st.lists(
    st.one_of(
        st.text(max_size=10),
        st.sampled_from(
            [" ", "\n", "\n\n", "\t", "\u00a0", "\u0301", "\u200d", "\ufe0f", "🇫", "👩"]
        ),
    ),
    max_size=60,
).map("".join)


@settings(max_examples=200, deadline=None)
@given(TEXT, st.integers(min_value=1, max_value=60))
def test_parts_fit_and_rejoin(text: str, max_chars: int) -> None:
    parts = split_text(text, max_chars)
    assert all(len(part) <= max_chars for part in parts)
    assert all(part.strip() for part in parts)
    assert rejoins(text, parts)
    if text.strip() and len(text) <= max_chars:
        assert parts == [text]
