"""The admin room: a direct chat between an operator and the bridge bot.

An operator (a Matrix ID in ``admin.admins``) invites the bot; the bot joins and the room becomes
an admin room (remembered in the database). Anyone else who invites the bot, or writes in an
admin room, gets a polite refusal. An operator's message is a command line (``help`` lists
them); the answer is a notice from the bot. A destructive command asks for confirmation, which
only the same operator, in the same room, can give by answering ``yes`` within
``admin.confirm_within_s``.

Any other user of the bridge's homeserver may DM the bot too: that room becomes a help desk
(remembered apart), where ``find <nom ou identifiant>``, ``dm <identifiant>`` and ``aide``
work, in French; an admin command there is refused, in French. Users of other homeservers (even
trusted ones) are refused: the bridge serves its homeserver's users, who are the ones its
operators answer for.

The bot's answers carry transaction ids derived from the command's event id, so an event
processed twice (a crash between the answer and its inbox mark) is answered once.
"""

from __future__ import annotations

import html
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from mautrix.errors import MatrixRequestError
from mautrix.types import RoomID

from bridge.admin.commands import AdminContext, Reply, build_parser
from bridge.admin.parser import CommandError, HelpShown, parse, split
from bridge.commands import CommandFailed
from bridge.commands import find as finding
from bridge.core.connector_manager import ConnectorAdminError
from bridge.core.errors import PermanentFailure, UnknownUser
from bridge.db.connector_state import BRIDGE_STATE, ConnectorStateStore
from bridge.i18n import N_, _
from bridge.matrix.homeserver import derived_txn_id

log = logging.getLogger("eimis.admin")

ADMIN_ROOMS_KEY = "admin_rooms"
# What people who are not operators read: English message ids, translated where shown (``_()``).
REFUSAL = N_(
    "Hello. I am the eimis-bridge bot: I take commands from this bridge's operators only. "
    "If you need something from the bridge, please write to its operators."
)
YES = ("yes", "y", "oui", "confirm")
HELP_ROOMS_KEY = "help_rooms"
ELSEWHERE = N_(
    "Hello. I am the EIMIS bridge's bot of {domain}: I answer this server's users only. "
    "Please ask the bridge's bot of your own server."
)
HELP = N_(
    "I find the health professionals the EIMIS bridge reaches:\n"
    "- find <name or identifier>: searches by name (family and/or given name) or by "
    "identifier (RPPS, ADELI or IDNPS); each answer gives a link to write to the person.\n"
    "- dm <identifier>: opens a conversation with this professional (you are invited to it).\n"
    "- aide: this message."
)
WELCOME = N_("Hello! {help}")
"""Filled with the translated ``HELP``."""
NOT_ADMIN = N_(
    "This command is for the bridge's administrators only. Here: find, dm and aide "
    "(type “aide”)."
)
UNKNOWN = N_("I did not understand. Type “aide” for the list of commands.")


@dataclass
class _Pending:
    action: Any
    expires: float


