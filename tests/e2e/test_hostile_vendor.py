"""A hostile vendor, end to end through a real Synapse with encrypted portals and nio native users.

The vendor is a webhook-contract connector an operator adds at run time ("hostile"); its app is
a webhook sandbox behind a recording proxy (the test sees every call the bridge makes to the
vendor), and the test also speaks for the vendor directly: signed events posted to the bridge's
events URL, as any vendor could. The vendor tries to edit and delete messages its users did not
write, to rename another vendor's ghost by claiming its IDNPS, and to make a ghost appear for
someone the national directory does not list. Native users try to pass for professionals.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web

from bridge.app import Bridge
from bridge.cli import main
from bridge.config import parse_config
from bridge.core.to_matrix import (
    DELETE_NOT_AUTHOR,
    EDIT_NOT_AUTHOR,
    NOT_BRIDGED,
    NOT_IN_DIRECTORY,
)
from bridge.devtools.ports import free_port
from bridge.devtools.stack import LocalStack, Sandbox
from bridge.directory.sample import HEADER, extract_line, rpps_idnps
from bridge.i18n import _
from connectors.idnps import Idnps
from connectors.kit.signing import sign
from connectors.pandalab.sandbox import USERS as PANDALAB_USERS
from connectors.sandbox.kernel import SandboxUser
from connectors.webhook.sandbox import CAPABILITIES, create_app

from e2e_helpers import (
    AppUser,
    Proxy,
    app_users_of,
    encrypted_native,
    inbox_message,
    portal_of,
    practitioner_bundle,
    redaction_of,
    unique,
)
from helpers import wait_until
from matrix_user import MatrixUser, text_is

pytestmark = pytest.mark.e2e

CAMILLE = PANDALAB_USERS[0]  # a PandaLab-style user whose IDNPS the hostile vendor claims
JULIEN = PANDALAB_USERS[1]  # a PandaLab-style user in the hostile vendor's conversations
HOSTILE_USERS = (
    SandboxUser(Idnps(rpps_idnps(900001)), "Hélène", "Hostile", "Infirmier"),
    SandboxUser(CAMILLE.idnps, "Evil", "Impostor", "Pirate"),
    SandboxUser(Idnps(rpps_idnps(900003)), "Faux", "Nom", "Chirurgien"),
    SandboxUser(Idnps(rpps_idnps(900004)), "Inconnu", "Annuaire", "Médecin"),
)
HELENE, IMPOSTOR, FAUX, INCONNU = range(4)
FAUX_IN_ANS = ("DURAND", "LEO", "10", "Médecin")  # what the national directory says of FAUX


class RecordingProxy(Proxy):
    """The hostile vendor's API as the bridge reaches it: every call is recorded, then passed to
    the vendor's app once it runs (calls made before wait for it)."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.target: str | None = None
        self.calls: list[tuple[str, str, bytes]] = []
        self._http: ClientSession | None = None

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.close()
        await super().stop()

    async def forward(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.calls.append((request.method, request.path, body))
        if self.target is None:
            return web.json_response({"error": "unavailable", "message": "starting"}, status=503)
        if self._http is None:
            self._http = ClientSession()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host",)}
        async with self._http.request(
            request.method,
            f"{self.target}{request.path_qs}",
            data=body,
            headers=headers,
            allow_redirects=False,
        ) as resp:
            answer = await resp.read()
            kept = {k: v for k, v in resp.headers.items() if k.lower() == "content-type"}
            return web.Response(status=resp.status, body=answer, headers=kept)

    def delivery_reports(self, conversation_id: str, message_id: str) -> list[dict[str, Any]]:
        path = f"/conversations/{conversation_id}/messages/{message_id}/delivery"
        return [
            json.loads(body) for method, p, body in self.calls if method == "POST" and p == path
        ]


@dataclass
class Hostile:
    connector_id: str
    secret: str
    proxy: RecordingProxy
    sandbox: Sandbox

    def users(self, http: ClientSession) -> list[AppUser]:
        return [
            AppUser(
                http,
                self.sandbox,
                {
                    "idnps": str(u.idnps),
                    "given_name": u.given_name,
                    "family_name": u.family_name,
                    "profession": u.profession,
                },
            )
            for u in HOSTILE_USERS
        ]


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    # Every vendor shows delivery statuses: refusals reach the hostile vendor through them.
    async with LocalStack(Path(tmp_path_factory.mktemp("hostile")), encrypted=True) as local:
        yield local


def running_bridge(stack: LocalStack) -> Bridge:
    assert stack.bridge is not None
    return stack.bridge


@pytest.fixture(scope="module")
async def hostile(stack: LocalStack) -> AsyncIterator[Hostile]:
    """The operator adds the hostile vendor at run time; its app starts with the shared secret
    the bridge generated (until then the proxy answers 503: the bridge announces again)."""
    proxy = RecordingProxy(free_port())
    await proxy.start()
    bridge = running_bridge(stack)
    assert bridge.connector_manager is not None
    capabilities = {**CAPABILITIES, "delivery_status": True}
    added = await bridge.connector_manager.add(
        "hostile", "webhook", {"base_url": proxy.url, "capabilities": capabilities}
    )
    port = free_port()
    sandbox = Sandbox(
        "webhook",
        f"http://127.0.0.1:{port}",
        port,
        lambda: create_app(secrets=(added.secret,), users=HOSTILE_USERS),
    )
    await sandbox.start()
    proxy.target = sandbox.url

    async def running() -> bool:
        connector = running_bridge(stack).connectors.get("hostile")
        return connector is not None and type(connector).__name__ == "WebhookConnector"

    await wait_until(running, 30, "the hostile connector to run")
    try:
        yield Hostile("hostile", added.secret, proxy, sandbox)
    finally:
        await sandbox.close()
        await proxy.stop()


async def forge(http: ClientSession, stack: LocalStack, hostile: Hostile, *events: dict) -> None:
    """The vendor posts events to the bridge itself, signed with its shared secret."""
    stamped = [{"id": str(uuid.uuid4()), "at": datetime.now(UTC).isoformat(), **e} for e in events]
    body = json.dumps({"events": stamped}).encode()
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "Idempotency-Key": str(uuid.uuid4()),
        "X-Eimis-Timestamp": timestamp,
        "X-Eimis-Signature": sign(hostile.secret, timestamp, body),
    }
    url = f"{stack.bridge_url}/connectors/{hostile.connector_id}/events"
    async with http.post(url, data=body, headers=headers) as resp:
        assert 200 <= resp.status < 300, (resp.status, await resp.text())


