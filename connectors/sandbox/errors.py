"""The refusals of a sandbox: vendor-neutral codes that each vendor layer formats its own way."""

from __future__ import annotations

from collections.abc import Mapping


class SandboxError(Exception):
    """A request the sandbox refuses: an HTTP status, a machine code and a sentence for humans.

    ``code`` is vendor-neutral (``invalid_request``, ``user_not_found`` ...); each vendor layer
    maps it to its own error format.
    """

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})


def bad_request(message: str) -> SandboxError:
    return SandboxError(400, "invalid_request", message)


def not_supported(vendor_name: str, what: str) -> SandboxError:
    return SandboxError(501, "not_supported", f"{vendor_name} does not support {what}.")


def file_too_large(limit: int) -> SandboxError:
    return SandboxError(
        413, "file_too_large", f"The file is larger than the limit of {describe_size(limit)}."
    )


def describe_size(size: int) -> str:
    """``104857600`` → ``"100 MiB (104857600 bytes)"``; small sizes in bytes only."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit} ({size} bytes)"
    return f"{size} bytes"
