"""What ``FromMatrix`` asks of the operators' admin rooms: ``AdminHook``.

Events of an admin room are commands, not conversation: ``FromMatrix`` offers every trusted
event to the hook first, and tells it when the bot is invited to a room or leaves one. The
admin room (``bridge/admin/room.py``) implements it; a bridge without operators has none.
"""

from __future__ import annotations

from typing import Any, Protocol


class AdminHook(Protocol):
    async def handles(self, raw: dict[str, Any]) -> bool:
        """Whether the event belongs to an admin room (it was handled there: not bridged)."""
        ...

    async def on_bot_invite(self, room_id: str, inviter: str) -> None:
        """The bot was invited to ``room_id`` by ``inviter``."""
        ...

    async def on_bot_left(self, room_id: str) -> None:
        """The bot left ``room_id`` (or was removed from it)."""
        ...
