"""The ``eimis-bridge`` command line: run, generate-registration, sandbox, demo, and the
operators' commands on the database, from the bridge's host (the bridge may be running).

Here are ``main`` and the top-level parser; each command's front end (its arguments, what is
printed, the exit status) is a module of this package, named after its subject. What an
operator's command does lives in ``bridge.commands`` (one module per subject, shared with the
admin room). Exit status: 0 done, 1 refused or nothing found (``REFUSED``), 2 bad input
(``USAGE_ERROR``), 3 ``forget`` whose Matrix part waits for the homeserver.
"""

from __future__ import annotations

import argparse
import sys

from bridge import __version__
from bridge.cli import (
    audit,
    connectors,
    dead_letters,
    demo,
    directory,
    forget,
    permissions,
    reports,
    run,
    sandbox,
    secrets,
    trust,
)
from bridge.cli.common import REFUSED, USAGE_ERROR
from bridge.config import ConfigError

__all__ = ["REFUSED", "USAGE_ERROR", "main"]

FRONT_ENDS = (
    run,
    sandbox,
    dead_letters,
    demo,
    secrets,
    connectors,
    directory,
    audit,
    trust,
    permissions,
    forget,
    reports,
)
"""Each registers its commands, in this order (the order ``--help`` lists them)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eimis-bridge",
        description="Matrix application service joining health-sector messaging tools to EIMIS.",
    )
    parser.add_argument("--version", action="version", version=f"eimis-bridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for front_end in FRONT_ENDS:
        front_end.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as error:
        print(f"Configuration error:\n{error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
