"""The national professional identifier (IDNPS) and the Luhn-checked numbers behind it."""

from __future__ import annotations

import re
from typing import Any

from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema

_DIGITS = re.compile(r"[0-9]+")


class InvalidIdnps(ValueError):
    """Raised for a string that is not a valid IDNPS; the message names the rule that failed."""


def luhn_valid(number: str) -> bool:
    """True when the digit string ends with a correct Luhn check digit."""
    total = 0
    for position, char in enumerate(reversed(number)):
        digit = ord(char) - 48
        if position % 2 == 1:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


def luhn_check_digit(partial: str) -> str:
    """The digit that makes `partial + digit` Luhn-valid (used to make test identifiers)."""
    for digit in "0123456789":
        if luhn_valid(partial + digit):
            return digit
    raise AssertionError("unreachable: one of ten digits always completes a Luhn number")


class Idnps(str):
    """An IDNPS: ``8`` + RPPS (11 digits, Luhn) or ``0`` + ADELI (9 digits, Luhn).

    Constructing one validates it, so holding an ``Idnps`` means holding a checked identifier.
    """

    __slots__ = ()

    def __new__(cls, value: str) -> Idnps:
        if isinstance(value, Idnps):
            return value
        if not isinstance(value, str):
            raise InvalidIdnps(f"an IDNPS is a string of digits, not {type(value).__name__}")
        value = value.strip()
        if not value:
            raise InvalidIdnps("an IDNPS cannot be empty")
        if not _DIGITS.fullmatch(value):
            # The value is never quoted: it may come from any file or request.
            position = next(i for i, c in enumerate(value, 1) if not ("0" <= c <= "9"))
            raise InvalidIdnps(f"an IDNPS has digits only (0-9); character {position} is not one")
        kind, number = value[0], value[1:]
        if kind == "8":
            if len(number) != 11:
                raise InvalidIdnps(
                    f"an RPPS-based IDNPS is '8' + 11 digits (12 in all); got {len(value)} digits"
                )
            if not luhn_valid(number):
                raise InvalidIdnps("the RPPS part of this IDNPS fails its Luhn check digit")
        elif kind == "0":
            if len(number) != 9:
                raise InvalidIdnps(
                    f"an ADELI-based IDNPS is '0' + 9 digits (10 in all); got {len(value)} digits"
                )
            if not luhn_valid(number):
                raise InvalidIdnps("the ADELI part of this IDNPS fails its Luhn check digit")
        else:
            raise InvalidIdnps(
                f"an IDNPS starts with '8' (RPPS) or '0' (ADELI); this one starts with {kind!r}"
            )
        return super().__new__(cls, value)

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        # Lets pydantic models and dataclasses hold a checked Idnps (and say which rule failed).
        return core_schema.no_info_after_validator_function(cls, core_schema.str_schema())

    @classmethod
    def is_valid(cls, value: str) -> bool:
        try:
            cls(value)
        except InvalidIdnps:
            return False
        return True

    @property
    def kind(self) -> str:
        return "RPPS" if self[0] == "8" else "ADELI"

    @property
    def national_number(self) -> str:
        """The RPPS or ADELI number without the type prefix."""
        return self[1:]
