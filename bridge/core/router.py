"""The router: processes the inbox in order, per conversation, and records each item's fate.

Matrix events go to ``FromMatrix`` (deliveries for the vendors); vendor events go to
``ToMatrix`` (what ghosts do in the rooms). Both return the writes their work calls for, and the
router commits them together with the item's ``done`` mark, in a group commit shared with the
other lanes. Every step is idempotent, so an item processed twice (after a crash between the
work and that commit) changes nothing the second time.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from mautrix.errors import MatrixConnectionError, MatrixRequestError
from mautrix.types import Event, StateEvent

from bridge.core.audit_trail import Trail
from bridge.core.errors import PermanentFailure
from bridge.core.from_matrix import FromMatrix
from bridge.core.matrix_content import POLL_TYPES
from bridge.core.to_matrix import ToMatrix
from bridge.crypto.machine import Crypto, KeysMissing, Undecryptable
from bridge.db.clock import now_ms
from bridge.db.group_commit import Write
from bridge.db.inbox import CRYPTO_ORIGIN, MATRIX_ORIGIN, InboxItem
from bridge.db.stores import Stores
from bridge.i18n import N_, _
from bridge.logs import log_context
from bridge.matrix.homeserver import Homeserver
from bridge.metrics import TO_MATRIX
from connectors.base import RemoteEvent, event_from_json

log = logging.getLogger("eimis.router")

ENCRYPTED = "m.room.encrypted"
CRYPTO_ATTEMPTS = 8
"""Tries of a crypto item before it is given up (about a minute of backoff)."""
DECRYPTED_TYPES = frozenset({"m.room.message", "m.reaction", "m.sticker", *POLL_TYPES})
"""What an encrypted event may turn out to be: message-like events only (and events of a
client's own namespaced types, ``_message_like``). A redaction, state, membership or receipt
is never encrypted (the homeserver must read it); one found inside ciphertext is a forgery the
homeserver never applied, and is refused."""
REFUSED_ENCRYPTED_TYPE = N_(
    "only messages and reactions are encrypted; a deletion, a change of the conversation or a "
    "read receipt received encrypted is not taken into account"
)
"""Why such an event is refused, for its sender (a catalog text: ``_()`` where it is used)."""
KEY_WAIT_INLINE_S = 2.0
"""How long a lane waits, holding its event, for a room key travelling beside it; after that
it waits as a retry (the key's arrival wakes it)."""


def remote_lane(connector: str, conversation_id: str) -> str:
    return f"{connector}\x1f{conversation_id}"


class Router:
    def __init__(
        self,
        stores: Stores,
        homeserver: Homeserver,
        from_matrix: FromMatrix,
        to_matrix: ToMatrix,
        outbox_notify: Callable[[], None],
        trail: Trail | None = None,
        *,
        crypto: Crypto | None = None,
        key_wait_s: float = 60.0,
        ids_ours: Callable[[str], bool] | None = None,
        on_undecryptable: Callable[[str, str, str], Awaitable[None]] | None = None,
        on_homeserver_back: Callable[[], None] | None = None,
    ) -> None:
        """``crypto``: end-to-bridge encryption, when enabled (``ids_ours``: whether a Matrix
        ID is the bridge's, whose events are never decrypted; ``key_wait_s``: how long an event
        waits for its key). ``on_homeserver_back``: the homeserver answers again after failing."""
        self.stores = stores
        self.hs = homeserver
        self.from_matrix = from_matrix
        self.to_matrix = to_matrix
        self._outbox_notify = outbox_notify
        self.trail = trail or Trail(stores.audit)
        """Vendor events' audit rows are made by ``to_matrix``; counted here once committed."""
        self._homeserver_down = False
        self._failed_once: set[int] = set()
        self.on_homeserver_back: Callable[[], None] = on_homeserver_back or (lambda: None)
        self.crypto = crypto
        """End-to-bridge encryption, when enabled."""
        self._crypto_tries: dict[int, int] = {}
        self.key_wait_s = key_wait_s
        self.ids_ours: Callable[[str], bool] = ids_ours or (lambda mxid: False)
        self.on_undecryptable: Callable[[str, str, str], Awaitable[None]] = (
            on_undecryptable or _nothing
        )
        """Told (room, event, reason) of an event that will never decrypt."""
        self.recovered_up_to: int | None = None
        """Inbox items up to this seq were stored before this process started: a crash may have
        left their work half done, so it is checked before it is redone. None: check all."""

    async def start(self) -> None:
        """Note where this run's own items begin (call before the inbox worker starts)."""
        self.recovered_up_to = await self.stores.inbox.max_seq()

    async def handle(self, item: InboxItem) -> None:
        """Process one inbox item; raises only for failures worth retrying."""
        if item.origin == CRYPTO_ORIGIN:
            context = log_context(crypto=item.lane.split("\x1f", 1)[0])
        elif item.origin == MATRIX_ORIGIN:
            room = item.payload.get("room_id")
            context = log_context(room=room if isinstance(room, str) else None)
        else:
            conversation = item.payload.get("conversation_id")
            context = log_context(
                connector=item.origin,
                conversation=conversation if isinstance(conversation, str) else None,
            )
        with context:
            await self._handle(item)

    async def _handle(self, item: InboxItem) -> None:
        writes: list[Write]
        event: RemoteEvent | None = None
        try:
            if item.origin == CRYPTO_ORIGIN:
                if not await self._crypto_item(item):
                    return
                writes = []
            elif item.origin == MATRIX_ORIGIN:
                payload = await self._readable(item)
                if payload is None:
                    await self.stores.inbox.mark_failed(item.seq, "undecryptable")
                    return
                await self._update_state(payload)
                writes = await self.from_matrix.handle(payload)
            else:
                retrying = item.attempts > 0 or item.seq in self._failed_once
                recovered = self.recovered_up_to is None or item.seq <= self.recovered_up_to
                event = event_from_json(item.payload)
                writes = await self.to_matrix.handle(
                    item.origin,
                    event,
                    retrying=retrying,
                    recovered=recovered or retrying,
                )
        except MatrixConnectionError:
            if not self._homeserver_down:
                self._homeserver_down = True
                log.warning("The homeserver does not answer; conversations wait for it")
            raise
        except PermanentFailure as failure:
            log.warning("Inbox item %d cannot be processed: %s", item.seq, failure)
            await self._not_sent(item, event, "failed", "permanent")
            await self.stores.inbox.mark_failed(item.seq, str(failure))
            return
        except (AttributeError, TypeError, KeyError, ValueError) as error:
            # Malformed input the parsers did not foresee: retrying cannot help, and waiting on
            # it would hold the whole conversation. Recorded as failed for the operators.
            log.error("Inbox item %d is malformed (%s); skipped", item.seq, type(error).__name__)
            await self.stores.inbox.mark_failed(item.seq, f"malformed: {type(error).__name__}")
            return
        except MatrixRequestError as error:
            if 400 <= error.http_status < 500 and error.http_status != 429:
                log.warning(
                    "Inbox item %d refused by the homeserver: %s %s",
                    item.seq,
                    error.errcode,
                    error.message,
                )
                await self._not_sent(item, event, "refused", f"homeserver:{error.errcode}")
                await self.stores.inbox.mark_failed(item.seq, f"homeserver: {error.errcode}")
                return
            raise
        if self._homeserver_down:
            self._homeserver_down = False
            log.info("The homeserver answers again; waiting conversations resume")
            self.on_homeserver_back()
        done = [*writes, self.stores.inbox.done_write(item.seq)]
        await self.stores.commit.commit(done)
        self.trail.committed(done, item.received_at)
        self._failed_once.discard(item.seq)
        if any(write.appends_to == "outbox" for write in writes):
            self._outbox_notify()

    async def _crypto_item(self, item: InboxItem) -> bool:
        """Hand a crypto item (to-device event, device lists, key counts) to the crypto layer.
        A failure is retried (the homeserver or database may be back), a few times only: one
        item that can never be handled must not hold its device's later room keys for ever.
        False when it was given up (marked failed)."""
        if self.crypto is None:
            return True
        try:
            await self.crypto.handle(item.payload)
        except Exception as error:
            # Tries of earlier runs (stored) and of this one (the lane retries the same item).
            tries = item.attempts + self._crypto_tries.pop(item.seq, 0) + 1
            if tries < CRYPTO_ATTEMPTS:
                self._crypto_tries[item.seq] = tries - item.attempts
                raise
            log.warning("Crypto item %d given up (%s)", item.seq, type(error).__name__)
            await self.stores.inbox.mark_failed(item.seq, f"crypto: {type(error).__name__}")
            return False
        self._crypto_tries.pop(item.seq, None)
        return True

    async def _readable(self, item: InboxItem) -> dict[str, Any] | None:
        """``_decrypted``, refusing (PermanentFailure, its sender told) an encrypted event that
        is not message-like once decrypted (``DECRYPTED_TYPES``)."""
        payload = await self._decrypted(item)
        if (
            payload is None
            or item.payload.get("type") != ENCRYPTED
            or payload.get("type") == ENCRYPTED
            or _message_like(payload)
        ):
            return payload
        inner = str(payload.get("type"))[:64]
        room_id, event_id = str(payload.get("room_id")), str(payload.get("event_id"))
        log.warning(
            "Refused encrypted event %s in %s: its inner type is %r", event_id, room_id, inner
        )
        await self.from_matrix.on_refused(room_id, event_id, _(REFUSED_ENCRYPTED_TYPE))
        raise PermanentFailure(f"refused: an encrypted {inner} is never bridged")

    async def _decrypted(self, item: InboxItem) -> dict[str, Any] | None:
        """The event as its sender wrote it: decrypted when it was encrypted (in memory only:
        the inbox keeps the ciphertext). Raises KeysMissing while its room key may still come;
        None once it never will (its sender has been told)."""
        raw = item.payload
        if raw.get("type") != ENCRYPTED or "state_key" in raw:
            return raw
        sender = raw.get("sender")
        if self.crypto is None or not isinstance(sender, str) or self.ids_ours(sender):
            return raw  # our own echo (already relayed when sent), or no crypto: not bridged
        try:
            return await self.crypto.decrypt(raw, wait_s=KEY_WAIT_INLINE_S)
        except KeysMissing as missing:
            try:
                if await self.crypto.catch_up(str(raw.get("room_id"))):
                    return await self.crypto.decrypt(raw)
            except KeysMissing:
                pass
            except Exception as error:
                log.warning(
                    "Could not read the bridge's to-device inboxes (%s)", type(error).__name__
                )
            waited_s = (now_ms() - item.received_at) / 1000
            if waited_s < self.key_wait_s:
                try:
                    await self.crypto.request_key(raw, missing)
                except Exception as error:
                    log.warning("Could not ask for a room key (%s)", type(error).__name__)
                missing.retry_after = min(max(1.0, waited_s), 10.0)  # type: ignore[attr-defined]
                raise
            reason = _("its decryption key did not reach the bridge within {seconds} s").format(
                seconds=f"{self.key_wait_s:g}"
            )
        except Undecryptable as error:
            reason = str(error)
        log.warning("Inbox item %d cannot be decrypted: %s", item.seq, reason)
        self.crypto.undecryptable += 1
        await self.on_undecryptable(str(raw.get("room_id")), str(raw.get("event_id")), reason)
        return None

    async def record_error(self, item: InboxItem, error: Exception) -> None:
        if item.origin != MATRIX_ORIGIN:
            self.trail.retried(item.origin, TO_MATRIX)
        self._failed_once.add(item.seq)
        await self.stores.inbox.record_attempt(item.seq, type(error).__name__)

    async def _not_sent(
        self, item: InboxItem, event: RemoteEvent | None, outcome: str, why: str
    ) -> None:
        """The audit row of a vendor event that will never reach Matrix (committed before the
        item is marked failed: a crash between records it twice rather than never)."""
        if item.origin == MATRIX_ORIGIN or event is None:
            return
        room_id = await self.stores.portals.by_conversation(item.origin, event.conversation_id)
        write = self.trail.to_matrix(item.origin, event, room_id, outcome, detail=why)
        await self.stores.commit.commit([write])
        self.trail.committed([write], None)

    async def _update_state(self, raw: dict[str, Any]) -> None:
        if "state_key" not in raw:
            return
        try:
            event = Event.deserialize(raw)
        except Exception:  # a state event mautrix cannot type is no reason to stop the lane
            return
        if isinstance(event, StateEvent):
            await self.hs.state_store.update_state(event)
        await self.from_matrix.portals.policy.observe(raw)  # joins; portals made public
        if self.crypto is None or not isinstance(raw.get("content"), dict):
            return
        if raw.get("type") == "m.room.encryption":
            if await self.crypto.room_encrypted(str(raw["room_id"]), raw["content"]):
                await self.crypto.ensure_member_devices(str(raw["room_id"]))
        elif raw.get("type") == "m.room.member" and raw["content"].get("membership") in (
            "leave",
            "ban",
        ):
            await self.crypto.member_left(str(raw["room_id"]))


def _message_like(payload: dict[str, Any]) -> bool:
    """A decrypted event the bridge may take: a message-like type, or a client's own namespaced
    type (``com.example.thing``, outside ``m.``), which ``FromMatrix`` bridges as its text or
    refuses with a reason; never a state event."""
    kind = payload.get("type")
    return kind in DECRYPTED_TYPES or (
        isinstance(kind, str)
        and "." in kind
        and not kind.startswith("m.")
        and "state_key" not in payload
    )


async def _nothing(*_unused: str) -> None:
    return None
