"""What every delivery leaves behind: an audit row committed with it, and the metrics.

The delivery code says what happened (an outbox item delivered, refused, dead-lettered; a
vendor event sent into Matrix or refused); this module makes the audit record of it (metadata
only: ids, kind, size, outcome and the reason's class, never content) as a write for the same
commit, and once that commit is done (``committed``) counts it in the metrics. The metrics
therefore count exactly what the audit log holds, and cost the hot path an in-memory increment.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from bridge.core import operations as op
from bridge.db.audit import AuditLog, AuditRecord, AuditWrite
from bridge.db.clock import now_ms
from bridge.db.group_commit import Write
from bridge.db.outbox import OutboxItem
from bridge.metrics import TO_MATRIX, TO_VENDOR, Metrics
from connectors.base import (
    ConversationCreated,
    MessageDeleted,
    MessageEdited,
    MessageReceived,
    ReactionAdded,
    ReactionRemoved,
    ReadUpTo,
    RemoteEvent,
    TypingChanged,
)

CARRIED = frozenset({"delivered", "sent"})
"""Outcomes of an event that reached the other side."""

_MSGTYPE_KINDS = {
    "m.text": "text",
    "m.notice": "notice",
    "m.emote": "emote",
    "m.location": "location",
    "m.image": "image",
    "m.file": "file",
    "m.audio": "audio",
    "m.video": "video",
}
_OPERATION_KINDS: dict[type[Any], str] = {
    op.CreateConversation: "conversation",
    op.EditMessage: "edit",
    op.Redact: "deletion",
    op.AddReaction: "reaction",
    op.MarkRead: "read",
    op.SystemNotice: "system",
}


class Trail:
    def __init__(self, audit: AuditLog, metrics: Metrics | None = None) -> None:
        self.audit = audit
        self.metrics = metrics

    # Audit rows --------------------------------------------------------------------------------

    def to_vendor(
        self,
        item: OutboxItem,
        operation: op.Operation | None,
        outcome: str,
        *,
        recipient: str | None = None,
        remote_ids: Iterable[str] = (),
        detail: str | None = None,
    ) -> AuditWrite:
        """The row of a delivery to ``item.connector`` of ``operation`` (the item read as one;
        None for a row that is no operation this bridge reads); ``recipient``: its vendor
        conversation."""
        sender = getattr(operation, "sender", None)
        event_id = getattr(operation, "event_id", None)
        return self.audit.record_write(
            AuditRecord(
                at=now_ms(),
                connector=item.connector,
                direction=TO_VENDOR,
                kind=outbox_kind(operation) if operation is not None else item.operation,
                outcome=outcome,
                sender=sender.mxid if sender is not None else None,
                recipient=recipient,
                portal=item.room_id,
                event_id=event_id or None,
                remote_id=",".join(dict.fromkeys(remote_ids)) or None,
                size=outbox_size(operation),
                detail=detail,
            )
        )

    def to_matrix(
        self,
        connector: str,
        event: RemoteEvent,
        room_id: str | None,
        outcome: str,
        *,
        event_id: str | None = None,
        detail: str | None = None,
    ) -> AuditWrite:
        """The row of a vendor event sent into (or refused from) the portal ``room_id``."""
        sender = getattr(event, "sender", None) or getattr(event, "creator", None)
        return self.audit.record_write(
            AuditRecord(
                at=now_ms(),
                connector=connector,
                direction=TO_MATRIX,
                kind=event_kind(event),
                outcome=outcome,
                sender=str(sender) if sender else None,
                recipient=room_id,
                portal=room_id,
                event_id=event_id,
                remote_id=_remote_id(event),
                size=event_size(event),
                detail=detail,
            )
        )

    # Metrics -----------------------------------------------------------------------------------

    def committed(self, writes: Iterable[Write], entered_ms: int | None) -> None:
        """The commit holding ``writes`` is done: count the deliveries they record.
        ``entered_ms``: when the work was stored (the delivery latency starts there)."""
        if self.metrics is None:
            return
        for write in writes:
            if isinstance(write, AuditWrite) and write.record is not None:
                record = write.record
                if record.outcome in CARRIED:
                    self.metrics.carried(
                        record.connector, record.direction, record.kind, entered_ms
                    )
                else:
                    self.metrics.not_carried(record.connector, record.direction, record.outcome)

    def retried(self, connector: str, direction: str) -> None:
        if self.metrics is not None:
            self.metrics.retried(connector, direction)


# Kinds and sizes (metadata only) ---------------------------------------------------------------


def outbox_kind(operation: op.Operation) -> str:
    if isinstance(operation, op.SendMessage):
        return _MSGTYPE_KINDS.get(str(operation.content.get("msgtype")), "text")
    return _OPERATION_KINDS.get(type(operation), operation.kind)


def outbox_size(operation: op.Operation | None) -> int | None:
    """Bytes of the body (the announced size for a file); None where there is none."""
    if isinstance(operation, op.AddReaction):
        return _bytes(operation.key)
    if not isinstance(operation, op.SendMessage | op.EditMessage):
        return None
    content = operation.content
    info = content.get("info")
    if content.get("url") and isinstance(info, dict) and isinstance(info.get("size"), int):
        return int(info["size"])
    return _bytes(content.get("body"))


def event_kind(event: RemoteEvent) -> str:
    if isinstance(event, MessageReceived):
        if event.attachment is not None:
            major = event.attachment.mime_type.split("/", 1)[0].lower()
            return major if major in ("image", "audio", "video") else "file"
        if event.location is not None:
            return "location"
        return event.message_kind
    kinds: dict[type[Any], str] = {
        MessageEdited: "edit",
        MessageDeleted: "deletion",
        ReactionAdded: "reaction",
        ReactionRemoved: "reaction_removal",
        ReadUpTo: "read",
        TypingChanged: "typing",
        ConversationCreated: "conversation",
    }
    return kinds.get(type(event), type(event).__name__)


def event_size(event: RemoteEvent) -> int | None:
    if isinstance(event, MessageReceived):
        if event.attachment is not None:
            return event.attachment.size
        return _bytes(event.text)
    if isinstance(event, MessageEdited):
        return _bytes(event.text)
    if isinstance(event, ReactionAdded):
        return _bytes(event.key)
    return None


def _remote_id(event: RemoteEvent) -> str:
    if isinstance(event, ReactionAdded | ReactionRemoved):
        return event.reaction_id
    message_id = getattr(event, "message_id", None)
    return str(message_id) if message_id else event.conversation_id


def _bytes(text: Any) -> int | None:
    return len(text.encode()) if isinstance(text, str) else None
