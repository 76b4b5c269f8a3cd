"""Connector instances: those of the config file and those registered at run time (any installed
type), with their shared secrets. Changes are stored in the database; the running bridge applies
them within a few seconds (it polls the registry), without a restart or a new registration.
One behaviour for the CLI's ``connector ...`` and the admin room's ``connectors`` and
``connector ...``; the run-time registry itself is ``bridge.core.connector_manager``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from bridge.commands import BadInput, Refused
from bridge.core.connector_manager import ConnectorAdminError, ConnectorInfo, ConnectorManager

_ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
T = TypeVar("T")


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``10m``, ``24h`` or ``7d`` (ValueError saying so)."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"{text!r} is not a duration: write one like 90s, 10m, 24h, 7d or 0")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def settings_of(
    pairs: Iterable[str],
    base: Mapping[str, Any] | None = None,
    *,
    environment: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A connector's settings from ``KEY=VALUE`` pairs (``a.b=...`` for nested keys) over
    ``base`` (a settings file's). With ``environment``, a value written ``${VAR}`` is read from
    it, as in the config file (the CLI's: credentials stay out of the shell history)."""
    settings = _expand(dict(base or {}), "settings", environment)
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BadInput(f"--set {item.split('=')[0][:60]!r}: write KEY=VALUE")
        path = key.strip().split(".")
        holder = settings
        for part in path[:-1]:
            holder = holder.setdefault(part, {})
            if not isinstance(holder, dict):
                raise BadInput(f"--set {key}: {part} is not a mapping")
        holder[path[-1]] = _expand(value, f"--set {key}", environment)
    return settings


def _expand(node: Any, where: str, environment: Mapping[str, str] | None) -> Any:
    if environment is None:
        return node
    if isinstance(node, dict):
        return {k: _expand(v, f"{where}.{k}", environment) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v, f"{where}[{i}]", environment) for i, v in enumerate(node)]
    if isinstance(node, str) and (match := _ENV_REF.match(node)):
        if match.group(1) not in environment:
            raise BadInput(f"{where}: environment variable {match.group(1)} is not set")
        return environment[match.group(1)]
    return node


def when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _grace(seconds: float) -> str:
    return f"{seconds / 3600:g} hour(s)" if seconds >= 3600 else f"{seconds:g} s"


async def _refusal(call: Awaitable[T]) -> T:
    try:
        return await call
    except ConnectorAdminError as error:
        raise Refused(str(error)) from None


class ConnectorCommands:
    def __init__(self, manager: ConnectorManager) -> None:
        self.manager = manager

    async def listing(self) -> list[ConnectorInfo]:
        return await self.manager.list()

    async def add(self, name: str, type_name: str, settings: dict[str, Any]) -> str:
        """Register a connector; the answer shows its shared secret once, on its last line."""
        result = await _refusal(self.manager.add(name, type_name, settings))
        if result.running is None:  # asked outside the running bridge
            runs = "the running bridge starts it within a few seconds."
        elif result.running:
            runs = "it runs."
        else:
            runs = f"it is not running: {result.problem}"
        return "\n".join(
            [
                f"Connector {result.connector_id} ({result.type_name}) registered; {runs}",
                f"Its web routes (webhooks): {result.webhook_base_url}/...",
                "Its shared secret, shown this once (it is stored sealed; give it to the vendor):",
                result.secret,
            ]
        )

    async def enable(self, name: str) -> str:
        info = await _refusal(self.manager.enable(name))
        text = f"Connector {name} enabled; the running bridge starts it within a few seconds."
        return text + (f"\nBut it cannot run yet: {info.problem}" if info.problem else "")

    @staticmethod
    def disable_question(name: str) -> str:
        return f"Disable connector {name}? Its deliveries wait until it is enabled again."

    async def disable(self, name: str) -> str:
        await _refusal(self.manager.disable(name))
        return (
            f"Connector {name} disabled; the running bridge stops it within a few seconds. Its "
            "webhooks answer 503 and what its conversations send it waits until it is enabled "
            "again."
        )

    @staticmethod
    def remove_question(name: str) -> str:
        return (
            f"Remove connector {name}? Its settings and secrets are deleted; vendors using it "
            "are refused."
        )

    async def remove(self, name: str, *, force: bool) -> str:
        await _refusal(self.manager.remove(name, force=force))
        return f"Connector {name} removed; the running bridge stops it within a few seconds."

    @staticmethod
    def rotate_question(name: str, grace_s: float) -> str:
        return (
            f"Rotate the shared secret of {name}? The current one stays accepted for "
            f"{_grace(grace_s)}, then requests signed with it are refused."
        )

    async def rotate_secret(self, name: str, grace_s: float) -> str:
        """A new shared secret, shown once on the answer's last line."""
        secret = await _refusal(self.manager.rotate_secret(name, grace_s))
        return (
            f"New shared secret of {name}, shown this once (give it to the vendor; the previous "
            f"one is accepted for {_grace(grace_s)} more):\n{secret}"
        )

    async def test(self, name: str) -> str:
        return f"Connector {name}: {await _refusal(self.manager.test(name))}"


def table(infos: list[ConnectorInfo]) -> str:
    """The connectors for a terminal: origin, enabled, when the secret was set, its grace."""
    if not infos:
        return "No connectors."
    lines = [f"{'id':<14}{'type':<12}{'origin':<9}{'enabled':<9}{'secret set':<19}grace until"]
    for info in infos:
        lines.append(
            f"{info.connector_id:<14}{info.type_name:<12}{info.origin:<9}"
            f"{'yes' if info.enabled else 'no':<9}{when(info.secret_rotated_at):<19}"
            f"{when(info.secret_grace_until)}"
        )
        if info.problem:
            lines.append(f"{'':<14}problem: {info.problem}")
    return "\n".join(lines)


def line(info: ConnectorInfo, state: str) -> str:
    """One connector for a chat room; ``state``: its health in the running bridge."""
    parts = [f"{info.connector_id} ({info.type_name})"]
    parts.append("enabled" if info.enabled else "disabled")
    parts.append(f"from {info.origin}")
    if info.running:
        parts.append(state)
    elif info.enabled:
        parts.append("not running")
    if info.secret_grace_until:
        parts.append(f"previous secret accepted until {when(info.secret_grace_until)}")
    if info.problem:
        parts.append(f"problem: {info.problem}")
    return ", ".join(parts)
