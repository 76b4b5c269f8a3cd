"""The running bridge's lifecycle: a start that fails half-way stops what it had started, in
reverse order, and leaves nothing behind (ports free, database closed), so the operator can
fix what the message names and start again."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web

import bridge.app
from bridge.app import Bridge
from bridge.config import Config, parse_config
from bridge.db.database import open_database
from bridge.matrix.homeserver import HomeserverCheckFailed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _config(tmp_path: Path, *, appservice_port: int, metrics_port: int) -> Config:
    return parse_config(
        {
            # Nothing listens on port 9: the homeserver check fails (at once, refused).
            "homeserver": {
                "url": "http://127.0.0.1:9",
                "domain": "eimis.example",
                "startup_timeout_s": 0.3,
            },
            "appservice": {
                "address": f"http://127.0.0.1:{appservice_port}",
                "hostname": "127.0.0.1",
                "port": appservice_port,
                "as_token": "a",
                "hs_token": "b",
            },
            "database": {"url": f"sqlite:{tmp_path / 'bridge.db'}"},
            "encryption": {"enabled": False},
            "metrics": {"enabled": True, "hostname": "127.0.0.1", "port": metrics_port},
        }
    )


@pytest.fixture
def stops(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """What the bridge stops, in order: its appservice listener, its HTTP session and its
    database (the parts started first, second-to-last and last)."""
    stopped: list[str] = []

    class Runner(web.AppRunner):
        async def cleanup(self) -> None:
            if any(r.method == "PUT" for r in self.app.router.routes()):  # the appservice API
                stopped.append("appservice")
            await super().cleanup()

    def session(**kwargs: Any) -> ClientSession:
        made = ClientSession(**kwargs)
        close = made.close

        async def recorded() -> None:
            if not made.closed:
                stopped.append("session")
            await close()

        made.close = recorded  # type: ignore[method-assign]
        return made

    async def database(config: Any) -> Any:
        db = await open_database(config)
        stop = db.stop

        async def recorded() -> None:
            stopped.append("database")
            await stop()

        db.stop = recorded  # type: ignore[method-assign]
        return db

    monkeypatch.setattr(bridge.app.web, "AppRunner", Runner)
    monkeypatch.setattr(bridge.app, "ClientSession", session)
    monkeypatch.setattr(bridge.app, "open_database", database)
    yield stopped


async def test_a_failed_homeserver_check_stops_what_had_started_in_reverse_order(
    tmp_path: Path, stops: list[str]
) -> None:
    appservice_port, metrics_port = _free_port(), _free_port()
    running = Bridge(_config(tmp_path, appservice_port=appservice_port, metrics_port=metrics_port))
    with pytest.raises(HomeserverCheckFailed):
        await running.start()
    # The appservice API and the metrics were listening when the check failed: both are gone.
    assert _bindable(appservice_port)
    assert _bindable(metrics_port)
    assert stops == ["appservice", "session", "database"]
    with pytest.raises(RuntimeError):  # closed
        await running.db.fetchval("SELECT 1")
    await running.stop()  # nothing left to stop: no error, nothing stopped twice
    assert stops == ["appservice", "session", "database"]


async def test_a_metrics_port_taken_stops_the_appservice_listener_and_the_database(
    tmp_path: Path, stops: list[str]
) -> None:
    appservice_port = _free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics_port = int(taken.getsockname()[1])
        running = Bridge(
            _config(tmp_path, appservice_port=appservice_port, metrics_port=metrics_port)
        )
        with pytest.raises(OSError):
            await running.start()
    assert _bindable(appservice_port)
    assert stops == ["appservice", "session", "database"]
    # Started again once the port is free: it gets as far as the homeserver check.
    running = Bridge(_config(tmp_path, appservice_port=appservice_port, metrics_port=metrics_port))
    with pytest.raises(HomeserverCheckFailed):
        await running.start()
    assert _bindable(appservice_port)
