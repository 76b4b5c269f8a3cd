"""Failures the core tells apart: try again later, or never."""

from __future__ import annotations


class PermanentFailure(Exception):
    """This item can never be processed as it is; retrying would not help.

    The message is shown to people (room notice, operator view): a sentence, with no content.
    """


class NotThere(Exception):
    """The vendor does not have what was to be removed (it answered 404): nothing was done,
    which is recorded as such (``why``, a short code), never as delivered."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class UnknownUser(PermanentFailure):
    """No connector knows this professional."""


class NotInDirectory(UnknownUser):
    """``identity.require_directory_entry``: the professional is not in the imported (national)
    directory, so no ghost may stand for them. The message (French) is shown to people."""
