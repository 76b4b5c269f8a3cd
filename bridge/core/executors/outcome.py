"""What an executor did at a vendor, as a typed result the delivery policy records.

An executor does one outbox operation and says what came of it: ``Delivered`` (with the vendor
ids it created, which delivery writes into the message map in the same commit as the item's
completion, and the degradations its sender is told of) or ``Skipped`` (nothing to do there: an
edit of a message that never reached this vendor, a deletion of what the vendor no longer has).
"""

from __future__ import annotations

from dataclasses import dataclass

from bridge.core.operations import reaction_ref


@dataclass(frozen=True)
class MessageMapped:
    """A vendor message the operation created, standing for the Matrix event ``event_id``."""

    message_id: str
    event_id: str

    @property
    def ref(self) -> str:
        """Its id in the message map."""
        return self.message_id


@dataclass(frozen=True)
class ReactionMapped:
    """A vendor reaction (on vendor message ``message_id``) standing for ``event_id``."""

    message_id: str
    reaction_id: str
    event_id: str

    @property
    def ref(self) -> str:
        return reaction_ref(self.message_id, self.reaction_id)


Mapped = MessageMapped | ReactionMapped


@dataclass(frozen=True)
class Delivered:
    """Done at the vendor, in its conversation ``conversation``."""

    conversation: str
    notes: tuple[str, ...] = ()
    """What was changed on the way (for the sender): empty when it went as it was."""
    mapped: tuple[Mapped, ...] = ()
    opened: bool = False
    """``conversation`` was opened by this operation (the portal link is to record it)."""


@dataclass(frozen=True)
class Skipped:
    """Nothing was done there, and nothing is reported to the sender."""

    conversation: str | None
    why: str | None = None
    """A short code for the audit log (``vendor_404``), None when there was nothing to do."""


Outcome = Delivered | Skipped
