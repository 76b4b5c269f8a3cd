"""The run-time owner of connector instances: those of the config file and those registered in
the database (``connector add``), started, stopped and changed without a restart.

The database wins over the config file for the enabled flag of a config connector, and a
registered connector's id never clashes with a config one. Operators act through the methods
below (the admin room in the running bridge), or through the CLI from another process: the
running bridge polls the registry and applies what changed within ``poll_interval_s``.

A disabled connector (or one that does not start) is *held*: its webhooks answer 503 and what
its conversations queue for it waits, in order, until it runs again. Its shared secret is read
through ``ctx.secrets`` from a cache the manager refreshes when it changes; a rotation keeps
the previous secret accepted for a grace period.

Without a ``ConnectorSet`` (the CLI), the manager only validates and stores.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from bridge.config import (
    CONNECTOR_ID,
    RESERVED_CONNECTOR_IDS,
    Config,
    format_validation_error,
)
from bridge.core.connector_routes import ConnectorRoutes
from bridge.core.connectors import ConnectorSet, ConnectorSpec, available_types
from bridge.core.held_connector import HeldConnector
from bridge.core.periodic import Periodic
from bridge.db.clock import SYSTEM_CLOCK, Clock, now_ms
from bridge.db.connector_registry import (
    ConnectorRecord,
    ConnectorRegistry,
    RegistryError,
    StoredSecret,
    secret_paths,
)
from bridge.db.connector_state import ConnectorStateStore
from bridge.secrets import SecretsError
from connectors.base import (
    BatchSink,
    Connector,
    ConnectorError,
    DirectoryLookup,
    EventSink,
    KeyValueStore,
    RemoteEvent,
)
from connectors.kit.backoff import Backoff

log = logging.getLogger("eimis.connectors")

Origin = Literal["config", "runtime"]
PROBE_TIMEOUT_S = 30.0
START_BACKOFF = Backoff(initial_s=5.0, max_s=300.0, jitter=False)
"""A connector that did not start is tried again after 5 s, doubling up to 5 minutes."""


# --- What operators see -------------------------------------------------------------------------


class ConnectorAdminError(Exception):
    """An operator's request was refused; the message is a sentence saying why."""


class UnknownConnector(ConnectorAdminError):
    pass


class InvalidConnector(ConnectorAdminError):
    """A bad id, type or settings, or an id already taken."""


class ConnectorInUse(ConnectorAdminError):
    """``remove`` refused: portal rooms are linked to the connector (use ``force``)."""


class ConfigConnector(ConnectorAdminError):
    """The connector is defined in the config file: removed there, not at run time."""


class ProbeFailed(ConnectorAdminError):
    pass


@dataclass(frozen=True)
class ConnectorInfo:
    """One connector as ``connectors`` lists it; never its secret. Times in ms since the epoch."""

    connector_id: str
    type_name: str
    enabled: bool
    origin: Origin
    running: bool | None
    """None when asked outside the running bridge (the CLI)."""
    secret_rotated_at: int | None
    """When the current shared secret was set (None: the bridge holds none)."""
    secret_grace_until: int | None
    """Until when the previous secret is still accepted (None: no grace period running)."""
    problem: str | None = None
    """Why it does not run although enabled (bad settings, did not start ...)."""


@dataclass(frozen=True)
class AddResult:
    connector_id: str
    type_name: str
    secret: str = field(repr=False)
    """The shared secret, shown to the operator once: it is stored sealed, never shown again."""
    webhook_base_url: str
    """Where the connector's web routes are: ``<appservice.public_url>/connectors/<id>``."""
    running: bool | None
    problem: str | None = None


# --- What each connector reads its shared secret from ----------------------------------------