def ghost_of(stack: LocalStack, connector: str, idnps: str) -> str:
    return f"@eimis_{connector}_{idnps}:{stack.synapse.server_name}"


async def pandalab_user(stack: LocalStack, http: ClientSession, who: SandboxUser) -> AppUser:
    return next(u for u in await app_users_of(stack, http, "pandalab") if u.idnps == who.idnps)


async def join_conversation(
    stack: LocalStack, opener: AppUser, with_: list[str], natives: list[MatrixUser], hello: str
) -> tuple[str, str]:
    """``opener`` (hostile) opens a conversation and says ``hello``; once every native user has
    read it: (the vendor conversation, the portal room)."""
    conversation = await opener.start_conversation(with_, unique("Hostile"))
    await opener.post(conversation, text=hello)
    room_id = await portal_of(stack, "hostile", conversation)
    for native in natives:
        await native.accept_invites(room_id, timeout=30)
        await native.wait_for_message(room_id, text_is(hello), 60)
    return conversation, room_id


async def at(user: AppUser, text: str) -> dict[str, Any]:
    return await wait_until(
        lambda: inbox_message(user, lambda m: m["text"] == text), 60, f"{text!r} at {user.idnps}"
    )


async def display_name(native: MatrixUser, mxid: str) -> str | None:
    return (await native.client.get_displayname(mxid)).displayname


async def directory_cli(stack: LocalStack, *args: str) -> int:
    config = stack.state_dir / "config.yaml"
    action, *rest = args
    return await asyncio.to_thread(main, ["directory", action, "-c", str(config), *rest])


async def import_ans(
    stack: LocalStack, path: Path, *people: tuple[str, str, str, str, str]
) -> None:
    """An operator imports a PS_LibreAcces extract listing ``people`` (idnps, family, given,
    code, label); the running bridge applies it to its ghosts."""
    lines = [extract_line(*p) for p in people]
    path.write_text("\n".join([HEADER, *lines]) + "\n", encoding="utf-8")
    assert await directory_cli(stack, "import", str(path)) == 0
    await running_bridge(stack).ghost_names.apply()


async def audit_details(stack: LocalStack, connector: str) -> list[tuple[str, str, str]]:
    rows = await running_bridge(stack).db.fetch(
        "SELECT kind, outcome, detail FROM audit_log WHERE connector = $1 AND outcome = 'refused'",
        connector,
    )
    return [(r["kind"], r["outcome"], r["detail"]) for r in rows]


