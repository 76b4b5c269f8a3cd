"""What operators can do and read, one module per subject (trust, directory, audit, connectors,
erasure, reports), whichever front end they use: the CLI (``bridge/cli/``: arguments,
printing, exit status) and the admin room (``bridge/admin/commands.py``: the room's command
line, replies). A subject module validates, calls the stores and words the answer; it prints
nothing, parses no command line and talks to no homeserver. It returns results, or raises one of
the errors below, whose message is meant for the operator as it is.
"""

from __future__ import annotations


class CommandFailed(Exception):
    """The command did not do what was asked: the message says why, for the operator."""


class BadInput(CommandFailed, ValueError):
    """What the operator typed is not valid (the CLI exits 2)."""


class Refused(CommandFailed):
    """Valid, but not done or nothing found (the CLI exits 1)."""
