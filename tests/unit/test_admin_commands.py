"""The admin room's parser and alerts, without a homeserver (end to end: test_e2e_admin.py)."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.admin.alerts import AlertWatch, Snapshot
from bridge.admin.commands import build_parser
from bridge.admin.parser import CommandError, HelpShown, parse, split


def test_every_command_parses_and_help_lists_it() -> None:
    parser = build_parser()
    for line in (
        "status", "version", "connectors", "connector add acme --type webhook --set base_url=x",
        "connector rotate-secret acme --grace 2", "queue pandalab", "dead-letters",
        "dead-letters medipeps", "retry all", "retry 12", "discard 12", "portals", "portals x",
        "portal !r:s", "whois 810000001916", "trust list", "trust add hs2.example",
        "directory import", "directory import /tmp/x.txt --format ps", "audit --since 7d",
        "forget 810000001916",
    ):  # fmt: skip
        args = parse(parser, split(line))
        assert callable(args.handler), line
    text = parser.format_help()
    for name in ("status", "connector", "dead-letters", "whois", "forget", "audit"):
        assert name in text


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("frobnicate", "invalid choice"),
        ("retry", "required"),
        ("discard twelve", "invalid int value"),
        ("trust shout hs2", "invalid choice"),
        ('whois "unbalanced', "Could not read"),
    ],
)
def test_errors_say_what_was_wrong_and_show_the_usage(line: str, says: str) -> None:
    with pytest.raises(CommandError) as error:
        parse(build_parser(), split(line))
    assert says in str(error.value)


def test_dash_h_explains_one_command() -> None:
    with pytest.raises(HelpShown) as shown:
        parse(build_parser(), split("discard -h"))
    assert "usage: discard" in str(shown.value) and "dead letter id" in str(shown.value)


class Feed:
    def __init__(self) -> None:
        self.now = Snapshot()
        self.posted: list[str] = []

    async def snapshot(self) -> Snapshot:
        return self.now

    async def post(self, text: str, key: str) -> None:
        self.posted.append(text)


def watch(feed: Feed, **kwargs: Any) -> AlertWatch:
    options = {"debounce_s": 0.0, "stalled_after_s": 0.0, **kwargs}
    return AlertWatch(feed.snapshot, feed.post, **options)


async def test_a_connector_down_then_back_is_posted_twice_when_apart() -> None:
    feed = Feed()
    alerts = watch(feed)
    feed.now = Snapshot(states={"acme": "CONNECTED"})
    await alerts.check()
    feed.now = Snapshot(states={"acme": "DOWN"})
    await alerts.check()
    feed.now = Snapshot(states={"acme": "CONNECTED"})
    await alerts.check()
    assert len(feed.posted) == 2
    assert "acme is down" in feed.posted[0] and "acme is back" in feed.posted[1]


async def test_alerts_within_the_window_are_grouped_and_a_blip_said_once() -> None:
    feed = Feed()
    alerts = watch(feed, debounce_s=3600)
    feed.now = Snapshot(states={"acme": "CONNECTED", "beta": "CONNECTED"})
    await alerts.check()
    feed.now = Snapshot(states={"acme": "DOWN", "beta": "REJECTED"}, dead={7: "beta"})
    await alerts.check()
    feed.now = Snapshot(states={"acme": "CONNECTED", "beta": "REJECTED"}, dead={7: "beta"})
    await alerts.check()
    assert feed.posted == []  # the window is still open
    alerts.debounce_s = 0
    await alerts.check()
    assert len(feed.posted) == 1
    text = feed.posted[0]
    assert "acme was down for a moment and is back" in text
    assert "beta: its vendor rejected" in text and "1 delivery(ies) to beta" in text
    assert "acme is back" not in text


async def test_a_queue_whose_head_does_not_move_while_the_vendor_answers_is_stalled() -> None:
    feed = Feed()
    alerts = watch(feed, stalled_after_s=0.0)
    feed.now = Snapshot(states={"acme": "CONNECTED"}, heads={"acme": (3, 41)})
    await alerts.check()  # first sight of the head
    await alerts.check()  # still there: stalled
    await alerts.check()  # said once
    assert len(feed.posted) == 1 and "acme answers but has delivered nothing" in feed.posted[0]
    feed.now = Snapshot(states={"acme": "CONNECTED"}, heads={"acme": (2, 42)})
    await alerts.check()  # it moved: no alert, and the watch starts again
    assert len(feed.posted) == 1


async def test_a_down_connector_is_not_also_called_stalled() -> None:
    feed = Feed()
    alerts = watch(feed)
    feed.now = Snapshot(states={"acme": "DOWN"}, heads={"acme": (3, 41)})
    for _ in range(3):
        await alerts.check()
    assert feed.posted == []