async def test_a_vendor_cannot_edit_or_delete_messages_its_users_did_not_write(
    stack: LocalStack, hostile: Hostile, http: ClientSession, tmp_path: Path
) -> None:
    helene = hostile.users(http)[HELENE]
    paul = await pandalab_user(stack, http, JULIEN)
    async with await encrypted_native(stack, tmp_path, "victim") as native:
        hello = unique("Bonjour")
        conversation, room_id = await join_conversation(
            stack, helene, [paul.idnps, native.user_id], [native], hello
        )
        paul_conv = (await at(paul, hello))["conversation_id"]

        allergy = unique("Allergie : pénicilline")
        native_event = await native.send_text(room_id, allergy)
        dose = unique("Dose : 5 mg")
        await paul.post(paul_conv, text=dose)
        paul_event = (await native.wait_for_message(room_id, text_is(dose), 60)).event_id
        native_copy = (await at(helene, allergy))["message_id"]
        paul_copy = (await at(helene, dose))["message_id"]

        forged = unique("Allergie : aucune")
        await forge(
            http,
            stack,
            hostile,
            *(
                {
                    "type": "message.edited",
                    "conversation_id": conversation,
                    "message_id": copy,
                    "sender": helene.idnps,
                    "text": forged,
                    "mentions": [],
                }
                for copy in (native_copy, paul_copy)
            ),
            *(
                {
                    "type": "message.deleted",
                    "conversation_id": conversation,
                    "message_id": copy,
                    "sender": helene.idnps,
                }
                for copy in (native_copy, paul_copy)
            ),
        )
        # A later legitimate message of the same conversation: it comes after the forged events.
        later = unique("Patient vu ce matin")
        own = await helene.post(conversation, text=later)
        await native.wait_for_message(room_id, text_is(later), 60)
        await at(paul, later)

        # Matrix is untouched: no redaction, no replacement text.
        events = native.events(room_id)
        for victim in (native_event, paul_event):
            assert not [e for e in events if redaction_of(victim)(e)]
        assert not [m for m in native.messages(room_id) if forged in getattr(m, "body", "")]
        # ... and so is what the other vendor shows.
        copy_at_paul = await at(paul, allergy)
        assert not copy_at_paul["edited"] and not copy_at_paul["deleted"]
        assert copy_at_paul["text"] == allergy

        # The vendor was told, on each message it tried to change, in French.
        for copy in (native_copy, paul_copy):
            reports = hostile.proxy.delivery_reports(conversation, copy)
            assert {"status": "failed", "detail": _(EDIT_NOT_AUTHOR)} in reports
            assert {"status": "failed", "detail": _(DELETE_NOT_AUTHOR)} in reports
        # The operator reads it in the audit trail.
        refused = await audit_details(stack, "hostile")
        assert refused.count(("edit", "refused", "not_author")) >= 2
        assert refused.count(("deletion", "refused", "not_author")) >= 2

        # The vendor's users still edit and delete their own messages.
        fixed = unique("Patient vu cet après-midi")
        await helene.edit(conversation, own, fixed)
        await native.wait_for_message(room_id, lambda m: getattr(m, "body", "") == f"* {fixed}", 60)
        await helene.delete(conversation, own)
        later_event = (await native.wait_for_message(room_id, text_is(later), 1)).event_id
        await native.wait_for_event(room_id, redaction_of(later_event), 60)


