"""Parsing what an operator types in the admin room: a real argument parser, nothing printed.

argparse writes help and errors to stdout/stderr and exits the process; here both become
exceptions carrying the text, which the admin room posts back. ``help`` lists the commands,
``<command> -h`` explains one, and an error says what was wrong followed by the usage.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any, NoReturn


class CommandError(Exception):
    """The command could not be understood: the message says why (and how to write it)."""


class HelpShown(Exception):  # noqa: N818 (not an error: the answer to -h)
    """``-h`` was asked for: the message is the help text."""


class AdminParser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("exit_on_error", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise CommandError(f"{message}\n\n{self.format_usage().strip()}")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise CommandError(message or "")

    def print_help(self, file: Any = None) -> None:
        raise HelpShown(self.format_help().strip())

    def print_usage(self, file: Any = None) -> None:
        raise HelpShown(self.format_usage().strip())


def split(text: str) -> list[str]:
    """The words of a command line, shell-style (quotes group words)."""
    try:
        return shlex.split(text)
    except ValueError as error:  # an unbalanced quote
        raise CommandError(f"Could not read the command: {error}.") from None


def parse(parser: AdminParser, words: list[str]) -> argparse.Namespace:
    """Parse, turning argparse's own exceptions (exit_on_error=False) into CommandError."""
    try:
        return parser.parse_args(words)
    except argparse.ArgumentError as error:
        raise CommandError(f"{error}\n\n{parser.format_usage().strip()}") from None
