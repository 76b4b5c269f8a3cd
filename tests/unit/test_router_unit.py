"""Ghost user ids: ``@<prefix><connector>_<IDNPS>:<domain>``, and back to (connector, IDNPS)."""

from __future__ import annotations

import random

import pytest

from bridge.core.ghost_ids import GhostIds, GhostRef
from connectors.idnps import Idnps, luhn_check_digit

DOMAIN = "eimis.example"
IDS = GhostIds("eimis_", DOMAIN, "eimis_bot")


def test_ghost_mxid_names_prefix_connector_idnps_and_domain() -> None:
    mxid = IDS.mxid("pandalab", Idnps("810000001916"))
    assert mxid == "@eimis_pandalab_810000001916:eimis.example"
    assert IDS.bot_mxid == "@eimis_bot:eimis.example"


@pytest.mark.parametrize("idnps", ["810000001916", "899700218896", "810000005479", "0012807590"])
@pytest.mark.parametrize("connector", ["pandalab", "medipeps", "a", "chu2"])
def test_ghost_mxid_parses_back_to_its_connector_and_idnps(connector: str, idnps: str) -> None:
    mxid = IDS.mxid(connector, Idnps(idnps))
    ref = IDS.parse(mxid)
    assert ref == GhostRef(connector, Idnps(idnps))
    assert isinstance(ref.idnps, Idnps)  # type: ignore[union-attr]
    assert IDS.in_namespace(mxid)


def test_round_trip_over_many_generated_identifiers() -> None:
    rng = random.Random(1234)
    for _ in range(300):
        base = "".join(rng.choice("0123456789") for _ in range(10))
        idnps = Idnps("8" + base + luhn_check_digit(base))
        connector = rng.choice("abcdefghijklmnopqrstuvwxyz") + "".join(
            rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(rng.randint(0, 10))
        )
        assert IDS.parse(IDS.mxid(connector, idnps)) == GhostRef(connector, idnps)


@pytest.mark.parametrize(
    "mxid",
    [
        "@eimis_bot:eimis.example",  # the bot is not a ghost
        "@eimis_pandalab_810000001917:eimis.example",  # Luhn fails
        "@eimis_pandalab_81000000191:eimis.example",  # too short
        "@eimis_pandalab_910000001916:eimis.example",  # bad prefix
        "@eimis_pandalab_810000001916:other.example",  # other domain
        "@eimis_pandalab_810000001916:eimis.example.org",
        "@eimis_pandalab_810000001916:eimis.example:8448",
        "@eimis_pandalab_810000001916:eimisXexample",
        "@other_pandalab_810000001916:eimis.example",  # other prefix
        "@pandalab_810000001916:eimis.example",
        "@eimis_PandaLab_810000001916:eimis.example",  # connector ids are lower case
        "@eimis_9lab_810000001916:eimis.example",
        "@eimis__810000001916:eimis.example",
        "@eimis_pandalab_810000001916x:eimis.example",
        "@alice:eimis.example",
        "eimis_pandalab_810000001916:eimis.example",
        "",
    ],
)
def test_anything_but_a_ghost_with_a_valid_idnps_parses_to_none(mxid: str) -> None:
    assert IDS.parse(mxid) is None


def test_a_ghost_id_with_a_trailing_newline_is_not_a_ghost() -> None:
    assert IDS.parse("@eimis_pl_810000001916:eimis.example\n") is None


def test_namespace_is_the_prefix_on_our_domain() -> None:
    assert IDS.in_namespace("@eimis_bot:eimis.example")
    assert IDS.in_namespace("@eimis_futurevendor_810000001916:eimis.example")
    assert not IDS.in_namespace("@alice:eimis.example")
    assert not IDS.in_namespace("@eimis_bot:other.example")
    assert not IDS.in_namespace("@eimis_bot:eimis.example.org")


def test_other_prefix_and_domain_are_honoured() -> None:
    ids = GhostIds("hds.", "chu.example", "hds.bridge")
    mxid = ids.mxid("pl", Idnps("0012807590"))
    assert mxid == "@hds.pl_0012807590:chu.example"
    assert ids.parse(mxid) == GhostRef("pl", Idnps("0012807590"))
    # The prefix's dot is literal.
    assert ids.parse("@hdsXpl_0012807590:chu.example") is None
    assert IDS.parse(mxid) is None