async def test_a_vendor_claiming_another_vendors_user_does_not_rename_their_ghost(
    stack: LocalStack, hostile: Hostile, http: ClientSession, tmp_path: Path
) -> None:
    paul = await pandalab_user(stack, http, CAMILLE)
    impostor = hostile.users(http)[IMPOSTOR]
    paul_ghost = ghost_of(stack, "pandalab", paul.idnps)
    async with await encrypted_native(stack, tmp_path, "witness") as native:
        # Paul's ghost exists, named by PandaLab.
        conversation = await paul.start_conversation([native.user_id], unique("Paul"))
        hello = unique("Bonjour de Paul")
        await paul.post(conversation, text=hello)
        room_id = await portal_of(stack, "pandalab", conversation)
        await native.accept_invites(room_id, timeout=30)
        await native.wait_for_message(room_id, text_is(hello), 60)
        assert await display_name(native, paul_ghost) == "Camille MARTIN - Infirmier"

        # The hostile vendor says Paul's IDNPS is its "Evil Impostor - Pirate".
        await join_conversation(stack, impostor, [native.user_id], [native], unique("Coucou"))
        bridge = running_bridge(stack)
        await bridge.ghost_names.apply()  # the directory pass that used to rename every ghost

        impostor_ghost = ghost_of(stack, "hostile", paul.idnps)
        assert await display_name(native, impostor_ghost) == "Evil IMPOSTOR - Pirate"
        assert await display_name(native, paul_ghost) == "Camille MARTIN - Infirmier"
        row = await bridge.stores.ghosts.get(paul_ghost)
        assert row is not None and row.display_name == "Camille MARTIN - Infirmier"
        entry = await bridge.stores.directory.get(paul.idnps)
        assert entry is not None and entry.display_name == "Camille MARTIN - Infirmier"
        assert entry.source == "connector:pandalab"
        # What Paul writes reaches the room under his own name still.
        again = unique("Toujours moi")
        await paul.post(conversation, text=again)
        seen = await native.wait_for_message(room_id, text_is(again), 60)
        assert seen.sender == paul_ghost


async def test_the_national_directory_outranks_every_vendor_claim(
    stack: LocalStack, hostile: Hostile, http: ClientSession, tmp_path: Path
) -> None:
    faux = hostile.users(http)[FAUX]
    family, given, code, label = FAUX_IN_ANS
    await import_ans(
        stack,
        tmp_path / "PS_LibreAcces_Personne_activite_1.txt",
        (faux.idnps, family, given, code, label),
        (CAMILLE.idnps, "MARTIN-DURAND", "CAMILLE", "60", "Infirmier"),
    )
    async with await encrypted_native(stack, tmp_path, "reader") as native:
        # A new ghost is named by the directory, not by its vendor ("Faux Nom - Chirurgien").
        await join_conversation(stack, faux, [native.user_id], [native], unique("Bonjour"))
        faux_ghost = ghost_of(stack, "hostile", faux.idnps)
        # "LEO" / "DURAND" in the extract: named the French way.
        assert await display_name(native, faux_ghost) == "Leo DURAND - Médecin"
        # Existing ghosts of the same person, on every vendor, follow the directory.
        wanted = "Camille MARTIN-DURAND - Infirmier"
        assert await display_name(native, ghost_of(stack, "hostile", CAMILLE.idnps)) == wanted
        assert await display_name(native, ghost_of(stack, "pandalab", CAMILLE.idnps)) == wanted
        # A vendor describing them again changes nothing.
        bridge = running_bridge(stack)
        member = await bridge.portals.find_professional(Idnps(faux.idnps), exclude="pandalab")
        assert member is not None and member.display_name == "Leo DURAND - Médecin"
        entry = await bridge.stores.directory.get(faux.idnps)
        assert entry is not None and entry.source == "ps"


async def test_native_users_are_shown_to_vendors_with_their_matrix_id_or_directory_identity(
    stack: LocalStack, hostile: Hostile, http: ClientSession, tmp_path: Path
) -> None:
    helene = hostile.users(http)[HELENE]
    paul = await pandalab_user(stack, http, JULIEN)
    ghost_name = await running_bridge(stack).portals.ghost("pandalab", Idnps(paul.idnps))
    async with (
        await encrypted_native(stack, tmp_path, "mallory") as mallory,
        await encrypted_native(stack, tmp_path, "doctor") as doctor,
    ):
        # Mallory names himself exactly like a ghost; the doctor is in the national directory.
        await mallory.client.set_displayname(ghost_name.display_name)
        await doctor.client.set_displayname("Dr Who")
        bundle = tmp_path / "practitioner.json"
        doctor_idnps = rpps_idnps(900010)
        bundle.write_text(
            json.dumps(
                practitioner_bundle(doctor_idnps, "GARCIA", "Ana", doctor.user_id, profession="10")
            )
        )
        assert await directory_cli(stack, "import", str(bundle)) == 0
        entry = await running_bridge(stack).stores.directory.by_mxid(doctor.user_id)
        assert entry is not None

        hello = unique("Bonjour")
        conversation, room_id = await join_conversation(
            stack, helene, [paul.idnps, mallory.user_id, doctor.user_id], [mallory, doctor], hello
        )
        paul_conv = (await at(paul, hello))["conversation_id"]
        assert paul_conv
        fake = unique("Je suis infirmier, changez la dose")
        await mallory.send_text(room_id, fake)
        true = unique("Dose confirmée")
        await doctor.wait_for_message(room_id, text_is(fake), 60)
        await doctor.send_text(room_id, true)
        for vendor_user in (helene, paul):
            seen = await at(vendor_user, fake)
            assert seen["sender"] == mallory.user_id
            assert seen["sender_name"] == f"{ghost_name.display_name} ({mallory.user_id})"
            assert seen["sender_name"] != ghost_name.display_name
            seen = await at(vendor_user, true)
            assert seen["sender_name"] == entry.display_name
            assert "GARCIA" in seen["sender_name"] and "Dr Who" not in seen["sender_name"]


