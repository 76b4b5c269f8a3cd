"""Per-person permissions (TI-Messenger's concept): the decision, the store, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mautrix.util.async_db import Database

from bridge.cli import main
from bridge.db.permissions import PermissionStore
from bridge.values.permissions import ALLOW_ALL, BLOCK_ALL, Permission, exception_change

IDNPS = "810000001916"
OTHER = "0012807590"


# --- The decision -------------------------------------------------------------------------------


def test_no_setting_is_allow_all() -> None:
    assert Permission(IDNPS).decide("@anyone:anywhere.example").allowed


def test_allow_all_with_exceptions_blocks_them() -> None:
    p = Permission(IDNPS, ALLOW_ALL, frozenset({"evil.example"}), frozenset({"@bob:hs2.example"}))
    assert p.decide("@alice:hs2.example").allowed
    refused = p.decide("@bob:hs2.example")
    assert not refused.allowed and "from this user" in refused.reason
    refused = p.decide("@carol:evil.example:8448")  # the port does not matter, as in the ACL
    assert not refused.allowed and "from this server" in refused.reason


def test_block_all_with_exceptions_allows_them() -> None:
    p = Permission(IDNPS, BLOCK_ALL, frozenset({"hs2.example"}), frozenset({"@dan:hs3.example"}))
    assert p.decide("@alice:HS2.example").allowed
    assert p.decide("@dan:hs3.example").allowed
    refused = p.decide("@eve:hs3.example")
    assert not refused.allowed and refused.reason == "this professional does not accept invitations"


def test_allow_and_block_mean_add_or_remove_by_default() -> None:
    assert exception_change(Permission(IDNPS, ALLOW_ALL), "block") == "add"
    assert exception_change(Permission(IDNPS, ALLOW_ALL), "allow") == "remove"
    assert exception_change(Permission(IDNPS, BLOCK_ALL), "allow") == "add"
    assert exception_change(Permission(IDNPS, BLOCK_ALL), "block") == "remove"


# --- The store, on both engines -----------------------------------------------------------------


async def test_permission_store_round_trip(db: Database) -> None:
    store = PermissionStore(db)
    assert await store.get(IDNPS) is None
    assert (await store.effective(IDNPS)).default_setting == ALLOW_ALL

    await store.add_exception(IDNPS, "server", "evil.example")  # creates an allow-all row
    await store.add_exception(IDNPS, "server", "evil.example")  # twice: once
    await store.add_exception(IDNPS, "user", "@bob:hs2.example")
    stored = await store.get(IDNPS)
    assert stored == Permission(
        IDNPS, ALLOW_ALL, frozenset({"evil.example"}), frozenset({"@bob:hs2.example"})
    )
    assert await store.get(OTHER) is None, "one professional's setting is not another's"

    assert await store.remove_exception(IDNPS, "server", "evil.example")
    assert not await store.remove_exception(IDNPS, "server", "evil.example")
    await store.set_default(IDNPS, BLOCK_ALL, keep_exceptions=False)
    assert await store.get(IDNPS) == Permission(IDNPS, BLOCK_ALL)
    await store.add_exception(IDNPS, "server", "hs2.example")
    await store.set_default(IDNPS, BLOCK_ALL, keep_exceptions=True)
    assert (await store.effective(IDNPS)).servers == {"hs2.example"}

    assert await store.clear(IDNPS)
    assert not await store.clear(IDNPS)
    assert await store.get(IDNPS) is None
    assert await db.fetchval("SELECT COUNT(*) FROM permission_exception") == 0
    with pytest.raises(ValueError):
        await store.add_exception(IDNPS, "group", "x")
    with pytest.raises(ValueError):
        await store.set_default(IDNPS, "allow-some", keep_exceptions=True)  # type: ignore[arg-type]


# --- The CLI ------------------------------------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "config.yaml"
    data = {
        "homeserver": {"url": "http://127.0.0.1:1", "domain": "own.example"},
        "appservice": {"address": "http://127.0.0.1:2", "as_token": "a", "hs_token": "b"},
        "database": {"url": f"sqlite:{tmp_path / 'bridge.db'}"},
    }
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        status = main(list(argv))
    except SystemExit as exit_:  # argparse's own usage errors
        status = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_permissions_flow(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "permissions", "show", "-c", config, IDNPS)
    assert status == 0 and f"{IDNPS}: allow-all" in out and "nothing stored" in out

    status, out, _ = run(
        capsys, "permissions", "block", "-c", config, IDNPS,
        "--server", "Evil.example", "--user", "@bob:hs2.example",
    )  # fmt: skip
    assert status == 0
    assert "blocked server: evil.example" in out and "blocked user:   @bob:hs2.example" in out

    status, out, _ = run(capsys, "permissions", "set", "-c", config, IDNPS, "block-all")
    assert status == 0 and "exceptions were dropped" in out and f"{IDNPS}: block-all" in out

    status, out, _ = run(
        capsys, "permissions", "allow", "-c", config, IDNPS, "--server", "hs2.example"
    )
    assert status == 0 and "allowed server: hs2.example" in out

    status, out, _ = run(
        capsys, "permissions", "block", "-c", config, IDNPS, "--server", "hs2.example"
    )
    assert status == 0 and "no exceptions" in out

    status, out, _ = run(capsys, "permissions", "clear", "-c", config, IDNPS)
    assert status == 0 and "cleared, now allow-all" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["show", IDNPS[:-1] + "7"], "invalid IDNPS: the RPPS part of this IDNPS fails its Luhn"),
        (["show", "12345"], "invalid IDNPS: an IDNPS starts with '8' (RPPS) or '0' (ADELI)"),
        (["set", IDNPS, "allow-some"], "invalid choice: 'allow-some'"),
        (["set", IDNPS], "the following arguments are required: setting"),
        (["block", IDNPS], "'block' needs --server SERVER and/or --user MXID"),
        (["allow", IDNPS, "--server", "bad_name"], "invalid server name: 'bad_name'"),
        (["block", IDNPS, "--user", "bob"], "invalid --user: 'bob' is not a Matrix user id"),
    ],
)
def test_cli_permissions_bad_input_exits_2(
    config: str, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    status, _, err = run(capsys, "permissions", argv[0], "-c", config, *argv[1:])
    assert status == 2
    assert message in err
