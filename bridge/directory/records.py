"""What the directory's loaders produce: records to store, and rejections with their reason."""

from __future__ import annotations

import re
from dataclasses import dataclass

from bridge.db.directory import Record

__all__ = ["DirectoryFormatError", "Record", "Rejected", "mailbox_address", "matrix_id"]

# A Matrix user ID as the spec's grammar allows it (historical localparts included), with a
# server name of a host and optional port.
_MXID = re.compile(r"@[\x21-\x39\x3b-\x7e]{1,255}:[A-Za-z0-9.\-]{1,255}(:[0-9]{1,5})?")
_MATRIX_URI = re.compile(r"matrix:u/([^?#]+)")
# A secure mailbox's address: an RFC 5321 dot-atom local part (ASCII) @ a domain of at least two
# labels of letters, digits and inner hyphens. Quoted local parts, IP literals and non-ASCII
# addresses are not used by the national secure-mail space and are refused.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_MAILBOX = re.compile(rf"({_ATOM}(?:\.{_ATOM})*)@({_LABEL}(?:\.{_LABEL})+)")
MAX_ADDRESS = 254


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


def mailbox_address(value: str) -> tuple[str | None, str]:
    """A secure mailbox's address normalised (domain in lower case, local part as given, an
    optional ``mailto:`` dropped), or None and why it is refused. The reason never quotes the
    value (it may be anything)."""
    value = value.strip()
    if value[:7].lower() == "mailto:":
        value = value[7:]
    if not value:
        return None, "empty mailbox address"
    if not value.isascii():
        return None, "mailbox address is not ASCII"
    if len(value) > MAX_ADDRESS:
        return None, f"mailbox address longer than {MAX_ADDRESS} characters"
    match = _MAILBOX.fullmatch(value)
    if match is None or len(match.group(1)) > 64:
        return None, "not a mailbox address (local-part@domain)"
    return f"{match.group(1)}@{match.group(2).lower()}", ""
