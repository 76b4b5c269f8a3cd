"""Conversions bounded whatever the input (issue 11, point 8): nesting, list length and size are
capped, what is past a cap is kept readably, and the output grows linearly with the input."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.formatting import limits
from bridge.formatting.convert import html_to_markdown, html_to_plain, markdown_to_html
from bridge.formatting.limits import (
    MAX_DEPTH,
    MAX_FORMATTED_CHARS,
    MAX_LIST_ITEMS,
    MAX_RAW_DEPTH,
    bound_raw_depth,
    bound_structure,
)
from bridge.formatting.sanitize import sanitize_html

_OPEN = re.compile(r"<([a-z0-9-]+)[^>]*>")


def depth(html: str) -> int:
    """The deepest nesting of well-formed (sanitised) HTML."""
    level = deepest = 0
    for match in re.finditer(r"<(/?)([a-z0-9-]+)[^>]*>", html):
        if match.group(2) in {"br", "hr", "img"}:
            continue
        level += -1 if match.group(1) else 1
        deepest = max(deepest, level)
    return deepest


def nested_list(n: int) -> str:
    return "".join(f"<ul><li>item{i}" for i in range(n)) + "</li></ul>" * n


def test_deep_nesting_is_capped_and_every_item_stays_on_its_own_line() -> None:
    bounded = bound_structure(sanitize_html(nested_list(100)))
    assert depth(bounded) == MAX_DEPTH
    for convert in (html_to_markdown, html_to_plain):
        text = convert(nested_list(100))
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        # Every item, in order, each on its own line; those past the cap with a "- " mark.
        assert [re.sub(r"^(\\?-|-)\s*", "", line) for line in lines] == [
            f"item{i}" for i in range(100)
        ]
        assert all(line.lstrip("\\").startswith("- ") for line in lines)
        # Indentation stops growing at the cap: the text stays linear in the input.
        assert max(len(line) - len(line.lstrip()) for line in text.splitlines()) < 4 * MAX_DEPTH


def test_thousands_of_nested_items_give_linear_output() -> None:
    # 4,000 nested items once gave ~16 MB of indentation; now a few times the input.
    html = "<ul><li>x" * 4000
    for convert in (html_to_markdown, html_to_plain):
        text = convert(html)
        assert text.count("x") == 4000
        assert len(text) < 5 * len(html)


def test_deep_quotes_are_capped() -> None:
    text = html_to_plain("<blockquote>" * 50 + "deep" + "</blockquote>" * 50)
    assert text == "> " * MAX_DEPTH + "deep"


def test_raw_nesting_is_bounded_before_sanitising() -> None:
    html = "<div><span>" * 5000 + "fin"
    bounded = bound_raw_depth(html)
    assert bounded.count("<div>") + bounded.count("<span>") == MAX_RAW_DEPTH
    assert bounded.endswith("fin")
    clean = sanitize_html(html)
    assert depth(clean) <= MAX_RAW_DEPTH and clean.count("fin") == 1
    # Flat elements (items, paragraphs, cells) do not count: a long sloppy list keeps its items.
    sloppy = "<ul>" + "<li>x" * 1000 + "</ul>"
    assert bound_raw_depth(sloppy) == sloppy


def test_long_list_keeps_its_first_items_and_the_rest_as_lines_of_the_last() -> None:
    n = MAX_LIST_ITEMS + 3
    html = "<ol>" + "".join(f"<li>v{i}</li>" for i in range(1, n + 1)) + "</ol><p>après</p>"
    bounded = bound_structure(sanitize_html(html))
    assert bounded.count("<li>") == MAX_LIST_ITEMS + 1
    assert bounded.count("</li>") == MAX_LIST_ITEMS + 1
    markdown = html_to_markdown(html)
    lines = markdown.splitlines()
    assert lines[0] == "1. v1"
    assert f"{MAX_LIST_ITEMS}. v{MAX_LIST_ITEMS}" in lines
    assert f"{MAX_LIST_ITEMS + 1}. v{MAX_LIST_ITEMS + 1}" in lines
    tail = [line.strip() for line in lines[-4:]]
    assert tail == [f"{MAX_LIST_ITEMS + 2}\\. v{MAX_LIST_ITEMS + 2}", f"{n}\\. v{n}", "", "après"]
    plain = html_to_plain(html).splitlines()
    assert [line.strip() for line in plain[-3:]] == [f"{n}. v{n}", "", "après"]


def test_ordered_list_numbers_are_right_for_a_long_list() -> None:
    html = '<ol start="7">' + "<li>x</li>" * MAX_LIST_ITEMS + "</ol>"
    lines = html_to_markdown(html).splitlines()
    assert lines == [f"{7 + i}. x" for i in range(MAX_LIST_ITEMS)]


def test_formatted_text_over_the_size_cap_is_shown_as_plain_text() -> None:
    cell = "<b>*gras*</b> [lien](https://evil.example) "
    html = "<p>" + cell * (MAX_FORMATTED_CHARS // len(cell) + 1) + "</p>"
    markdown = html_to_markdown(html)
    assert "**" not in markdown and "\\*gras\\*" in markdown and "\\[lien\\]" in markdown
    md = "**gras** " * (MAX_FORMATTED_CHARS // 9 + 1)
    html_out = markdown_to_html(md)
    assert html_out.startswith("<p>**gras**") and "<strong>" not in html_out


def _tree(depth: int) -> st.SearchStrategy[str]:
    leaf = st.sampled_from(["a", "b", "c"]).map(lambda t: f"{t}{next(_ids)}")
    if depth == 0:
        return leaf

    def wrap(children: list[str], tag: str) -> str:
        if tag in {"ul", "ol"}:
            return f"<{tag}>" + "".join(f"<li>{c}</li>" for c in children) + f"</{tag}>"
        return f"<{tag}>" + "".join(children) + f"</{tag}>"

    node = st.builds(
        wrap,
        st.lists(_tree(depth - 1), min_size=1, max_size=4),
        st.sampled_from(["ul", "ol", "blockquote", "b", "p", "div"]),
    )
    return st.one_of(leaf, node)


_ids = itertools.count()


@settings(max_examples=200, deadline=None)
@given(st.lists(_tree(6), min_size=1, max_size=3))
def test_bounded_html_is_well_formed_within_bounds_and_keeps_every_text(
    parts: list[str],
) -> None:
    html = sanitize_html("".join(parts))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(limits, "MAX_DEPTH", 4)
        patch.setattr(limits, "MAX_LIST_ITEMS", 2)
        bounded = limits.bound_structure(html)
    assert sanitize_html(bounded) == bounded  # well formed: the sanitiser changes nothing
    assert depth(bounded) <= 4
    words = re.compile(r"[abc]\d+")
    assert words.findall(bounded) == words.findall(html)
    assert max(items_per_list(bounded), default=0) <= 2 + 1  # + the one holding the rest


def items_per_list(html: str) -> list[int]:
    """How many items each list of well-formed HTML has (its own, not its sublists')."""
    counts: list[int] = []
    open_lists: list[int] = []  # indexes into counts
    stack: list[str] = []
    for match in re.finditer(r"<(/?)([a-z0-9-]+)[^>]*>", html):
        closing, name = match.groups()
        if name in {"br", "hr", "img"}:
            continue
        if closing:
            stack.pop()
            if name in {"ul", "ol"}:
                open_lists.pop()
            continue
        if name == "li" and stack and stack[-1] in {"ul", "ol"}:
            counts[open_lists[-1]] += 1
        stack.append(name)
        if name in {"ul", "ol"}:
            counts.append(0)
            open_lists.append(len(counts) - 1)
    return counts
