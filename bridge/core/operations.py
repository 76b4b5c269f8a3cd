"""The outbox operations: what the bridge can ask a vendor to do, one FIFO per portal."""

CREATE_CONVERSATION = "create_conversation"
SEND_MESSAGE = "send_message"
EDIT_MESSAGE = "edit_message"
REDACT = "redact"
ADD_REACTION = "add_reaction"
MARK_READ = "mark_read"

REACTION_PREFIX = "reaction:"
"""Message-map ids of reactions: ``reaction:<vendor message id>:<vendor reaction id>``."""


def reaction_ref(message_id: str, reaction_id: str) -> str:
    return f"{REACTION_PREFIX}{message_id}:{reaction_id}"


def parse_reaction_ref(ref: str) -> tuple[str, str] | None:
    """(vendor message id, vendor reaction id) of a reaction ref, or None for a message id."""
    if not ref.startswith(REACTION_PREFIX):
        return None
    message_id, _, reaction_id = ref[len(REACTION_PREFIX) :].rpartition(":")
    return (message_id, reaction_id) if message_id else None
