"""Mail threads in the connector's key-value state: a portal's conversation as mail sees it.

A thread is named by a token (the conversation id the bridge keeps, and the ``+<token>`` of the
portal's reply address). Keys, all under the connector's own store:

- ``thread:<token>``: JSON ``{"subject", "participants": [[idnps, address]...],
  "message_ids": [...]}`` (the last ``MAX_REFERENCES`` Message-IDs, oldest first);
- ``msgid:<Message-ID>``: the token of the thread a mail belongs to (In-Reply-To/References);
- ``conv-request:<request_id>``: the token ``create_conversation`` gave for that request;
- ``sent:<request_id>``: JSON ``{"message_id", "sent"}``: written before the mail goes (``sent``
  false) and after (true), so a retry never sends a second mail once the first was accepted.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field

from connectors.base import KeyValueStore

MAX_REFERENCES = 20
"""Message-IDs kept per thread (the References header carries them)."""
TOKEN_BYTES = 8


def new_token() -> str:
    """A fresh thread token: 16 lowercase hex characters (safe in a mail address local part)."""
    return secrets.token_hex(TOKEN_BYTES)


def is_token(value: str) -> bool:
    return len(value) == 2 * TOKEN_BYTES and all(c in "0123456789abcdef" for c in value)


@dataclass
class Thread:
    token: str
    subject: str
    participants: list[tuple[str, str]]
    """(IDNPS, mailbox address) of the MSSanté professionals in the conversation."""
    message_ids: list[str] = field(default_factory=list)

    @property
    def addresses(self) -> list[str]:
        return [address for _, address in self.participants]

    def has(self, idnps: str) -> bool:
        return any(who == idnps for who, _ in self.participants)

    def add_message_id(self, message_id: str) -> None:
        if message_id not in self.message_ids:
            self.message_ids.append(message_id)
            del self.message_ids[:-MAX_REFERENCES]

    def to_json(self) -> str:
        return json.dumps(
            {
                "subject": self.subject,
                "participants": [list(p) for p in self.participants],
                "message_ids": self.message_ids,
            }
        )

    @classmethod
    def from_json(cls, token: str, data: str) -> Thread:
        raw = json.loads(data)
        return cls(
            token=token,
            subject=str(raw["subject"]),
            participants=[(str(i), str(a)) for i, a in raw["participants"]],
            message_ids=[str(m) for m in raw.get("message_ids", [])],
        )


@dataclass(frozen=True)
class SendRecord:
    message_id: str
    sent: bool


class ThreadStore:
    """Threads, Message-ID index and send records over a ``KeyValueStore``."""

    def __init__(self, store: KeyValueStore) -> None:
        self.store = store

    async def get(self, token: str) -> Thread | None:
        if not is_token(token):
            return None
        data = await self.store.get(f"thread:{token}")
        return None if data is None else Thread.from_json(token, data)

    async def save(self, thread: Thread) -> None:
        await self.store.set(f"thread:{thread.token}", thread.to_json())
        for message_id in thread.message_ids:
            await self.index(message_id, thread.token)

    async def index(self, message_id: str, token: str) -> None:
        await self.store.set(f"msgid:{message_id.lower()}", token)

    async def by_message_id(self, message_id: str) -> Thread | None:
        token = await self.store.get(f"msgid:{message_id.lower()}")
        return None if token is None else await self.get(token)

    async def conversation_for(self, request_id: str) -> str | None:
        return await self.store.get(f"conv-request:{request_id}")

    async def remember_conversation(self, request_id: str, token: str) -> None:
        await self.store.set(f"conv-request:{request_id}", token)

    async def send_record(self, request_id: str) -> SendRecord | None:
        data = await self.store.get(f"sent:{request_id}")
        if data is None:
            return None
        raw = json.loads(data)
        return SendRecord(str(raw["message_id"]), bool(raw["sent"]))

    async def record_send(self, request_id: str, record: SendRecord) -> None:
        await self.store.set(
            f"sent:{request_id}", json.dumps({"message_id": record.message_id, "sent": record.sent})
        )
