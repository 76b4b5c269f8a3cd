"""End to end, hostile content (issue 11, points 8 and 10): what reaches vendors is inert, and one
hostile message neither freezes the bridge nor holds up other conversations.

A native Matrix user's plain text reaches the PandaLab-style (Markdown) vendor escaped, so that a
Markdown renderer, even one obeying raw HTML, shows the very text and no link, image or HTML;
formatted messages keep only the sanitiser's allow-list; vendor Markdown reaches Matrix
sanitised. A 40 KB HTML list of 4,000 items (which once took seconds on the event loop) is
converted in the worker process, delivered with its list bounded, while another conversation
keeps flowing and ``/live`` answers: the conversion's result is held until then, so this is
shown by order of events, not by timing.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession
from bs4 import BeautifulSoup
from markdown_it import MarkdownIt

from bridge.devtools.stack import LocalStack
from bridge.formatting import worker
from bridge.formatting.limits import MAX_LIST_ITEMS

from e2e_helpers import ThreeWay, send_status, three_way, unique, vendor_copy
from helpers import wait_until

pytestmark = pytest.mark.e2e

# A vendor that obeys raw HTML in Markdown: the worst case for what reaches it.
VENDOR_RENDERER = MarkdownIt("commonmark", {"html": True, "breaks": True}).enable(
    ["table", "strikethrough"]
)
HOSTILE_PLAIN = (
    "[x](javascript:alert(1)) ![](https://tracker.example/p.png) <img src=x onerror=alert(1)> "
    "<https://evil.example/a> &lt;b&gt; [r][1]\n\n[1]: https://evil.example/ref"
)


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    async with LocalStack(
        Path(tmp_path_factory.mktemp("inert")),
        config_overrides={"delivery": {"success_statuses": True}},
    ) as local:
        yield local
    worker.shutdown()


@pytest.fixture
async def trio(stack: LocalStack, http: ClientSession) -> AsyncIterator[ThreeWay]:
    async with three_way(stack, http, "pandalab", "medipeps", "Inerte", "Bonjour") as found:
        yield found


def rendered(markdown: str) -> tuple[str, str]:
    """What the vendor's renderer makes of ``markdown``: its HTML, and the text a reader sees."""
    html = VENDOR_RENDERER.render(markdown)
    return html, " ".join(BeautifulSoup(html, "html.parser").get_text().split())


async def test_a_native_users_plain_text_reaches_a_markdown_vendor_as_inert_text(
    trio: ThreeWay,
) -> None:
    marker = unique("Inerte")
    body = f"{marker} {HOSTILE_PLAIN}"
    await trio.native.send(trio.room_id, "m.room.message", {"msgtype": "m.text", "body": body})
    at_pandalab = await vendor_copy(trio.starter, lambda m: marker in m["text"])
    html, text = rendered(at_pandalab["text"])
    for active in ("<a", "<img", "<b>"):  # as tags: their text shows, escaped
        assert active not in html, html
    assert text == " ".join(body.split())
    # The plain-text vendor gets the text exactly as written.
    at_medipeps = await vendor_copy(trio.other, lambda m: marker in m["text"])
    assert at_medipeps["text"] == body


async def test_formatted_messages_keep_the_allow_list_and_their_text_is_inert(
    trio: ThreeWay,
) -> None:
    marker = unique("Mise en forme")
    html = (
        f"<p>{marker} <strong>5 mg</strong> <a href='https://example.org/p'>protocole</a> "
        "[x](javascript:alert(1)) ![](https://tracker.example/p.png) "
        "&lt;img src=x onerror=alert(1)&gt; <a href='javascript:alert(1)'>piège</a>"
        "<img src='https://tracker.example/q.png' onerror='alert(1)'></p>"
    )
    await trio.native.send(
        trio.room_id,
        "m.room.message",
        {
            "msgtype": "m.text",
            "body": marker,
            "format": "org.matrix.custom.html",
            "formatted_body": html,
        },  # fmt: skip
    )
    at_pandalab = await vendor_copy(trio.starter, lambda m: marker in m["text"])
    out, text = rendered(at_pandalab["text"])
    assert "<strong>5 mg</strong>" in out
    assert re.findall(r"<a [^>]*>", out) == ['<a href="https://example.org/p">']
    assert "<img" not in out and "tracker.example/q.png" not in text
    assert "[x](javascript:alert(1)) ![](https://tracker.example/p.png)" in text
    assert "<img src=x onerror=alert(1)>" in text and "piège" in text


