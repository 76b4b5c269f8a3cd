"""Telling senders what became of their message: Matrix send statuses, vendor delivery reports.

A Matrix sender gets a ``com.beeper.message_send_status`` event per vendor (SUCCESS with what was
changed, FAIL_RETRIABLE while retrying, FAIL_PERMANENT with the reason) and, for a failure, a
notice in the room. A vendor sender whose message went through Matrix to another vendor gets the
same news through its vendor's delivery status, when the vendor has one.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from mautrix.errors import MatrixRequestError

from bridge.core.connectors import ConnectorSet
from bridge.core.members import Member
from bridge.core.operations import parse_reaction_ref
from bridge.core.system_notices import tell_everyone
from bridge.db.stores import Stores
from bridge.i18n import _
from bridge.matrix.homeserver import Homeserver, derived_txn_id
from connectors.base import Connector, DeliveryReport

log = logging.getLogger("eimis.status")

SEND_STATUS = "com.beeper.message_send_status"
Outcome = Literal["SUCCESS", "FAIL_RETRIABLE", "FAIL_PERMANENT"]


class StatusReporter:
    def __init__(self, stores: Stores, homeserver: Homeserver, connectors: ConnectorSet) -> None:
        self.stores = stores
        self.hs = homeserver
        self.connectors = connectors

    async def report(
        self,
        *,
        room_id: str,
        event_id: str,
        sender: Member,
        target: str,
        outcome: Outcome,
        detail: str,
        unsupported: bool = False,
    ) -> None:
        """What happened to ``event_id`` on its way to connector ``target``."""
        if sender.connector is None:
            await self._matrix_status(room_id, event_id, target, outcome, detail, unsupported)
        elif outcome != "FAIL_RETRIABLE":
            status: Literal["delivered", "degraded", "failed"] = (
                "failed" if outcome == "FAIL_PERMANENT" else "degraded" if detail else "delivered"
            )
            await self.vendor_report(
                sender.connector,
                room_id,
                event_id,
                DeliveryReport(
                    status,
                    _("{target}: {detail}").format(target=target, detail=detail)
                    if detail
                    else _("delivered to {target}").format(target=target),
                ),
            )
        if outcome == "FAIL_PERMANENT":
            await self.tell_everyone(
                room_id,
                _("A message could not be delivered to {target}: {detail}").format(
                    target=target, detail=detail
                ),
                txn_id=derived_txn_id("failed", event_id, target),
                exclude=(target,),
            )

    async def undecryptable(self, room_id: str, event_id: str, reason: str) -> None:
        """An encrypted event the bridge could never read: its sender is told, nothing garbled
        goes to any vendor."""
        detail = _("the bridge could not decrypt it ({reason})").format(reason=reason)
        await self._matrix_status(
            room_id, event_id, "eimis-bridge", "FAIL_PERMANENT", detail, False
        )
        await self.notice(
            room_id,
            _("A message could not be delivered outside Matrix: {detail}.").format(detail=detail),
            txn_id=derived_txn_id("undecryptable", event_id),
        )

    async def refused(self, room_id: str, event_id: str, reason: str) -> None:
        """An event the bridge refuses to relay (its sender may not say it: ``reason``, in
        the bridge's locale): nothing of it reaches any vendor; its sender and the room are told."""
        await self._matrix_status(
            room_id, event_id, "eimis-bridge", "FAIL_PERMANENT", reason, False, "m_no_permission"
        )
        await self.notice(
            room_id,
            _("An event was not passed on outside Matrix: {reason}.").format(reason=reason),
            txn_id=derived_txn_id("refused", event_id),
        )

    async def unsupported(self, room_id: str, event_id: str, reason: str) -> None:
        """An event no vendor can take in any form (``reason``, in the bridge's locale):
        nothing of it reaches any vendor; its sender and the room are told."""
        await self._matrix_status(room_id, event_id, "eimis-bridge", "FAIL_PERMANENT", reason, True)
        await self.notice(
            room_id,
            _("An event was not passed on outside Matrix: {reason}.").format(reason=reason),
            txn_id=derived_txn_id("unsupported", event_id),
        )

    async def vendor_report(
        self, connector_id: str, room_id: str, event_id: str, report: DeliveryReport
    ) -> None:
        """Tell a vendor user (through their vendor) what became of their message."""
        connector = self.connectors.get(connector_id)
        if connector is None or not connector.capabilities.delivery_status:
            return
        # Only a message a vendor user wrote has a delivery status (not a reaction).
        remote_ids = [
            ref
            for ref in await self.stores.messages.remotes_for(
                connector_id, event_id, room_id=room_id
            )
            if parse_reaction_ref(ref) is None
        ]
        link = await self.stores.portals.link(room_id, connector_id)
        if not remote_ids or link is None or link.conversation_id is None:
            return
        await report_to_vendor(connector, connector_id, link.conversation_id, remote_ids[0], report)

    async def _matrix_status(
        self,
        room_id: str,
        event_id: str,
        target: str,
        outcome: Outcome,
        detail: str,
        unsupported: bool,
        reason: str | None = None,
    ) -> None:
        content: dict[str, object] = {
            "network": target,
            "m.relates_to": {"rel_type": "m.reference", "event_id": event_id},
            "status": outcome,
        }
        if outcome != "SUCCESS":
            content["reason"] = reason or (
                "m_unsupported" if unsupported else "m_foreign_network_error"
            )
        if detail:
            content["message"] = detail
        txn_id = derived_txn_id("status", event_id, target, outcome)
        await self._as_voice(room_id, SEND_STATUS, content, txn_id, "send a message status")

    async def tell_everyone(
        self,
        room_id: str,
        text: str,
        *,
        txn_id: str,
        vendor_text: str | None = None,
        exclude: tuple[str, ...] = (),
    ) -> None:
        """A notice about the conversation: the room reads ``text``, and the users of every
        vendor linked to it but ``exclude`` read ``vendor_text`` (``text`` when it is the
        same; both from the catalogs, in the bridge's locale) as a system message, queued
        once per notice (keyed by ``txn_id``)."""
        await tell_everyone(self.stores, room_id, vendor_text or text, key=txn_id, exclude=exclude)
        await self.notice(room_id, text, txn_id=txn_id)

    async def notice(self, room_id: str, text: str, *, txn_id: str) -> None:
        content = {"msgtype": "m.notice", "body": text}
        await self._as_voice(room_id, "m.room.message", content, txn_id, "post a notice")

    async def _as_voice(
        self, room_id: str, event_type: str, content: dict[str, Any], txn_id: str, what: str
    ) -> None:
        """Sent by the portal's voice (the bridge's own word in the room), best effort: a
        homeserver refusing it is logged (its error code), never retried."""
        portal = await self.stores.portals.get(room_id)
        if portal is None:
            return
        try:
            await self.hs.send_event(portal.voice, room_id, event_type, content, txn_id=txn_id)
        except MatrixRequestError as error:
            log.warning("Could not %s (%s)", what, error.errcode)


async def report_to_vendor(
    connector: Connector | None,
    connector_id: str,
    conversation_id: str,
    message_id: str,
    report: DeliveryReport,
) -> None:
    """A delivery report on one vendor message, when its vendor shows statuses: best effort (a
    vendor that refuses it is logged, never retried: the report is news, not a delivery)."""
    if connector is None or not connector.capabilities.delivery_status:
        return
    try:
        await connector.report_delivery(conversation_id, message_id, report)  # type: ignore[attr-defined]
    except Exception as error:
        log.warning("Delivery report to %s failed: %s", connector_id, type(error).__name__)
