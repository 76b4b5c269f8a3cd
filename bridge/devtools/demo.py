"""``eimis-bridge demo``: a local Synapse, the bridge, every shipped sandbox, and a scripted chat.

The script uses only what a user would: each sandbox's user-side API (the stand-in for the
vendor's app) and the Matrix client-server API for the native users. Partway through, the vendor
user who opened the conversation adds a second native user, who must see what follows and
nothing from before. It prints what each side saw and, with ``--once``, exits 0 only when every
side saw every message it should have (and the newcomer nothing earlier).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import ClientSession

from bridge.devtools.matrix_user import MatrixUser, connect
from bridge.devtools.stack import LocalStack, Sandbox
from bridge.devtools.synapse import LocalSynapse
from bridge.directory.importer import import_file
from bridge.directory.sample import HEADER, extract_line, rpps_idnps
from bridge.i18n import _, ngettext
from bridge.logs import setup_logging
from bridge.private_files import private_dir, write_private
from connectors.names import person_name

NATIVE_LOCALPART = "julie.bernard"
NATIVE_DISPLAYNAME = "Julie BERNARD - Médecin"
NEWCOMER_LOCALPART = "marc.petit"
NEWCOMER_DISPLAYNAME = "Marc PETIT - Médecin"
TIMEOUT_S = 90.0


class DemoFailure(Exception):
    """A side saw something it should not have."""


def say(line: str = "") -> None:
    print(line, flush=True)


async def wait_for(what: str, check: Any, timeout: float = TIMEOUT_S) -> Any:
    """Poll an async condition until it returns something truthy. ``what`` (translated) ends
    the message of the ``TimeoutError``, which the demo prints."""
    deadline = time.monotonic() + timeout
    delay = 0.1
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(_("timed out waiting for {what}").format(what=what))
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 1.0)


class SandboxUser:
    """A professional using a vendor's app, through the sandbox's user-side API."""

    def __init__(self, http: ClientSession, sandbox: Sandbox, user: dict[str, Any]) -> None:
        self.http = http
        self.sandbox = sandbox
        self.idnps: str = user["idnps"]
        self.name = f"{user['given_name']} {user['family_name']}"
        """As the vendor shows them."""
        self.bridged_name = person_name(user["given_name"], user["family_name"])
        """As the bridge names them to everyone else (``connectors.names``: ``Alice MARTIN``)."""
        self.base = f"{sandbox.url}/_sandbox/users/{self.idnps}"

    async def start_conversation(self, with_: list[str], title: str) -> str:
        async with self.http.post(
            f"{self.base}/conversations", json={"with": with_, "title": title}
        ) as resp:
            resp.raise_for_status()
            return str((await resp.json())["conversation_id"])

    async def conversations(self) -> list[dict[str, Any]]:
        async with self.http.get(f"{self.base}/conversations") as resp:
            resp.raise_for_status()
            return list((await resp.json())["conversations"])

    async def send(self, conversation_id: str, text: str) -> None:
        async with self.http.post(
            f"{self.base}/conversations/{conversation_id}/messages", json={"text": text}
        ) as resp:
            resp.raise_for_status()

    async def inbox(self) -> list[dict[str, Any]]:
        async with self.http.get(f"{self.base}/inbox") as resp:
            resp.raise_for_status()
            return list((await resp.json())["messages"])

    async def add_participants(self, conversation_id: str, refs: list[str]) -> None:
        """Adds people (IDNPS or Matrix IDs) to a conversation, as the vendor's app allows."""
        async with self.http.post(
            f"{self.base}/conversations/{conversation_id}/participants", json={"add": refs}
        ) as resp:
            resp.raise_for_status()


class NativeUser:
    """A professional on a Matrix client with end-to-end encryption (matrix-nio on vodozemac):
    the portals are encrypted, and what the homeserver stores is ciphertext."""

    def __init__(self, user: MatrixUser) -> None:
        self.user = user
        self.user_id = user.user_id
        self.joined: list[str] = []

    async def invites(self) -> list[str]:
        """Rooms this user was invited to and has now joined."""
        with contextlib.suppress(TimeoutError):
            self.joined += await self.user.accept_invites(timeout=1.0)
        return list(self.joined)

    def encrypted(self, room_id: str) -> bool:
        room = self.user.client.rooms.get(room_id)
        return room is not None and room.encrypted

    async def send(self, room_id: str, text: str) -> None:
        await self.user.send_text(room_id, text)

    async def messages(self, room_id: str) -> list[tuple[str, str]]:
        """(sender's display name, body) of the room's messages this device read, oldest first."""
        await self.user.sync()
        room = self.user.client.rooms.get(room_id)
        return [
            (room.user_name(m.sender) if room else m.sender, str(getattr(m, "body", "")))
            for m in self.user.messages(room_id)
        ]


