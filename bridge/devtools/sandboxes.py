"""Finding the vendor sandboxes the installed connector types ship (entry points in the group
``eimis_bridge.sandboxes``, keyed by connector type name): the one look-up the demo, the
``sandbox`` command, the local stack and the tests use."""

from __future__ import annotations

from importlib.metadata import entry_points

from connectors.sandbox_entry import ENTRY_POINT_GROUP, VendorSandbox


class NoSandbox(LookupError):
    """No installed connector type of this name ships a sandbox."""


def vendor_sandboxes() -> dict[str, VendorSandbox]:
    """Every installed sandbox, by connector type name."""
    found: dict[str, VendorSandbox] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        sandbox = entry.load()
        if not isinstance(sandbox, VendorSandbox):
            raise TypeError(
                f"entry point {entry.name!r} of {ENTRY_POINT_GROUP} is not a VendorSandbox "
                f"({entry.value})"
            )
        found[entry.name] = sandbox
    return found


def vendor_sandbox(type_name: str) -> VendorSandbox:
    """The sandbox of this connector type; ``NoSandbox`` names those installed otherwise."""
    sandboxes = vendor_sandboxes()
    try:
        return sandboxes[type_name]
    except KeyError:
        installed = ", ".join(sorted(sandboxes)) or "none"
        raise NoSandbox(
            f"no sandbox for connector type {type_name!r}; installed: {installed}"
        ) from None
