"""The trust list: server names, the ACL it makes, the run-time store and CLI, the watcher."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mautrix.util.async_db import Database

from bridge.cli import main
from bridge.config import ConfigError, parse_config
from bridge.core.trust import TrustWatcher
from bridge.db.trust import TrustStore
from bridge.values.trust import (
    InvalidServerName,
    TrustList,
    acl_matches,
    host_of,
    server_acl,
    server_of,
    valid_mxid,
    validate_server_name,
)

from helpers import wait_until

BASE = {
    "homeserver": {"url": "http://127.0.0.1:1", "domain": "own.example"},
    "appservice": {"address": "http://127.0.0.1:2", "as_token": "a", "hs_token": "b"},
}


# --- Server names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("matrix.example.org", "matrix.example.org"),
        ("Matrix.Example.ORG:8448", "matrix.example.org:8448"),
        ("localhost", "localhost"),
        (" hs-2.eimis.localhost:08448 ", "hs-2.eimis.localhost:8448"),
    ],
)
def test_valid_server_names_are_normalised(raw: str, expected: str) -> None:
    assert validate_server_name(raw) == expected


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("", "empty"),
        ("1.2.3.4", "IP literal"),
        ("[::1]:8448", "IP literal"),
        ("bad_name.example", "hostname[:port]"),
        ("-x.example", "hostname[:port]"),
        ("x.example:0", "port"),
        ("x.example:99999", "port"),
        ("x.example:http", "port"),
        ("*.example", "hostname[:port]"),
        ("a" * 300, "255"),
    ],
)
def test_invalid_server_names_say_why(raw: str, why: str) -> None:
    with pytest.raises(InvalidServerName, match=why.replace("[", r"\[").replace("]", r"\]")):
        validate_server_name(raw)


def test_servers_and_users() -> None:
    assert server_of("@alice:hs.example:8448") == "hs.example:8448"
    assert server_of("not-an-id") is None
    assert host_of("HS.example:8448") == "hs.example"
    assert valid_mxid("@bob:HS2.example") == "@bob:hs2.example"
    with pytest.raises(ValueError, match="localpart"):
        valid_mxid("@Bob:hs2.example")
    with pytest.raises(ValueError, match="Matrix user id"):
        valid_mxid("bob")


# --- The effective list and its ACL -------------------------------------------------------------


def test_own_server_is_always_trusted_and_ports_do_not_matter() -> None:
    trust = TrustList("own.example", ["hs2.example:8448"])
    assert trust.servers == ["own.example", "hs2.example:8448"]
    assert trust.is_trusted("@a:own.example")
    assert trust.is_trusted("@a:hs2.example")  # the ACL ignores ports: so does the bridge
    assert trust.is_trusted("@a:HS2.example:1234")
    assert not trust.is_trusted("@a:evil.example")
    assert not trust.is_trusted("@a:sub.hs2.example")
    assert not trust.is_trusted("garbage")


def test_acl_allows_exactly_the_trusted_hosts() -> None:
    trust = TrustList("own.example:8448", ["hs2.example:8448", "b.example"], ["c.example"])
    assert trust.acl() == {
        "allow": ["b.example", "c.example", "hs2.example", "own.example"],
        "deny": [],
        "allow_ip_literals": False,
    }
    assert server_acl(["own.example"])["allow"] == ["own.example"]


def test_replace_extra_reports_only_real_changes() -> None:
    trust = TrustList("own.example", ["hs2.example"])
    assert not trust.replace_extra([])
    assert trust.replace_extra(["hs3.example"])
    assert not trust.replace_extra(["hs3.example"])
    assert not trust.replace_extra(["hs2.example:8448", "hs3.example"])  # same hosts
    assert trust.replace_extra([])
    assert not trust.is_trusted("@x:hs3.example")


def test_acl_matches() -> None:
    wanted = server_acl(["own.example", "hs2.example"])
    assert acl_matches(dict(wanted), wanted)
    assert acl_matches({**wanted, "allow": list(reversed(wanted["allow"]))}, wanted)
    assert not acl_matches(None, wanted)
    assert not acl_matches({**wanted, "allow_ip_literals": True}, wanted)
    assert not acl_matches({**wanted, "allow": ["*"]}, wanted)
    assert not acl_matches({**wanted, "deny": ["x"]}, wanted)


# --- Config -------------------------------------------------------------------------------------


def test_config_trust_section() -> None:
    config = parse_config({**BASE, "trust": {"servers": ["HS2.example:8448"]}})
    assert config.trust.servers == ("hs2.example:8448",)
    assert parse_config(BASE).trust.servers == ()


@pytest.mark.parametrize(
    ("trust", "message"),
    [
        ({"servers": ["ok.example", "bad_name"]}, "trust.servers: entry 1: 'bad_name' is not"),
        ({"servers": "one.example"}, "trust.servers: must be a list"),
        ({"servers": ["10.0.0.1"]}, "trust.servers: entry 0: '10.0.0.1' is an IP literal"),
        ({"poll_interval_s": 30}, "trust.poll_interval_s"),
        ({"server": ["x.example"]}, "trust.server"),
    ],
)
def test_config_trust_errors_name_the_key(trust: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config({**BASE, "trust": trust})
    assert message in str(error.value)


# --- The watcher --------------------------------------------------------------------------------


async def test_watcher_calls_back_on_change_and_retries_a_failed_callback() -> None:
    trust = TrustList("own.example")
    table: list[str] = []
    calls: list[list[str]] = []
    fail = [True]

    async def load() -> list[str]:
        return list(table)

    async def changed() -> None:
        calls.append(trust.servers)
        if fail[0]:
            fail[0] = False
            raise ConnectionError("homeserver down")

    watcher = TrustWatcher(trust, load, changed, interval_s=0.01)
    assert not await watcher.refresh()
    table.append("hs2.example")
    with pytest.raises(ConnectionError):
        await watcher.refresh()
    assert await watcher.refresh()  # the failed pass is tried again although nothing changed
    assert not await watcher.refresh()
    assert calls == [["own.example", "hs2.example"]] * 2

    watcher.start(sweep=True)  # a start-up sweep, then polls
    try:
        await wait_until(lambda: len(calls) == 3)
        table.append("hs3.example")
        await wait_until(lambda: len(calls) == 4)
        assert trust.is_trusted("@a:hs3.example")
    finally:
        await watcher.stop()


# --- The store, on both engines -----------------------------------------------------------------


async def test_trust_store_add_list_remove(db: Database) -> None:
    store = TrustStore(db)
    assert await store.list() == []
    assert await store.add("hs2.example", "cli:test")
    assert not await store.add("hs2.example", "cli:other")
    assert await store.add("a.example:8448", "cli:test")
    rows = await store.list()
    assert [r.server_name for r in rows] == ["a.example:8448", "hs2.example"]
    assert rows[1].added_by == "cli:test" and rows[1].added_at > 0
    assert await store.remove("hs2.example")
    assert not await store.remove("hs2.example")
    assert await store.names() == ["a.example:8448"]
    await db.execute(
        "INSERT INTO portal (room_id, title, is_direct, voice, created_at) "
        "VALUES ('!r:own.example', NULL, true, '@bot:own.example', 1)"
    )
    assert await store.portal_voices() == [("!r:own.example", "@bot:own.example")]


# --- The CLI ------------------------------------------------------------------------------------


def _config(tmp_path: Path, servers: list[str] | None = None) -> Path:
    path = tmp_path / "config.yaml"
    data = {**BASE, "database": {"url": f"sqlite:{tmp_path / 'bridge.db'}"}}
    if servers is not None:
        data["trust"] = {"servers": servers}
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_cli_trust_list_add_remove(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(_config(tmp_path, ["cfg.example"]))
    assert main(["trust", "add", "-c", config, "HS2.example:8448"]) == 0
    assert "hs2.example:8448 added" in capsys.readouterr().out
    assert main(["trust", "list", "-c", config]) == 0
    out = capsys.readouterr().out
    assert "own.example  (this bridge's homeserver)" in out
    assert "cfg.example  (config trust.servers)" in out
    assert "hs2.example:8448  (added by cli:" in out
    assert "ACL allow: cfg.example, hs2.example, own.example" in out
    assert main(["trust", "remove", "-c", config, "hs2.example:8448"]) == 0
    assert main(["trust", "remove", "-c", config, "hs2.example:8448"]) == 1
    assert main(["trust", "add", "-c", config, "cfg.example"]) == 0
    assert "already trusted (config)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["trust", "add"], "the following arguments are required: server"),
        (["trust", "add", "bad_name"], "invalid server name: 'bad_name' is not hostname[:port]"),
        (["trust", "remove", "10.1.2.3"], "IP literal"),
        (["trust", "remove", "own.example"], "always trusted"),
        (["trust", "remove", "cfg.example"], "trust.servers: remove it there"),
    ],
)
def test_cli_trust_bad_input_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    config = str(_config(tmp_path, ["cfg.example"]))
    try:
        status = main([argv[0], argv[1], "-c", config, *argv[2:]])
    except SystemExit as exit_:  # argparse's own usage errors
        status = exit_.code
    assert status == 2
    assert message in capsys.readouterr().err


# --- Refusals in the Matrix -> vendors path -----------------------------------------------------


class _Intent:
    def __init__(self, left: list[tuple[str, str, str]], mxid: str) -> None:
        self.left, self.mxid = left, mxid

    async def leave_room(self, room_id: str, reason: str) -> None:
        self.left.append((self.mxid, str(room_id), reason))


class _Homeserver:
    def __init__(self) -> None:
        self.trust = TrustList("own.example", ["hs2.example"])
        self.left: list[tuple[str, str, str]] = []

    def intent(self, mxid: str) -> _Intent:
        return _Intent(self.left, mxid)


class _Portals:
    def __init__(self) -> None:
        from bridge.core.ghost_ids import GhostIds

        self.ids = GhostIds("eimis_", "own.example", "eimis_bot")

    def member_changed(self, *args: object) -> None:
        pass


async def test_untrusted_senders_are_dropped_and_their_invites_refused() -> None:
    from bridge.core.from_matrix import FromMatrix

    hs = _Homeserver()
    from_matrix = FromMatrix(None, hs, _Portals())  # type: ignore[arg-type]
    message = {
        "event_id": "$m",
        "room_id": "!r:evil.example",
        "type": "m.room.message",
        "sender": "@mallory:evil.example",
        "content": {"msgtype": "m.text", "body": "secret"},
    }
    assert await from_matrix.handle(message) == []
    for target in ("@eimis_bot:own.example", "@eimis_pandalab_810000001916:own.example"):
        invite = {
            "event_id": "$i",
            "room_id": "!r:evil.example",
            "type": "m.room.member",
            "sender": "@mallory:evil.example:8448",
            "state_key": target,
            "content": {"membership": "invite"},
        }
        assert await from_matrix.handle(invite) == []
    assert from_matrix.untrusted_dropped == 3
    assert [who for who, _, _ in hs.left] == [
        "@eimis_bot:own.example",
        "@eimis_pandalab_810000001916:own.example",
    ]
    assert all("n'appartient pas à l'espace de confiance EIMIS" in reason for *_, reason in hs.left)
    # Typing from there is ignored without touching storage.
    await from_matrix.handle(
        {"type": "m.typing", "room_id": "!r:x", "content": {"user_ids": ["@m:evil.example"]}}
    )
