"""The running bridge, its composition root: builds storage, the homeserver client, the
connectors and the workers, each given what it needs, and starts and stops them in order."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

from aiohttp import ClientSession, ClientTimeout, web
from mautrix.appservice import AppServiceAPI
from mautrix.errors import MatrixRequestError
from mautrix.types import Membership, RoomID, UserID

from bridge import __version__
from bridge.admin.console import Console
from bridge.appservice.server import AppserviceServer
from bridge.appservice.thirdparty import ThirdParty
from bridge.config import Config, ConfigError, load_tokens
from bridge.core.audit_trail import Trail
from bridge.core.causal_order import CausalOrder
from bridge.core.connector_manager import ConnectorManager, Wiring
from bridge.core.connector_routes import ConnectorRoutes
from bridge.core.connectors import ConnectorSet, validate_connectors
from bridge.core.delivery import Delivery
from bridge.core.discovery import Discovery
from bridge.core.erasure import Erasure
from bridge.core.errors import PermanentFailure
from bridge.core.from_matrix import FromMatrix
from bridge.core.ghost_ids import GhostIds
from bridge.core.ghost_names import GhostNames
from bridge.core.intake import VendorIntake
from bridge.core.lanes import LaneScheduler
from bridge.core.metrics_sampler import bridge_sampler
from bridge.core.periodic import Periodic
from bridge.core.portals import Portals
from bridge.core.reconcile import Reconciler, TransactionWatch
from bridge.core.router import Router
from bridge.core.send_status import StatusReporter
from bridge.core.to_matrix import ToMatrix
from bridge.core.trust import TrustWatcher
from bridge.crypto.machine import Crypto
from bridge.crypto.pickling import PickleKey
from bridge.db.clock import now_ms
from bridge.db.connector_state import BRIDGE_STATE, ConnectorStateStore
from bridge.db.crypto import CryptoStore
from bridge.db.database import open_database, ping, truncate_wal
from bridge.db.group_commit import GroupCommit
from bridge.db.inbox import InboxItem
from bridge.db.stores import Stores
from bridge.directory.lookup import StoreDirectoryLookup
from bridge.i18n import set_locale
from bridge.matrix.homeserver import Homeserver, HomeserverCheckFailed, appservice_api
from bridge.matrix.keys import KeysApi
from bridge.matrix.media import MediaRepository
from bridge.matrix.registration_probe import warn_if_open_registration
from bridge.metrics import Metrics
from bridge.secrets import KeyUnavailable, SecretBox, SecretsError

log = logging.getLogger("eimis.bridge")

READY_TIMEOUT_S = 5.0
"""A readiness check that takes longer than this fails (a probe must answer, not hang)."""

ERASURE_POLL_S = 5.0
"""How often the bridge looks for erasures made elsewhere (CLI) and Matrix parts left to do."""

PORTAL_ACL_KEY = "portal_server_acl"
"""The ``m.room.server_acl`` content every portal was last brought to."""


class Bridge:
    """The composition root: builds every part with what it needs (constructor injection) and
    starts them in order on one exit stack, so that ``stop`` (or a start failing half-way)
    stops what had started, in reverse order."""

    def __init__(self, config: Config) -> None:
        self.config = config
        set_locale(config.bridge.locale)
        self.connectors = ConnectorSet()
        self.ids = GhostIds(
            config.appservice.user_prefix,
            config.homeserver.domain,
            config.appservice.bot_username,
        )
        self._session: ClientSession | None = None
        self.connector_manager: ConnectorManager | None = None
        self.homeserver_info: dict[str, object] = {}
        self.metrics = Metrics(__version__)
        self._stack: AsyncExitStack | None = None
        """What started, each part's stop pushed as it started (``stop`` unwinds it)."""

    async def start(self, *, paused: bool = False) -> None:
        """Open storage, serve the appservice API, check the homeserver, then start the work.

        ``paused`` stores everything that arrives but processes nothing (maintenance; tests of
        what a crash between acknowledgement and processing leaves behind). A start that fails
        stops what it had started (in reverse order) before it raises.
        """
        if self._stack is not None:
            raise RuntimeError("the bridge is running already")
        async with AsyncExitStack() as stack:
            await self._build(stack)
            await self._run(stack, paused=paused)
            self._stack = stack.pop_all()

    async def stop(self) -> None:
        """Stop what started, in reverse order (nothing when the bridge is not running)."""
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    async def _build(self, stack: AsyncExitStack) -> None:
        """Storage, the homeserver client and every part, each given what it needs."""
        config = self.config
        validate_connectors(config)
        as_token, hs_token = load_tokens(config)
        self.db = await open_database(config.database)
        stack.push_async_callback(self.db.stop)
        self.stores = Stores.of(self.db, secrets=config.secrets)
        await self._seal_queued_content()
        self.stores.audit.retention_days = config.audit.retention_days
        trail = Trail(self.stores.audit, self.metrics)
        """Every delivery's audit row and metrics."""
        # Vendor events' commits (the router and deliveries have their own); the inbox worker
        # is woken for them once it exists.
        self._intake = VendorIntake(
            self.stores.inbox, GroupCommit(self.db), lambda: self.inbox.notify()
        )
        session = self._session = ClientSession(timeout=ClientTimeout(total=60))
        stack.push_async_callback(self._close_session)
        api = appservice_api(config, as_token, self.db, session)
        self.crypto = await self._open_crypto(api) if config.encryption.enabled else None
        self.homeserver = Homeserver(
            config, as_token, self.db, session, api=api, encryptor=self.crypto
        )
        stack.push_async_callback(self.homeserver.close)
        self.homeserver.trust.replace_extra(await self.stores.trusted_servers.names())
        self.trust_watcher = TrustWatcher(
            self.homeserver.trust,
            self.stores.trusted_servers.names,
            self._apply_trust,
            config.trust.poll_interval_s,
        )
        # Config connectors and those registered at run time; changes apply without a restart.
        self.connector_routes = ConnectorRoutes()
        self.connector_manager = ConnectorManager(
            config,
            self.stores.connector_registry,
            connectors=self.connectors,
            routes=self.connector_routes,
            wire=self._wiring,
            on_resumed=self._connector_resumed,
        )
        await self.connector_manager.load()
        stack.push_async_callback(self.connector_manager.stop)  # the instances built
        self.portals = Portals(
            self.stores,
            self.homeserver,
            self.connectors,
            self.ids,
            crypto=self.crypto,
            require_encryption=config.encryption.require,
            require_directory_entry=config.identity.require_directory_entry,
        )
        self.media = MediaRepository(
            config.homeserver.url,
            as_token,
            session,
            config.media.chunk_size,
            fetch_timeout_s=config.media.fetch_timeout_s,
        )
        self.status = StatusReporter(self.stores, self.homeserver, self.connectors)
        self.delivery = Delivery(
            self.stores,
            self.homeserver,
            self.connectors,
            self.media,
            config.media,
            self.status,
            max_attempts=config.delivery.max_attempts,
            success_statuses=config.delivery.success_statuses,
            trail=trail,
            portals=self.portals,
        )
        self.outbox = self.delivery.queue  # its own lanes: a vendor back retries them
        # Erasures (``forget``, admin room or CLI): their Matrix part when the homeserver was
        # down, and no erased delivery sent from memory.
        self.erasure = Erasure(
            self.stores, self.homeserver, crypto=self.crypto, on_dropped=self._erased
        )
        # The operators' admin rooms: their events are commands; alerts are posted there.
        self.console = Console(
            config=config,
            stores=self.stores,
            homeserver=self.homeserver,
            connectors=self.connectors,
            health=self.delivery.health,
            media=self.media,
            ids=self.ids,
            manager=self.connector_manager,
            erasure=self.erasure,
            crypto=self.crypto,
            portals=self.portals,
        )
        self.from_matrix = FromMatrix(
            self.stores,
            self.homeserver,
            self.portals,
            # Always: without operators, the bot's help desk still serves the homeserver's users.
            admin=self.console.room,
            on_refused=self.status.refused,
            on_unsupported=self.status.unsupported,
            decrypt=self.crypto.decrypt if self.crypto is not None else None,
        )
        self.router = Router(
            self.stores,
            self.homeserver,
            self.from_matrix,
            ToMatrix(
                self.stores,
                self.homeserver,
                self.portals,
                self.media,
                config.media,
                self.status,
                self.outbox.notify,
                relay=self.from_matrix.handle,
                success_statuses=config.delivery.success_statuses,
                trail=trail,
                crypto=self.crypto,
                backfill=config.portal.backfill,
            ),
            outbox_notify=self.outbox.notify,
            trail=trail,
            crypto=self.crypto,
            key_wait_s=config.encryption.key_wait_s,
            ids_ours=self.ids.in_namespace,
            on_undecryptable=self.status.undecryptable,
            on_homeserver_back=self._homeserver_back,
        )
        self.inbox = LaneScheduler[InboxItem](
            "inbox",
            self.stores.inbox.pending,
            self.router.handle,
            self.router.record_error,
            fetch_lane=self.stores.inbox.pending_in_lane,
        )
        self.reconciler = Reconciler(
            self.stores.inbox,
            self.homeserver,
            self._timeline_readers,
            self.inbox.notify,
            config.reconcile,
        )
        self.reconciler.hold()  # transactions wait for the start-up reconciliation
        self.causal_order = CausalOrder(
            self.stores.inbox,
            self.homeserver,
            self._timeline_readers,
            config.homeserver.domain,
            self.inbox.notify,
            config.reconcile,
            asyncio.Lock(),
        )
        self.appservice = AppserviceServer(
            hs_token=hs_token,
            inbox=self.stores.inbox,
            on_stored=self.inbox.notify,
            query_user=self.query_user,
            ready=self.readiness,
            max_body_bytes=config.appservice.max_body_bytes,
            watch=TransactionWatch(self.stores.inbox, self.reconciler),
            order=self.causal_order,
            thirdparty=ThirdParty(
                hs_token,
                self.stores.directory,
                lambda: [cid for cid, c in config.connectors.items() if c.enabled],
            ),
        )
        self.connector_routes.mount(self.appservice.app)
        # Ghosts named after the directory, now and whenever an import changes it.
        self.ghost_names = GhostNames(
            self.stores, self.homeserver, config.directory.sync_interval_s
        )
        # The directory published in the homeserver's user directory (ghosts found from any
        # client's user search): in the background, after GhostNames.
        self.discovery = Discovery(
            self.stores, self.homeserver, self.connectors, config, names=self.ghost_names
        )
        self.console.context.discovery = self.discovery
        self.audit_purge = Periodic(
            "Audit log purge", self._purge_audit, config.audit.purge_interval_s, log, at_once=True
        )
        self.wal_truncation = Periodic(
            "Write-ahead log truncation",
            self._truncate_wal,
            config.database.wal_truncate_interval_s if config.database.is_sqlite else 0,
            log,
        )
        self.erasure_follow = Periodic(
            "Erasure follow-up", self._follow_erasures, ERASURE_POLL_S, log, at_once=True
        )

    async def _run(self, stack: AsyncExitStack, *, paused: bool) -> None:
        """Start the parts in order; each pushes its stop on ``stack`` once started."""
        config = self.config
        runner = web.AppRunner(self.appservice.app, access_log=None)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        await web.TCPSite(runner, config.appservice.hostname, config.appservice.port).start()
        log.info(
            "Appservice API listening on %s:%d", config.appservice.hostname, config.appservice.port
        )
        if config.metrics.enabled:
            self.metrics.watch(
                bridge_sampler(
                    self.stores,
                    self.connectors,
                    self.delivery.health,
                    buffered=lambda: {"inbox": self.inbox.buffered, "outbox": self.outbox.buffered},
                    untrusted_dropped=lambda: self.from_matrix.untrusted_dropped,
                    crypto=lambda: self.crypto.counts() if self.crypto is not None else {},
                )
            )
            stack.push_async_callback(self.metrics.stop)
            await self.metrics.start(config.metrics.hostname, config.metrics.port)
        self.homeserver_info = await self._check_homeserver()
        if self.crypto is not None:
            await self.crypto.start()
        await self.reconciler.start()
        stack.push_async_callback(self.reconciler.stop)
        await self.causal_order.start()
        stack.push_async_callback(self.causal_order.stop)
        await self.homeserver.bot.set_displayname(config.appservice.bot_displayname)
        await self.ghost_names.start()
        stack.push_async_callback(self.ghost_names.stop)
        if config.appservice.ghosts_in_user_directory:
            await warn_if_open_registration(
                self._session, config.homeserver.url, config.appservice.user_prefix
            )
        for periodic in (self.audit_purge, self.wal_truncation):
            periodic.start()
            stack.push_async_callback(periodic.stop)
        self._erasures_seen = await self.erasure.erasures.latest_id()
        self.erasure_follow.start()
        stack.push_async_callback(self.erasure_follow.stop)
        await self.connector_manager.start()  # its stop was pushed when it loaded
        await self.router.start()
        self.discovery.start()  # its first pass runs in the background
        stack.push_async_callback(self.discovery.stop)
        self.trust_watcher.start()  # and brings every portal's ACL to the list at once
        stack.push_async_callback(self.trust_watcher.stop)
        self.console.start()
        stack.push_async_callback(self.console.stop)
        # The queues stop first (pushed last): no work is taken once stopping began.
        stack.push_async_callback(self.outbox.stop)
        stack.push_async_callback(self.inbox.stop)
        if not paused:
            self.inbox.start()
            self.outbox.start()
        log.info("Bridge running with connectors: %s", ", ".join(self.connectors.ids()) or "none")

    async def _close_session(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _homeserver_back(self) -> None:
        """The homeserver answers again: waiting events go on, and what it may have pushed
        while failing is looked for."""
        self.inbox.retry_now()
        self.reconciler.request("the homeserver answers again")

    def _room_key_arrived(self, room_id: str) -> None:
        """A room key arrived: the room's events waiting for it are tried again at once."""
        self.inbox.retry_now(room_id)

    async def _seal_queued_content(self) -> None:
        """Queued content is sealed at rest; rows of before (in clear) are sealed now."""
        outbox = self.stores.outbox
        if outbox.box is None:
            sealed_with = sorted(k for k in await outbox.key_usage() if k)
            if sealed_with:
                raise ConfigError(
                    "the outbox holds deliveries sealed with the secrets key "
                    f"{', '.join(sealed_with)}, and no key is configured: set secrets.key_file"
                )
            log.warning(
                "No secrets key is configured: message content waiting in the outbox is stored "
                "unsealed; set secrets.key_file (eimis-bridge secrets generate-key)"
            )
            return
        try:
            sealed, _ = await outbox.seal_all()
        except SecretsError as error:
            raise ConfigError(f"queued deliveries cannot be opened: {error}") from None
        if sealed:
            log.info("Sealed %d queued delivery(ies) with the secrets key", sealed)

    async def _open_crypto(self, api: AppServiceAPI) -> Crypto:
        """End-to-bridge encryption over this bridge's database and appservice API."""
        try:
            box = SecretBox.from_config(self.config.secrets)
        except KeyUnavailable as error:
            raise ConfigError(
                f"encryption.enabled needs a key to seal its sessions at rest: {error}"
            ) from None
        store = CryptoStore(self.db)

        async def members(room_id: str, viewer: str) -> list[str]:
            state = api.state_store
            if not await state.has_full_member_list(RoomID(room_id)):
                try:
                    await api.intent(UserID(viewer)).get_members(RoomID(room_id))  # fills it
                except MatrixRequestError as error:
                    # Not a member (the bot, in a room a native user opened to a ghost): what
                    # the transactions told the state store is what there is.
                    log.debug("Members of %s not readable as %s (%s)", room_id, viewer, error)
            joined_or_invited = (Membership.JOIN, Membership.INVITE)
            return [str(u) for u in await state.get_members(RoomID(room_id), joined_or_invited)]

        return Crypto(
            store,
            KeysApi(api),
            await PickleKey.load(store, box),
            bot_mxid=self.config.bot_mxid,
            members=members,
            is_ours=self.ids.in_namespace,
            cross_signing=self.config.encryption.cross_signing,
            on_room_key=self._room_key_arrived,
        )

    async def _check_homeserver(self) -> dict[str, object]:
        deadline = time.monotonic() + self.config.homeserver.startup_timeout_s
        delay = 0.5
        while True:
            remaining = max(deadline - time.monotonic(), 0.1)
            try:
                async with asyncio.timeout(remaining):
                    info = await self.homeserver.check()
                log.info("Homeserver OK (ping %s ms)", info["ping_ms"])
                return info
            except (TimeoutError, HomeserverCheckFailed) as error:
                if time.monotonic() + delay > deadline:
                    if isinstance(error, HomeserverCheckFailed):
                        raise
                    raise HomeserverCheckFailed(
                        f"the homeserver at {self.config.homeserver.url} does not answer within "
                        f"{self.config.homeserver.startup_timeout_s:g} s; check homeserver.url"
                    ) from None
                log.warning("Homeserver not ready yet; retrying in %.1fs", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _wiring(self, connector_id: str) -> Wiring:
        return Wiring(
            emit=self._intake.emitter(connector_id),
            emit_all=self._intake.batch_emitter(connector_id),
            store=ConnectorStateStore(self.db, connector_id),
            public_base_url=f"{self.config.appservice.webhook_base_url}/connectors/{connector_id}",
            directory=StoreDirectoryLookup(self.stores.directory),
        )

    def _connector_resumed(self, connector_id: str) -> None:
        """A connector runs again: its conversations waiting for it go on at once."""
        lanes = f"{connector_id}\x1f"  # the lanes of its conversations, in both queues
        self.inbox.retry_now(lanes)  # (told once started: the queues exist by then)
        self.outbox.retry_now(lanes)

    async def _apply_trust(self) -> None:
        """The trust list changed (or the bridge started): every portal's ACL follows it.

        The ACL last applied to every portal is remembered: a start with an unchanged list
        touches no portal (a bridge with 100,000 portals starts at once), and a pass that
        failed part-way is done again whole at the next poll."""
        acl = self.homeserver.trust.acl()
        applied = json.dumps(acl, sort_keys=True)
        state = ConnectorStateStore(self.db, BRIDGE_STATE)
        if await state.get(PORTAL_ACL_KEY) == applied:
            return
        after = ""
        while page := await self.stores.trusted_servers.portal_voices_page(after, 500):
            await self.homeserver.update_server_acls(page)
            after = page[-1][0]
        await state.set(PORTAL_ACL_KEY, applied)

    async def _timeline_readers(self, room_id: str) -> list[str]:
        """Who of the bridge reads a portal's timeline: its voice, else a ghost joined there."""
        portal = await self.stores.portals.get(room_id)
        if portal is None:
            return []
        members = await self.homeserver.state_store.get_members(RoomID(room_id), (Membership.JOIN,))
        ghosts = [str(m) for m in members if self.ids.in_namespace(m) and m != portal.voice]
        return [portal.voice, *ghosts]

    async def query_user(self, mxid: str) -> bool:
        """The homeserver asks whether a user of our namespace exists (e.g. before an invite)."""
        if mxid == self.ids.bot_mxid:
            return True
        ref = self.ids.parse(mxid)
        if ref is None or ref.connector not in self.connectors:
            return False
        try:
            await self.portals.ghost(ref.connector, ref.idnps)
        except PermanentFailure:
            return False
        except Exception:
            log.exception("Could not look up %s", mxid)
            return False
        return True

    async def _truncate_wal(self) -> None:
        """Cleared content (delivered, discarded) leaves the write-ahead log's old frames."""
        await truncate_wal(self.db)

    async def _erased(self, seqs: list[int]) -> None:
        await self.outbox.reread()

    async def _follow_erasures(self) -> None:
        latest = await self.erasure.erasures.latest_id()
        if latest > self._erasures_seen:
            self._erasures_seen = latest
            await self.outbox.reread()  # an erasure from the CLI: drop what memory holds
        await self.erasure.resume()

    async def _purge_audit(self) -> None:
        purged = await self.stores.audit.purge()
        if purged:
            log.info("Audit log: %d rows past their retention purged", purged)
        if self.crypto is not None:
            retention_ms = int(self.config.audit.retention_days * 86_400_000)
            await self.crypto.store.purge_message_indexes(now_ms() - retention_ms)

    async def readiness(self) -> dict[str, bool]:
        """Ready when the database and the homeserver both answer, each within
        ``READY_TIMEOUT_S`` (asked at once, never retried: a probe wants an answer now)."""

        async def database() -> bool:
            await ping(self.db)
            return True

        async def homeserver() -> bool:
            assert self._session is not None
            url = f"{self.config.homeserver.url.rstrip('/')}/_matrix/client/versions"
            async with self._session.get(url, timeout=ClientTimeout(total=READY_TIMEOUT_S)) as r:
                return r.status == 200

        async def check(probe: Callable[[], Awaitable[bool]]) -> bool:
            try:
                async with asyncio.timeout(READY_TIMEOUT_S):
                    return await probe()
            except Exception:
                return False

        db_ok, hs_ok = await asyncio.gather(check(database), check(homeserver))
        return {"database": db_ok, "homeserver": hs_ok}

    async def run_forever(self) -> None:
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()
