"""The IDNPS: '8' + RPPS (11 digits) or '0' + ADELI (9 digits), each Luhn-checked.

Holding an ``Idnps`` means holding a checked identifier, and every refusal says which rule failed,
so an operator reading a log knows what to fix in the vendor's directory.
"""

from __future__ import annotations

import random

import pytest

from connectors.idnps import Idnps, InvalidIdnps, luhn_check_digit, luhn_valid

VALID_RPPS = ["810000001916", "899700218896", "810000005479"]
VALID_ADELI = ["0012807590"]


@pytest.mark.parametrize("value", VALID_RPPS)
def test_rpps_based_idnps_is_accepted(value: str) -> None:
    idnps = Idnps(value)
    assert idnps == value
    assert isinstance(idnps, str)
    assert idnps.kind == "RPPS"
    assert idnps.national_number == value[1:]
    assert Idnps.is_valid(value)


@pytest.mark.parametrize("value", VALID_ADELI)
def test_adeli_based_idnps_is_accepted(value: str) -> None:
    idnps = Idnps(value)
    assert idnps == value
    assert idnps.kind == "ADELI"
    assert idnps.national_number == value[1:]
    assert Idnps.is_valid(value)


def test_surrounding_whitespace_is_ignored() -> None:
    assert Idnps(" 810000001916\n") == "810000001916"


def test_an_idnps_wrapped_again_is_the_same_value() -> None:
    idnps = Idnps("810000001916")
    assert Idnps(idnps) is idnps


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("81000000191a", "digits only"),
        ("8100-0000-1916", "digits only"),
        ("+33810000001916", "digits only"),
        ("٨١٠٠٠٠٠٠١٩١٦", "digits only"),  # Arabic-Indic digits are not ASCII digits
        ("81000000191", "12 in all"),  # RPPS one digit short
        ("8100000019160", "12 in all"),  # RPPS one digit too many
        ("001280759", "10 in all"),  # ADELI one digit short
        ("00128075900", "10 in all"),  # ADELI one digit too many
        ("110000001916", "starts with '8' (RPPS) or '0' (ADELI)"),
        ("910000001916", "starts with '8' (RPPS) or '0' (ADELI)"),
        ("810000001917", "RPPS part of this IDNPS fails its Luhn check"),
        ("899700218895", "RPPS part of this IDNPS fails its Luhn check"),
        ("0012807591", "ADELI part of this IDNPS fails its Luhn check"),
    ],
)
def test_each_rule_failure_names_the_rule(value: str, rule: str) -> None:
    with pytest.raises(InvalidIdnps) as caught:
        Idnps(value)
    assert rule in str(caught.value)
    assert not Idnps.is_valid(value)


def test_a_non_string_is_refused_with_its_type_named() -> None:
    with pytest.raises(InvalidIdnps, match="not int"):
        Idnps(810000001916)  # type: ignore[arg-type]


def test_invalid_idnps_is_a_value_error() -> None:
    # Callers that validate input generically (pydantic, argparse) catch ValueError.
    assert issubclass(InvalidIdnps, ValueError)


def test_a_single_transposition_of_digits_is_caught_by_luhn() -> None:
    # What the check digit is for: a swapped pair of different adjacent digits is refused.
    number = "810000001916"
    for i in range(1, len(number) - 1):
        a, b = number[i], number[i + 1]
        if a == b or {a, b} == {"0", "9"}:  # Luhn's one blind spot: 09 <-> 90
            continue
        swapped = number[:i] + b + a + number[i + 2 :]
        assert not Idnps.is_valid(swapped), swapped


def test_luhn_check_digit_makes_valid_rpps_and_adeli_numbers() -> None:
    rng = random.Random(20240611)
    for _ in range(500):
        rpps_base = "".join(rng.choice("0123456789") for _ in range(10))
        rpps = "8" + rpps_base + luhn_check_digit(rpps_base)
        assert Idnps(rpps).kind == "RPPS"

        adeli_base = "".join(rng.choice("0123456789") for _ in range(8))
        adeli = "0" + adeli_base + luhn_check_digit(adeli_base)
        assert Idnps(adeli).kind == "ADELI"


def test_luhn_check_digit_is_the_only_digit_that_completes_the_number() -> None:
    rng = random.Random(7)
    for _ in range(200):
        base = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 15)))
        digit = luhn_check_digit(base)
        completing = [d for d in "0123456789" if luhn_valid(base + d)]
        assert completing == [digit]