async def play_script(
    http: ClientSession, sandboxes: list[Sandbox], native: NativeUser, newcomer: NativeUser
) -> dict[str, list[str]]:
    """The scripted conversation; returns each side's transcript. Raises when a side misses one
    (``TimeoutError``) or the newcomer saw what came before their arrival (``DemoFailure``)."""
    first, second = sandboxes[0], sandboxes[1]
    alice = SandboxUser(http, first, first.users[0])
    bob = SandboxUser(http, second, second.users[0])
    stamp = time.strftime("%H:%M:%S")
    lines = {
        "alice": f"[{stamp}] " + _("Hello, could you come and see the patient in room 12?"),
        "bob": f"[{stamp}] " + _("Yes, I will come by around 3 pm."),
        "native": f"[{stamp}] " + _("Thank you, I am preparing the prescription."),
        "welcome": f"[{stamp}] " + _("I am adding Marc, the intern on call, for what follows."),
        "newcomer": f"[{stamp}] " + _("Good evening, I am taking over tonight."),
    }
    before = [lines["alice"], lines["bob"], lines["native"]]
    say(
        _(
            "{alice} ({alice_vendor}) opens a conversation with {bob} ({bob_vendor}) and {mxid} "
            "(Matrix)"
        ).format(
            alice=alice.name,
            alice_vendor=first.type_name,
            bob=bob.name,
            bob_vendor=second.type_name,
            mxid=native.user_id,
        )
    )
    conversation = await alice.start_conversation(
        [bob.idnps, native.user_id], f"Demo {stamp}: " + _("post-operative follow-up")
    )
    await alice.send(conversation, lines["alice"])

    room_id = (await wait_for(_("the invite to reach the Matrix user"), native.invites))[-1]

    async def bob_conversation() -> str | None:
        for conv in await bob.conversations():
            if conv.get("title", "").startswith(f"Demo {stamp}"):
                return str(conv["conversation_id"])
        return None

    bob_conv = await wait_for(
        _("the conversation to open on {vendor}").format(vendor=second.type_name),
        bob_conversation,
    )
    await wait_for(
        _("{name} to receive the first message").format(name=bob.name),
        lambda: _inbox_has(bob, lines["alice"]),
    )
    await bob.send(bob_conv, lines["bob"])
    await wait_for(
        _("the Matrix user to see both vendor messages"),
        lambda: _room_has(native, room_id, [lines["alice"], lines["bob"]]),
    )
    await native.send(room_id, lines["native"])
    await wait_for(
        _("{name} to see the other two").format(name=alice.name),
        lambda: _inbox_has(alice, lines["bob"], lines["native"]),
    )
    await wait_for(
        _("{name} to see the Matrix message").format(name=bob.name),
        lambda: _inbox_has(bob, lines["native"]),
    )

    # Partway through: the vendor user adds a third person, who sees what follows only.
    say(
        _("{name} adds {mxid} (Matrix) to the conversation").format(
            name=alice.name, mxid=newcomer.user_id
        )
    )
    await alice.add_participants(conversation, [newcomer.user_id])

    async def newcomer_joined() -> bool:
        return room_id in await newcomer.invites()

    await wait_for(_("the invite to reach the added Matrix user"), newcomer_joined)
    await alice.send(conversation, lines["welcome"])
    await wait_for(
        _("the added Matrix user to see what follows"),
        lambda: _room_has(newcomer, room_id, [lines["welcome"]]),
    )
    await newcomer.send(room_id, lines["newcomer"])
    await wait_for(
        _("every side to see the added user's message"),
        lambda: _everyone_has(alice, bob, native, room_id, lines["welcome"], lines["newcomer"]),
    )
    earlier = [body for _sender, body in await newcomer.messages(room_id) if body in before]
    if earlier:
        raise DemoFailure(
            ngettext(
                "the added Matrix user saw {n} message from before",
                "the added Matrix user saw {n} messages from before",
                len(earlier),
            ).format(n=len(earlier))
        )
    say(
        _(
            "{mxid}, added partway through, saw what followed and nothing from before "
            "(history visibility: invited; room keys from their arrival on)."
        ).format(mxid=newcomer.user_id)
    )

    said = _("{sender}: {text}")
    transcript = {
        _("{name} on {vendor}").format(name=alice.name, vendor=first.type_name): [
            said.format(sender=m["sender_name"], text=m["text"])
            for m in await alice.inbox()
            if stamp in m["text"]
        ],
        _("{name} on {vendor}").format(name=bob.name, vendor=second.type_name): [
            said.format(sender=m["sender_name"], text=m["text"])
            for m in await bob.inbox()
            if stamp in m["text"]
        ],
        _("{mxid} on Matrix").format(mxid=native.user_id): [
            said.format(sender=sender, text=body)
            for sender, body in await native.messages(room_id)
            if stamp in body
        ],
        _("{mxid} on Matrix (added later)").format(mxid=newcomer.user_id): [
            said.format(sender=sender, text=body)
            for sender, body in await newcomer.messages(room_id)
            if stamp in body
        ],
    }
    return transcript


