"""The stand-in for a connector instance that does not run (disabled, or failing to start).

Conversations linked to it keep queueing deliveries for it: they must wait, in order, and go
out once it runs again, not fail. So the stand-in declares the real type's capabilities and
implements the same optional operations (what is queued is prepared as for the real connector),
and answers every call as an unreachable vendor, which the delivery code waits for without
spending a delivery's retry budget.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime

from pydantic import BaseModel

from connectors.base import (
    Connector,
    ConnectorContext,
    ConnectorError,
    DeliveryReport,
    Idnps,
    MessageReceived,
    NewConversation,
    OutboundMessage,
    ParticipantChange,
    RemoteAttachment,
    RemoteEvent,
    RemoteUser,
    Sender,
    UserPage,
    protocols_of,
    with_protocols,
)


class HeldConnector(Connector):
    """Defines every optional operation; each instance inherits the classes of the real type
    (``__new__``), so it can be asked exactly what the real connector can."""

    def __new__(cls, connector_id: str, real: type[Connector], reason: str) -> HeldConnector:
        return super().__new__(with_protocols(cls, protocols_of(real)))

    def __init__(self, connector_id: str, cls: type[Connector], reason: str) -> None:
        """``reason`` completes "connector <id> ...": e.g. "is disabled"."""
        super().__init__(
            ConnectorContext(
                connector_id=connector_id,
                settings=_NoSettings(),
                emit=_emit_nothing,
                emit_all=_emit_nothing_all,
                store=_NoState(),
                public_base_url="",
                log=logging.getLogger(f"eimis.connector.{connector_id}"),
            )
        )
        self.real_type = cls
        self.type_name = cls.type_name  # type: ignore[misc]
        self.capabilities = cls.capabilities  # type: ignore[misc]
        self.reason = reason

    def _wait(self) -> ConnectorError:
        return ConnectorError(
            f"connector {self.ctx.connector_id} {self.reason}; its deliveries wait",
            retriable=True,
            unreachable=True,
        )

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def create_conversation(self, conversation: NewConversation) -> str:
        raise self._wait()

    async def send_message(self, conversation_id: str, message: OutboundMessage) -> str:
        raise self._wait()

    async def get_user(self, idnps: Idnps) -> RemoteUser | None:
        raise self._wait()

    async def open_attachment(
        self, attachment: RemoteAttachment
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        raise self._wait()

    async def edit_message(
        self, conversation_id: str, message_id: str, message: OutboundMessage
    ) -> None:
        raise self._wait()

    async def delete_message(self, conversation_id: str, message_id: str, sender: Sender) -> bool:
        raise self._wait()

    async def add_reaction(
        self, conversation_id: str, message_id: str, sender: Sender, key: str, request_id: str
    ) -> str:
        raise self._wait()

    async def remove_reaction(
        self, conversation_id: str, message_id: str, reaction_id: str, sender: Sender
    ) -> bool:
        raise self._wait()

    async def mark_read(self, conversation_id: str, reader: Sender, message_id: str) -> None:
        raise self._wait()

    async def set_typing(self, conversation_id: str, who: Sender, typing: bool) -> None:
        raise self._wait()

    async def report_delivery(
        self, conversation_id: str, message_id: str, report: DeliveryReport
    ) -> None:
        raise self._wait()

    async def add_participants(self, conversation_id: str, change: ParticipantChange) -> None:
        raise self._wait()

    async def remove_external(self, conversation_id: str, change: ParticipantChange) -> None:
        raise self._wait()

    async def remove_members(self, conversation_id: str, change: ParticipantChange) -> None:
        raise self._wait()

    async def set_title(self, conversation_id: str, title: str | None, by: Sender) -> None:
        raise self._wait()

    async def set_topic(self, conversation_id: str, topic: str | None, by: Sender) -> None:
        raise self._wait()

    async def send_system_message(self, conversation_id: str, text: str, request_id: str) -> None:
        raise self._wait()

    async def history(
        self, conversation_id: str, *, limit: int, since: datetime
    ) -> Sequence[MessageReceived]:
        raise self._wait()

    async def list_users(self, cursor: str | None, limit: int) -> UserPage:
        raise self._wait()


class _NoSettings(BaseModel):
    pass


class _NoState:
    async def get(self, key: str) -> str | None:
        return None

    async def set(self, key: str, value: str) -> None:
        raise RuntimeError("a held connector keeps no state")


async def _emit_nothing(event: RemoteEvent) -> None:
    raise RuntimeError("a held connector emits nothing")


async def _emit_nothing_all(events: Sequence[RemoteEvent]) -> None:
    raise RuntimeError("a held connector emits nothing")
