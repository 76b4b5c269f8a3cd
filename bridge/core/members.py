"""The people in a portal, as the core sees them: ghosts of a connector or native Matrix users."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from connectors.base import Sender
from connectors.idnps import Idnps


@dataclass(frozen=True)
class Member:
    mxid: str
    display_name: str
    connector: str | None = None
    """The connector whose ghost this is; None for a native Matrix user."""
    idnps: Idnps | None = None

    def as_sender(self) -> Sender:
        return Sender(mxid=self.mxid, display_name=self.display_name, idnps=self.idnps)

    def to_json(self) -> dict[str, Any]:
        return {
            "mxid": self.mxid,
            "display_name": self.display_name,
            "connector": self.connector,
            "idnps": self.idnps,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Member:
        idnps = data.get("idnps")
        return cls(
            data["mxid"],
            data["display_name"],
            data.get("connector"),
            Idnps(idnps) if idnps else None,
        )
