"""Which Matrix ID reaches a professional who has several (the EIMIS "several accounts" case).

The rule, in order (README, "The directory"):

1. the ``preferred`` one (set by an operator: ``eimis-bridge directory prefer IDNPS MXID``);
2. else a **native** Matrix account (the person's own, on a homeserver of the trust space) over
   any ghost: the bridge only stands in for people who have no Matrix account of their own;
   among several native accounts, the lowest Matrix ID (a stable, if arbitrary, choice);
3. else the ghost of the **first connector in the configuration's order**.

Ghosts of the asking user's own connector (``exclude``) and of connectors that are not running
are never chosen: a vendor's own users are members of the vendor conversation, not participants
from outside it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from bridge.db.directory import GHOST, NATIVE, ProfessionalMxid


def reachable(
    mxids: Iterable[ProfessionalMxid], connectors: Sequence[str], *, exclude: str | None = None
) -> list[ProfessionalMxid]:
    """The Matrix IDs that can be used, best first (the rule above)."""
    order = {connector: position for position, connector in enumerate(connectors)}
    usable = [
        m
        for m in mxids
        if m.kind == NATIVE or (m.kind == GHOST and m.connector in order and m.connector != exclude)
    ]

    def rank(m: ProfessionalMxid) -> tuple[int, int, int, str]:
        return (
            0 if m.preferred else 1,
            0 if m.kind == NATIVE else 1,
            order.get(m.connector or "", -1),
            m.mxid,
        )

    return sorted(usable, key=rank)


def choose(
    mxids: Iterable[ProfessionalMxid], connectors: Sequence[str], *, exclude: str | None = None
) -> ProfessionalMxid | None:
    """The Matrix ID a conversation with this professional goes to; None when there is none."""
    ranked = reachable(mxids, connectors, exclude=exclude)
    return ranked[0] if ranked else None