class RegistrySecrets:
    """``SharedSecrets`` from the registry, cached: ``current()``/``accepted()`` are called on
    every signed request and never wait for the database. A secret whose grace period ends
    stops being accepted at that moment, without a refresh."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self._secrets: tuple[StoredSecret, ...] = ()
        self._clock = clock

    def replace(self, stored: Sequence[StoredSecret]) -> None:
        self._secrets = tuple(stored)

    def current(self) -> str | None:
        return next((s.value for s in self._secrets if s.valid_until is None), None)

    def accepted(self) -> Sequence[str]:
        now = now_ms(self._clock)
        return [s.value for s in self._secrets if s.accepted_at(now)]

    def __repr__(self) -> str:
        return f"RegistrySecrets({len(self._secrets)} held)"


# --- The bridge's side -------------------------------------------------------------------------


@dataclass(frozen=True)
class Wiring:
    """What the bridge gives a connector instance it runs."""

    emit: EventSink
    emit_all: BatchSink
    store: KeyValueStore
    public_base_url: str
    directory: DirectoryLookup | None = None
    """The directory of professionals (secure mailboxes); None: one that knows no one."""


@dataclass
class _Wanted:
    """What the config and the registry say about one connector."""

    connector_id: str
    origin: Origin
    type_name: str
    enabled: bool
    cls: type[Connector] | None = None
    settings: BaseModel | None = None
    version: int = 0
    """The registry row's ``updated_at`` the settings come from (0: the config's)."""
    problem: str | None = None


@dataclass
class _Running:
    version: int
    cls: type[Connector]
    active: bool = False
    problem: str | None = None
    failures: int = 0
    retry_at: float = 0.0


class ConnectorManager:
    def __init__(
        self,
        config: Config,
        registry: ConnectorRegistry,
        *,
        connectors: ConnectorSet | None = None,
        routes: ConnectorRoutes | None = None,
        wire: Callable[[str], Wiring] | None = None,
        on_resumed: Callable[[str], None] | None = None,
        poll_interval_s: float = 2.0,
    ) -> None:
        """``connectors``, ``routes`` and ``wire`` make it the running bridge's: it then runs
        the instances. ``on_resumed(connector_id)`` is called when one starts running again
        (its waiting conversations can go on at once)."""
        self.config = config
        self.registry = registry
        self._connectors = connectors
        self._routes = routes or ConnectorRoutes()
        self._wire = wire or self._detached_wiring
        self._on_resumed = on_resumed or (lambda connector_id: None)
        self._lock = asyncio.Lock()
        self._running: dict[str, _Running] = {}
        self._secrets: dict[str, RegistrySecrets] = {}
        self._fingerprint: tuple[int, ...] | None = None
        self._poll = Periodic("connector registry poll", self._poll_step, poll_interval_s, log)

    @property
    def attached(self) -> bool:
        return self._connectors is not None

    # Lifecycle (the running bridge) -------------------------------------------------------------

    async def load(self) -> None:
        """Build every wanted instance (not started yet) so their routes answer and what is
        queued for them finds them; enabled ones start with ``start()``."""
        assert self._connectors is not None, "load() is for the running bridge"
        async with self._lock:
            self._fingerprint = await self.registry.fingerprint()
            for wanted in await self._wanted():
                await self._build(wanted)

    async def start(self) -> None:
        """Start the loaded instances, in order, then follow the registry. A config connector
        that does not start stops the bridge's start (as a bad config would); one registered at
        run time is held and tried again."""
        async with self._lock:
            for connector_id, state in list(self._running.items()):
                if state.active:
                    await self._launch(connector_id, state, strict=self._is_config(connector_id))
        self._poll.start()

    async def stop(self) -> None:
        await self._poll.stop()
        async with self._lock:
            for connector_id in reversed(list(self._running)):
                await self._halt(connector_id, "is stopped", forget=True)

    async def refresh(self) -> None:
        """Apply what changed in the registry (the poll does it every ``poll_interval_s``)."""
        async with self._lock:
            self._fingerprint = await self.registry.fingerprint()
            await self._sync()

    async def _poll_step(self) -> None:
        fingerprint = await self.registry.fingerprint()
        due = any(
            s.active and s.problem and s.retry_at <= time.monotonic()
            for s in self._running.values()
        )
        if fingerprint != self._fingerprint or due:
            await self.refresh()

    # Operators -------------------------------------------------------------------------------

    async def list(self) -> list[ConnectorInfo]:
        infos = []
        for wanted in await self._wanted():
            status = await self.registry.secret_status(wanted.connector_id)
            state = self._running.get(wanted.connector_id)
            running: bool | None = None
            if self.attached:
                running = state is not None and state.active and state.problem is None
            infos.append(
                ConnectorInfo(
                    connector_id=wanted.connector_id,
                    type_name=wanted.type_name,
                    enabled=wanted.enabled,
                    origin=wanted.origin,
                    running=running,
                    secret_rotated_at=status.rotated_at,
                    secret_grace_until=status.grace_until,
                    problem=wanted.problem or (state.problem if state else None),
                )
            )
        return infos

    async def info(self, connector_id: str) -> ConnectorInfo:
        for item in await self.list():
            if item.connector_id == connector_id:
                return item
        raise self._unknown(connector_id)

    async def add(
        self, connector_id: str, type_name: str, settings: Mapping[str, Any]
    ) -> AddResult:
        """Register a new connector instance and (in the running bridge) start it. Its shared
        secret is generated, stored sealed, and returned this once."""
        check_connector_id(connector_id)
        if connector_id in self.config.connectors:
            raise InvalidConnector(
                f"{connector_id!r} is a connector of the config file; choose another id"
            )
        cls = _connector_type(type_name)
        model = validate_settings(cls, settings)
        secret = secrets.token_urlsafe(32)
        async with self._lock:
            if await self.registry.get(connector_id) is not None:
                raise InvalidConnector(
                    f"a connector {connector_id!r} is already registered; choose another id "
                    "or remove it first"
                )
            await _admin(self.registry.add(connector_id, type_name, model, secret=secret))
            log.info("Connector %s (%s) registered", connector_id, type_name)
            if self.attached:
                await self._sync()
        info = await self.info(connector_id)
        return AddResult(
            connector_id,
            type_name,
            secret,
            self.webhook_base_url(connector_id),
            info.running,
            info.problem,
        )

    async def enable(self, connector_id: str) -> ConnectorInfo:
        return await self._set_enabled(connector_id, True)

    async def disable(self, connector_id: str) -> ConnectorInfo:
        """Stop it; its webhooks answer 503 and its conversations' deliveries wait."""
        return await self._set_enabled(connector_id, False)

    async def _set_enabled(self, connector_id: str, enabled: bool) -> ConnectorInfo:
        async with self._lock:
            entry = self.config.connectors.get(connector_id)
            if entry is not None:
                await self.registry.override(connector_id, entry.type, enabled)
            elif not await self.registry.set_enabled(connector_id, enabled):
                raise self._unknown(connector_id)
            log.info("Connector %s %s", connector_id, "enabled" if enabled else "disabled")
            if self.attached:
                await self._sync()
        return await self.info(connector_id)

    async def remove(self, connector_id: str, *, force: bool = False) -> None:
        """Forget a connector registered at run time (with its secrets and state). Refused
        while portal rooms are linked to it unless ``force``: then those rooms stop being
        bridged to it and what is queued for it fails."""
        if connector_id in self.config.connectors:
            raise ConfigConnector(
                f"{connector_id!r} is defined in the config file: remove it there and restart; "
                f"'connector disable {connector_id}' stops it now"
            )
        async with self._lock:
            if await self.registry.get(connector_id) is None:
                raise self._unknown(connector_id)
            linked = await self.registry.linked_portals(connector_id)
            if linked and not force:
                raise ConnectorInUse(
                    f"{connector_id!r} is linked to {linked} portal room(s): removing it ends "
                    "those conversations on its side and fails what is queued for it. Disable "
                    "it instead, or remove it with force (--force)"
                )
            await self.registry.remove(connector_id)
            log.info("Connector %s removed (%d linked portal rooms)", connector_id, linked)
            if self.attached:
                await self._sync()

    async def rotate_secret(self, connector_id: str, grace_s: float) -> str:
        """A new shared secret, returned this once; the previous one is still accepted for
        ``grace_s`` seconds (0: refused at once)."""
        if not grace_s >= 0:
            raise InvalidConnector("the grace period is a number of seconds, 0 or more")
        async with self._lock:
            if connector_id not in {w.connector_id for w in await self._wanted()}:
                raise self._unknown(connector_id)
            secret = secrets.token_urlsafe(32)
            await _admin(self.registry.rotate_secret(connector_id, secret, grace_s))
            log.info(
                "Connector %s: shared secret rotated (previous accepted %g s more)",
                connector_id,
                grace_s,
            )
            if connector_id in self._secrets:
                await self._refresh_secrets(connector_id)
            self._fingerprint = await self.registry.fingerprint()
        return secret

    async def test(self, connector_id: str) -> str:
        """Ask the vendor something cheap (``Connector.probe``): a sentence when it answers,
        ProbeFailed saying why when it does not."""
        wanted = next((w for w in await self._wanted() if w.connector_id == connector_id), None)
        if wanted is None:
            raise self._unknown(connector_id)
        connectors = self._connectors
        if connectors is not None and connector_id in connectors.ids():
            running = connectors.get(connector_id)
            assert running is not None
            return await _probe(connector_id, running)
        if wanted.cls is None or wanted.settings is None:
            raise ProbeFailed(f"{connector_id}: {wanted.problem or 'cannot be built'}")
        connector = self._instance(wanted)
        try:
            return await _probe(connector_id, connector)
        finally:
            await _stop_quietly(connector_id, connector)

    def webhook_base_url(self, connector_id: str) -> str:
        return f"{self.config.appservice.webhook_base_url}/connectors/{connector_id}"

    # What is wanted -----------------------------------------------------------------------------

    async def _wanted(self) -> list[_Wanted]:
        """Every connector, config ones first in config order, then registered ones."""
        records = {r.connector_id: r for r in await self.registry.list()}
        types = available_types()
        found: list[_Wanted] = []
        for connector_id, entry in self.config.connectors.items():
            record = records.pop(connector_id, None)
            wanted = _Wanted(
                connector_id,
                "config",
                entry.type,
                record.enabled if record is not None else entry.enabled,
            )
            wanted.cls = types.get(entry.type)
            if wanted.cls is None:
                wanted.problem = f"connector type {entry.type!r} is not installed"
            else:
                try:
                    wanted.settings = validate_settings(wanted.cls, entry.settings)
                except InvalidConnector as error:
                    wanted.problem = str(error)
            found.append(wanted)
        for record in records.values():
            found.append(self._wanted_record(record, types))
        return found

    def _wanted_record(self, record: ConnectorRecord, types: dict[str, type[Connector]]) -> _Wanted:
        wanted = _Wanted(
            record.connector_id,
            "runtime",
            record.type_name,
            record.enabled,
            version=record.updated_at,
        )
        if record.overrides_config:
            wanted.problem = "overrides a connector that is no longer in the config file"
            return wanted
        wanted.cls = types.get(record.type_name)
        if wanted.cls is None:
            wanted.problem = f"connector type {record.type_name!r} is not installed"
            return wanted
        try:
            wanted.settings = self.registry.open_settings(record, wanted.cls.Settings)
        except ValidationError as error:
            wanted.problem = "stored settings are not valid any more: " + format_validation_error(
                error, prefix="settings."
            ).replace("\n", "; ")
        except (SecretsError, RegistryError) as error:
            wanted.problem = str(error)
        return wanted

    # Running instances -------------------------------------------------------------------------

    async def _sync(self) -> None:
        """Bring the running instances to what the config and registry say."""
        wanted_all = await self._wanted()
        wanted_ids = {w.connector_id for w in wanted_all}
        for connector_id in [c for c in self._running if c not in wanted_ids]:
            await self._halt(connector_id, "was removed", forget=True)
        for wanted in wanted_all:
            state = self._running.get(wanted.connector_id)
            if state is None:
                await self._build(wanted)
                state = self._running.get(wanted.connector_id)
                if state is not None and state.active:
                    await self._launch(wanted.connector_id, state, strict=False)
                continue
            if not wanted.enabled or wanted.problem is not None or wanted.cls is None:
                if state.active:
                    reason = "is disabled" if not wanted.enabled else "cannot run"
                    await self._halt(wanted.connector_id, reason)
                    state.active = False
                continue
            try:
                await self._refresh_secrets(wanted.connector_id)
            except SecretsError as error:
                log.warning(
                    "Connector %s: its secrets do not open (%s)", wanted.connector_id, error
                )
            if state.active and state.version == wanted.version and state.problem is None:
                continue  # running as wanted
            if state.active and state.version == wanted.version:
                if state.retry_at > time.monotonic():
                    continue  # did not start: tried again later
            elif state.active:
                await self._halt(wanted.connector_id, "is restarting with new settings")
            await self._build(wanted)
            new_state = self._running[wanted.connector_id]
            if new_state.active:
                new_state.failures = state.failures if state.version == wanted.version else 0
                await self._launch(wanted.connector_id, new_state, strict=False)

    async def _build(self, wanted: _Wanted) -> None:
        """Create the instance (active) or its stand-in (held); routes follow."""
        assert self._connectors is not None
        connector_id = wanted.connector_id
        if wanted.problem is not None and wanted.enabled:
            log.warning("Connector %s cannot run: %s", connector_id, wanted.problem)
        if wanted.cls is None:
            self._connectors.discard(connector_id)
            self._routes.drop(connector_id)
            self._running.pop(connector_id, None)
            return
        if not wanted.enabled or wanted.settings is None:
            reason = "is disabled" if not wanted.enabled else "cannot run"
            self._connectors.hold(connector_id, HeldConnector(connector_id, wanted.cls, reason))
            self._routes.hold(connector_id)
            self._running[connector_id] = _Running(wanted.version, wanted.cls, active=False)
            return
        shared = self._secrets.setdefault(connector_id, RegistrySecrets(self.registry.clock))
        try:
            await self._refresh_secrets(connector_id)
        except SecretsError as error:
            log.warning("Connector %s cannot run: %s", connector_id, error)
            self._connectors.hold(
                connector_id, HeldConnector(connector_id, wanted.cls, "cannot open its secret")
            )
            self._routes.hold(connector_id)
            self._running[connector_id] = _Running(
                wanted.version, wanted.cls, active=False, problem=str(error)
            )
            return
        spec = ConnectorSpec(connector_id, wanted.cls, wanted.settings)
        wiring = self._wire(connector_id)
        connector = self._connectors.add(
            spec,
            emit=wiring.emit,
            emit_all=wiring.emit_all,
            store=wiring.store,
            public_base_url=wiring.public_base_url,
            secrets=shared,
            directory=wiring.directory,
        )
        self._routes.serve(
            connector_id,
            connector.web_routes(),
            connector.max_request_bytes,
            connector.refuse_unread,
        )
        self._running[connector_id] = _Running(wanted.version, wanted.cls, active=True)

    async def _launch(self, connector_id: str, state: _Running, *, strict: bool) -> None:
        assert self._connectors is not None
        connector = self._connectors.get(connector_id)
        assert connector is not None
        try:
            await connector.start()
        except Exception as error:
            if strict:
                raise
            state.failures += 1
            delay = START_BACKOFF.delay(state.failures)
            state.problem = f"did not start: {_describe(error)}"
            state.retry_at = time.monotonic() + delay
            log.warning(
                "Connector %s did not start (%s); tried again in %.0f s",
                connector_id,
                _describe(error),
                delay,
            )
            await _stop_quietly(connector_id, connector)
            self._connectors.hold(
                connector_id, HeldConnector(connector_id, state.cls, "did not start")
            )
            self._routes.hold(connector_id)
            return
        state.problem = None
        state.failures = 0
        log.info("Connector %s (%s) started", connector_id, state.cls.type_name)
        self._on_resumed(connector_id)

    async def _halt(self, connector_id: str, reason: str, *, forget: bool = False) -> None:
        """Stop the instance: held (webhooks 503, deliveries wait), or forgotten."""
        assert self._connectors is not None
        state = self._running.get(connector_id)
        connector = self._connectors.get(connector_id)
        held = self._connectors.is_held(connector_id)
        if forget:
            self._routes.drop(connector_id)
            self._connectors.discard(connector_id)
            self._running.pop(connector_id, None)
            self._secrets.pop(connector_id, None)
        elif state is not None:
            self._routes.hold(connector_id)
            self._connectors.hold(connector_id, HeldConnector(connector_id, state.cls, reason))
            state.problem = None
        if connector is not None and not held:
            await _stop_quietly(connector_id, connector)
            log.info("Connector %s stopped (%s)", connector_id, reason.removeprefix("is "))

    async def _refresh_secrets(self, connector_id: str) -> None:
        shared = self._secrets.get(connector_id)
        if shared is not None:
            shared.replace(await self.registry.secrets(connector_id))

    # Helpers -----------------------------------------------------------------------------------

    def _instance(self, wanted: _Wanted) -> Connector:
        """An instance outside the running set, for a probe: it emits nothing."""
        assert wanted.cls is not None and wanted.settings is not None
        wiring = self._detached_wiring(wanted.connector_id)
        return ConnectorSet().add(
            ConnectorSpec(wanted.connector_id, wanted.cls, wanted.settings),
            emit=wiring.emit,
            emit_all=wiring.emit_all,
            store=wiring.store,
            public_base_url=wiring.public_base_url,
        )

    def _detached_wiring(self, connector_id: str) -> Wiring:
        async def refuse(event: RemoteEvent) -> None:
            raise RuntimeError("a connector under test emits nothing")

        async def refuse_all(events: Sequence[RemoteEvent]) -> None:
            raise RuntimeError("a connector under test emits nothing")

        return Wiring(
            refuse,
            refuse_all,
            ConnectorStateStore(self.registry.db, connector_id),
            self.webhook_base_url(connector_id),
        )

    def _is_config(self, connector_id: str) -> bool:
        return connector_id in self.config.connectors

    def _unknown(self, connector_id: str) -> UnknownConnector:
        return UnknownConnector(
            f"no connector {connector_id!r}; 'connectors' lists them"
            if CONNECTOR_ID.fullmatch(connector_id)
            else f"{connector_id!r} is not a connector id"
        )


