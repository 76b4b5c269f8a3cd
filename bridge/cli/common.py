"""What every front end of the command line shares: the exit statuses, the ``-c CONFIG``
argument, running a command on the configured database, who the operator is, asking them to
confirm, and where a command's output goes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from bridge.config import load_config

USAGE_ERROR = 2
"""Exit status of a command given bad input."""
REFUSED = 1
"""Exit status of a command that was not done, or found nothing."""


def config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", type=Path, required=True, help="bridge config file")


def on_database(
    args: argparse.Namespace,
    action: Callable[[Any, Any], Awaitable[int]],
    *,
    prefix: bool = True,
) -> int:
    """Run ``action(config, db)`` on the configured database (the running bridge may be using
    it). A ``bridge.commands`` error is printed on stderr: bad input exits 2, a refusal 1."""
    from bridge.commands import BadInput, CommandFailed
    from bridge.db.database import open_database
    from bridge.i18n import set_locale

    async def go() -> int:
        config = load_config(args.config)
        set_locale(config.bridge.locale)  # what a command tells people (a leave reason ...)
        db = await open_database(config.database)
        try:
            return await action(config, db)
        finally:
            await db.stop()

    try:
        return asyncio.run(go())
    except CommandFailed as error:
        bad = isinstance(error, BadInput)
        print(f"eimis-bridge {args.command}: {error}" if bad and prefix else error, file=sys.stderr)
        return USAGE_ERROR if bad else REFUSED


def operator() -> str:
    """Who runs the command, as stores record it (``cli:<login>``)."""
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no login name in some containers
        return "cli:unknown"


@contextlib.contextmanager
def output(path: Path | None) -> Iterator[TextIO]:
    if path is None:
        yield sys.stdout
        return
    with path.open("w", encoding="utf-8", newline="") as file:
        yield file


def confirm(question: str) -> bool:
    """The operator's answer to a question on the terminal (no answer: no)."""
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")
