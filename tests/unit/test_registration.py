"""`eimis-bridge generate-registration`: the file the homeserver reads to route users to the bridge.

The command runs as the operator runs it (a subprocess). The namespace regex is checked the way
Synapse applies it (``re.match``: anchored at the start only).
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

DOMAIN = "eimis.example"

CONFIG = f"""
homeserver:
  url: http://127.0.0.1:8008
  domain: {DOMAIN}
appservice:
  id: eimis-test
  address: http://127.0.0.1:29340
  registration: registration.yaml
connectors:
  pandalab:
    type: pandalab
    settings:
      api_url: http://127.0.0.1:8101
      client_id: eimis-bridge
      client_secret: x
      webhook_secret: y
"""


def generate(config: Path, registration: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "bridge",
            "generate-registration",
            "-c",
            str(config),
            "-r",
            str(registration),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=config.parent,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )


@pytest.fixture(scope="module")
def generated(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """Two registrations generated from the same config, and the path of the first."""
    tmp = tmp_path_factory.mktemp("registration")
    config = tmp / "config.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    results = []
    for name in ("first.yaml", "second.yaml"):
        done = generate(config, tmp / "out" / name)
        assert done.returncode == 0, done.stderr
        results.append(yaml.safe_load((tmp / "out" / name).read_text(encoding="utf-8")))
    return results[0], results[1], tmp / "out" / "first.yaml"


def user_regexes(registration: dict[str, Any]) -> list[re.Pattern[str]]:
    return [re.compile(ns["regex"]) for ns in registration["namespaces"]["users"]]


def claimed(registration: dict[str, Any], mxid: str) -> bool:
    return any(regex.match(mxid) for regex in user_regexes(registration))


def test_registration_has_long_random_tokens(generated: Any) -> None:
    first, second, _ = generated
    for registration in (first, second):
        assert isinstance(registration["as_token"], str) and len(registration["as_token"]) >= 32
        assert isinstance(registration["hs_token"], str) and len(registration["hs_token"]) >= 32
        assert registration["as_token"] != registration["hs_token"]
    # Never a constant: every run draws new tokens.
    tokens = {first["as_token"], first["hs_token"], second["as_token"], second["hs_token"]}
    assert len(tokens) == 4


def test_registration_names_the_appservice_and_its_bot(generated: Any) -> None:
    first, _, _ = generated
    assert first["id"] == "eimis-test"
    assert first["url"] == "http://127.0.0.1:29340"
    assert first["sender_localpart"] == "eimis_bot"


def test_registration_is_not_rate_limited_and_receives_ephemeral_events(generated: Any) -> None:
    first, _, _ = generated
    assert first["rate_limited"] is False
    assert first["receive_ephemeral"] is True


def test_registration_claims_the_bot_exclusively_and_ghosts_non_exclusively(
    generated: Any,
) -> None:
    # Synapse's user directory leaves exclusive namespaces out: ghosts must be non-exclusive
    # to be found from a client's user search (appservice.ghosts_in_user_directory, default).
    first, _, _ = generated
    users = first["namespaces"]["users"]
    assert users == [
        {"exclusive": True, "regex": r"^@eimis_bot:eimis\.example$"},
        {"exclusive": False, "regex": r"@eimis_.*:eimis\.example$"},
    ]
    exclusive = [re.compile(ns["regex"]) for ns in users if ns["exclusive"]]
    assert [r.pattern for r in exclusive if r.match(f"@eimis_bot:{DOMAIN}")]
    assert not [r for r in exclusive if r.match(f"@eimis_pandalab_810000001916:{DOMAIN}")]
    assert not [r for r in exclusive if r.match(f"@eimis_bot:{DOMAIN}.org")]
    assert first["namespaces"].get("rooms", []) == []
    assert first["namespaces"].get("aliases", []) == []


def test_without_ghosts_in_user_directory_one_exclusive_namespace(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        CONFIG.replace(
            "  registration: registration.yaml\n",
            "  registration: registration.yaml\n  ghosts_in_user_directory: false\n",
        ),
        encoding="utf-8",
    )
    done = generate(config, tmp_path / "registration.yaml")
    assert done.returncode == 0, done.stderr
    registration = yaml.safe_load((tmp_path / "registration.yaml").read_text(encoding="utf-8"))
    assert registration["namespaces"]["users"] == [
        {"exclusive": True, "regex": r"@eimis_.*:eimis\.example$"}
    ]


def test_example_registration_matches_the_generated_namespaces(generated: Any) -> None:
    first, _, _ = generated
    example = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "appservice.yaml").read_text(encoding="utf-8")
    )
    assert [ns["exclusive"] for ns in example["namespaces"]["users"]] == [
        ns["exclusive"] for ns in first["namespaces"]["users"]
    ]


@pytest.mark.parametrize(
    "mxid",
    [
        f"@eimis_bot:{DOMAIN}",
        f"@eimis_pandalab_810000001916:{DOMAIN}",
        # A connector configured later is covered without a new registration.
        f"@eimis_anyvendor_810000001916:{DOMAIN}",
        f"@eimis_medipeps_0012807590:{DOMAIN}",
    ],
)
def test_namespace_claims_the_bot_and_every_ghost(generated: Any, mxid: str) -> None:
    first, _, _ = generated
    assert claimed(first, mxid)


@pytest.mark.parametrize(
    "mxid",
    [
        f"@alice:{DOMAIN}",
        f"@eimis:{DOMAIN}",
        f"@eimisbot:{DOMAIN}",
        f"@not_eimis_bot:{DOMAIN}",
        f"@EIMIS_bot:{DOMAIN}",
        "@eimis_bot:other.example",
        "@eimis_pandalab_810000001916:matrix.org",
        "@eimis_bot:eimisXexample",  # the domain's dots are literal
    ],
)
def test_namespace_leaves_other_users_and_other_domains_alone(generated: Any, mxid: str) -> None:
    first, _, _ = generated
    assert not claimed(first, mxid)


@pytest.mark.parametrize(
    "mxid", [f"@eimis_bot:{DOMAIN}.org", f"@eimis_pandalab_810000001916:{DOMAIN}:8448"]
)
def test_namespace_leaves_domains_that_only_start_with_ours_alone(
    generated: Any, mxid: str
) -> None:
    # Synapse's re.match anchors the start only: the regex itself must anchor the end.
    first, _, _ = generated
    assert not claimed(first, mxid)


def test_registration_file_is_readable_by_its_owner_only(generated: Any) -> None:
    _, _, path = generated
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_regenerating_over_a_world_readable_file_makes_it_private(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    registration = tmp_path / "registration.yaml"
    registration.write_text("old: content\n", encoding="utf-8")
    registration.chmod(0o644)

    done = generate(config, registration)

    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(registration.stat().st_mode) == 0o600
    assert "as_token" in yaml.safe_load(registration.read_text(encoding="utf-8"))


def test_invalid_config_exits_non_zero_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.replace("  domain: eimis.example\n", ""), encoding="utf-8")
    registration = tmp_path / "registration.yaml"

    done = generate(config, registration)

    assert done.returncode != 0
    assert "homeserver.domain" in done.stderr
    assert "Traceback" not in done.stderr
    assert not registration.exists()
