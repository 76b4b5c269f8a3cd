"""The people in a portal, as the core sees them: ghosts of a connector or native Matrix users."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import BeforeValidator

from connectors.base import Sender
from connectors.idnps import Idnps

BRIDGE_LEAVE = "eu.eimis.bridge_leave"
"""On the leave of a ghost the bridge made for its own reasons, not the person's: its value says
which (``room_policy``: the room was opened to anyone; ``unencrypted``). No vendor
conversation changes for it: the person did not leave their conversation. (mautrix sends a leave
with extra content as a state event and drops its ``reason``: put the reason in the content.)"""


@dataclass(frozen=True)
class Member:
    mxid: str
    display_name: str
    connector: str | None = None
    """The connector whose ghost this is; None for a native Matrix user."""
    idnps: Annotated[Idnps | None, BeforeValidator(lambda value: value or None)] = None
    """(Stored rows may say ``""`` for none.)"""

    def as_sender(self) -> Sender:
        return Sender(mxid=self.mxid, display_name=self.display_name, idnps=self.idnps)
