"""`eimis-bridge run -c CONFIG` as an operator runs it: checks the homeserver, serves, stops."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import ClientError, ClientSession

from bridge.devtools.stack import LocalStack

from helpers import wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture
async def stack_without_bridge(tmp_path: Path) -> AsyncIterator[LocalStack]:
    stack = LocalStack(tmp_path / "stack")
    try:
        await stack.start(with_bridge=False)
        yield stack
    finally:
        await stack.stop()


async def _ready(url: str, proc: subprocess.Popen[str], timeout: float = 60) -> dict[str, object]:
    async with ClientSession() as http:

        async def ready() -> dict[str, object] | None:
            assert proc.poll() is None, "the bridge exited: " + (
                proc.stderr.read() if proc.stderr else ""
            )
            try:
                async with http.get(f"{url}/ready") as resp:
                    if resp.status == 200:
                        return dict(await resp.json())
            except ClientError:
                pass
            return None

        return await wait_until(ready, timeout, "the bridge to become ready")


async def test_run_checks_the_homeserver_serves_and_stops_on_sigterm(
    stack_without_bridge: LocalStack,
) -> None:
    config = stack_without_bridge.state_dir / "config.yaml"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "run", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        ready = await _ready(stack_without_bridge.bridge_url, proc)
        assert ready["checks"] == {"database": True, "homeserver": True}
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
        assert code == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_run_with_an_invalid_config_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("homeserver:\n  url: ftp://nowhere\n  domain: x\nappservice: {}\n")
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "homeserver.url" in result.stderr
    assert "appservice.address" in result.stderr


def test_run_against_an_unreachable_homeserver_fails_with_a_sentence(
    tmp_path: Path, free_port: Callable[[], int]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "homeserver:\n  url: http://127.0.0.1:9\n  domain: x.test\n  startup_timeout_s: 1\n"
        f"appservice:\n  address: http://127.0.0.1:9\n  port: {free_port()}\n"
        "  as_token: a\n  hs_token: b\n"
        f"database:\n  url: sqlite:{tmp_path / 'db.sqlite'}\n"
        "encryption:\n  enabled: false\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3
    assert "does not answer" in result.stderr
    assert "Traceback" not in result.stderr
