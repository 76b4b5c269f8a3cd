"""``find``: the professionals a clinician is looking for, by name or identifier, in French.

Any user of the bridge's homeserver may ask the bot (its help desk, ``bridge/admin/room.py``)
and the homeserver's third-party lookup (``bridge/appservice/server.py``) uses the same search.
A query is a name (family and/or given, any case, accents or not) or an identifier: an IDNPS,
or an RPPS (11 digits) or ADELI (9 digits) number as typed, which stands for the IDNPS ``8`` +
RPPS or ``0`` + ADELI (``connectors/idnps.py``). Each match says where the professional is
reached (issue 5's choice rule, ``bridge/directory/choice.py``) and links to their Matrix ID.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bridge.commands import BadInput, Refused
from bridge.db.directory import GHOST, DirectoryStore, Professional
from bridge.directory.choice import choose
from connectors.idnps import Idnps, InvalidIdnps

MAX_QUERY = 100
"""Characters of a query: beyond this, it is refused (no name is that long)."""
MAX_RESULTS = 10


@dataclass(frozen=True)
class Match:
    professional: Professional
    mxid: str | None
    """The Matrix ID a conversation goes to; None when nobody reaches them."""
    connector: str | None
    """The connector whose ghost that is; None for a native account."""

    @property
    def link(self) -> str | None:
        return f"https://matrix.to/#/{self.mxid}" if self.mxid else None


def identifier(query: str) -> Idnps | None:
    """The IDNPS a query stands for, when it is an identifier (None for a name)."""
    digits = query.strip().replace(" ", "")
    if not digits.isdigit():
        return None
    if len(digits) == 11:
        digits = "8" + digits  # RPPS
    elif len(digits) == 9:
        digits = "0" + digits  # ADELI
    try:
        return Idnps(digits)
    except InvalidIdnps:
        raise BadInput(
            "Ce numéro n'est pas un identifiant valide (IDNPS, RPPS à 11 chiffres ou ADELI à "
            "9 chiffres)."
        ) from None


async def search(
    store: DirectoryStore, connectors: Sequence[str], query: str, limit: int = MAX_RESULTS
) -> list[Match]:
    """The matches of ``query`` (a name or an identifier), at most ``limit``."""
    query = query.strip()
    if not query:
        raise BadInput("Indiquez un nom ou un identifiant : find <nom ou identifiant>.")
    if len(query) > MAX_QUERY:
        raise BadInput(f"Recherche trop longue (au plus {MAX_QUERY} caractères).")
    idnps = identifier(query)
    if idnps is not None:
        entry = await store.get(idnps)
        found = [entry] if entry is not None else []
    else:
        found = await store.search(query, min(limit, MAX_RESULTS))
    mxids = await store.mxids_of([p.idnps for p in found])
    matches = []
    for professional in found:
        chosen = choose(mxids.get(professional.idnps, []), connectors)
        matches.append(
            Match(
                professional,
                chosen.mxid if chosen else None,
                chosen.connector if chosen and chosen.kind == GHOST else None,
            )
        )
    return matches


def reached(match: Match) -> str:
    if match.mxid is None:
        return "joignable par aucune messagerie reliée au pont"
    if match.connector is not None:
        return f"joignable via {match.connector}"
    return f"compte Matrix {match.mxid}"


async def find(store: DirectoryStore, connectors: Sequence[str], query: str) -> list[str]:
    """The bot's answer to ``find <query>``, one line per match."""
    matches = await search(store, connectors, query)
    if not matches:
        raise Refused(
            "Aucun professionnel trouvé. Essayez le nom de famille seul, ou l'identifiant "
            "(RPPS, ADELI ou IDNPS)."
        )
    lines = [f"{len(matches)} professionnel(s) trouvé(s) :"]
    for m in matches:
        line = f"- {m.professional.display_name} ({m.professional.idnps}), {reached(m)}"
        if m.link:
            line += f" : {m.link}"
        lines.append(line)
    if len(matches) >= MAX_RESULTS:
        lines.append("D'autres réponses existent peut-être : précisez le nom ou le prénom.")
    return lines


async def dm_link(store: DirectoryStore, connectors: Sequence[str], query: str) -> list[str]:
    """The bot's answer to ``dm <identifier>``: who it is and the link that opens the DM (an
    invite of the professional's ghost opens the vendor conversation, as any DM with a ghost)."""
    if identifier(query) is None:
        raise BadInput("Indiquez un identifiant : dm <RPPS, ADELI ou IDNPS>. Pour un nom : find.")
    matches = await search(store, connectors, query)
    if not matches:
        raise Refused("Aucun professionnel connu avec cet identifiant.")
    m = matches[0]
    if m.link is None:
        raise Refused(
            f"{m.professional.display_name} n'est joignable par aucune messagerie reliée au pont."
        )
    return [
        f"{m.professional.display_name}, {reached(m)}.",
        f"Ouvrez la conversation ici : {m.link}",
    ]
