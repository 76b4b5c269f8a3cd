"""Dead letters: deliveries that spent their retry budget. Each holds back the later deliveries
of its conversation (order is kept) until an operator retries it (back in its queue) or
discards it (its content dropped for good). Straight on the database: the running bridge picks
released work up on its next idle rescan. One behaviour for the CLI's ``dead-letters``,
``retry``, ``discard`` and the admin room's.
"""

from __future__ import annotations

from bridge.commands import BadInput, Refused
from bridge.db.dead_letters import DeadLetter, DeadLetterStore

NONE = "No dead letter."


class DeadLetterCommands:
    def __init__(self, store: DeadLetterStore) -> None:
        self.store = store

    async def listing(self, connector: str | None = None) -> list[DeadLetter]:
        return await self.store.list(connector)

    async def retry(self, value: str) -> str:
        """Put one dead letter (by id) or ``all`` back in their queues."""
        if value == "all":
            count = await self.store.retry(None)
            if not count:
                return NONE
        else:
            try:
                seq = int(value)
            except ValueError:
                raise BadInput(
                    f"retry takes a dead letter id (a number) or 'all', not {value[:40]!r}."
                ) from None
            count = await self.store.retry(seq)
            if not count:
                raise Refused(f"No dead letter {seq} (see dead-letters).")
        return f"{count} dead letter(s) back in their queue; they go out in order."

    async def find(self, seq: int) -> DeadLetter:
        for letter in await self.store.list():
            if letter.seq == seq:
                return letter
        raise Refused(f"No dead letter {seq} (see dead-letters).")

    @staticmethod
    def discard_question(letter: DeadLetter) -> str:
        return (
            f"Discard dead letter {letter.seq} ({letter.operation} to {letter.connector} in "
            f"{letter.room_id})? Its content is deleted and it will never be delivered."
        )

    async def discard(self, seq: int) -> str:
        if await self.store.discard(seq):
            return f"Dead letter {seq} discarded; its conversation flows again."
        raise Refused(f"No dead letter {seq} (see dead-letters).")


def table(letters: list[DeadLetter]) -> str:
    """For a terminal: attempts, what each holds back, the operation and its last error."""
    if not letters:
        return NONE
    lines = [f"{'id':>8}  {'connector':<12} {'attempts':>8} {'held':>5}  room / last error"]
    for d in letters:
        lines.append(f"{d.seq:>8}  {d.connector:<12} {d.attempts:>8} {d.held:>5}  {d.room_id}")
        lines.append(f"{'':>8}  {d.operation}: {d.last_error or ''}")
    return "\n".join(lines)


def room_table(letters: list[DeadLetter]) -> str:
    """For a chat room: shorter, and how to act on them."""
    if not letters:
        return NONE
    lines = [f"{'id':>8}  {'connector':<12} {'held':>5}  operation          room / last error"]
    for letter in letters:
        lines.append(
            f"{letter.seq:>8}  {letter.connector:<12} {letter.held:>5}  {letter.operation:<18} "
            f"{letter.room_id}\n{'':>10}{(letter.last_error or '')[:160]}"
        )
    lines.append("retry ID|all puts them back in their queue; discard ID drops one.")
    return "\n".join(lines)
