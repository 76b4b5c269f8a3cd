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
from bridge.i18n import _
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
            _(
                "This number is not a valid identifier (IDNPS, an 11-digit RPPS or a 9-digit "
                "ADELI)."
            )
        ) from None


async def search(
    store: DirectoryStore, connectors: Sequence[str], query: str, limit: int = MAX_RESULTS
) -> list[Match]:
    """The matches of ``query`` (a name or an identifier), at most ``limit``."""
    query = query.strip()
    if not query:
        raise BadInput(_("Give a name or an identifier: find <name or identifier>."))
    if len(query) > MAX_QUERY:
        raise BadInput(
            _("Search too long (at most {limit} characters).").format(limit=MAX_QUERY)
        )
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
        return _("reachable by no messaging service connected to the bridge")
    if match.connector is not None:
        return _("reachable via {connector}").format(connector=match.connector)
    return _("Matrix account {mxid}").format(mxid=match.mxid)


async def find(store: DirectoryStore, connectors: Sequence[str], query: str) -> list[str]:
    """The bot's answer to ``find <query>``, one line per match."""
    matches = await search(store, connectors, query)
    if not matches:
        raise Refused(
            _(
                "No professional found. Try the family name alone, or the identifier (RPPS, "
                "ADELI or IDNPS)."
            )
        )
    lines = [_("{n} professional(s) found:").format(n=len(matches))]
    for m in matches:
        who = {"name": m.professional.display_name, "idnps": m.professional.idnps}
        if m.link:
            line = _("- {name} ({idnps}), {reached}: {link}")
        else:
            line = _("- {name} ({idnps}), {reached}")
        lines.append(line.format(**who, reached=reached(m), link=m.link))
    if len(matches) >= MAX_RESULTS:
        lines.append(_("There may be more answers: give the family or given name more fully."))
    return lines


async def dm_link(store: DirectoryStore, connectors: Sequence[str], query: str) -> list[str]:
    """The bot's answer to ``dm <identifier>``: who it is and the link that opens the DM (an
    invite of the professional's ghost opens the vendor conversation, as any DM with a ghost)."""
    if identifier(query) is None:
        raise BadInput(_("Give an identifier: dm <RPPS, ADELI or IDNPS>. For a name: find."))
    matches = await search(store, connectors, query)
    if not matches:
        raise Refused(_("No professional is known with this identifier."))
    m = matches[0]
    if m.link is None:
        raise Refused(
            _("{name} is reachable by no messaging service connected to the bridge.").format(
                name=m.professional.display_name
            )
        )
    return [
        _("{name}, {reached}.").format(name=m.professional.display_name, reached=reached(m)),
        _("Open the conversation here: {link}").format(link=m.link),
    ]