async def test_require_directory_entry_refuses_a_ghost_for_an_unknown_idnps(
    stack: LocalStack, hostile: Hostile, http: ClientSession, tmp_path: Path
) -> None:
    # The operator turns identity.require_directory_entry on (a restart applies it).
    stack.raw_config = {**stack.raw_config, "identity": {"require_directory_entry": True}}
    stack.config = parse_config(stack.raw_config)
    await stack.stop_bridge()
    await stack.start_bridge()

    async def running() -> bool:
        connector = running_bridge(stack).connectors.get("hostile")
        return connector is not None and type(connector).__name__ == "WebhookConnector"

    await wait_until(running, 30, "the hostile connector to run again")
    users = hostile.users(http)
    faux, inconnu = users[FAUX], users[INCONNU]
    family, given, code, label = FAUX_IN_ANS
    await import_ans(  # FAUX is in the national directory, INCONNU is not
        stack,
        tmp_path / "PS_LibreAcces_Personne_activite_2.txt",
        (faux.idnps, family, given, code, label),
    )
    unknown_ghost = ghost_of(stack, "hostile", inconnu.idnps)
    async with await encrypted_native(stack, tmp_path, "careful") as native:
        # Someone absent from the directory opens a conversation: it is not bridged, and what
        # they write there is reported failed to them.
        alone = await inconnu.start_conversation([native.user_id], unique("Inconnu"))
        attempt = unique("Bonjour, je suis médecin")
        attempt_id = await inconnu.post(alone, text=attempt)

        async def reported(conversation: str, message_id: str) -> list[dict[str, Any]] | None:
            message = await inconnu.message(conversation, message_id)
            return (message or {}).get("delivery") or None

        got = await wait_until(lambda: reported(alone, attempt_id), 60, "the refusal at the vendor")
        assert [(r["status"], r["detail"]) for r in got] == [("failed", _(NOT_BRIDGED))]

        # A listed colleague opens one with them: it is bridged without them, and what they
        # write there is refused and reported to them; the conversation goes on.
        hello = unique("Bonjour")
        conversation, room_id = await join_conversation(
            stack, faux, [inconnu.idnps, native.user_id], [native], hello
        )
        await native.wait_for_message(
            room_id, lambda m: inconnu.idnps in getattr(m, "body", ""), 60
        )
        sneaky = unique("Message de l'inconnu")
        sneaky_id = await inconnu.post(conversation, text=sneaky)
        later = unique("Suite de la conversation")
        await faux.post(conversation, text=later)
        await native.wait_for_message(room_id, text_is(later), 60)
        assert not [m for m in native.messages(room_id) if getattr(m, "body", "") == sneaky]
        got = await wait_until(
            lambda: reported(conversation, sneaky_id), 60, "the refusal at the vendor"
        )
        assert [(r["status"], r["detail"]) for r in got] == [("failed", _(NOT_IN_DIRECTORY))]

        # A Matrix user's invite does not make one appear either: it declines, saying why.
        dm = await native.create_dm(unknown_ghost)
        left = await native.wait_for_event(
            dm,
            lambda e: (
                e.get("type") == "m.room.member"
                and e.get("state_key") == unknown_ghost
                and (e.get("content") or {}).get("membership") == "leave"
            ),
            60,
        )
        assert "annuaire national" in left["content"]["reason"]

        # No ghost was made; the operator sees why.
        bridge = running_bridge(stack)
        assert await bridge.stores.ghosts.get(unknown_ghost) is None
        assert unknown_ghost not in await bridge.homeserver.joined_members(
            room_id, viewer=bridge.ids.bot_mxid
        )
        refused = await audit_details(stack, "hostile")
        assert ("conversation", "refused", "not_in_directory") in refused
        assert ("text", "refused", "not_in_directory") in refused
