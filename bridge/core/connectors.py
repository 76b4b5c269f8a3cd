"""Finding connector types (entry points) and running the configured connector instances."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points

from pydantic import BaseModel, ValidationError

from bridge.config import Config, ConfigError, format_validation_error
from connectors.base import (
    BatchSink,
    CapabilityMismatch,
    Connector,
    ConnectorContext,
    DirectoryLookup,
    EventSink,
    KeyValueStore,
    SharedSecrets,
    capability_mismatch,
)

ENTRY_POINT_GROUP = "eimis_bridge.connectors"


def available_types() -> dict[str, type[Connector]]:
    """Connector types installed in this environment, by type name.

    A type whose advertised operations disagree with the operation classes it implements
    (``connectors.base.EditHandling`` ...) is refused here, before any instance runs."""
    types: dict[str, type[Connector]] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = entry.load()
        except CapabilityMismatch as error:
            raise ConfigError(f"connector type {entry.name!r} refused: {error}") from None
        if not (isinstance(cls, type) and issubclass(cls, Connector)):
            raise ConfigError(f"entry point {entry.name!r} is not a Connector subclass")
        problem = capability_mismatch(cls)
        if problem is not None:
            raise ConfigError(f"connector type {entry.name!r} refused: {problem}")
        types[entry.name] = cls
    return types


@dataclass(frozen=True)
class ConnectorSpec:
    connector_id: str
    cls: type[Connector]
    settings: BaseModel


def validate_connectors(config: Config) -> list[ConnectorSpec]:
    """Check every enabled connector's type and settings; errors name the key."""
    types = available_types()
    specs = []
    for connector_id, entry in config.connectors.items():
        if not entry.enabled:
            continue
        cls = types.get(entry.type)
        if cls is None:
            raise ConfigError(
                f"connectors.{connector_id}.type: unknown connector type {entry.type!r}; "
                f"installed types: {', '.join(sorted(types)) or 'none'}"
            )
        try:
            settings = cls.Settings.model_validate(entry.settings)
        except ValidationError as error:
            raise ConfigError(
                format_validation_error(error, prefix=f"connectors.{connector_id}.settings.")
            ) from None
        specs.append(ConnectorSpec(connector_id, cls, settings))
    return specs


class ConnectorSet:
    """The connector instances, in config order (the order IDNPS lookups try them), then those
    registered at run time.

    An instance can be *held* (disabled by an operator, or not started yet): a stand-in takes
    its place, so the conversations it is in still queue deliveries for it, which wait (the
    stand-in answers as an unreachable vendor) until it runs again; lookups skip it.
    """

    def __init__(self) -> None:
        self._by_id: dict[str, Connector] = {}
        self._held: set[str] = set()

    def add(
        self,
        spec: ConnectorSpec,
        *,
        emit: EventSink,
        emit_all: BatchSink,
        store: KeyValueStore,
        public_base_url: str,
        secrets: SharedSecrets | None = None,
        directory: DirectoryLookup | None = None,
    ) -> Connector:
        ctx = ConnectorContext(
            connector_id=spec.connector_id,
            settings=spec.settings,
            emit=emit,
            emit_all=emit_all,
            store=store,
            public_base_url=public_base_url,
            log=logging.getLogger(f"eimis.connector.{spec.connector_id}"),
        )
        if secrets is not None:
            ctx.secrets = secrets
        if directory is not None:
            ctx.directory = directory
        connector = spec.cls(ctx)
        # An instance may set its own capabilities (a webhook vendor declares them): they
        # must still match what it implements, or the bridge would ask what it cannot do.
        problem = capability_mismatch(connector)
        if problem is not None:
            raise ConfigError(f"connectors.{spec.connector_id}: {problem}")
        self._by_id[spec.connector_id] = connector
        self._held.discard(spec.connector_id)
        return connector

    def hold(self, connector_id: str, stand_in: Connector) -> None:
        """Put a stand-in (``bridge/core/held_connector.py``) in the instance's place."""
        self._by_id[connector_id] = stand_in
        self._held.add(connector_id)

    def discard(self, connector_id: str) -> None:
        """Forget the instance: deliveries still queued for it fail."""
        self._by_id.pop(connector_id, None)
        self._held.discard(connector_id)

    def is_held(self, connector_id: str) -> bool:
        return connector_id in self._held

    def get(self, connector_id: str) -> Connector | None:
        return self._by_id.get(connector_id)

    def __contains__(self, connector_id: object) -> bool:
        return connector_id in self._by_id

    def __iter__(self) -> Iterator[tuple[str, Connector]]:
        """The running instances (held ones skipped)."""
        return iter([(i, c) for i, c in self._by_id.items() if i not in self._held])

    def ids(self) -> list[str]:
        """The running instances' ids, in order."""
        return [i for i in self._by_id if i not in self._held]
