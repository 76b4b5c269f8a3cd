"""A stub Matrix homeserver for the benchmarks: answers the client-server API calls the bridge
makes, at once and plausibly, and counts what it was sent.

It is not a homeserver: no federation, no auth rules, no sync. It keeps just enough state for the
bridge's calls to get sensible answers (registered users, rooms and their members, power levels,
the create event) and deduplicates sends on (user, transaction id) as Synapse does, returning
``$<hash>`` event ids. Every message event sent is kept per room (sender, type, body), so a
benchmark can count deliveries and check their order.

Run standalone: ``python bench/stub_homeserver.py --port 8008 --domain eimis.localhost
--as-token TOKEN --bot-localpart eimis_bot``; ``GET /_stub/stats`` gives the counters.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import time
from collections import Counter, defaultdict
from typing import Any

from aiohttp import web

ROOM_VERSION = "10"


def _error(status: int, errcode: str, message: str) -> web.Response:
    return web.json_response({"errcode": errcode, "error": message}, status=status)


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:43]


class StubHomeserver:
    def __init__(self, *, domain: str, as_token: str, bot_localpart: str) -> None:
        self.domain = domain
        self.as_token = as_token
        self.bot_mxid = f"@{bot_localpart}:{domain}"
        self.registered: set[str] = {self.bot_mxid}
        self.displaynames: dict[str, str] = {}
        self.members: dict[str, dict[str, str]] = defaultdict(dict)  # room -> user -> membership
        self.state: dict[str, dict[tuple[str, str], dict[str, Any]]] = defaultdict(dict)
        self.txns: dict[tuple[str, str], str] = {}
        self.messages: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
        """room -> [(sender, event type, body)] of every new message event, in arrival order."""
        self.message_count = 0
        self.first_message_at: float | None = None
        self.last_message_at: float | None = None
        self.calls: Counter[str] = Counter()
        self.unknown: Counter[str] = Counter()
        self.media: dict[str, bytes] = {}
        self._room_ids = itertools.count(1)
        self.app = self._build_app()

    # Helpers -----------------------------------------------------------------------------------

    def _user(self, request: web.Request) -> str:
        """The user an appservice request acts as (``user_id`` query, default the bot)."""
        return request.query.get("user_id") or self.bot_mxid

    def _check_token(self, request: web.Request) -> web.Response | None:
        header = request.headers.get("Authorization", "")
        if header != f"Bearer {self.as_token}":
            return _error(401, "M_UNKNOWN_TOKEN", "Unknown access token")
        return None

    def _event(
        self, room_id: str, sender: str, etype: str, content: dict[str, Any], state_key: str | None
    ) -> dict[str, Any]:
        event: dict[str, Any] = {
            "type": etype,
            "room_id": room_id,
            "sender": sender,
            "content": content,
            "origin_server_ts": int(time.time() * 1000),
            "event_id": "$" + _digest(room_id, sender, etype, str(state_key), json.dumps(content)),
        }
        if state_key is not None:
            event["state_key"] = state_key
        return event

    def _set_state(
        self, room_id: str, sender: str, etype: str, state_key: str, content: dict[str, Any]
    ) -> dict[str, Any]:
        event = self._event(room_id, sender, etype, content, state_key)
        self.state[room_id][(etype, state_key)] = event
        if etype == "m.room.member":
            self.members[room_id][state_key] = str(content.get("membership", "leave"))
        return event

    def _membership(self, room_id: str, user: str, membership: str) -> None:
        content: dict[str, Any] = {"membership": membership}
        name = self.displaynames.get(user)
        if name:
            content["displayname"] = name
        self._set_state(room_id, user, "m.room.member", user, content)

    def _power_levels(self, creator: str) -> dict[str, Any]:
        return {
            "users": {creator: 100, self.bot_mxid: 100},
            "users_default": 0,
            "events_default": 0,
            "state_default": 50,
            "ban": 50,
            "kick": 50,
            "redact": 50,
            "invite": 0,
            "events": {},
        }

    def ensure_room(self, room_id: str, creator: str | None = None) -> None:
        """A room the stub was never told about (pre-created by a benchmark) gets default state."""
        if room_id in self.state:
            return
        creator = creator or self.bot_mxid
        create = {"creator": creator, "room_version": ROOM_VERSION}
        self._set_state(room_id, creator, "m.room.create", "", create)
        self._set_state(room_id, creator, "m.room.power_levels", "", self._power_levels(creator))
        self._set_state(room_id, creator, "m.room.join_rules", "", {"join_rule": "invite"})
        self._membership(room_id, creator, "join")

    # Routes ------------------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        @web.middleware
        async def count(request: web.Request, handler: Any) -> web.StreamResponse:
            route = request.match_info.route.resource
            name = route.canonical if route is not None else "?"
            self.calls[f"{request.method} {name}"] += 1
            if request.path.startswith("/_matrix/client/v3") or "/media/" in request.path:
                refused = self._check_token(request)
                if refused is not None:
                    return refused
            return await handler(request)

        app = web.Application(middlewares=[count], client_max_size=512 * 1024 * 1024)
        c = "/_matrix/client/v3"
        room = c + "/rooms/{room_id}"
        app.add_routes(
            [
                web.get("/_matrix/client/versions", self.versions),
                web.get(c + "/account/whoami", self.whoami),
                web.post(c + "/register", self.register),
                web.post("/_matrix/client/v1/appservice/{as_id}/ping", self.ping),
                web.get(c + "/profile/{user_id}", self.get_profile),
                web.get(c + "/profile/{user_id}/displayname", self.get_displayname),
                web.put(c + "/profile/{user_id}/displayname", self.set_displayname),
                web.put(c + "/profile/{user_id}/avatar_url", self.ok),
                web.post(c + "/createRoom", self.create_room),
                web.post(c + "/join/{room_id}", self.join),
                web.post(room + "/join", self.join),
                web.post(room + "/invite", self.invite),
                web.post(room + "/leave", self.leave),
                web.put(room + "/send/{event_type}/{txn_id}", self.send),
                web.put(room + "/redact/{event_id}/{txn_id}", self.redact),
                web.put(room + "/state/{event_type}", self.put_state),
                web.put(room + "/state/{event_type}/{state_key:.*}", self.put_state),
                web.get(room + "/state", self.get_all_state),
                web.get(room + "/state/{event_type}", self.get_state),
                web.get(room + "/state/{event_type}/{state_key:.*}", self.get_state),
                web.get(room + "/joined_members", self.joined_members),
                web.get(room + "/members", self.get_members),
                web.get(room + "/messages", self.get_messages),
                web.put(room + "/typing/{user_id}", self.ok),
                web.post(room + "/receipt/{receipt_type}/{event_id}", self.ok),
                web.post(room + "/read_markers", self.ok),
                web.post("/_matrix/media/v3/upload", self.upload),
                web.post("/_matrix/client/v1/media/upload", self.upload),
                web.get("/_matrix/client/v1/media/download/{server}/{media_id}", self.download),
                web.get(
                    "/_matrix/client/v1/media/download/{server}/{media_id}/{name}", self.download
                ),
                web.get("/_stub/stats", self.stats),
                web.get("/_stub/messages", self.dump_messages),
                web.route("*", "/{tail:.*}", self.unknown_route),
            ]
        )
        return app

    async def ok(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def unknown_route(self, request: web.Request) -> web.Response:
        self.unknown[f"{request.method} {request.path}"] += 1
        return _error(404, "M_UNRECOGNIZED", "Unrecognized request")

    async def versions(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "versions": [f"v1.{n}" for n in range(1, 12)],
                "unstable_features": {"org.matrix.msc2716": False},
            }
        )

    async def whoami(self, request: web.Request) -> web.Response:
        return web.json_response({"user_id": self._user(request), "is_guest": False})

    async def register(self, request: web.Request) -> web.Response:
        body = await request.json()
        mxid = f"@{body.get('username')}:{self.domain}"
        if mxid in self.registered:
            return _error(400, "M_USER_IN_USE", "User ID already taken.")
        self.registered.add(mxid)
        return web.json_response({"user_id": mxid, "home_server": self.domain})

    async def ping(self, request: web.Request) -> web.Response:
        return web.json_response({"duration_ms": 1})

    async def get_profile(self, request: web.Request) -> web.Response:
        user = request.match_info["user_id"]
        if user not in self.registered:
            return _error(404, "M_NOT_FOUND", "Profile not found")
        name = self.displaynames.get(user)
        return web.json_response({"displayname": name} if name else {})

    async def get_displayname(self, request: web.Request) -> web.Response:
        user = request.match_info["user_id"]
        name = self.displaynames.get(user)
        if name is None:
            return _error(404, "M_NOT_FOUND", "Profile not found")
        return web.json_response({"displayname": name})

    async def set_displayname(self, request: web.Request) -> web.Response:
        user = request.match_info["user_id"]
        body = await request.json()
        self.displaynames[user] = str(body.get("displayname") or "")
        return web.json_response({})

    async def create_room(self, request: web.Request) -> web.Response:
        body = await request.json()
        creator = self._user(request)
        room_id = f"!stub{next(self._room_ids)}{_digest(creator, str(time.time()))[:8]}:" + (
            self.domain
        )
        self.ensure_room(room_id, creator)
        for event in body.get("initial_state") or []:
            self._set_state(
                room_id, creator, event["type"], event.get("state_key", ""), event["content"]
            )
        if body.get("name"):
            self._set_state(room_id, creator, "m.room.name", "", {"name": body["name"]})
        for user in body.get("invite") or []:
            self._membership(room_id, user, "invite")
        return web.json_response({"room_id": room_id})

    async def join(self, request: web.Request) -> web.Response:
        room_id = request.match_info["room_id"]
        self.ensure_room(room_id)
        self._membership(room_id, self._user(request), "join")
        return web.json_response({"room_id": room_id})

    async def invite(self, request: web.Request) -> web.Response:
        room_id = request.match_info["room_id"]
        body = await request.json()
        self.ensure_room(room_id)
        self._membership(room_id, str(body.get("user_id")), "invite")
        return web.json_response({})

    async def leave(self, request: web.Request) -> web.Response:
        room_id = request.match_info["room_id"]
        self.ensure_room(room_id)
        self._membership(room_id, self._user(request), "leave")
        return web.json_response({})

    async def send(self, request: web.Request) -> web.Response:
        room_id = request.match_info["room_id"]
        user = self._user(request)
        key = (user, request.match_info["txn_id"])
        event_id = self.txns.get(key)
        if event_id is None:
            content = await request.json()
            event_id = "$" + _digest(room_id, *key)
            self.txns[key] = event_id
            etype = request.match_info["event_type"]
            body = content.get("body") if isinstance(content, dict) else None
            self.messages[room_id].append((user, etype, body if isinstance(body, str) else ""))
            if etype == "m.room.message":
                now = time.monotonic()
                self.message_count += 1
                self.last_message_at = now
                if self.first_message_at is None:
                    self.first_message_at = now
        return web.json_response({"event_id": event_id})

    async def redact(self, request: web.Request) -> web.Response:
        key = (self._user(request), "redact:" + request.match_info["txn_id"])
        event_id = self.txns.setdefault(key, "$" + _digest(request.match_info["room_id"], *key))
        return web.json_response({"event_id": event_id})

    async def put_state(self, request: web.Request) -> web.Response:
        room_id = request.match_info["room_id"]
        self.ensure_room(room_id)
        content = await request.json()
        event = self._set_state(
            room_id,
            self._user(request),
            request.match_info["event_type"],
            request.match_info.get("state_key", ""),
            content,
        )
        return web.json_response({"event_id": event["event_id"]})

    async def get_state(self, request: web.Request) -> web.Response:
        room_id = request.match_info["room_id"]
        self.ensure_room(room_id)
        etype = request.match_info["event_type"]
        state_key = request.match_info.get("state_key", "")
        event = self.state[room_id].get((etype, state_key))
        if event is None and etype == "m.room.member" and state_key:
            # A member the stub was never told about: answer as if they had joined (the
            # benchmarks' native users), with a name derived from their localpart.
            name = state_key[1:].split(":", 1)[0].replace(".", " ").title()
            self.displaynames.setdefault(state_key, name)
            self._membership(room_id, state_key, "join")
            event = self.state[room_id][(etype, state_key)]
        if event is None:
            return _error(404, "M_NOT_FOUND", "Event not found")
        if request.query.get("format") == "event":
            return web.json_response(event)
        return web.json_response(event["content"])

    async def get_all_state(self, request: web.Request) -> web.Response:
        room_id = request.match_info["room_id"]
        self.ensure_room(room_id)
        return web.json_response(list(self.state[room_id].values()))

    async def joined_members(self, request: web.Request) -> web.Response:
        room_id = request.match_info["room_id"]
        self.ensure_room(room_id)
        joined = {
            user: {"display_name": self.displaynames.get(user), "avatar_url": None}
            for user, membership in self.members[room_id].items()
            if membership == "join"
        }
        return web.json_response({"joined": joined})

    async def get_members(self, request: web.Request) -> web.Response:
        room_id = request.match_info["room_id"]
        self.ensure_room(room_id)
        chunk = [e for (t, _), e in self.state[room_id].items() if t == "m.room.member"]
        return web.json_response({"chunk": chunk})

    async def get_messages(self, request: web.Request) -> web.Response:
        return web.json_response({"chunk": [], "start": "s0", "end": None})

    async def upload(self, request: web.Request) -> web.Response:
        data = await request.read()
        media_id = _digest(str(len(self.media)), str(time.time()))[:24]
        self.media[media_id] = data
        return web.json_response({"content_uri": f"mxc://{self.domain}/{media_id}"})

    async def download(self, request: web.Request) -> web.Response:
        data = self.media.get(request.match_info["media_id"])
        if data is None:
            return _error(404, "M_NOT_FOUND", "Media not found")
        return web.Response(body=data, content_type="application/octet-stream")

    # Benchmark side ----------------------------------------------------------------------------

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "message_count": self.message_count,
                "first_message_at": self.first_message_at,
                "last_message_at": self.last_message_at,
                "calls": dict(self.calls),
                "unknown": dict(self.unknown),
            }
        )

    async def dump_messages(self, request: web.Request) -> web.Response:
        """Per room, the bodies of ``m.room.message`` events (optionally from one sender prefix)."""
        prefix = request.query.get("sender_prefix", "")
        out = {
            room: [
                body
                for sender, etype, body in sends
                if etype == "m.room.message" and sender.startswith(prefix)
            ]
            for room, sends in self.messages.items()
        }
        return web.json_response(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--domain", default="eimis.localhost")
    parser.add_argument("--as-token", required=True)
    parser.add_argument("--bot-localpart", default="eimis_bot")
    args = parser.parse_args()
    stub = StubHomeserver(
        domain=args.domain, as_token=args.as_token, bot_localpart=args.bot_localpart
    )
    web.run_app(stub.app, host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
