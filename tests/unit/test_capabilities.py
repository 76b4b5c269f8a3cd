"""Connector capabilities as types (``connectors/base.py``): a connector can do an optional
operation exactly when it implements that operation's class, its advertised flags follow from
those classes, a type or instance whose flags disagree is refused at registration, and the
bridge asks a connector only for what it implements (the rest degrades). Also the look-up of
the vendor sandboxes through their own entry-point group (``bridge/devtools/sandboxes.py``).
"""

from __future__ import annotations

from dataclasses import replace
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any, ClassVar

import pytest
from aiohttp import web
from mautrix.util.async_db import Database
from pydantic import BaseModel

from bridge.config import ConfigError, MediaConfig
from bridge.core import connectors as registry
from bridge.core import operations as op
from bridge.core.connectors import ConnectorSet, ConnectorSpec, available_types
from bridge.core.delivery import Delivery
from bridge.core.held_connector import HeldConnector
from bridge.db.portal import Portal
from bridge.db.stores import Stores
from bridge.devtools import sandboxes
from bridge.devtools.sandboxes import NoSandbox, vendor_sandbox, vendor_sandboxes
from connectors.base import (
    OPERATION_PROTOCOLS,
    AttachmentSource,
    Capabilities,
    CapabilityMismatch,
    Connector,
    ConnectorContext,
    DeletionHandling,
    DeliveryStatusHandling,
    EditHandling,
    HistorySource,
    Idnps,
    MemberRemoval,
    NewConversation,
    OutboundMessage,
    ParticipantAdding,
    ReactionHandling,
    ReadReceiptHandling,
    RemoteAttachment,
    RemoteUser,
    TitleHandling,
    TopicHandling,
    TypingHandling,
    capability_mismatch,
)
from connectors.medipeps import MedipepsConnector
from connectors.pandalab import PandaLabConnector
from connectors.pandalab.sandbox_entry import SANDBOX as PANDALAB_SANDBOX
from connectors.sandbox_entry import ENTRY_POINT_GROUP as SANDBOXES_GROUP
from connectors.sandbox_entry import VendorSandbox
from connectors.webhook import WebhookConnector

ROOM = "!ward:eimis.example"
VOICE = "@eimis_bot:eimis.example"
CAROL = "@carol:eimis.example"


class NoSettings(BaseModel):
    pass


class Plain(Connector):
    """The required part only: no optional operation."""

    type_name: ClassVar[str] = "plain"
    Settings: ClassVar[type[BaseModel]] = NoSettings
    capabilities: ClassVar[Capabilities] = Capabilities(replies=True)

    def __init__(self, ctx: ConnectorContext) -> None:
        super().__init__(ctx)
        self.calls: list[tuple[str, ...]] = []

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def create_conversation(self, conversation: NewConversation) -> str:
        return "conv-1"

    async def send_message(self, conversation_id: str, message: OutboundMessage) -> str:
        self.calls.append(("send", conversation_id, message.text))
        return f"sent-{len(self.calls)}"

    async def get_user(self, idnps: Idnps) -> RemoteUser | None:
        return None


class Editing(Plain, EditHandling):
    """The same vendor, with edits."""

    type_name: ClassVar[str] = "editing"

    async def edit_message(
        self, conversation_id: str, message_id: str, message: OutboundMessage
    ) -> None:
        self.calls.append(("edit", conversation_id, message_id, message.text))


async def _refuse(event: Any) -> None:
    raise AssertionError("nothing is emitted here")


class _NoState:
    async def get(self, key: str) -> str | None:
        return None

    async def set(self, key: str, value: str) -> None:
        return None


def context(settings: BaseModel | None = None) -> ConnectorContext:
    return ConnectorContext(
        connector_id="pl",
        settings=settings or NoSettings(),
        emit=_refuse,
        store=_NoState(),
        public_base_url="http://bridge.example/connectors/pl",
    )


def add(cls: type[Connector], settings: BaseModel | None = None) -> Connector:
    """Register an instance the way the bridge does."""
    return ConnectorSet().add(
        ConnectorSpec("pl", cls, settings or NoSettings()),
        emit=_refuse,
        emit_all=_refuse,  # type: ignore[arg-type]
        store=_NoState(),
        public_base_url="http://bridge.example/connectors/pl",
    )


# --- The flags follow the classes ---------------------------------------------------------------


