"""``bridge.commands.connectors`` without a registry: settings as typed in either front end,
durations, and the answers' wording that both the CLI and the admin room show."""

from __future__ import annotations

import pytest

from bridge.commands import BadInput
from bridge.commands.connectors import ConnectorCommands, parse_duration, settings_of


def test_settings_nest_and_read_the_environment_only_when_given_one() -> None:
    typed = ["base_url=https://v.example", "auth.token=${TOKEN}", "auth.user=bob"]
    assert settings_of(typed, {"auth": {"user": "alice"}, "x": 1}) == {
        "base_url": "https://v.example",
        "auth": {"token": "${TOKEN}", "user": "bob"},
        "x": 1,
    }
    on_host = settings_of(typed, environment={"TOKEN": "s3cret"})
    assert on_host["auth"] == {"token": "s3cret", "user": "bob"}
    with pytest.raises(BadInput, match="environment variable TOKEN is not set"):
        settings_of(typed, environment={})


@pytest.mark.parametrize(
    ("pairs", "message"),
    [(["novalue"], "--set 'novalue': write KEY=VALUE"), (["a=1", "a.b=2"], "a is not a mapping")],
)
def test_bad_settings_say_how_to_write_them(pairs: list[str], message: str) -> None:
    with pytest.raises(BadInput, match=message):
        settings_of(pairs)


def test_durations() -> None:
    assert parse_duration("90") == parse_duration("90s") == parse_duration("1.5m") == 90
    assert parse_duration("24h") == parse_duration("1d") == 86400
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration("tomorrow")


def test_questions_say_what_happens() -> None:
    assert "stays accepted for 24 hour(s)" in ConnectorCommands.rotate_question("acme", 86400)
    assert "stays accepted for 90 s" in ConnectorCommands.rotate_question("acme", 90)
    assert "secrets are deleted" in ConnectorCommands.remove_question("acme")