async def test_vendor_markdown_reaches_matrix_sanitised(trio: ThreeWay) -> None:
    marker = unique("Retour")
    await trio.starter.post(trio.starter_conv, text=f"{marker} **ok** {HOSTILE_PLAIN}")
    event = await trio.native.wait_for_event(
        trio.room_id, lambda e: marker in (e.get("content") or {}).get("body", ""), 30
    )
    html = event["content"]["formatted_body"]
    # The vendor's Markdown is its formatting: its https links stay (the allow-list), the
    # javascript: link is text, the remote image and the raw HTML are gone or shown as text.
    assert "<strong>ok</strong>" in html
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    hrefs = re.findall(r'href="([^"]*)"', html)
    assert hrefs and all(href.startswith("https://evil.example/") for href in hrefs)
    assert "[x](javascript:alert(1))" in html


async def test_a_hostile_list_is_delivered_bounded_while_another_conversation_flows(
    stack: LocalStack, http: ClientSession, trio: ThreeWay, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The conversion runs in the worker; its result is held until the other conversation has
    # been served, which the event loop could not do if the conversion ran on it.
    converting, release = asyncio.Event(), asyncio.Event()
    real_run = worker.run
    offloaded: list[str] = []

    async def held(fn: Any, *args: Any, **kwargs: Any) -> Any:
        offloaded.append(fn.__name__)
        conversion = asyncio.ensure_future(real_run(fn, *args, **kwargs))
        converting.set()
        await release.wait()
        return await conversion

    monkeypatch.setattr(worker, "run", held)
    marker = unique("Liste")
    items = 4000
    html = f"<p>{marker}</p><ol>" + "".join(f"<li>{i}</li>" for i in range(1, items + 1)) + "</ol>"
    assert len(html) > 40_000
    event_id = await trio.native.send(
        trio.room_id,
        "m.room.message",
        {
            "msgtype": "m.text",
            "body": marker,
            "format": "org.matrix.custom.html",
            "formatted_body": html,
        },  # fmt: skip
    )
    async with asyncio.timeout(60):
        await converting.wait()
    async with three_way(stack, http, "pandalab", "medipeps", "Ailleurs", "Bonjour") as other:
        meanwhile = unique("Pendant ce temps")
        await other.native.send(
            other.room_id, "m.room.message", {"msgtype": "m.text", "body": meanwhile}
        )
        await vendor_copy(other.starter, lambda m: m["text"] == meanwhile)
        async with http.get(f"{stack.bridge_url}/live") as resp:
            assert resp.status == 200
        assert not [m for m in await trio.starter.inbox() if marker in m["text"]]
    release.set()

    async def parts() -> list[str] | None:
        texts = [m["text"] for m in await trio.starter.inbox()]
        start = next((i for i, t in enumerate(texts) if marker in t), None)
        if start is None:
            return None
        mine = texts[start:]
        return mine if any(f"{items}\\. {items}" in t for t in mine) else None

    received = "\n".join(await wait_until(parts, 60, "the hostile list at PandaLab"))
    assert "render_text" in offloaded
    lines = [line.strip() for line in received.splitlines() if line.strip()]
    items_seen = [m.groups() for line in lines if (m := re.fullmatch(r"(\d+)\\?\. (\d+)", line))]
    numbers = [int(text) for mark, text in items_seen if mark == text]
    assert numbers == list(range(1, items + 1))  # every item, in order
    assert f"{MAX_LIST_ITEMS}. {MAX_LIST_ITEMS}" in lines  # a list up to its bound,
    assert f"{MAX_LIST_ITEMS + 2}\\. {MAX_LIST_ITEMS + 2}" in lines  # then lines of text
    status = await send_status(trio, event_id, "pandalab")
    assert status["status"] == "SUCCESS"