async def show_search(http: ClientSession, url: str, token: str, person: dict[str, Any]) -> None:
    """A vendor user found from Matrix: the family name typed in any client's "start a chat"
    search (the homeserver's user directory) finds their ghost, named after the directory."""
    term = str(person["family_name"])

    async def found() -> list[tuple[str, str]]:
        async with http.post(
            f"{url}/_matrix/client/v3/user_directory/search",
            json={"search_term": term, "limit": 10},
            headers={"Authorization": f"Bearer {token}"},
        ) as resp:
            results = (await resp.json()).get("results", []) if resp.status == 200 else []
        return [
            (str(r["user_id"]), str(r.get("display_name") or r["user_id"]))
            for r in results
            if person["idnps"] in str(r.get("user_id", ""))
        ]

    hits = await wait_for(_("{name} in the homeserver's user directory").format(name=term), found)
    say(
        "\n" + _("“{term}” typed in any Matrix client's search for people finds:").format(term=term)
    )
    for user_id, name in hits:
        say(f"  {name} ({user_id})")


async def _inbox_has(user: SandboxUser, *texts: str) -> bool:
    seen = [m["text"] for m in await user.inbox()]
    return all(t in seen for t in texts)


async def _everyone_has(
    alice: SandboxUser, bob: SandboxUser, native: NativeUser, room_id: str, *texts: str
) -> bool:
    return (
        await _inbox_has(alice, *texts[1:])  # her own message is not in her inbox
        and await _inbox_has(bob, *texts)
        and await _room_has(native, room_id, list(texts))
    )


async def _room_has(user: NativeUser, room_id: str, texts: list[str]) -> bool:
    bodies = [body for _, body in await user.messages(room_id)]
    return all(t in bodies for t in texts)


async def run_demo(state_dir: Path, *, once: bool) -> int:
    setup_logging("WARNING")
    # The demo's Matrix client (matrix-nio) narrates its key exchanges at WARNING: not news here.
    logging.getLogger("nio").setLevel(logging.ERROR)
    say(
        _(
            "EIMIS bridge demo (state in {state_dir}/). The sandboxes emulate vendor-style APIs; "
            "they are not the vendors' real services."
        ).format(state_dir=state_dir)
    )
    # The sandboxes keep their data in memory, so their ids start again at every run: the
    # bridge's database must start again too (Synapse keeps its rooms and accounts).
    private_dir(state_dir)
    for stale in state_dir.glob("bridge.db*"):
        stale.unlink()
    stack = LocalStack(
        state_dir,
        encrypted=True,  # portals are end-to-end encrypted
        # As in the example config: only people the national directory lists become ghosts.
        config_overrides={"identity": {"require_directory_entry": True}},
    )
    if len(stack.sandboxes) < 2:
        say(_("The demo needs two connector types with sandboxes installed."))
        return 1
    _stop_on_signals()
    try:
        say(_("Starting Synapse, the sandboxes and the bridge ..."))
        await stack.start()
        hs = stack.synapse
        native_password = _native_password(state_dir)
        native_id, native_token = await hs.register_user(NATIVE_LOCALPART, native_password)
        newcomer_id, newcomer_token = await hs.register_user(NEWCOMER_LOCALPART, native_password)
        async with ClientSession() as http:
            sandboxes = list(stack.sandboxes.values())
            for sandbox in sandboxes:
                async with http.get(f"{sandbox.url}/_sandbox/users") as resp:
                    sandbox.users = (await resp.json())["users"]
            matrix_user = await connect(
                hs.url,
                native_id,
                native_token,
                encrypted=True,
                store_dir=state_dir / "native-device",
            )
            native = NativeUser(matrix_user)
            newcomer_user = await connect(
                hs.url,
                newcomer_id,
                newcomer_token,
                encrypted=True,
                store_dir=state_dir / "newcomer-device",
            )
            newcomer = NativeUser(newcomer_user)
            _write_demo_json(state_dir, hs, [native_id, newcomer_id], native_password, sandboxes)
            await _import_directory(stack, sandboxes, native_id, newcomer_id)
            ok = True
            try:
                await matrix_user.client.set_displayname(NATIVE_DISPLAYNAME)
                await newcomer_user.client.set_displayname(NEWCOMER_DISPLAYNAME)
                transcript = await play_script(http, sandboxes, native, newcomer)
                if not (native.joined and native.encrypted(native.joined[-1])):
                    raise TimeoutError(_("the portal is not end-to-end encrypted"))
                await show_search(http, hs.url, native_token, sandboxes[0].users[-1])
                say(
                    "\n"
                    + _(
                        "The portal is end-to-end encrypted (Megolm): the homeserver relayed "
                        "ciphertext; the bridge decrypted and encrypted for the vendors."
                    )
                )
            except (TimeoutError, DemoFailure) as error:
                ok = False
                say(_("FAILED: {error}").format(error=error))
                transcript = {}
            finally:
                await matrix_user.close()
                await newcomer_user.close()
            for side, seen in transcript.items():
                say("\n" + _("{side} saw:").format(side=side))
                for line in seen:
                    say(f"  {line}")
            verdict = _("Verified on every side.") if ok else _("The scripted conversation FAILED.")
            say("\n" + verdict)
            if once:
                return 0 if ok else 1
            say(
                "\n"
                + _(
                    "Still running. Log in with any Matrix client at {url} as {first} or "
                    "{second} (passwords in {state_dir}/demo.json); the sandboxes' users are "
                    "listed there too. Ctrl-C to stop."
                ).format(url=hs.url, first=native_id, second=newcomer_id, state_dir=state_dir)
            )
            await asyncio.Event().wait()
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 0
    finally:
        await stack.stop()
    return 0