def test_a_connector_advertises_exactly_the_operations_it_implements() -> None:
    assert Editing.capabilities.edits and not Plain.capabilities.edits
    assert Editing.capabilities.replies, "what it declared itself stays"
    assert isinstance(add(Editing), EditHandling)
    assert not isinstance(add(Plain), EditHandling)
    assert not hasattr(add(Plain), "edit_message"), "the base class has no optional method"
    # The shipped types: PandaLab does everything, Medipeps some.
    for flag, protocol in OPERATION_PROTOCOLS.items():
        assert getattr(PandaLabConnector.capabilities, flag) is True
        assert issubclass(PandaLabConnector, protocol)
    medipeps = {f for f, p in OPERATION_PROTOCOLS.items() if issubclass(MedipepsConnector, p)}
    assert medipeps == {
        "deletions",
        "read_receipts",
        "delivery_status",
        "add_participants",
        "titles",
        "history",
        "user_listing",
    }, "Medipeps users cannot be removed by others, and Medipeps has no topics"
    assert {f for f in OPERATION_PROTOCOLS if getattr(MedipepsConnector.capabilities, f)} == (
        medipeps
    )
    assert issubclass(PandaLabConnector, AttachmentSource)
    assert issubclass(MedipepsConnector, AttachmentSource)


def test_a_webhook_instance_implements_what_its_vendor_declared() -> None:
    settings = WebhookConnector.Settings.model_validate(
        {
            "base_url": "http://vendor.example",
            "secret": "s" * 32,
            "capabilities": {
                "edits": True,
                "read_receipts": True,
                "formatting": "markdown",
                "add_participants": True,
                "history": True,
            },
        }
    )
    connector = add(WebhookConnector, settings)
    assert isinstance(connector, WebhookConnector)
    assert type(connector).__name__ == "WebhookConnector"
    assert isinstance(connector, EditHandling) and isinstance(connector, ReadReceiptHandling)
    assert isinstance(connector, ParticipantAdding) and isinstance(connector, HistorySource)
    for protocol in (
        DeletionHandling,
        ReactionHandling,
        TypingHandling,
        DeliveryStatusHandling,
        MemberRemoval,
        TitleHandling,
        TopicHandling,
    ):
        assert not isinstance(connector, protocol)
    caps = connector.capabilities
    assert caps.edits and caps.read_receipts and caps.formatting == "markdown"
    assert caps.add_participants and caps.history
    assert not (caps.deletions or caps.reactions or caps.typing or caps.delivery_status)
    assert not (caps.remove_participants or caps.titles or caps.topics)
    assert capability_mismatch(connector) is None

    everything = add(
        WebhookConnector,
        WebhookConnector.Settings.model_validate(
            {
                "base_url": "http://vendor.example",
                "capabilities": {f: True for f in OPERATION_PROTOCOLS if f != "user_listing"},
            }
        ),
    )
    for flag, protocol in OPERATION_PROTOCOLS.items():
        assert isinstance(everything, protocol) and getattr(everything.capabilities, flag)
    assert capability_mismatch(everything) is None

    bare = add(
        WebhookConnector,
        WebhookConnector.Settings.model_validate({"base_url": "http://vendor.example"}),
    )
    assert not isinstance(bare, EditHandling) and not bare.capabilities.edits
    assert bare.capabilities.user_listing, "every webhook vendor has GET /users (404: none)"
    assert WebhookConnector.capabilities == Capabilities(user_listing=True)


def test_a_held_connector_can_be_asked_what_the_real_type_can() -> None:
    held = HeldConnector("pl", PandaLabConnector, "is disabled")
    assert held.capabilities == PandaLabConnector.capabilities
    for protocol in OPERATION_PROTOCOLS.values():
        assert isinstance(held, protocol)
    held = HeldConnector("mp", MedipepsConnector, "is disabled")
    assert held.capabilities == MedipepsConnector.capabilities
    assert isinstance(held, DeletionHandling) and not isinstance(held, EditHandling)
    assert isinstance(held, HeldConnector)


# --- Flags that disagree are refused -----------------------------------------------------------


def test_a_class_declaring_a_flag_without_its_class_cannot_be_defined() -> None:
    with pytest.raises(CapabilityMismatch) as refused:

        class Liar(Plain):
            capabilities: ClassVar[Capabilities] = Capabilities(edits=True)

    message = str(refused.value)
    assert "declares edits=True but does not implement EditHandling (edit_message)" in message


LIAR_MODULE = """
from connectors.base import Capabilities, Connector


class Liar(Connector):
    type_name = "liar"
    capabilities = Capabilities(reactions=True)

    async def start(self): ...
    async def stop(self): ...
    async def create_conversation(self, conversation): ...
    async def send_message(self, conversation_id, message): ...
    async def get_user(self, idnps): ...
"""
"""A third-party package whose connector declares reactions without implementing them."""


