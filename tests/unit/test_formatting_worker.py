"""Large conversions run off the event loop, in a worker process with time and memory limits
(issue 11, point 8). The loop's freedom is shown by a handshake, never by timing: the worker
waits for a file that only the event loop creates while the conversion runs."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from bridge.core import degradation
from bridge.core.degradation import RenderedText, render_text, render_text_bounded
from bridge.formatting import worker
from connectors.base import Capabilities

MARKDOWN = Capabilities(formatting="markdown")


def wait_for_file(path: str) -> str:
    """In the worker: returns once ``path`` exists (or gives up after 60 s)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return "released"
        time.sleep(0.01)
    return "never released"


def spin() -> None:
    while True:
        pass


def allocate() -> int:
    return len(bytearray(worker.MEMORY_LIMIT_BYTES * 2))


@pytest.fixture(autouse=True, scope="module")
def stop_the_worker() -> Any:
    yield
    worker.shutdown()


async def test_the_worker_is_another_process() -> None:
    assert await worker.run(os.getpid) != os.getpid()


async def test_the_event_loop_runs_while_a_conversion_runs(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    conversion = asyncio.create_task(worker.run(wait_for_file, str(gate), time_limit=120))
    await asyncio.sleep(0)  # the conversion is under way: only the loop can open the gate
    assert not conversion.done()
    gate.touch()
    assert await conversion == "released"


async def test_a_conversion_past_its_time_limit_fails_and_the_next_one_works() -> None:
    with pytest.raises(worker.ConversionFailed, match="time limit"):
        await worker.run(spin, time_limit=0.5)
    assert await worker.run(len, "abc") == 3


async def test_a_conversion_past_the_memory_limit_fails() -> None:
    with pytest.raises(worker.ConversionFailed, match="memory limit"):
        await worker.run(allocate)
    assert await worker.run(len, "abc") == 3


async def test_other_errors_of_the_conversion_pass_through() -> None:
    with pytest.raises(degradation.Undeliverable, match="vide"):
        await worker.run(render_text, {"msgtype": "m.text", "body": "  "}, MARKDOWN, "X", "pl")


def hostile_list(items: int = 4000) -> dict[str, Any]:
    html = "<ol>" + "<li>x</li>" * items + "</ol>"
    return {"msgtype": "m.text", "body": "x", "format": "org.matrix.custom.html",
            "formatted_body": html}  # fmt: skip


async def test_large_messages_are_rendered_in_the_worker_small_ones_in_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    real_run = worker.run

    async def spy(fn: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(args))
        return await real_run(fn, *args, **kwargs)

    monkeypatch.setattr(worker, "run", spy)
    small = {"msgtype": "m.text", "body": "bonjour [x](javascript:alert(1))"}
    assert (await render_text_bounded(small, MARKDOWN, "X", "pl")).parts == (
        render_text(small, MARKDOWN, "X", "pl").parts
    )
    assert calls == []
    big = hostile_list()
    rendered = await render_text_bounded(big, MARKDOWN, "X", "pl")
    assert calls == [4]
    assert rendered == render_text(big, MARKDOWN, "X", "pl")


async def test_when_the_worker_fails_the_plain_body_goes_with_a_note(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def failing(fn: Any, *args: Any, **kwargs: Any) -> Any:
        raise worker.ConversionFailed("time limit")

    monkeypatch.setattr(worker, "run", failing)
    content = hostile_list()
    content["body"] = "liste [x](javascript:alert(1))"
    rendered = await render_text_bounded(content, MARKDOWN, "X", "pl")
    assert isinstance(rendered, RenderedText)
    assert rendered.parts == ["liste \\[x\\](javascript:alert(1))"]
    assert rendered.notes == [
        "mise en forme retirée : le message était trop complexe pour être converti"
    ]


async def test_large_vendor_markdown_is_converted_in_the_worker_with_a_plain_fallback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bridge.formatting.convert import markdown_to_html, plain_to_html

    calls: list[str] = []
    real_run = worker.run

    async def spy(fn: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(fn.__name__)
        return await real_run(fn, *args, **kwargs)

    monkeypatch.setattr(worker, "run", spy)
    text = "**gras** " + "- x\n" * 2000
    html = await worker.bounded(
        markdown_to_html, text, size=len(text), fallback=lambda: plain_to_html(text)
    )
    assert calls == ["markdown_to_html"] and html == markdown_to_html(text)

    async def failing(fn: Any, *args: Any, **kwargs: Any) -> Any:
        raise worker.ConversionFailed("time limit")

    monkeypatch.setattr(worker, "run", failing)
    html = await worker.bounded(
        markdown_to_html, text, size=len(text), fallback=lambda: plain_to_html(text)
    )
    assert html == plain_to_html(text)
