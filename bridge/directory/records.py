"""What the directory's loaders produce: records to store, and rejections with their reason."""

from __future__ import annotations

import re
from dataclasses import dataclass

from bridge.db.directory import Record

__all__ = ["DirectoryFormatError", "Record", "Rejected", "matrix_id"]

# A Matrix user ID as the spec's grammar allows it (historical localparts included), with a
# server name of a host and optional port.
_MXID = re.compile(r"@[\x21-\x39\x3b-\x7e]{1,255}:[A-Za-z0-9.\-]{1,255}(:[0-9]{1,5})?")
_MATRIX_URI = re.compile(r"matrix:u/([^?#]+)")


class DirectoryFormatError(ValueError):
    """A file or document the loader cannot read at all (not one bad line: the whole of it)."""


@dataclass(frozen=True)
class Rejected:
    """A line (or FHIR entry) not imported, and why."""

    position: int
    reason: str
    unit: str = "line"

    def __str__(self) -> str:
        return f"{self.unit} {self.position}: {self.reason}"


def matrix_id(value: str) -> str | None:
    """The Matrix user ID in ``@user:server`` or a ``matrix:u/user:server`` URI; else None."""
    value = value.strip()
    uri = _MATRIX_URI.fullmatch(value)
    if uri:
        value = "@" + uri.group(1)
    return value if _MXID.fullmatch(value) else None
