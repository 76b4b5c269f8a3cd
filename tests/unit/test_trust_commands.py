"""``trust list|add|remove``: one behaviour (``bridge.commands.trust``) for the CLI and the admin
room. They used to disagree: the room stored a server of the config that the CLI said was
already trusted; now both say so and store nothing."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from mautrix.util.async_db import Database

from bridge.admin.commands import build_parser
from bridge.admin.parser import parse, split
from bridge.cli import main
from bridge.commands import BadInput, Refused
from bridge.commands.trust import TrustCommands
from bridge.config import parse_config
from bridge.db.trust import TrustStore

OWN = "own.example"
CONFIGURED = ["cfg.example", "hs3.example:8448"]


async def test_add_list_remove(db: Database) -> None:
    trust = TrustCommands(TrustStore(db), OWN, CONFIGURED)
    assert await trust.add("HS2.example", "cli:ops") == (
        "hs2.example added: trusted; every portal's ACL follows within seconds."
    )
    assert await trust.add("hs2.example", "cli:ops") == "hs2.example was already in the trust list."
    listing = await trust.listing()
    assert listing.text().splitlines() == [
        "Trusted servers:",
        "  own.example  (this bridge's homeserver)",
        "  cfg.example  (config trust.servers)",
        "  hs3.example:8448  (config trust.servers)",
        "  hs2.example  (added by cli:ops)",
        "ACL allow: cfg.example, hs2.example, hs3.example, own.example",
    ]
    assert "no longer trusted" in await trust.remove("hs2.example")
    with pytest.raises(Refused, match="hs2.example is not in the run-time trust list."):
        await trust.remove("hs2.example")


@pytest.mark.parametrize("server", ["cfg.example", "CFG.example", "hs3.example:8448", OWN])
async def test_a_server_of_the_config_or_ours_is_trusted_already_and_not_stored(
    db: Database, server: str
) -> None:
    store = TrustStore(db)
    trust = TrustCommands(store, OWN, CONFIGURED)
    assert await trust.add(server, "cli:ops") == f"{server.lower()} is already trusted (config)."
    assert await store.list() == []
    with pytest.raises(BadInput):
        trust.removable(server)


async def test_bad_server_names_are_refused_before_the_store(db: Database) -> None:
    trust = TrustCommands(TrustStore(db), OWN, CONFIGURED)
    with pytest.raises(BadInput, match="invalid server name: 'bad_name' is not hostname"):
        await trust.add("bad_name", "cli:ops")
    with pytest.raises(BadInput, match="'trust remove' needs a server name"):
        trust.removable(None)


# --- The fixed disagreement, in both front ends --------------------------------------------------


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    data = {
        "homeserver": {"url": "http://127.0.0.1:1", "domain": OWN},
        "appservice": {"address": "http://127.0.0.1:2", "as_token": "a", "hs_token": "b"},
        "database": {"url": f"sqlite:{tmp_path / 'bridge.db'}"},
        "trust": {"servers": CONFIGURED},
    }
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_cli_trust_add_of_a_config_server_stores_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(_config(tmp_path))
    assert main(["trust", "add", "-c", config, "cfg.example"]) == 0
    assert capsys.readouterr().out == "cfg.example is already trusted (config).\n"
    assert main(["trust", "list", "-c", config]) == 0
    assert "added by" not in capsys.readouterr().out


async def test_admin_room_trust_add_of_a_config_server_stores_nothing(db: Database) -> None:
    config = parse_config(
        {
            "homeserver": {"url": "http://127.0.0.1:1", "domain": OWN},
            "appservice": {"address": "http://127.0.0.1:2", "as_token": "a", "hs_token": "b"},
            "trust": {"servers": CONFIGURED},
        }
    )
    store = TrustStore(db)
    ctx = SimpleNamespace(config=config, stores=SimpleNamespace(trusted_servers=store))
    who = "!admin:own.example|@ops:own.example"

    async def run(line: str) -> str:
        args = parse(build_parser(), split(line))
        return str((await args.handler(ctx, args, who)).text)

    assert await run("trust add cfg.example") == "cfg.example is already trusted (config)."
    assert await store.list() == []
    assert await run("trust remove cfg.example") == (
        "cfg.example is in the config file's trust.servers: remove it there"
    )
    assert "added: trusted" in await run("trust add hs2.example")
    assert [(r.server_name, r.added_by) for r in await store.list()] == [
        ("hs2.example", "@ops:own.example")
    ]
