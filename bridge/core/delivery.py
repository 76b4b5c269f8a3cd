"""Delivery: carries outbox items to the vendors, in order per (connector, portal room), and
decides what becomes of each one.

Each item is read as its typed operation (``operations.py``) and done by the executor of its
kind (``executors/``), which says what it did and which vendor ids it created; this module is
the policy around them: the ids mapped and the audit row are committed with the item's
completion; a vendor that is down holds its lanes until it answers again (``health.py``); a
failure worth retrying is retried (and the sender told once), up to ``max_attempts`` for a
vendor that keeps refusing, after which the item is a dead letter that holds the rest of its
conversation; a permanent failure fails the item alone, and its sender is told why.

Each call carries an idempotency key (the portal room for a new conversation, the Matrix event id
for a message, reaction, edit, membership, name or topic change), so a retry after a timeout or
a crash never shows anything twice. What a vendor cannot show is degraded (``degradation.py``)
and the sender is told (``send_status.py``): nothing is silently lost.
"""

from __future__ import annotations

import logging

from bridge.config import MediaConfig
from bridge.core import operations as op
from bridge.core.audit_trail import Trail
from bridge.core.connectors import ConnectorSet
from bridge.core.degradation import Undeliverable
from bridge.core.errors import PermanentFailure
from bridge.core.executors import Delivered, Executors, Outcome
from bridge.core.health import ConnectorHealth
from bridge.core.lanes import LaneScheduler
from bridge.core.portals import Portals
from bridge.core.send_status import Outcome as StatusOutcome
from bridge.core.send_status import StatusReporter
from bridge.db.group_commit import GroupCommit
from bridge.db.outbox import OutboxItem
from bridge.db.stores import Stores
from bridge.i18n import N_, _, ngettext
from bridge.logs import log_context
from bridge.matrix.homeserver import Homeserver
from bridge.matrix.media import MediaError, MediaRepository
from bridge.metrics import TO_VENDOR
from connectors.base import ConnectorError

log = logging.getLogger("eimis.delivery")