class AdminRoom:
    def __init__(self, ctx: AdminContext) -> None:
        self.ctx = ctx
        self.admins = frozenset(ctx.config.admin.admins)
        self.bot = ctx.config.bot_mxid
        self._state = ConnectorStateStore(ctx.stores.db, BRIDGE_STATE)
        self._rooms: set[str] | None = None
        self._help_rooms: set[str] | None = None
        self.domain = ctx.config.homeserver.domain
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._parser = build_parser()

    async def rooms(self) -> set[str]:
        if self._rooms is None:
            raw = await self._state.get(ADMIN_ROOMS_KEY)
            self._rooms = set(json.loads(raw)) if raw else set()
        return self._rooms

    async def help_rooms(self) -> set[str]:
        if self._help_rooms is None:
            raw = await self._state.get(HELP_ROOMS_KEY)
            self._help_rooms = set(json.loads(raw)) if raw else set()
        return self._help_rooms

    async def _remember(self, room_id: str, present: bool, *, help_desk: bool = False) -> None:
        rooms = await (self.help_rooms() if help_desk else self.rooms())
        if (room_id in rooms) == present:
            return
        rooms.add(room_id) if present else rooms.discard(room_id)
        key = HELP_ROOMS_KEY if help_desk else ADMIN_ROOMS_KEY
        await self._state.set(key, json.dumps(sorted(rooms)))

    def _local(self, mxid: str) -> bool:
        return mxid.partition(":")[2] == self.domain

    # Membership -------------------------------------------------------------------------------

    async def on_bot_invite(self, room_id: str, inviter: str) -> None:
        """The bot was invited: an operator's DM becomes an admin room; others are refused."""
        intent = self.ctx.homeserver.bot
        if inviter not in self.admins and self._local(inviter):
            await self._open_help_desk(room_id)
            return
        if inviter not in self.admins:
            log.info("Refusing an invite of the bot from another homeserver's user")
            try:
                await intent.leave_room(
                    RoomID(room_id), reason=_(ELSEWHERE).format(domain=self.domain)
                )
            except MatrixRequestError as error:
                log.warning("Could not refuse the bot's invite (%s)", error.errcode)
            return
        try:
            await intent.join_room_by_id(RoomID(room_id))
        except MatrixRequestError as error:
            log.warning("Could not join the admin room %s (%s)", room_id, error.errcode)
            return
        await self._remember(room_id, True)
        # An operator's client usually encrypts DMs: the bot's answers are encrypted there too
        # (and commands, secrets shown once included, never cross the homeserver in clear).
        await self.ctx.homeserver.follow_encryption(room_id, self.ctx.homeserver.config.bot_mxid)
        log.info("Admin room %s opened by an operator", room_id)
        await self._send(
            room_id,
            Reply(
                "eimis-bridge admin room. Type 'help' for the commands, '<command> -h' for one. "
                "I will also post here when a connector goes down, comes back, has its "
                "credentials rejected, stalls, or a delivery becomes a dead letter."
            ),
            derived_txn_id("admin-welcome", room_id),
        )

    async def _open_help_desk(self, room_id: str) -> None:
        try:
            await self.ctx.homeserver.bot.join_room_by_id(RoomID(room_id))
        except MatrixRequestError as error:
            log.warning("Could not join the help desk room %s (%s)", room_id, error.errcode)
            return
        await self._remember(room_id, True, help_desk=True)
        await self.ctx.homeserver.follow_encryption(room_id, self.ctx.homeserver.config.bot_mxid)
        log.info("Help desk room %s opened by a user of the homeserver", room_id)
        await self._send(
            room_id,
            Reply(_(WELCOME).format(help=_(HELP))),
            derived_txn_id("help-welcome", room_id),
        )

    async def on_bot_left(self, room_id: str) -> None:
        await self._remember(room_id, False)
        await self._remember(room_id, False, help_desk=True)

    # Messages ---------------------------------------------------------------------------------

    async def handles(self, raw: dict[str, Any]) -> bool:
        """Whether this room event belongs to an admin room (then it is dealt with here)."""
        room_id = raw.get("room_id")
        if isinstance(room_id, str) and room_id in await self.help_rooms():
            await self._help_desk(room_id, raw)
            return True
        if not isinstance(room_id, str) or room_id not in await self.rooms():
            return False
        if raw.get("type") != "m.room.message" or raw.get("sender") == self.bot:
            return True
        sender = str(raw.get("sender"))
        content = raw.get("content") if isinstance(raw.get("content"), dict) else {}
        event_id = str(raw.get("event_id"))
        txn_id = derived_txn_id("admin-reply", event_id)
        if sender not in self.admins:
            await self._send(room_id, Reply(_(REFUSAL)), txn_id)
            return True
        if content.get("msgtype") == "m.file" and isinstance(content.get("url"), str):
            name = str(content.get("filename") or content.get("body") or "upload")
            self.ctx.uploads[(room_id, sender)] = (content["url"], name)
            await self._send(
                room_id,
                Reply(f"Got {name[:80]}. 'directory import' imports it into the directory."),
                txn_id,
            )
            return True
        body = content.get("body")
        if content.get("msgtype") != "m.text" or not isinstance(body, str) or not body.strip():
            return True
        await self._send(room_id, await self._answer(room_id, sender, body), txn_id)
        return True

    async def _help_desk(self, room_id: str, raw: dict[str, Any]) -> None:
        """A message in a help desk room: find, dm and aide, answered in French."""
        if raw.get("type") != "m.room.message" or raw.get("sender") == self.bot:
            return
        content = raw.get("content") if isinstance(raw.get("content"), dict) else {}
        body = content.get("body")
        if content.get("msgtype") != "m.text" or not isinstance(body, str) or not body.strip():
            return
        txn_id = derived_txn_id("help-reply", str(raw.get("event_id")))
        await self._send(room_id, await self.help_answer(body, str(raw.get("sender"))), txn_id)

    async def help_answer(self, body: str, sender: str) -> Reply:
        """The help desk's answer to one line (never logged: it may name a person)."""
        text = body.strip().removeprefix("!")
        word, _space, rest = text.partition(" ")
        word = word.lower()
        if word in ("aide", "help", "?"):
            return Reply(_(HELP))
        if word not in ("find", "cherche", "chercher", "dm"):
            known = set(getattr(self._subcommands(), "choices", None) or ())
            return Reply(_(NOT_ADMIN) if word in known else _(UNKNOWN))
        connectors = [cid for cid, c in self.ctx.config.connectors.items() if c.enabled]
        store = self.ctx.stores.directory
        log.info("Help desk command %s", word)
        try:
            if word == "dm":
                return await self._dm(store, connectors, rest, sender)
            return Reply("\n".join(await finding.find(store, connectors, rest)))
        except CommandFailed as error:
            return Reply(str(error))
        except Exception as error:
            log.exception("A help desk command failed")
            return Reply(
                _("The search failed ({error}). Please try again later.").format(
                    error=type(error).__name__
                )
            )

    async def _dm(self, store: Any, connectors: list[str], rest: str, sender: str) -> Reply:
        """``dm <identifier>``: the portal opened at once (a ghost), or the link (a native
        account, or a bridge without portals at hand)."""
        portals = self.ctx.portals
        idnps = finding.identifier(rest)
        if portals is None or idnps is None:
            return Reply("\n".join(await finding.dm_link(store, connectors, rest)))
        try:
            room_id, member, new = await portals.open_direct(sender, idnps)
        except (UnknownUser, PermanentFailure) as error:
            return Reply(_("Could not open the conversation: {reason}.").format(reason=error))
        if room_id is None:
            return Reply("\n".join(await finding.dm_link(store, connectors, rest)))
        if not new:
            return Reply(
                _("You already have a conversation with {name}: {link}").format(
                    name=member.display_name, link=f"https://matrix.to/#/{room_id}"
                )
            )
        return Reply(
            _("Conversation opened with {name}: accept the invitation, or {link}").format(
                name=member.display_name, link=f"https://matrix.to/#/{room_id}"
            )
        )

    def _subcommands(self) -> Any:
        for action in self._parser._actions:
            if getattr(action, "choices", None):
                return action
        return None

    async def _answer(self, room_id: str, sender: str, body: str) -> Reply:
        text = body.strip()
        if text.startswith("!"):
            text = text[1:]  # the habit of other bridges' bots
        pending = self._pending.pop((room_id, sender), None)
        if pending is not None:
            if text.lower() in YES and pending.expires >= time.monotonic():
                return await self._run_safely(pending.action)
            if text.lower() in YES:
                return Reply("That confirmation came too late; run the command again.")
            if text.lower() in ("no", "n", "non", "cancel"):
                return Reply("Cancelled.")
            # Anything else: the pending action is dropped and the text read as a command.
        try:
            words = split(text)
            if not words:
                return Reply("Type 'help' for the commands.")
            args = parse(self._parser, words)
        except HelpShown as shown:
            return Reply(str(shown), pre=True)
        except CommandError as error:
            return Reply(f"{error}\nType 'help' for the commands.", pre=True)
        if getattr(args, "handler", None) is None:
            return Reply("Type 'help' for the commands.")
        log.info("Admin command %s by an operator", args.command)
        reply = await self._run_safely(lambda: args.handler(self.ctx, args, f"{room_id}|{sender}"))
        if reply.confirm is not None:
            self._pending[(room_id, sender)] = _Pending(
                reply.confirm, time.monotonic() + self.ctx.config.admin.confirm_within_s
            )
        return reply

    async def _run_safely(self, action: Any) -> Reply:
        try:
            return await action()
        except CommandError as error:
            return Reply(str(error))
        except (ValueError, ConnectorAdminError) as error:  # "bad input" answers, as sentences
            return Reply(str(error))
        except Exception as error:
            log.exception("An admin command failed")
            return Reply(f"The command failed ({type(error).__name__}); the bridge log has more.")

    async def _send(self, room_id: str, reply: Reply, txn_id: str) -> None:
        content: dict[str, Any] = {"msgtype": "m.notice", "body": reply.text}
        if reply.pre:
            content["format"] = "org.matrix.custom.html"
            content["formatted_body"] = f"<pre><code>{html.escape(reply.text)}</code></pre>"
        try:
            await self.ctx.homeserver.send_event(
                self.bot, room_id, "m.room.message", content, txn_id=txn_id
            )
        except MatrixRequestError as error:
            log.warning("Could not answer in the admin room (%s)", error.errcode)

    async def post(self, text: str, key: str) -> None:
        """An alert to every admin room (``key`` makes the send idempotent)."""
        for room_id in sorted(await self.rooms()):
            await self._send(room_id, Reply(text), derived_txn_id("admin-alert", key, room_id))