def _stop_on_signals() -> None:
    """SIGINT and SIGTERM alike stop the demo and every server it started (``stack.stop()``):
    they cancel it, wherever it is. Not left to Python's KeyboardInterrupt, which SIGTERM never
    raises and which a demo started in the background (SIGINT ignored) never gets. A second
    signal during the stop gets the default action."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def stop() -> None:
        for sig in _STOP_SIGNALS:
            loop.remove_signal_handler(sig)
        task.cancel()

    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, stop)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


async def _import_directory(
    stack: LocalStack, sandboxes: list[Sandbox], native_id: str, newcomer_id: str
) -> None:
    """The demo's national directory: an ANS-style extract listing the sandboxes' (made-up)
    users and the native users with their Matrix IDs, imported as an operator would."""
    people = []
    for n, (displayname, mxid) in enumerate(
        [(NATIVE_DISPLAYNAME, native_id), (NEWCOMER_DISPLAYNAME, newcomer_id)]
    ):
        name, label = displayname.split(" - ")
        given, family = name.split(" ", 1)
        # As in the national extract: in capitals (the directory writes "Julie BERNARD").
        people.append((rpps_idnps(99 - n), given.upper(), family.upper(), label, mxid))
    for sandbox in sandboxes:
        for user in sandbox.users:
            people.append(
                (user["idnps"], user["given_name"], user["family_name"], user["profession"], "")
            )
    lines = [f"{HEADER}MXID|"]
    for idnps, given_name, family_name, label, mxid in people:
        lines.append(f"{extract_line(idnps, family_name, given_name, '10', label)}{mxid}|")
    path = stack.state_dir / "PS_LibreAcces_Personne_activite_demo.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert stack.bridge is not None
    report = await import_file(stack.bridge.stores.directory, path, progress=False)
    if report.rejected:
        raise RuntimeError(f"the demo's directory has {len(report.rejected)} rejected lines")


def _native_password(state_dir: Path) -> str:
    path = state_dir / "native-password"
    if not path.exists():
        write_private(path, secrets.token_urlsafe(18))
    return path.read_text().strip()


def _write_demo_json(
    state_dir: Path,
    hs: LocalSynapse,
    native_ids: list[str],
    password: str,
    sandboxes: list[Sandbox],
) -> None:
    data = {
        "homeserver_url": hs.url,
        "server_name": hs.server_name,
        # The first is the one in the conversation from the start; the second is added later.
        "native_users": [{"user_id": user_id, "password": password} for user_id in native_ids],
        "sandboxes": {
            s.type_name: {"url": s.url, "users": [u["idnps"] for u in s.users]} for s in sandboxes
        },
    }
    write_private(state_dir / "demo.json", json.dumps(data, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    sys.exit(asyncio.run(run_demo(Path(".demo"), once="--once" in sys.argv)))