class Delivery:
    def __init__(
        self,
        stores: Stores,
        homeserver: Homeserver,
        connectors: ConnectorSet,
        media: MediaRepository,
        media_config: MediaConfig,
        status: StatusReporter,
        max_attempts: int = 10,
        success_statuses: bool = False,
        trail: Trail | None = None,
        portals: Portals | None = None,
    ) -> None:
        self.stores = stores
        self.media_config = media_config
        self.status = status
        self.max_attempts = max_attempts
        self.success_statuses = success_statuses
        self.executors = Executors(stores, homeserver, connectors, media, media_config, portals)
        """Each kind of operation done at its vendor."""
        self.trail = trail or Trail(stores.audit)
        """Each delivery's audit row (committed with it) and metrics."""
        self.health = ConnectorHealth(self._vendor_back)
        # Its own group commit: on PostgreSQL, completed deliveries commit while the router's
        # batch (other rows) is committing.
        self._commit = GroupCommit(stores.db)
        self.queue = LaneScheduler[OutboxItem](
            "outbox",
            stores.outbox.pending,
            self.handle,
            self.record_error,
            fetch_lane=stores.outbox.pending_in_lane,
        )
        """The outbox's ordered lanes, worked by this delivery (started by the bridge)."""
        self._attempts: dict[int, int] = {}
        self._told_retrying: set[int] = set()
        self._media_tries: dict[int, int] = {}
        """Failed tries at fetching an item's file (not the homeserver down), by seq."""

    def _vendor_back(self, connector: str) -> None:
        self.queue.retry_now(f"{connector}\x1f")

    async def handle(self, item: OutboxItem) -> None:
        """Deliver one item; raises only for failures worth retrying."""
        with log_context(connector=item.connector, room=item.room_id):
            await self._handle(item)

    async def _deliver(self, item: OutboxItem) -> tuple[op.Operation, Outcome]:
        """Read the item as its operation and have its executor do it."""
        operation = op.from_stored(item.operation, item.payload)
        return operation, await self.executors.run(item.connector, item.room_id, operation)

    async def _handle(self, item: OutboxItem) -> None:
        try:
            operation, outcome = await self._deliver(item)
        except ConnectorError as error:
            if error.unreachable:
                self.health.unreachable(item.connector)
                raise
            if error.credentials_rejected:
                self.health.rejected(item.connector)
                raise
            self.health.answered(item.connector)
            if not error.retriable:
                await self._give_up(item, str(error), unsupported=False, why="vendor_refused")
                return
            attempts = self._attempts.get(item.seq, item.attempts) + 1
            self._attempts[item.seq] = attempts
            if attempts >= self.max_attempts:
                await self._dead_letter(item, str(error), attempts)
                return
            raise
        except MediaError as error:
            if error.homeserver_down:
                raise  # the homeserver's trouble, not this message's: no budget spent
            tries = self._media_tries.pop(item.seq, 0) + 1
            if error.retriable and tries < self.media_config.fetch_attempts:
                self._media_tries[item.seq] = tries
                raise  # this file's trouble: its budget, then this message alone fails
            log.warning("Delivery %d: a file could not be fetched: %s", item.seq, error)
            await self._give_up(item, _unfetchable(error, tries), unsupported=False, why="media")
            return
        except Undeliverable as refusal:
            await self._give_up(item, str(refusal), unsupported=True, why="unsupported")
            return
        except PermanentFailure as failure:
            await self._give_up(item, str(failure), unsupported=False, why="permanent")
            return
        self.health.answered(item.connector)
        await self._done(item, operation, outcome)

    async def _done(self, item: OutboxItem, operation: op.Operation, outcome: Outcome) -> None:
        """Record what the executor did, in one commit with the item's completion: the vendor
        ids it mapped and the audit row; then tell the sender what was changed on the way.
        ``Skipped``: nothing was done there, so nothing to report."""
        if isinstance(outcome, Delivered):
            if outcome.opened:
                await self._opened(item, outcome.conversation)
            mapped, detail = outcome.mapped, ("degraded" if outcome.notes else None)
        else:
            mapped, detail = (), outcome.why
        writes = [
            self.stores.messages.add_write(item.connector, m.ref, item.room_id, m.event_id)
            for m in mapped
        ]
        audit = self.trail.to_vendor(
            item,
            operation,
            "delivered" if isinstance(outcome, Delivered) else "skipped",
            recipient=outcome.conversation,
            remote_ids=[m.ref for m in mapped],
            detail=detail,
        )
        done = [*writes, audit, self.stores.outbox.done_write(item.seq)]
        await self._commit.commit(done)
        self.trail.committed(done, item.created_at)
        self._told_retrying.discard(item.seq)
        self._attempts.pop(item.seq, None)
        self._media_tries.pop(item.seq, None)
        if isinstance(outcome, Delivered) and (outcome.notes or self.success_statuses):
            await self._report(item, "SUCCESS", "; ".join(outcome.notes))

    async def _opened(self, item: OutboxItem, conversation: str) -> None:
        """The portal's conversation at this vendor now exists: its link records it (before
        the item completes, so no later item finds the portal without it)."""
        await self.stores.portals.set_conversation(item.room_id, item.connector, conversation)
        log.info("Opened %s conversation %s for %s", item.connector, conversation, item.room_id)

    # Failures ----------------------------------------------------------------------------------

    async def record_error(self, item: OutboxItem, error: Exception) -> None:
        self.trail.retried(item.connector, TO_VENDOR)
        await self.stores.outbox.record_attempt(item.seq, _describe(error))
        if item.seq not in self._told_retrying and _reported(item) is not None:
            self._told_retrying.add(item.seq)
            await self._report(
                item,
                "FAIL_RETRIABLE",
                _("the file could not be fetched yet; the bridge keeps trying")
                if isinstance(error, MediaError)
                else _("{connector} is not answering; the bridge keeps trying").format(
                    connector=item.connector
                ),
            )

    async def _dead_letter(self, item: OutboxItem, reason: str, attempts: int) -> None:
        """The retry budget is spent: park the delivery and hold the rest of its conversation."""
        log.warning(
            "Delivery %d to %s is a dead letter after %d attempts: %s",
            item.seq,
            item.connector,
            attempts,
            reason,
        )
        await self._audit(item, "dead_letter", "retries_exhausted")
        await self.stores.outbox.mark_dead(item.seq, reason)
        self._attempts.pop(item.seq, None)
        self._told_retrying.discard(item.seq)
        self.queue.drop_backlog(item.lane)
        detail = ngettext(
            "{connector} refused it {n} time ({reason}); later messages of this conversation "
            "wait until an operator retries or discards it",
            "{connector} refused it {n} times ({reason}); later messages of this conversation "
            "wait until an operator retries or discards it",
            attempts,
        ).format(connector=item.connector, n=attempts, reason=reason)
        await self._tell_failed(
            item,
            detail,
            held=_("This conversation is held: {detail}").format(detail=detail),
            txn_id=f"eimis.dead.{item.seq}",
        )

    async def _give_up(self, item: OutboxItem, reason: str, *, unsupported: bool, why: str) -> None:
        """``why``: the reason's class, for the audit log (the reason's text stays out)."""
        log.warning("Delivery %d to %s failed for good: %s", item.seq, item.connector, reason)
        await self._audit(item, "refused" if unsupported else "failed", why)
        await self.stores.outbox.mark_failed(item.seq, reason)
        self._told_retrying.discard(item.seq)
        await self._tell_failed(
            item,
            reason,
            held=_("The conversation could not be opened on {connector}: {detail}").format(
                connector=item.connector, detail=reason
            ),
            txn_id=f"eimis.create-failed.{item.seq}",
            unsupported=unsupported,
        )

    async def _tell_failed(
        self, item: OutboxItem, detail: str, *, held: str, txn_id: str, unsupported: bool = False
    ) -> None:
        """An item failed for good: its sender is told ``detail``; a conversation that could
        not be opened is nobody's message, so the room and the other vendors' users are told
        (``held``) instead, and so they are (by the portal's voice) of a membership, name or
        topic change."""
        if item.operation == op.SYSTEM_NOTICE:
            return  # the room read it already; a vendor that cannot show it is not told again
        if item.operation == op.CREATE_CONVERSATION:
            await self.status.tell_everyone(
                item.room_id, held, txn_id=txn_id, exclude=(item.connector,)
            )
        elif (change := _CHANGES.get(item.operation)) is not None:
            text = _(change).format(connector=item.connector, detail=detail)
            await self.status.tell_everyone(
                item.room_id, text, txn_id=txn_id, exclude=(item.connector,)
            )
        else:
            await self._report(item, "FAIL_PERMANENT", detail, unsupported)

    async def _report(
        self, item: OutboxItem, outcome: StatusOutcome, detail: str, unsupported: bool = False
    ) -> None:
        """The send status of the item's event for its sender (none for a read marker or a
        conversation's opening, nor for a row that is no operation this bridge reads)."""
        operation = _reported(item)
        if operation is None:
            return
        await self.status.report(
            room_id=item.room_id,
            event_id=operation.event_id,
            sender=operation.sender,
            target=item.connector,
            outcome=outcome,
            detail=detail,
            unsupported=unsupported,
        )

    async def _audit(self, item: OutboxItem, outcome: str, why: str) -> None:
        """The audit row of a delivery that did not happen, committed before the item's fate
        (a crash between the two records it twice rather than never)."""
        link = await self.stores.portals.link(item.room_id, item.connector)
        write = self.trail.to_vendor(
            item,
            op.readable(item.operation, item.payload),
            outcome,
            recipient=link.conversation_id if link is not None else None,
            detail=why,
        )
        await self._commit.commit([write])
        self.trail.committed([write], item.created_at)