# --- Validation (the same rules as the config file) -------------------------------------------


def check_connector_id(connector_id: str) -> None:
    if not CONNECTOR_ID.fullmatch(connector_id) or connector_id in RESERVED_CONNECTOR_IDS:
        raise InvalidConnector(
            f"connector id {connector_id!r} must be 1-32 lower-case letters and digits, "
            f"starting with a letter, and not one of {sorted(RESERVED_CONNECTOR_IDS)}"
        )


def _connector_type(type_name: str) -> type[Connector]:
    types = available_types()
    cls = types.get(type_name)
    if cls is None:
        raise InvalidConnector(
            f"unknown connector type {type_name!r}; installed types: "
            f"{', '.join(sorted(types)) or 'none'}"
        )
    return cls


def validate_settings(cls: type[Connector], settings: Mapping[str, Any]) -> BaseModel:
    """The settings as the type's model reads them; errors name the field
    (``settings.api_url: Field required``)."""
    try:
        secret_paths(cls.Settings)
        return cls.Settings.model_validate(dict(settings))
    except ValidationError as error:
        raise InvalidConnector(format_validation_error(error, prefix="settings.")) from None
    except RegistryError as error:
        raise InvalidConnector(f"connector type {cls.type_name!r}: {error}") from None


async def _admin(step: Any) -> Any:
    """Storage refusals and key problems as operator-facing errors."""
    try:
        return await step
    except (SecretsError, RegistryError) as error:
        raise ConnectorAdminError(str(error)) from None


async def _probe(connector_id: str, connector: Connector) -> str:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            answer = await connector.probe()
    except TimeoutError:
        raise ProbeFailed(f"{connector_id}: no answer within {PROBE_TIMEOUT_S:g} s") from None
    except Exception as error:
        raise ProbeFailed(f"{connector_id}: {_describe(error)}") from None
    return f"{connector_id}: {answer}"


async def _stop_quietly(connector_id: str, connector: Connector) -> None:
    try:
        await connector.stop()
    except Exception as error:  # noqa: BLE001 - stopping goes on
        log.warning("Connector %s did not stop cleanly (%s)", connector_id, type(error).__name__)


def _describe(error: BaseException) -> str:
    """An error for operators: a connector's own message (written without secrets), a network
    error's, else only its type (other texts may quote what was being processed)."""
    if isinstance(error, ConnectorError | OSError):
        return str(error) or type(error).__name__
    return type(error).__name__
