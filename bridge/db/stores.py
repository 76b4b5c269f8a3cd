"""All table stores of one database, built once and passed around together."""

from __future__ import annotations

from dataclasses import dataclass

from mautrix.util.async_db import Database

from bridge.config import SecretsConfig
from bridge.db.audit import AuditLog
from bridge.db.connector_registry import ConnectorRegistry
from bridge.db.dead_letters import DeadLetterStore
from bridge.db.directory import DirectoryStore
from bridge.db.erasure import ErasureStore
from bridge.db.ghost import GhostStore
from bridge.db.group_commit import GroupCommit
from bridge.db.inbox import InboxStore
from bridge.db.message_map import MessageMapStore
from bridge.db.outbox import OutboxStore
from bridge.db.permissions import PermissionStore
from bridge.db.portal import PortalStore
from bridge.db.reports import ReportStore
from bridge.db.trust import TrustStore
from bridge.secrets import SecretBox, configured_box


@dataclass(frozen=True)
class Stores:
    db: Database
    inbox: InboxStore
    outbox: OutboxStore
    portals: PortalStore
    ghosts: GhostStore
    messages: MessageMapStore
    dead_letters: DeadLetterStore
    commit: GroupCommit
    """Where the workers' per-item writes are committed together."""
    trusted_servers: TrustStore
    permissions: PermissionStore
    directory: DirectoryStore
    audit: AuditLog
    connector_registry: ConnectorRegistry
    """Connectors registered at run time and their sealed secrets."""
    reports: ReportStore
    """Read-only reports for operators (status, queues, portals)."""
    erasures: ErasureStore
    """The rows an erasure deletes, and erasures whose Matrix part waits."""

    @classmethod
    def of(
        cls,
        db: Database,
        *,
        cache_size: int | None = None,
        secrets: SecretsConfig | SecretBox | None = None,
    ) -> Stores:
        """``cache_size``: rows each read-through cache keeps (None: the default, 0: none).
        ``secrets``: the key that seals queued content and secrets (read now when one is
        configured; a configured key that cannot be read is an error; without any, queued
        content is stored in clear and connector secrets cannot be sealed)."""
        sized = {} if cache_size is None else {"cache_size": cache_size}
        secrets = secrets or SecretsConfig()
        box = secrets if isinstance(secrets, SecretBox) else configured_box(secrets)
        return cls(
            db,
            InboxStore(db),
            OutboxStore(db, box),
            PortalStore(db, **sized),
            GhostStore(db, **sized),
            MessageMapStore(db),
            DeadLetterStore(db),
            GroupCommit(db),
            trusted_servers=TrustStore(db),
            permissions=PermissionStore(db),
            directory=DirectoryStore(db),
            audit=AuditLog(db),
            connector_registry=ConnectorRegistry(db, box or secrets),
            reports=ReportStore(db),
            erasures=ErasureStore(db),
        )