_CHANGES = {
    op.ADD_PARTICIPANTS: N_("{connector} could not apply the addition of participants: {detail}"),
    op.REMOVE_PARTICIPANTS: N_("{connector} could not apply the removal of participants: {detail}"),
    op.SET_TITLE: N_("{connector} could not apply the change of the conversation's name: {detail}"),
    op.SET_TOPIC: N_(
        "{connector} could not apply the change of the conversation's topic: {detail}"
    ),
}
"""The operations that are nobody's message but a change of the portal, told in the room
when they fail for good (catalog texts: ``{connector}``, ``{detail}``)."""


def _reported(item: OutboxItem) -> op.Reported | None:
    """The item's operation when its sender gets send statuses about it."""
    operation = op.readable(item.operation, item.payload)
    return operation if isinstance(operation, op.Reported) else None


def _unfetchable(error: MediaError, tries: int) -> str:
    """Why a file's message fails, for its sender (in the bridge's locale)."""
    if error.retriable and error.status:
        return ngettext(
            "the Matrix server could not fetch the file after {n} try (origin server "
            "unreachable or refused, response {status}): this message is not passed on, the "
            "conversation goes on",
            "the Matrix server could not fetch the file after {n} tries (origin server "
            "unreachable or refused, response {status}): this message is not passed on, the "
            "conversation goes on",
            tries,
        ).format(n=tries, status=error.status)
    if error.retriable:
        return ngettext(
            "the Matrix server could not fetch the file after {n} try (origin server "
            "unreachable or refused): this message is not passed on, the conversation goes on",
            "the Matrix server could not fetch the file after {n} tries (origin server "
            "unreachable or refused): this message is not passed on, the conversation goes on",
            tries,
        ).format(n=tries)
    if error.status is None:
        return _("the file's address is not valid: this message is not passed on")
    if error.status == 404:
        return _("the file cannot be found on the Matrix server: this message is not passed on")
    return _(
        "the Matrix server refuses to provide the file (response {status}): this message is "
        "not passed on"
    ).format(status=error.status)


def _describe(error: Exception) -> str:
    if isinstance(error, ConnectorError | MediaError):
        return str(error)[:300]
    return type(error).__name__
