"""How ghosts are named on Matrix: ``@<prefix><connector>_<idnps>:<domain>``, and back."""

from __future__ import annotations

import re
from dataclasses import dataclass

from connectors.idnps import Idnps, InvalidIdnps


@dataclass(frozen=True)
class GhostRef:
    connector: str
    idnps: Idnps


class GhostIds:
    def __init__(self, prefix: str, domain: str, bot_localpart: str) -> None:
        self.prefix = prefix
        self.domain = domain
        self.bot_mxid = f"@{bot_localpart}:{domain}"
        self._pattern = re.compile(
            rf"@{re.escape(prefix)}([a-z][a-z0-9]*)_([0-9]+):{re.escape(domain)}"
        )

    def mxid(self, connector: str, idnps: Idnps) -> str:
        return f"@{self.prefix}{connector}_{idnps}:{self.domain}"

    def in_namespace(self, mxid: str) -> bool:
        return mxid.startswith(f"@{self.prefix}") and mxid.endswith(f":{self.domain}")

    def parse(self, mxid: str) -> GhostRef | None:
        """The (connector, IDNPS) behind a ghost id; None for anything else or an invalid IDNPS."""
        match = self._pattern.fullmatch(mxid)
        if not match:
            return None
        try:
            return GhostRef(match.group(1), Idnps(match.group(2)))
        except InvalidIdnps:
            return None