def _entry_points(monkeypatch: pytest.MonkeyPatch, module: Any, group: str, *eps: EntryPoint):
    def entry_points(**kwargs: Any) -> list[EntryPoint]:
        assert kwargs == {"group": group}
        return list(eps)

    monkeypatch.setattr(module, "entry_points", entry_points)


def test_a_type_declaring_a_flag_without_its_class_is_refused_at_registration(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "liar_connector.py").write_text(LIAR_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    group = registry.ENTRY_POINT_GROUP
    liar = EntryPoint(name="liar", value="liar_connector:Liar", group=group)
    _entry_points(monkeypatch, registry, group, liar)
    with pytest.raises(ConfigError) as refused:
        available_types()
    assert str(refused.value) == (
        "connector type 'liar' refused: connector Liar declares reactions=True but does not "
        "implement ReactionHandling (add_reaction, remove_reaction): inherit it and implement "
        "its methods, or drop the flag"
    )


class Patched(Plain):
    """Flags changed after the class was defined: the registry still sees the mismatch."""

    type_name: ClassVar[str] = "patched"


def test_a_type_whose_flags_were_changed_afterwards_is_refused_at_registration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Patched, "capabilities", replace(Plain.capabilities, typing=True))
    group = registry.ENTRY_POINT_GROUP
    patched = EntryPoint(name="patched", value=f"{__name__}:Patched", group=group)
    _entry_points(monkeypatch, registry, group, patched)
    with pytest.raises(
        ConfigError,
        match="'patched' refused: .*advertises typing but does not "
        r"implement TypingHandling \(set_typing\)",
    ):
        available_types()

    monkeypatch.setattr(Patched, "capabilities", Plain.capabilities)
    assert available_types() == {"patched": Patched}


class Boasting(Plain):
    """An instance that sets its own flags (as a webhook vendor's do) beyond its classes."""

    def __init__(self, ctx: ConnectorContext) -> None:
        super().__init__(ctx)
        self.capabilities = Capabilities(delivery_status=True)  # type: ignore[misc]


class Hiding(Editing):
    """An instance that hides an operation it implements: the bridge would degrade edits it
    could make, and its class says otherwise."""

    def __init__(self, ctx: ConnectorContext) -> None:
        super().__init__(ctx)
        self.capabilities = Capabilities()  # type: ignore[misc]


def test_an_instance_whose_flags_disagree_with_its_classes_is_refused() -> None:
    with pytest.raises(ConfigError) as refused:
        add(Boasting)
    assert str(refused.value) == (
        "connectors.pl: connector Boasting advertises delivery_status but does not implement "
        "DeliveryStatusHandling (report_delivery)"
    )
    with pytest.raises(
        ConfigError, match="Hiding implements EditHandling but does not advertise edits"
    ):
        add(Hiding)


# --- The bridge asks only what a connector implements --------------------------------------------


@pytest.fixture
async def stores(db: Database) -> Stores:
    return Stores.of(db)


class Statuses:
    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []

    async def report(self, **kwargs: Any) -> None:
        self.reports.append(kwargs)


async def edit_through_delivery(
    stores: Stores, connector: Connector
) -> tuple[str, list[dict[str, Any]]]:
    """Deliver a correction of a delivered message to ``connector``: the audit outcome and the
    send statuses."""
    await stores.portals.create(Portal(ROOM, None, False, VOICE))
    await stores.portals.add_link(ROOM, "pl", "conv-1")
    await stores.messages.add("pl", "m-1", ROOM, "$original")
    statuses = Statuses()
    delivery = Delivery(
        stores,
        None,  # type: ignore[arg-type]
        {"pl": connector},  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        MediaConfig(),
        statuses,  # type: ignore[arg-type]
    )
    sender = {"mxid": CAROL, "display_name": "Carol", "connector": None, "idnps": None}
    payload = {
        "sender": sender,
        "event_id": "$edit",
        "target_event": "$original",
        "content": {"msgtype": "m.text", "body": "corrigé"},
    }
    await stores.outbox.enqueue("pl", ROOM, op.EDIT_MESSAGE, "edit-$edit", payload)
    [item] = await stores.outbox.pending(0, 10)
    await delivery.handle(item)
    assert not await stores.outbox.pending(0, 10)
    [row] = [r for r in await stores.audit.query(portal=ROOM) if r.event_id == "$edit"]
    return f"{row.outcome}:{row.detail}", statuses.reports


