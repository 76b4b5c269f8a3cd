"""Shared plumbing of the benchmarks: child processes, readiness, bridge configs, databases."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml
from aiohttp import ClientSession, ClientTimeout

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bridge.devtools.ports import free_port  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "latest.json"


def stop_on_signals() -> None:
    """SIGINT and SIGTERM alike cancel the running benchmark (the calling task), so every
    server it started is stopped by the ``async with`` / ``finally`` that started it. A second
    signal during the stop gets the default action."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def stop() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
DOMAIN = "eimis.localhost"
BOT = f"@eimis_bot:{DOMAIN}"
NATIVE = f"@nurse.bench:{DOMAIN}"
PG_ADMIN_URL = os.environ.get("EIMIS_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def merge_results(figures: dict[str, Any], drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """Merge ``figures`` into bench/results/latest.json (``drop``: keys to remove)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    merged.update(figures)
    for key in drop:
        merged.pop(key, None)
    RESULTS.write_text(json.dumps(merged, indent=2) + "\n")
    return merged


class Child:
    """A child process with its output in a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, url: str | None = None) -> None:
        self.name = name
        self.url = url
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=str(ROOT),
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self.started_at = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    async def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


async def wait_http(
    http: ClientSession,
    url: str,
    child: Child | None = None,
    timeout: float = 60.0,
    interval: float = 0.01,
) -> float:
    """Poll ``url`` until it answers 200; returns when (monotonic)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with http.get(url, timeout=ClientTimeout(total=2)) as resp:
                if resp.status == 200:
                    return time.monotonic()
        except (TimeoutError, OSError):
            pass
        if child is not None and not child.alive():
            raise RuntimeError(f"{child.name} exited ({child.proc.returncode}):\n{child.tail()}")
        if time.monotonic() > deadline:
            tail = child.tail() if child is not None else ""
            raise TimeoutError(f"{url} not ready after {timeout:.0f}s\n{tail}")
        await asyncio.sleep(interval)


def python_child(
    name: str, script: str, args: list[str], log_dir: Path, url: str | None = None
) -> Child:
    return Child(name, [sys.executable, str(ROOT / script), *args], log_dir, url)


async def start_stub(http: ClientSession, log_dir: Path, as_token: str) -> Child:
    port = free_port()
    child = python_child(
        "stub-homeserver",
        "bench/stub_homeserver.py",
        ["--port", str(port), "--domain", DOMAIN, f"--as-token={as_token}"],
        log_dir,
        f"http://127.0.0.1:{port}",
    )
    await wait_http(http, f"{child.url}/_matrix/client/versions", child)
    return child


async def start_sandbox(http: ClientSession, log_dir: Path) -> Child:
    port = free_port()
    child = python_child(
        "medipeps-sandbox",
        "bench/sandbox_server.py",
        ["--port", str(port)],
        log_dir,
        f"http://127.0.0.1:{port}",
    )
    await wait_http(http, f"{child.url}/_bench/probe", child)
    return child


def bridge_config(
    *,
    homeserver_url: str,
    bridge_port: int,
    database_url: str,
    medipeps_url: str | None,
    as_token: str,
    hs_token: str,
    poll_interval_s: float = 1.0,
) -> dict[str, Any]:
    """A bridge configuration like ``LocalStack._raw_config``, with tokens inline."""
    from connectors.medipeps.sandbox import API_KEY

    connectors: dict[str, Any] = {}
    if medipeps_url is not None:
        connectors["medipeps"] = {
            "type": "medipeps",
            "settings": {
                "api_url": medipeps_url,
                "api_key": API_KEY,
                "poll_interval_s": poll_interval_s,
            },
        }
    return {
        "homeserver": {"url": homeserver_url, "domain": DOMAIN, "startup_timeout_s": 30},
        "appservice": {
            "id": "eimis-bridge",
            "address": f"http://127.0.0.1:{bridge_port}",
            "hostname": "127.0.0.1",
            "port": bridge_port,
            "as_token": as_token,
            "hs_token": hs_token,
        },
        "database": {"url": database_url},
        "connectors": connectors,
        "logging": {"level": "WARNING"},
        # The stub homeserver speaks no key APIs: these runs measure plain rooms
        # (bench/encryption.py measures encrypted ones against a real Synapse).
        "encryption": {"enabled": False},
    }


def new_tokens() -> tuple[str, str]:
    return secrets.token_urlsafe(32), secrets.token_urlsafe(32)


def start_bridge(
    config: dict[str, Any],
    work: Path,
    log_dir: Path,
    name: str = "bridge",
    launcher: list[str] | None = None,
) -> Child:
    """``python -m bridge run -c <config>``; ``launcher`` replaces ``python -m bridge``."""
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    argv = [*(launcher or [sys.executable, "-m", "bridge"]), "run", "-c", str(path)]
    return Child(name, argv, log_dir, config["appservice"]["address"])


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} for {pid}")


@contextlib.asynccontextmanager
async def postgres_database(prefix: str) -> AsyncIterator[str | None]:
    """A fresh PostgreSQL database on the local server (dropped after); None when unreachable."""
    import asyncpg

    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
    try:
        admin = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    except (TimeoutError, OSError, asyncpg.PostgresError):
        yield None
        return
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        base = PG_ADMIN_URL.rsplit("/", 1)[0]
        yield f"{base}/{name}"
    finally:
        drop = f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
        try:
            await admin.execute(drop)
        except Exception:  # the server restarted under us: drop through a new connection
            with contextlib.suppress(Exception):
                again = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
                await again.execute(drop)
                await again.close()
        with contextlib.suppress(Exception):
            await admin.close()


async def open_bridge_db(url: str):
    """The bridge's own database object, schema brought up to date by its migrations."""
    from bridge.config import DatabaseConfig
    from bridge.db.database import open_database

    return await open_database(DatabaseConfig(url=url))
