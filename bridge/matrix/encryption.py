"""What the homeserver client asks of end-to-bridge encryption: ``Encryptor``.

``bridge/matrix`` owns this protocol and ``bridge/crypto`` implements it (``Crypto``), so the
Matrix side never imports the crypto side: the running bridge hands its ``Crypto`` to the
``Homeserver`` it builds (or None, encryption off).
"""

from __future__ import annotations

from typing import Any, Protocol


class Encryptor(Protocol):
    async def encrypt(
        self, sender: str, room_id: str, event_type: str, content: dict[str, Any]
    ) -> dict[str, Any] | None:
        """The ``m.room.encrypted`` content of an event ``sender`` sends in ``room_id``; None
        when the room is not encrypted (the event goes in clear)."""
        ...

    async def encryption_of(self, room_id: str) -> object | None:
        """The room's encryption settings as recorded; None for a plain room."""
        ...

    async def room_encrypted(self, room_id: str, content: dict[str, Any]) -> bool:
        """Record the room's ``m.room.encryption`` content; False for an algorithm not
        supported."""
        ...
