"""The configuration file: typed, validated at start, every error naming the key to fix."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.config import ConfigError, load_config, load_tokens, parse_config
from bridge.core.connectors import validate_connectors

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = REPO_ROOT / "config.example.yaml"
EXAMPLE_ENV = {
    "PANDALAB_CLIENT_SECRET": "pl-client-secret",
    "PANDALAB_WEBHOOK_SECRET": "pl-webhook-secret",
    "MEDIPEPS_API_KEY": "mp-api-key",
}

MINIMAL: dict[str, Any] = {
    "homeserver": {"url": "http://127.0.0.1:8008", "domain": "eimis.example"},
    "appservice": {
        "address": "http://127.0.0.1:29340",
        "as_token": "as-token-value",
        "hs_token": "hs-token-value",
    },
    "connectors": {
        "pandalab": {
            "type": "pandalab",
            "settings": {
                "api_url": "http://127.0.0.1:8101",
                "client_id": "eimis-bridge",
                "client_secret": "s3cret",
                "webhook_secret": "w3bhook",
            },
        },
        "medipeps": {
            "type": "medipeps",
            "settings": {"api_url": "http://127.0.0.1:8102", "api_key": "k3y"},
        },
    },
}


def minimal(**changes: Any) -> dict[str, Any]:
    """A valid config dict, with dotted-path changes applied (value None deletes the key)."""
    data = copy.deepcopy(MINIMAL)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(leaf)
        else:
            node[leaf] = value
    return data


def config_error(data: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return str(caught.value)


@pytest.fixture
def example_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in EXAMPLE_ENV.items():
        monkeypatch.setenv(name, value)


# --- The example config --------------------------------------------------------------------------


def test_example_config_parses_when_its_environment_variables_are_set(example_env: None) -> None:
    config = load_config(EXAMPLE)

    assert config.homeserver.domain == "eimis.example"
    assert config.bot_mxid == "@eimis_bot:eimis.example"
    # Relative registration paths are relative to the config file, not the working directory.
    assert config.appservice.registration == REPO_ROOT / "registration.yaml"
    pandalab = config.connectors["pandalab"].settings
    assert pandalab["client_secret"] == "pl-client-secret"
    assert pandalab["webhook_secret"] == "pl-webhook-secret"
    assert config.connectors["medipeps"].settings["api_key"] == "mp-api-key"
    # Its connectors are installed types with valid settings.
    specs = validate_connectors(config)
    assert [(s.connector_id, s.cls.type_name) for s in specs] == [
        ("pandalab", "pandalab"),
        ("medipeps", "medipeps"),
    ]


@pytest.mark.parametrize(
    ("variable", "key"),
    [
        ("PANDALAB_CLIENT_SECRET", "connectors.pandalab.settings.client_secret"),
        ("PANDALAB_WEBHOOK_SECRET", "connectors.pandalab.settings.webhook_secret"),
        ("MEDIPEPS_API_KEY", "connectors.medipeps.settings.api_key"),
    ],
)
def test_example_config_with_an_unset_variable_fails_naming_the_key(
    example_env: None, monkeypatch: pytest.MonkeyPatch, variable: str, key: str
) -> None:
    monkeypatch.delenv(variable)
    with pytest.raises(ConfigError) as caught:
        load_config(EXAMPLE)
    message = str(caught.value)
    assert key in message
    assert variable in message


def test_environment_variable_reference_is_only_a_whole_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EIMIS_TEST_DOMAIN", "from-env.example")
    config = parse_config(minimal(homeserver__domain="${EIMIS_TEST_DOMAIN}"))
    assert config.homeserver.domain == "from-env.example"
    # Not a template language: a reference inside a longer string is left as written.
    config = parse_config(minimal(appservice__bot_displayname="Bridge ${EIMIS_TEST_DOMAIN}"))
    assert config.appservice.bot_displayname == "Bridge ${EIMIS_TEST_DOMAIN}"


# --- Validation errors name the dotted key -------------------------------------------------------


def test_minimal_config_is_valid_and_fills_defaults() -> None:
    config = parse_config(minimal())
    assert config.appservice.port == 29340
    assert config.appservice.bot_username == "eimis_bot"
    assert config.database.is_sqlite
    assert config.logging.level == "INFO"


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"homeserver__domain": None}, "homeserver.domain"),
        ({"homeserver__url": None}, "homeserver.url"),
        ({"appservice__address": None}, "appservice.address"),
        ({"homeserver": None}, "homeserver"),
        ({"connectors__pandalab__type": None}, "connectors.pandalab.type"),
    ],
)
def test_missing_required_key_is_named(change: dict[str, Any], key: str) -> None:
    message = config_error(minimal(**change))
    assert f"{key}: Field required" in message


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"appservice__port": "not-a-port"}, "appservice.port"),
        ({"appservice__port": 70000}, "appservice.port"),
        ({"homeserver__verify_ssl": "perhaps"}, "homeserver.verify_ssl"),
        ({"homeserver__startup_timeout_s": -1}, "homeserver.startup_timeout_s"),
        ({"database__max_size": 0}, "database.max_size"),
        ({"logging__level": "CHATTY"}, "logging.level"),
        ({"connectors__pandalab__enabled": "sometimes"}, "connectors.pandalab.enabled"),
        ({"connectors__medipeps__settings": ["a", "list"]}, "connectors.medipeps.settings"),
    ],
)
def test_wrong_type_or_range_names_the_key(change: dict[str, Any], key: str) -> None:
    message = config_error(minimal(**change))
    assert message.startswith(f"{key}: ") or f"\n{key}: " in message, message


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"homeserver__url": "127.0.0.1:8008"}, "homeserver.url"),
        ({"appservice__address": "ftp://bridge.example"}, "appservice.address"),
        ({"appservice__public_url": "bridge.example/hooks"}, "appservice.public_url"),
        ({"database__url": "mysql://db.example/eimis"}, "database.url"),
    ],
)
def test_bad_url_names_the_key(change: dict[str, Any], key: str) -> None:
    message = config_error(minimal(**change))
    assert key in message
    assert "must start with" in message


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"homeserver__urll": "http://x"}, "homeserver.urll"),
        ({"appservice__hs_tokn": "x"}, "appservice.hs_tokn"),
        ({"databse": {"url": "sqlite:x.db"}}, "databse"),
        ({"connectors__pandalab__setings": {}}, "connectors.pandalab.setings"),
    ],
)
def test_unknown_key_is_refused_as_a_probable_typo(change: dict[str, Any], key: str) -> None:
    message = config_error(minimal(**change))
    assert f"{key}: Extra inputs are not permitted" in message


@pytest.mark.parametrize(
    "connector_id", ["PandaLab", "panda-lab", "9lab", "bot", "matrix", "a" * 33]
)
def test_invalid_connector_id_is_named(connector_id: str) -> None:
    data = minimal()
    data["connectors"][connector_id] = data["connectors"].pop("pandalab")
    message = config_error(data)
    assert message.startswith("connectors")
    assert repr(connector_id) in message


def test_user_prefix_must_be_a_localpart_prefix_ending_with_underscore() -> None:
    assert "appservice.user_prefix" in config_error(minimal(appservice__user_prefix="EIMIS_"))
    assert "appservice.user_prefix" in config_error(minimal(appservice__user_prefix="eimis"))


def test_tokens_are_required_from_registration_or_config() -> None:
    message = config_error(minimal(appservice__as_token=None))
    assert "appservice" in message
    assert "registration" in message and "as_token" in message


def test_every_error_is_reported_at_once() -> None:
    message = config_error(minimal(homeserver__domain=None, appservice__port="x"))
    assert "homeserver.domain" in message
    assert "appservice.port" in message


@pytest.mark.parametrize("data", [None, [], "homeserver: x", 42])
def test_a_config_that_is_not_a_mapping_is_refused(data: Any) -> None:
    assert "mapping" in config_error(data)


# --- Loading a file ------------------------------------------------------------------------------


def test_load_config_of_missing_file_says_it_cannot_read_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(path) in str(caught.value)
    assert "cannot read" in str(caught.value)


def test_load_config_of_a_directory_says_it_cannot_read_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)


def test_load_config_of_invalid_yaml_says_so(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("homeserver:\n  url: [unclosed\n  domain: x\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "not valid YAML" in str(caught.value)
    assert str(path) in str(caught.value)


def test_load_config_of_an_empty_file_says_it_needs_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_load_config_of_a_binary_file_gives_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    # Not UTF-8: a ConfigError naming the file, not a UnicodeDecodeError traceback.
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(path) in str(caught.value)


def test_load_config_reads_a_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(minimal()), encoding="utf-8")
    assert load_config(path).homeserver.url == "http://127.0.0.1:8008"


# --- Tokens --------------------------------------------------------------------------------------


def test_tokens_come_from_the_registration_file_next_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "registration.yaml").write_text(
        yaml.safe_dump({"id": "eimis-bridge", "as_token": "AS-from-file", "hs_token": "HS-file"}),
        encoding="utf-8",
    )
    data = minimal(appservice__as_token=None, appservice__hs_token=None)
    data["appservice"]["registration"] = "registration.yaml"
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(data), encoding="utf-8")

    config = load_config(config_path)

    assert config.appservice.registration == tmp_path / "registration.yaml"
    assert load_tokens(config) == ("AS-from-file", "HS-file")


def test_explicit_tokens_win_over_the_registration_file(tmp_path: Path) -> None:
    data = minimal()
    data["appservice"]["registration"] = str(tmp_path / "does-not-exist.yaml")
    config = parse_config(data)
    assert load_tokens(config) == ("as-token-value", "hs-token-value")


def test_one_explicit_token_is_completed_from_the_registration_file(tmp_path: Path) -> None:
    registration = tmp_path / "registration.yaml"
    registration.write_text(
        yaml.safe_dump({"as_token": "AS-from-file", "hs_token": "HS-from-file"}), encoding="utf-8"
    )
    data = minimal(appservice__hs_token=None)
    data["appservice"]["registration"] = str(registration)
    assert load_tokens(parse_config(data)) == ("as-token-value", "HS-from-file")


def test_tokens_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EIMIS_AS_TOKEN", "as-env")
    monkeypatch.setenv("EIMIS_HS_TOKEN", "hs-env")
    data = minimal(
        appservice__as_token="${EIMIS_AS_TOKEN}", appservice__hs_token="${EIMIS_HS_TOKEN}"
    )
    assert load_tokens(parse_config(data)) == ("as-env", "hs-env")


def test_missing_registration_file_says_to_generate_it(tmp_path: Path) -> None:
    data = minimal(appservice__as_token=None, appservice__hs_token=None)
    data["appservice"]["registration"] = str(tmp_path / "registration.yaml")
    with pytest.raises(ConfigError) as caught:
        load_tokens(parse_config(data))
    assert "appservice.registration" in str(caught.value)
    assert "generate-registration" in str(caught.value)


@pytest.mark.parametrize("content", ["", "- a list\n", "id: eimis-bridge\nas_token: only-one\n"])
def test_registration_file_without_tokens_is_named(tmp_path: Path, content: str) -> None:
    registration = tmp_path / "registration.yaml"
    registration.write_text(content, encoding="utf-8")
    data = minimal(appservice__as_token=None, appservice__hs_token=None)
    data["appservice"]["registration"] = str(registration)
    with pytest.raises(ConfigError, match="appservice.registration"):
        load_tokens(parse_config(data))


# --- Connector types and settings ----------------------------------------------------------------


def test_unknown_connector_type_names_the_type_key() -> None:
    data = minimal(connectors__pandalab__type="pandalabs")
    with pytest.raises(ConfigError) as caught:
        validate_connectors(parse_config(data))
    message = str(caught.value)
    assert message.startswith("connectors.pandalab.type:")
    assert "'pandalabs'" in message
    # It lists what is installed, so the operator can fix the typo.
    assert "medipeps" in message and "pandalab" in message.split("installed")[-1]


def test_connector_setting_missing_names_the_settings_field() -> None:
    data = minimal(connectors__pandalab__settings__client_id=None)
    with pytest.raises(ConfigError) as caught:
        validate_connectors(parse_config(data))
    assert "connectors.pandalab.settings.client_id: Field required" in str(caught.value)


def test_connector_setting_unknown_or_wrong_type_names_the_settings_field() -> None:
    data = minimal(connectors__medipeps__settings__page_size="many")
    data["connectors"]["medipeps"]["settings"]["poll_intervall_s"] = 1
    with pytest.raises(ConfigError) as caught:
        validate_connectors(parse_config(data))
    message = str(caught.value)
    assert "connectors.medipeps.settings.page_size" in message
    assert "connectors.medipeps.settings.poll_intervall_s" in message


def test_connector_id_is_free_of_its_type() -> None:
    # Two instances of one type under their own ids: each is validated and named by its id.
    data = minimal()
    data["connectors"]["chu"] = copy.deepcopy(data["connectors"]["pandalab"])
    del data["connectors"]["chu"]["settings"]["webhook_secret"]
    with pytest.raises(ConfigError, match=r"connectors\.chu\.settings\.webhook_secret"):
        validate_connectors(parse_config(data))


def test_disabled_connector_is_not_validated() -> None:
    data = minimal(connectors__pandalab__type="not-installed", connectors__pandalab__enabled=False)
    specs = validate_connectors(parse_config(data))
    assert [s.connector_id for s in specs] == ["medipeps"]