async def test_a_connector_implementing_edits_is_asked_for_them(stores: Stores) -> None:
    connector = add(Editing)
    outcome, reports = await edit_through_delivery(stores, connector)
    assert connector.calls == [("edit", "conv-1", "m-1", "corrigé")]  # type: ignore[attr-defined]
    assert outcome == "delivered:None"
    assert reports == []


async def test_a_connector_without_edits_is_never_asked_and_gets_a_correction(
    stores: Stores,
) -> None:
    connector = add(Plain)
    outcome, reports = await edit_through_delivery(stores, connector)
    # A marked correction, answering the original (the vendor shows replies).
    assert connector.calls == [("send", "conv-1", "✏️ Correction : corrigé")]  # type: ignore[attr-defined]
    assert outcome == "delivered:degraded"
    [status] = reports
    assert status["outcome"] == "SUCCESS"
    assert (
        "pl ne permet pas de modifier un message : envoyé comme une correction signalée"
        in status["detail"]
    )
    assert await stores.messages.remotes_for("pl", "$edit", room_id=ROOM) == ["sent-1"]


# --- Sandboxes: their own entry-point group -------------------------------------------------------


def test_the_sandbox_loader_finds_the_three_shipped_sandboxes() -> None:
    """Through the installed metadata (after ``pip install -e .``)."""
    found = vendor_sandboxes()
    assert {"pandalab", "medipeps", "webhook"} <= set(found)
    types = available_types()
    for name in ("pandalab", "medipeps", "webhook"):
        sandbox = vendor_sandbox(name)
        assert sandbox is found[name]
        types[name].Settings.model_validate(sandbox.settings("http://127.0.0.1:1"))
        assert isinstance(sandbox.app(), web.Application)
    assert vendor_sandbox("pandalab") is PANDALAB_SANDBOX


def test_the_sandbox_loader_reads_its_own_group(monkeypatch: pytest.MonkeyPatch) -> None:
    acme = EntryPoint("acme", "connectors.pandalab.sandbox_entry:SANDBOX", SANDBOXES_GROUP)
    _entry_points(monkeypatch, sandboxes, SANDBOXES_GROUP, acme)
    assert vendor_sandboxes() == {"acme": PANDALAB_SANDBOX}
    assert vendor_sandbox("acme") is PANDALAB_SANDBOX
    with pytest.raises(NoSandbox, match="for connector type 'pandalab'; installed: acme"):
        vendor_sandbox("pandalab")

    wrong = EntryPoint("wrong", "connectors.pandalab:PandaLabConnector", SANDBOXES_GROUP)
    _entry_points(monkeypatch, sandboxes, SANDBOXES_GROUP, wrong)
    with pytest.raises(TypeError, match="'wrong' of eimis_bridge.sandboxes is not a VendorSandbox"):
        vendor_sandboxes()


def test_sandboxes_are_not_part_of_the_production_contract() -> None:
    for name in ("sandbox_app", "sandbox_settings"):
        assert not hasattr(Connector, name)
        assert not hasattr(PandaLabConnector, name)
    assert isinstance(PANDALAB_SANDBOX, VendorSandbox)


def test_the_contract_exposes_the_identifier_type() -> None:
    import connectors.base as contract
    from connectors.idnps import Idnps as Original
    from connectors.idnps import InvalidIdnps as OriginalInvalid

    assert contract.Idnps is Original and contract.InvalidIdnps is OriginalInvalid
    with pytest.raises(contract.InvalidIdnps):
        contract.Idnps("123")


def test_a_file_from_a_connector_that_cannot_fetch_files_is_refused_with_a_reason() -> None:
    """A connector emitting a file without implementing ``AttachmentSource`` gets a refusal
    its sender is told of (not an AttributeError in the conversation's lane)."""
    from bridge.core.to_matrix import file_refusal

    pdf = RemoteAttachment("bilan.pdf", "application/pdf", 10, "src")
    media = MediaConfig()
    assert not isinstance(Plain(context()), AttachmentSource)
    refusal = file_refusal(Plain(context()), pdf, media)
    assert refusal == (
        "le connecteur de cet éditeur ne sait pas récupérer ses fichiers",
        "no_attachment_source",
    )
    assert file_refusal(MedipepsConnector.__new__(MedipepsConnector), pdf, media) is None
    huge = RemoteAttachment("scan.pdf", "application/pdf", media.max_file_size + 1, "src")
    assert file_refusal(MedipepsConnector.__new__(MedipepsConnector), huge, media) == (
        "le fichier dépasse la taille acceptée dans cet espace "
        f"({media.max_file_size // 2**20} Mio)",
        "too_large",
    )
