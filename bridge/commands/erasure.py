"""``forget``: erase a professional (the right to erasure), asked from the admin room or from the
bridge's host. The erasure itself is ``bridge.core.erasure``; this module checks the IDNPS, says
what is about to happen (the front end asks for confirmation), and runs it.

The database part always runs. The Matrix part (redactions, leaving rooms, clearing profiles)
is done at once when the homeserver answers; otherwise it is queued in the database and the
running bridge finishes it when the homeserver is back (or the next ``forget`` does). The
report says which.
"""

from __future__ import annotations

from dataclasses import dataclass

from bridge.commands import BadInput
from bridge.core.erasure import Erasure, ErasureReport
from bridge.db.stores import Stores
from connectors.idnps import Idnps, InvalidIdnps


def idnps_of(value: str) -> str:
    try:
        return str(Idnps(value))
    except InvalidIdnps as error:
        raise BadInput(f"invalid IDNPS: {error}") from None


@dataclass(frozen=True)
class ForgetPlan:
    idnps: str
    ghosts: list[str]

    def question(self) -> str:
        """What the operator confirms (the front end says how to answer)."""
        return (
            f"Erase everything the bridge holds about {self.idnps} ({len(self.ghosts)} "
            "ghost(s))? Their messages are redacted in every portal, their ghosts leave and lose "
            "their profile, and what they sent that still waits in queues is dropped."
        )


async def plan(stores: Stores, value: str) -> ForgetPlan:
    idnps = idnps_of(value)
    return ForgetPlan(idnps, [g.mxid for g in await stores.ghosts.of_professional(idnps)])


async def forget(erasure: Erasure, plan: ForgetPlan, requested_by: str) -> ErasureReport:
    """Erase; ``report.lines()`` is the answer, ``report.matrix.pending`` whether the Matrix
    part waits for the homeserver."""
    return await erasure.erase(plan.idnps, requested_by)
