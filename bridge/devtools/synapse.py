"""Run a real Synapse homeserver as a local subprocess, for the tests and `eimis-bridge demo`."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import aiohttp
import yaml

from bridge.devtools.ports import free_port, port_is_free
from bridge.private_files import private_dir

__all__ = ["LocalSynapse", "SynapseError", "SynapseStartError"]

log = logging.getLogger(__name__)

_CONFIG_NAME = "homeserver.yaml"
_LOG_CONFIG_NAME = "log.config"
_SYNAPSE_LOG_NAME = "homeserver.log"
_STDOUT_LOG_NAME = "synapse.stdout.log"
_SECRET_NAME = "registration_shared_secret"
_PID_NAME = "synapse.pid"
_DB_NAME = "homeserver.db"
_MEDIA_DIR = "media_store"

_POLL_INTERVAL = 0.05
_LOG_TAIL_LINES = 40

# Rate limits high enough that tests and the demo never hit them. Only keys that Synapse 1.163
# reads (synapse/config/ratelimiting.py); `rc_federation` uses its own schema.
_FAST = {"per_second": 100_000, "burst_count": 1_000_000}
_RATE_LIMITS: dict[str, Any] = {
    "rc_message": _FAST,
    "rc_registration": _FAST,
    "rc_registration_token_validity": _FAST,
    "rc_login": {"address": _FAST, "account": _FAST, "failed_attempts": _FAST},
    "rc_admin_redaction": _FAST,
    "rc_joins": {"local": _FAST, "remote": _FAST},
    "rc_joins_per_room": _FAST,
    "rc_key_requests": _FAST,
    "rc_3pid_validation": _FAST,
    "rc_invites": {"per_room": _FAST, "per_user": _FAST, "per_issuer": _FAST},
    "rc_third_party_invite": _FAST,
    "rc_media_create": _FAST,
    "rc_presence": {"per_user": _FAST},
    "rc_delayed_event_mgmt": _FAST,
    "rc_room_creation": _FAST,
    "rc_reports": _FAST,
    "rc_user_directory": _FAST,
    "rc_profile": _FAST,
    "rc_federation": {
        "window_size": 1000,
        "sleep_limit": 100_000,
        "sleep_delay": 1,
        "reject_limit": 1_000_000,
        "concurrent": 1_000,
    },
}

# An appservice doing end-to-end encryption needs the to-device messages of its users pushed to
# it (MSC2409) and device lists / one-time key counts in its transactions (MSC3202); Synapse
# 1.163 keeps both behind these flags (synapse/config/experimental.py). Merged key by key with
# an existing experimental_features and with extra_config's, which wins.
_EXPERIMENTAL_FEATURES: dict[str, Any] = {
    "msc2409_to_device_messages_enabled": True,
    "msc3202_transaction_extensions": True,
}

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class SynapseError(RuntimeError):
    """A LocalSynapse operation failed."""


class SynapseStartError(SynapseError):
    """Synapse did not come up; the message carries the tail of its logs."""


class LocalSynapse:
    """A Synapse homeserver on 127.0.0.1, keeping all its state (config, keys, SQLite, media,
    logs) in ``state_dir`` so that starting it again on the same directory reuses its data.

    Files in ``state_dir``: ``homeserver.yaml`` (generated once, rewritten on every start),
    ``homeserver.log`` (Synapse's own log at ``log_level``), ``synapse.stdout.log`` (the
    process's stdout/stderr), ``registration_shared_secret`` (mode 0600), ``homeserver.db``,
    ``media_store/``, the signing key and ``synapse.pid`` while running.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        server_name: str = "eimis.localhost",
        port: int | None = None,
        appservice_registrations: Sequence[Path] = (),
        database: str = "sqlite",
        log_level: str = "WARNING",
        start_timeout: float = 60.0,
        stop_timeout: float = 15.0,
        extra_config: Mapping[str, Any] | None = None,
        extra_listeners: Sequence[Mapping[str, Any]] = (),
        log_levels: Mapping[str, str] | None = None,
    ) -> None:
        """Describe a homeserver; nothing runs until :meth:`start`.

        ``port=None`` reuses the port of a previous run on the same ``state_dir`` when it is
        free, else picks a free one. ``extra_config`` is merged (top-level keys) over the
        generated config last, for options this class does not set itself.
        ``extra_listeners`` are added after the plain HTTP listener on 127.0.0.1:``port``
        (which stays first, and is what ``url`` points at), e.g. a TLS federation listener.
        ``log_levels`` sets the level of individual Synapse loggers (e.g. one INFO logger under
        a WARNING root); SQL logging never goes below INFO.
        """
        if database != "sqlite":
            raise NotImplementedError(
                f"LocalSynapse supports database='sqlite' only, not {database!r} "
                "(PostgreSQL would need matrix-synapse[postgres], i.e. psycopg2)"
            )
        level = log_level.upper()
        if level not in _LOG_LEVELS:
            raise ValueError(
                f"log_level must be one of {', '.join(_LOG_LEVELS)}, not {log_level!r}"
            )
        self.state_dir: Path = Path(state_dir).resolve()
        self.server_name: str = server_name
        self.appservice_registrations: tuple[Path, ...] = tuple(
            Path(p).resolve() for p in appservice_registrations
        )
        self.database: str = database
        self.log_level: str = level
        self.start_timeout: float = start_timeout
        self.stop_timeout: float = stop_timeout
        self.extra_config: dict[str, Any] = dict(extra_config or {})
        self.extra_listeners: tuple[dict[str, Any], ...] = tuple(dict(x) for x in extra_listeners)
        self.log_levels: dict[str, str] = {
            name: level.upper() for name, level in (log_levels or {}).items()
        }
        for name, level in self.log_levels.items():
            if level not in _LOG_LEVELS:
                raise ValueError(f"log level of {name!r} must be one of {_LOG_LEVELS}")
        self._proc: subprocess.Popen[bytes] | None = None
        self._stdout: IO[bytes] | None = None
        self._secret: str | None = None
        self.port: int = port if port is not None else self._pick_port()
        self.url: str = f"http://127.0.0.1:{self.port}"

    # -- paths -----------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.state_dir / _CONFIG_NAME

    @property
    def log_path(self) -> Path:
        """Synapse's own log file (at ``log_level``)."""
        return self.state_dir / _SYNAPSE_LOG_NAME

    @property
    def stdout_log_path(self) -> Path:
        """Where the Synapse process's stdout and stderr go."""
        return self.state_dir / _STDOUT_LOG_NAME

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def registration_shared_secret(self) -> str:
        """The shared secret for ``/_synapse/admin/v1/register``: generated on first use and
        kept in ``state_dir/registration_shared_secret`` (mode 0600)."""
        if self._secret is None:
            self._secret = self._load_or_create_secret()
        return self._secret

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Generate the config on first start, rewrite it, start Synapse and wait until
        ``/_matrix/client/versions`` answers. Raises :class:`SynapseStartError` (with the
        tail of the logs) if the process exits or does not answer within ``start_timeout``."""
        if self.running:
            raise SynapseError(f"Synapse is already running at {self.url} (pid {self.pid})")
        for reg in self.appservice_registrations:
            if not reg.is_file():
                raise FileNotFoundError(f"appservice registration file not found: {reg}")
        private_dir(self.state_dir)  # its signing key, secrets and database
        await self._stop_stale_process()
        if not port_is_free(self.port):
            # Checked up front: the readiness poll would otherwise be answered by whatever
            # already listens there.
            raise SynapseStartError(f"port {self.port} on 127.0.0.1 is already in use")
        began = time.monotonic()
        if not self.config_path.exists():
            await self._generate_config()
        self._write_config()

        # Opening a local file and spawning are quick; both are closed/reaped in stop().
        self._stdout = open(self.stdout_log_path, "ab")  # noqa: SIM115, ASYNC230
        self._stdout.write(f"---- starting Synapse {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self._stdout.flush()
        try:
            # Polled with asyncio.sleep, never waited on while the loop runs.
            self._proc = subprocess.Popen(  # noqa: ASYNC220
                [sys.executable, "-m", "synapse.app.homeserver", "-c", str(self.config_path)],
                cwd=self.state_dir,
                stdin=subprocess.DEVNULL,
                stdout=self._stdout,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal must not reach Synapse
            )
        except BaseException:
            await self.stop()
            raise
        (self.state_dir / _PID_NAME).write_text(f"{self._proc.pid}\n")
        atexit.register(self._kill_at_exit)
        try:
            await self._wait_ready(began)
        except BaseException:
            await self.stop()
            raise
        log.info(
            "Synapse %s ready at %s in %.1f s", self.server_name, self.url, time.monotonic() - began
        )

    async def stop(self) -> None:
        """SIGTERM, wait up to ``stop_timeout``, then SIGKILL. A no-op when not running."""
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                if not await _wait_exit(proc, self.stop_timeout):
                    log.warning(
                        "Synapse (pid %d) ignored SIGTERM for %.0f s; killing it",
                        proc.pid,
                        self.stop_timeout,
                    )
                    proc.kill()
                    await _wait_exit(proc, 10.0)
            self._proc = None
            atexit.unregister(self._kill_at_exit)
            (self.state_dir / _PID_NAME).unlink(missing_ok=True)
        if self._stdout is not None:
            self._stdout.close()
            self._stdout = None

    async def restart(self) -> None:
        """Stop and start again on the same port and state."""
        await self.stop()
        await self.start()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- users -----------------------------------------------------------------------------

    async def register_user(
        self, localpart: str, password: str, *, admin: bool = False
    ) -> tuple[str, str]:
        """Register ``@localpart:server_name`` through the shared-secret admin API and return
        ``(user_id, access_token)``. If the user exists already, log in with ``password``
        instead (its admin flag is then left as it is)."""
        if not self.running:
            raise SynapseError("Synapse is not running; call start() first")
        url = f"{self.url}/_synapse/admin/v1/register"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            async with http.get(url) as resp:
                body = await _json(resp)
                if resp.status != 200 or "nonce" not in body:
                    raise SynapseError(
                        f"could not get a registration nonce: HTTP {resp.status} {_err(body)}"
                    )
                nonce = str(body["nonce"])
            message = "\x00".join([nonce, localpart, password, "admin" if admin else "notadmin"])
            mac = hmac.new(self.registration_shared_secret.encode(), message.encode(), hashlib.sha1)
            payload = {
                "nonce": nonce,
                "username": localpart,
                "password": password,
                "admin": admin,
                "mac": mac.hexdigest(),
            }
            async with http.post(url, json=payload) as resp:
                body = await _json(resp)
                if resp.status == 200:
                    return str(body["user_id"]), str(body["access_token"])
                if body.get("errcode") != "M_USER_IN_USE":
                    raise SynapseError(
                        f"registering {localpart!r} failed: HTTP {resp.status} {_err(body)}"
                    )
            return await self._login(http, localpart, password)

    async def _login(
        self, http: aiohttp.ClientSession, localpart: str, password: str
    ) -> tuple[str, str]:
        payload = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": localpart},
            "password": password,
            "initial_device_display_name": "LocalSynapse",
        }
        async with http.post(f"{self.url}/_matrix/client/v3/login", json=payload) as resp:
            body = await _json(resp)
            if resp.status != 200:
                raise SynapseError(
                    f"user {localpart!r} exists but logging in failed (wrong password?): "
                    f"HTTP {resp.status} {_err(body)}"
                )
            return str(body["user_id"]), str(body["access_token"])

    # -- internals -------------------------------------------------------------------------

    def _pick_port(self) -> int:
        """The port of a previous run on this state_dir if it is free now, else a free one."""
        try:
            old = yaml.safe_load(self.config_path.read_text())
            previous = int(old["listeners"][0]["port"])
        except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError, ValueError):
            return free_port()
        if port_is_free(previous) or self._stale_pid() is not None:
            return previous  # a Synapse left running here is stopped by start()
        return free_port()

    def _load_or_create_secret(self) -> str:
        path = self.state_dir / _SECRET_NAME
        if path.exists():
            secret = path.read_text().strip()
            if secret:
                return secret
        self.state_dir.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        return secret

    async def _generate_config(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "synapse.app.homeserver",
            "--server-name",
            self.server_name,
            "--config-path",
            str(self.config_path),
            "--data-directory",
            str(self.state_dir),
            "--generate-config",
            "--report-stats=no",
        ]
        try:
            result = await asyncio.to_thread(
                subprocess.run,
                cmd,
                cwd=self.state_dir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=120,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise SynapseStartError("generating the Synapse config timed out after 120 s") from e
        if result.returncode != 0 or not self.config_path.exists():
            output = (result.stdout + result.stderr).decode(errors="replace")
            hint = ""
            if "No module named" in output:
                hint = " (is matrix-synapse installed? pip install 'eimis-bridge[demo]')"
            raise SynapseStartError(
                f"generating the Synapse config failed with exit code {result.returncode}{hint}:\n"
                + _tail(output)
            )
        # The generated log config is unused (start() writes log.config); drop it to avoid doubt.
        (self.state_dir / f"{self.server_name}.log.config").unlink(missing_ok=True)

    def _write_config(self) -> None:
        config: dict[str, Any] = yaml.safe_load(self.config_path.read_text()) or {}
        existing = config.get("server_name")
        if existing and existing != self.server_name:
            raise SynapseError(
                f"{self.state_dir} belongs to server {existing!r}, not {self.server_name!r}; "
                "a Synapse database cannot change its server name (use another state_dir)"
            )
        secret_path = self.state_dir / _SECRET_NAME
        self.registration_shared_secret  # noqa: B018 - make sure the secret file exists
        config.pop("registration_shared_secret", None)  # only the file holds it
        experimental = {
            **(config.get("experimental_features") or {}),
            **_EXPERIMENTAL_FEATURES,
            **(self.extra_config.get("experimental_features") or {}),
        }
        config.update(
            {
                "server_name": self.server_name,
                "public_baseurl": f"{self.url}/",
                "pid_file": str(self.state_dir / "homeserver.pid"),
                "listeners": [
                    {
                        "port": self.port,
                        "bind_addresses": ["127.0.0.1"],
                        "type": "http",
                        "tls": False,
                        "x_forwarded": False,
                        "resources": [{"names": ["client", "federation"], "compress": False}],
                    },
                    *self.extra_listeners,
                ],
                "database": {
                    "name": "sqlite3",
                    "args": {"database": str(self.state_dir / _DB_NAME)},
                },
                "media_store_path": str(self.state_dir / _MEDIA_DIR),
                "log_config": str(self.state_dir / _LOG_CONFIG_NAME),
                "registration_shared_secret_path": str(secret_path),
                "enable_registration": False,
                "report_stats": False,
                "trusted_key_servers": [],
                "suppress_key_server_warning": True,
                "app_service_config_files": [str(p) for p in self.appservice_registrations],
                "presence": {"enabled": False},
                "url_preview_enabled": False,
                # Professionals are found from any client's "start a chat" search: the bridge
                # publishes the directory as ghosts (non-exclusive namespace), and the user
                # directory must list every local user, not only those sharing a room.
                "user_directory": {"enabled": True, "search_all_users": True},
                # Password hashing at 12 rounds costs ~0.3 s per register/login; local only.
                "bcrypt_rounds": 4,
                **_RATE_LIMITS,
            }
        )
        config.update(self.extra_config)
        config["experimental_features"] = experimental
        _write_private(self.config_path, yaml.safe_dump(config, sort_keys=False))
        _write_private(self.state_dir / _LOG_CONFIG_NAME, yaml.safe_dump(self._log_config()))

    def _log_config(self) -> dict[str, Any]:
        return {
            "version": 1,
            "formatters": {
                "precise": {
                    "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - "
                    "%(request)s - %(message)s"
                }
            },
            "handlers": {
                "file": {
                    "class": "logging.FileHandler",
                    "formatter": "precise",
                    "filename": str(self.log_path),
                    "encoding": "utf8",
                }
            },
            # Never below INFO for SQL: at DEBUG Synapse logs access tokens.
            "loggers": {
                **{name: {"level": level} for name, level in self.log_levels.items()},
                "synapse.storage.SQL": {
                    "level": _max_level(
                        self.log_levels.get("synapse.storage.SQL", self.log_level), "INFO"
                    )
                },
            },
            "root": {"level": self.log_level, "handlers": ["file"]},
            "disable_existing_loggers": False,
        }

    async def _wait_ready(self, began: float) -> None:
        assert self._proc is not None
        deadline = began + self.start_timeout
        url = f"{self.url}/_matrix/client/versions"
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                code = self._proc.poll()
                if code is not None:
                    raise SynapseStartError(
                        f"Synapse exited with code {code} during startup.\n{self._log_tails()}"
                    )
                try:
                    async with http.get(url) as resp:
                        if resp.status == 200 and self._proc.poll() is None:
                            return
                except (TimeoutError, aiohttp.ClientError, OSError):
                    pass
                if time.monotonic() >= deadline:
                    raise SynapseStartError(
                        f"Synapse did not answer {url} within {self.start_timeout:.0f} s.\n"
                        + self._log_tails()
                    )
                await asyncio.sleep(_POLL_INTERVAL)

    def _log_tails(self) -> str:
        parts = []
        for path in (self.stdout_log_path, self.log_path):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            if text.strip():
                parts.append(f"--- tail of {path} ---\n{_tail(text)}")
        return "\n".join(parts) or "(Synapse wrote no log output)"

    async def _stop_stale_process(self) -> None:
        """Stop a Synapse left running on this state_dir by a process that died without
        stopping it (e.g. a killed demo). Only a pid whose command line names our config
        file is touched."""
        pid_path = self.state_dir / _PID_NAME
        pid = self._stale_pid()
        if pid is None:
            pid_path.unlink(missing_ok=True)
            return
        log.warning("Stopping a Synapse left running on %s (pid %d)", self.state_dir, pid)
        _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        while _alive(pid) and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_INTERVAL)
        if _alive(pid):
            _signal(pid, signal.SIGKILL)
            while _alive(pid) and time.monotonic() < deadline + 10:
                await asyncio.sleep(_POLL_INTERVAL)
        pid_path.unlink(missing_ok=True)

    def _stale_pid(self) -> int | None:
        """The pid in state_dir/synapse.pid if that process is a live Synapse running our
        config file (and not the one this object runs)."""
        try:
            pid = int((self.state_dir / _PID_NAME).read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\x00")
        except (OSError, ValueError):
            return None
        if self._proc is not None and self._proc.pid == pid:
            return None
        if str(self.config_path).encode() not in cmdline or not _alive(pid):
            return None
        return pid

    def _kill_at_exit(self) -> None:
        """Last resort at interpreter exit: do not leave an orphaned Synapse behind."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _max_level(a: str, b: str) -> str:
    """The less verbose of two logging level names."""
    return a if _LOG_LEVELS.index(a) >= _LOG_LEVELS.index(b) else b


async def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_POLL_INTERVAL)
    return True


def _alive(pid: int) -> bool:
    # A zombie child of ours would still "exist"; /proc/<pid>/stat tells (state Z).
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # also when the file existed (the generated config is 0644)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _tail(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


async def _json(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        body = await resp.json(content_type=None)
    except (ValueError, aiohttp.ContentTypeError):
        return {}
    return body if isinstance(body, dict) else {}


def _err(body: Mapping[str, Any]) -> str:
    """errcode and error of a Matrix error body (never echoes request data)."""
    return f"{body.get('errcode', '')} {body.get('error', '')}".strip() or "(no error body)"
