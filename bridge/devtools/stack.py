"""A whole local deployment in one process: Synapse, the bridge, and every shipped sandbox.

Used by ``eimis-bridge demo`` and by the end-to-end tests, so both exercise the same wiring.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from bridge.app import Bridge
from bridge.config import Config, parse_config
from bridge.devtools.ports import free_port
from bridge.devtools.sandboxes import vendor_sandboxes
from bridge.devtools.synapse import LocalSynapse
from bridge.private_files import private_dir, write_private
from bridge.registration import write_registration
from bridge.secrets import generate_key

SERVER_NAME = "eimis.localhost"


@dataclass
class Sandbox:
    type_name: str
    url: str
    port: int
    app_factory: Any
    runner: web.AppRunner | None = None
    site: web.TCPSite | None = None
    users: list[dict[str, Any]] = field(default_factory=list)

    async def start(self) -> None:
        """Listen (again) on the same port; the vendor's data survives a stop()."""
        if self.runner is None:
            self.runner = web.AppRunner(self.app_factory(), access_log=None)
            await self.runner.setup()
        self.site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await self.site.start()

    async def stop(self) -> None:
        """Stop answering (a vendor outage): connections are refused until start()."""
        if self.site is not None:
            await self.site.stop()
            self.site = None
            # Kept-alive connections would go on being served: close them too.
            if self.runner is not None and self.runner.server is not None:
                await self.runner.server.shutdown(1.0)

    async def close(self) -> None:
        await self.stop()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


class LocalStack:
    def __init__(
        self,
        state_dir: Path,
        *,
        database_url: str | None = None,
        log_level: str = "WARNING",
        config_overrides: dict[str, Any] | None = None,
        server_name: str = SERVER_NAME,
        synapse_options: Mapping[str, Any] | None = None,
        encrypted: bool = False,
        extra_connectors: Mapping[str, dict[str, Any]] | None = None,
    ) -> None:
        """``extra_connectors`` (id -> ``{"type", "settings"}``) are configured after the
        sandboxes' (a connector whose vendor is not a sandbox, e.g. a mail system the test
        starts). ``server_name`` and ``synapse_options`` (more LocalSynapse keyword arguments; an
        ``extra_config`` there is merged over this stack's own) serve the federation harness
        (bridge/devtools/federation.py); the defaults are the single-server stack."""
        self.state_dir = state_dir.resolve()
        self.server_name = server_name
        self.encrypted = encrypted
        """Portals are end-to-end encrypted (the product's default; most feature tests use
        plain rooms, which the bridge also serves)."""
        self.extra_connectors = dict(extra_connectors or {})
        self.database_url = database_url or f"sqlite:{self.state_dir / 'bridge.db'}"
        self.log_level = log_level
        self.bridge_port = free_port()
        self.sandboxes: dict[str, Sandbox] = {}
        for type_name, vendor in sorted(vendor_sandboxes().items()):
            port = free_port()
            self.sandboxes[type_name] = Sandbox(
                type_name, f"http://127.0.0.1:{port}", port, vendor.app
            )
        self.registration_path = self.state_dir / "registration.yaml"
        options = dict(synapse_options or {})
        self.synapse = LocalSynapse(
            self.state_dir / "synapse",
            server_name=server_name,
            port=None,  # the port of the previous run on this state, when free (stable URL)
            appservice_registrations=[self.registration_path],
            # Large enough for the streaming benchmark's 200 MB file.
            extra_config={"max_upload_size": "300M", **options.pop("extra_config", {})},
            **options,
        )
        self.raw_config = {**self._raw_config(), **(config_overrides or {})}
        self.config: Config = parse_config(self.raw_config)
        self.registration: dict[str, Any] = {}
        self.bridge: Bridge | None = None

    def _raw_config(self) -> dict[str, Any]:
        vendors = vendor_sandboxes()
        return {
            "homeserver": {"url": self.synapse.url, "domain": self.server_name},
            "appservice": {
                "id": "eimis-bridge",
                "address": f"http://127.0.0.1:{self.bridge_port}",
                "hostname": "127.0.0.1",
                "port": self.bridge_port,
                "registration": str(self.registration_path),
            },
            "database": {"url": self.database_url},
            "connectors": {
                **{
                    name: {"type": name, "settings": vendors[name].settings(s.url)}
                    for name, s in self.sandboxes.items()
                },
                **self.extra_connectors,
            },
            "logging": {"level": self.log_level},
            "encryption": {"enabled": self.encrypted, "default": self.encrypted},
            # Seals connector secrets and the crypto pickle key (made on start).
            "secrets": {"key_file": str(self.state_dir / "secrets.key")},
            # Any free port: several stacks run side by side (tests, demo).
            "metrics": {"hostname": "127.0.0.1", "port": 0},
        }

    @property
    def bridge_url(self) -> str:
        return f"http://127.0.0.1:{self.bridge_port}"

    async def start(self, *, with_bridge: bool = True) -> None:
        # Keys, tokens, the database: the state directory and its files are the owner's only.
        private_dir(self.state_dir).chmod(0o700)  # the stack's own, also when it existed
        key_file = self.state_dir / "secrets.key"
        if not key_file.exists():
            write_private(key_file, generate_key() + "\n")
        self.registration = write_registration(self.config, self.registration_path)
        write_private(
            self.state_dir / "config.yaml", yaml.safe_dump(self.raw_config, sort_keys=False)
        )
        for sandbox in self.sandboxes.values():
            await sandbox.start()
        await self.synapse.start()
        if with_bridge:
            await self.start_bridge()

    async def start_bridge(self, *, paused: bool = False) -> Bridge:
        self.bridge = Bridge(self.config)
        await self.bridge.start(paused=paused)
        return self.bridge

    async def stop_bridge(self) -> None:
        if self.bridge is not None:
            await self.bridge.stop()
            self.bridge = None

    async def stop(self) -> None:
        try:
            await self.stop_bridge()
        finally:
            await self.synapse.stop()
            for sandbox in self.sandboxes.values():
                await sandbox.close()

    async def __aenter__(self) -> LocalStack:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
