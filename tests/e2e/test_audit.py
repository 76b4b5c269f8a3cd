"""The audit log end to end: what one real delivery, through a real Synapse, leaves in it
(its metadata, never its content)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import ClientSession

from bridge.db.audit import AuditRecord
from bridge.devtools.stack import LocalStack

from e2e_helpers import app_users_of, inbox_message, portal_of, unique
from helpers import wait_until


async def collect(chunks: AsyncIterator[str]) -> str:
    return "".join([chunk async for chunk in chunks])


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    async with LocalStack(Path(tmp_path_factory.mktemp("audit"))) as local:
        yield local


@pytest.mark.e2e
async def test_a_vendor_to_vendor_message_leaves_its_metadata_and_no_content(
    stack: LocalStack, http: ClientSession
) -> None:
    alice = (await app_users_of(stack, http, "pandalab"))[0]
    bob = (await app_users_of(stack, http, "medipeps"))[0]
    conversation = await alice.start_conversation([bob.idnps], unique("Audit"))
    text = unique("Résultats confidentiels du patient en chambre 12")
    message_id = await alice.post(conversation, text=text)
    at_bob = await wait_until(
        lambda: inbox_message(bob, lambda m: m["text"] == text), 30, "the message at Medipeps"
    )
    room_id = await portal_of(stack, "pandalab", conversation)
    assert stack.bridge is not None
    log = stack.bridge.stores.audit

    async def both_rows() -> list[AuditRecord] | None:
        rows = [r for r in await log.query(portal=room_id, limit=1000) if r.kind == "text"]
        return rows if len(rows) == 2 else None

    to_matrix, to_vendor = sorted(
        await wait_until(both_rows, 10, "the audit rows"), key=lambda r: r.direction
    )
    size = len(text.encode())
    ghost = f"@eimis_pandalab_{alice.idnps}:{stack.synapse.server_name}"
    assert (to_matrix.direction, to_matrix.connector, to_matrix.outcome) == (
        "to_matrix",
        "pandalab",
        "sent",
    )
    assert (to_matrix.sender, to_matrix.recipient, to_matrix.remote_id, to_matrix.size) == (
        alice.idnps,
        room_id,
        message_id,
        size,
    )
    assert (to_vendor.direction, to_vendor.connector, to_vendor.outcome) == (
        "to_vendor",
        "medipeps",
        "delivered",
    )
    assert to_vendor.event_id == to_matrix.event_id and to_vendor.event_id.startswith("$")
    assert (to_vendor.sender, to_vendor.recipient, to_vendor.size) == (
        ghost,
        at_bob["conversation_id"],
        size,
    )
    assert to_vendor.remote_id == at_bob["message_id"]
    assert to_vendor.detail is None and to_matrix.detail is None
    # The conversation's opening left its rows too (on Matrix, then at Medipeps).
    kinds = {(r.direction, r.kind) for r in await log.query(portal=room_id, limit=1000)}
    assert {("to_matrix", "conversation"), ("to_vendor", "conversation")} <= kinds

    # No content anywhere in the log, in any column, nor in its exports.
    for fmt in ("csv", "json"):
        exported = await collect(log.export(fmt, portal=room_id))
        assert "confidentiels" not in exported and text not in exported
