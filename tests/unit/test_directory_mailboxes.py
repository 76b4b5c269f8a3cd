"""Professionals' secure mailboxes in the directory: the PS extract's mailbox columns and FHIR
``mailbox-mss`` telecoms (invalid addresses rejected with a reason), the store on both engines
(exact address, any case; several lines of one person; an address two people claim names no one),
erasure, ``directory show``, and the lookup a connector reaches through its context."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from pydantic import BaseModel

from bridge.cli import main
from bridge.config import DatabaseConfig
from bridge.core.connectors import ConnectorSet, ConnectorSpec
from bridge.db.database import open_database
from bridge.db.directory import PERSONAL_MAILBOX, Professional, Record
from bridge.db.erasure import ErasureStore
from bridge.db.stores import Stores
from bridge.directory import fhir, ps_libreacces
from bridge.directory.importer import import_file
from bridge.directory.lookup import StoreDirectoryLookup
from bridge.directory.records import Rejected, mailbox_address
from bridge.directory.sample import (
    HEADER,
    MAILBOX_COLUMNS,
    extract_line,
    mailbox_fields,
    rpps_idnps,
    write_extract,
)
from connectors.base import (
    Capabilities,
    Connector,
    ConnectorContext,
    Idnps,
    NewConversation,
    NoDirectory,
    OutboundMessage,
    RemoteUser,
)

DOMAIN = fhir.NATIONAL_MAILBOX_DOMAINS[0]
MARIE = "810099000019"
PAUL = rpps_idnps(7)
MARIE_BOX = f"Marie.Dupont@Medecin.{DOMAIN.upper()}"
EXTENSION = next(iter(fhir.MAILBOX_EXTENSIONS))


def ps_items(text: str) -> tuple[list[Record], list[Rejected]]:
    items = list(ps_libreacces.parse(io.StringIO(text)))
    return (
        [i for i in items if isinstance(i, Record)],
        [i for i in items if isinstance(i, Rejected)],
    )


# --- Addresses -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Marie.Dupont@Medecin.Example.FR", "Marie.Dupont@medecin.example.fr"),
        (" mailto:a+b@x.example ", "a+b@x.example"),
        ("a@localhost", None),  # one label: not a mail domain
        ("a b@x.example", None),
        ("a@@x.example", None),
        ("a..b@x.example", None),
        ("agnès@x.example", None),  # not ASCII
        ("a@-x.example", None),
        ("a@x.example\r\nBcc: b@y.example", None),  # header injection
        ("", None),
        ("x" * 65 + "@x.example", None),
        ("a@" + "x" * 250 + ".example", None),
    ],
)
def test_mailbox_addresses_are_normalised_or_refused_with_a_reason(
    value: str, expected: str | None
) -> None:
    address, reason = mailbox_address(value)

    assert address == expected
    assert bool(reason) == (expected is None)
    assert not value.strip() or value.strip() not in reason, "a reason never quotes the value"


# --- The PS extract ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "column",
    ["Adresse BAL", "Adresse BAL MSSanté", "ADRESSE BAL MSSANTE", "adresse  bal mssanté"],
)
def test_ps_mailbox_column_is_found_by_name_with_or_without_accents(column: str) -> None:
    line = extract_line(MARIE, "DUPONT", "MARIE", "10", "Médecin")
    (record,), rejected = ps_items(f"{HEADER}{column}|\n{line}{MARIE_BOX}|\n")

    assert rejected == []
    assert record.mailboxes == (f"Marie.Dupont@medecin.{DOMAIN}",)


def test_ps_keeps_personal_mailboxes_only_and_rejects_invalid_addresses_with_a_reason() -> None:
    def line(n: int, kind: str, address: str) -> str:
        idnps = rpps_idnps(n)
        return extract_line(idnps, "PETIT", "PAUL", "60", "Infirmier") + f"{kind}|{address}|"

    text = "\n".join(
        [
            HEADER + MAILBOX_COLUMNS,
            line(1, "PER", f"paul.petit@infirmier.{DOMAIN}; p.petit@x.example"),
            line(2, "ORG", f"secretariat@clinique.{DOMAIN}"),  # kept, without the mailbox
            line(3, "PER", "not an address"),
            line(4, "PER", ""),
            line(5, "per", f"leo@{DOMAIN}"),
        ]
    )

    records, rejected = ps_items(text + "\n")

    assert [(r.professional.idnps, r.mailboxes) for r in records] == [
        (rpps_idnps(1), (f"paul.petit@infirmier.{DOMAIN}", "p.petit@x.example")),
        (rpps_idnps(2), ()),
        (rpps_idnps(4), ()),
        (rpps_idnps(5), (f"leo@{DOMAIN}",)),
    ]
    (bad,) = rejected
    column = len(HEADER.split("|")) + 1  # the Adresse BAL column, counted from 1
    assert str(bad) == (
        f"line 4: column {column}, mailbox 1: not a mailbox address (local-part@domain)"
    )


def test_the_sample_extract_gives_some_people_a_mailbox(tmp_path: Path) -> None:
    path = tmp_path / "extract.txt"
    write_extract(path, 12, mailbox_every=4)
    with path.open("rb") as f:
        records = [i for i in ps_libreacces.parse(f) if isinstance(i, Record)]

    assert [bool(r.mailboxes) for r in records] == [n % 4 == 0 for n in range(1, 13)]
    assert all(m.endswith(f"@medecin.{DOMAIN}") for r in records for m in r.mailboxes)
    assert mailbox_fields(None) == "||"


# --- FHIR ----------------------------------------------------------------------------------------


def practitioner(rid: str, idnps: str, *telecom: dict[str, Any]) -> dict[str, Any]:
    return {
        "fullUrl": f"https://fhir.example/Practitioner/{rid}",
        "resource": {
            "resourceType": "Practitioner",
            "id": rid,
            "identifier": [{"system": fhir.IDNPS_SYSTEM, "value": idnps}],
            "name": [{"family": "DUPONT", "given": ["Marie"]}],
            "telecom": list(telecom),
        },
    }


def email(value: str, kind: str | None = None, marked: bool = False) -> dict[str, Any]:
    telecom: dict[str, Any] = {"system": "email", "value": value}
    if marked or kind:
        meta: dict[str, Any] = {"url": EXTENSION}
        if kind:
            meta["extension"] = [
                {"url": "type", "valueCodeableConcept": {"coding": [{"code": kind}]}}
            ]
        telecom["extension"] = [meta]
    return telecom


def fhir_items(
    *entries: dict[str, Any], domains: tuple[str, ...] = ()
) -> tuple[list[Record], list[Rejected]]:
    bundle = {"resourceType": "Bundle", "entry": list(entries)}
    items = list(fhir.parse_bundle(bundle, mailbox_domains=domains))
    return (
        [i for i in items if isinstance(i, Record)],
        [i for i in items if isinstance(i, Rejected)],
    )


def test_fhir_mailboxes_from_the_extension_the_national_domain_or_configured_domains() -> None:
    role = {
        "resource": {
            "resourceType": "PractitionerRole",
            "practitioner": {"reference": "Practitioner/p1"},
            "telecom": [email("m.dupont@hopital.example", "PER")],
        }
    }
    records, rejected = fhir_items(
        practitioner(
            "p1",
            MARIE,
            email(f"Marie.Dupont@MEDECIN.{DOMAIN}"),  # the national domain: no extension needed
            email("marie@gmail.example"),  # an ordinary e-mail: not a mailbox
            email("secretariat@hopital.example", "ORG"),  # an organisation's mailbox
            email("marie@apicrypt.example"),  # a configured secure-mail domain
            email("m@msg.other.example", marked=True),  # marked, no type
            {"system": "phone", "value": "0102030405"},
        ),
        role,
        domains=("apicrypt.example", "OTHER.example."),
    )

    assert rejected == []
    (record,) = records
    assert record.mailboxes == (
        f"Marie.Dupont@medecin.{DOMAIN}",
        "marie@apicrypt.example",
        "m@msg.other.example",
        "m.dupont@hopital.example",
    )


def test_fhir_invalid_mailbox_rejects_the_entry_with_a_reason() -> None:
    records, rejected = fhir_items(
        practitioner("p1", MARIE, email(f"marie dupont@{DOMAIN}")),
        practitioner("p2", PAUL, email("garbage", "PER")),
        practitioner("p3", rpps_idnps(8), email("not-a-mailbox@gmail.example")),
    )

    assert [r.professional.idnps for r in records] == [rpps_idnps(8)]
    assert [str(r) for r in rejected] == [
        "entry 1: Practitioner/p1: telecom 1: not a mailbox address (local-part@domain)",
        "entry 2: Practitioner/p2: telecom 1: not a mailbox address (local-part@domain)",
    ]


# --- The store, on SQLite and PostgreSQL ---------------------------------------------------------


@pytest.fixture
async def stores(database_url: str) -> AsyncIterator[Stores]:
    db = await open_database(DatabaseConfig(url=database_url))
    try:
        yield Stores.of(db)
    finally:
        await db.stop()


def ps_file(tmp_path: Path, *lines: tuple[str, str, str]) -> Path:
    path = tmp_path / "extract.txt"
    rows = [HEADER + MAILBOX_COLUMNS]
    for idnps, given, address in lines:
        rows.append(extract_line(idnps, "DUPONT", given, "10", "Médecin") + f"PER|{address}|")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


async def test_store_finds_the_professional_of_an_exact_address_whatever_its_case(
    stores: Stores, tmp_path: Path
) -> None:
    store = stores.directory
    extract = ps_file(
        tmp_path,
        (MARIE, "MARIE", MARIE_BOX),
        (MARIE, "MARIE", f"m.dupont@cab.{DOMAIN}"),  # a second line of the same person
        (PAUL, "PAUL", f"paul@cab.{DOMAIN}"),
    )

    report = await import_file(store, extract, progress=False)

    assert report.mailboxes == 3 and report.rejected == []
    found = await store.by_mailbox(f"marie.dupont@medecin.{DOMAIN}")
    assert found is not None and found.idnps == MARIE
    assert (await store.by_mailbox(f" MARIE.DUPONT@MEDECIN.{DOMAIN.upper()} ")).idnps == MARIE  # type: ignore[union-attr]
    assert await store.by_mailbox(f"marie.dupont@medecin.{DOMAIN}.evil.example") is None
    assert await store.by_mailbox(f"dupont@medecin.{DOMAIN}") is None
    assert await store.by_mailbox("%") is None and await store.by_mailbox("") is None
    assert [(m.address, m.kind, m.source) for m in await store.mailboxes(MARIE)] == [
        (f"m.dupont@cab.{DOMAIN}", PERSONAL_MAILBOX, "ps"),
        (f"Marie.Dupont@medecin.{DOMAIN}", PERSONAL_MAILBOX, "ps"),
    ]

    again = await import_file(store, extract, progress=False)

    assert (again.written, await store.count_mailboxes()) == (0, 3), "nothing doubled"


async def test_an_address_two_people_claim_names_no_one(stores: Stores, tmp_path: Path) -> None:
    store = stores.directory
    await import_file(
        store,
        ps_file(
            tmp_path, (MARIE, "MARIE", f"cabinet@{DOMAIN}"), (PAUL, "PAUL", f"CABINET@{DOMAIN}")
        ),
        progress=False,
    )

    assert await store.by_mailbox(f"cabinet@{DOMAIN}") is None


async def test_erasure_forgets_the_mailboxes(stores: Stores, tmp_path: Path) -> None:
    store = stores.directory
    await import_file(store, ps_file(tmp_path, (MARIE, "MARIE", MARIE_BOX)), progress=False)

    assert await ErasureStore(stores.db).erase_rows(MARIE) >= 2

    assert await store.mailboxes(MARIE) == []
    assert await store.by_mailbox(MARIE_BOX) is None
    assert await store.count_mailboxes() == 0


async def test_a_large_extract_with_mailboxes_imports_in_batches(
    stores: Stores, tmp_path: Path
) -> None:
    path = tmp_path / "big.txt"
    write_extract(path, 5_000, mailbox_every=4)

    report = await import_file(stores.directory, path, progress=False, batch=1_000)

    assert report.mailboxes == 1_250 == await stores.directory.count_mailboxes()
    assert (await stores.directory.by_mailbox(f"x@medecin.{DOMAIN}")) is None


# --- What a connector sees -----------------------------------------------------------------------


class _NoSettings(BaseModel):
    pass


class _Mail(Connector):
    type_name: ClassVar[str] = "mail"
    Settings: ClassVar[type[BaseModel]] = _NoSettings
    capabilities: ClassVar[Capabilities] = Capabilities()

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def create_conversation(self, conversation: NewConversation) -> str:
        return "c"

    async def send_message(self, conversation_id: str, message: OutboundMessage) -> str:
        return "m"

    async def get_user(self, idnps: Idnps) -> RemoteUser | None:
        return None


class _NoState:
    async def get(self, key: str) -> str | None:
        return None

    async def set(self, key: str, value: str) -> None:
        return None


async def _refuse(event: Any) -> None:
    raise AssertionError("nothing is emitted here")


async def test_a_connector_resolves_mailboxes_through_its_context(
    stores: Stores, tmp_path: Path
) -> None:
    await import_file(
        stores.directory, ps_file(tmp_path, (MARIE, "MARIE", MARIE_BOX)), progress=False
    )
    connector = ConnectorSet().add(
        ConnectorSpec("mail", _Mail, _NoSettings()),
        emit=_refuse,
        emit_all=_refuse,  # type: ignore[arg-type]
        store=_NoState(),
        public_base_url="http://bridge.example/connectors/mail",
        directory=StoreDirectoryLookup(stores.directory),
    )
    lookup = connector.ctx.directory

    idnps = await lookup.idnps_for_mailbox(f"MARIE.DUPONT@medecin.{DOMAIN}")

    assert idnps == MARIE and isinstance(idnps, Idnps)
    assert await lookup.idnps_for_mailbox("stranger@x.example") is None
    assert list(await lookup.mailboxes_of(Idnps(MARIE))) == [f"Marie.Dupont@medecin.{DOMAIN}"]
    assert list(await lookup.mailboxes_of(Idnps(PAUL))) == []
    user = await lookup.describe(Idnps(MARIE))
    assert user is not None and user.idnps == MARIE
    assert (user.given_name.upper(), user.family_name.upper()) == ("MARIE", "DUPONT")
    assert user.profession  # the label (or code) the extract gives
    assert await lookup.describe(Idnps(PAUL)) is None


async def test_a_context_without_a_directory_knows_no_one() -> None:
    ctx = ConnectorContext(
        connector_id="mail",
        settings=_NoSettings(),
        emit=_refuse,
        store=_NoState(),
        public_base_url="",
    )

    assert isinstance(ctx.directory, NoDirectory)
    assert await ctx.directory.idnps_for_mailbox(MARIE_BOX) is None
    assert list(await ctx.directory.mailboxes_of(Idnps(MARIE))) == []
    assert await ctx.directory.describe(Idnps(MARIE)) is None


# --- directory show ------------------------------------------------------------------------------


def test_directory_show_lists_the_mailboxes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = {
        "homeserver": {"url": "http://127.0.0.1:1", "domain": "eimis.localhost"},
        "appservice": {"address": "http://127.0.0.1:2", "as_token": "a", "hs_token": "h"},
        "database": {"url": f"sqlite:{tmp_path / 'bridge.db'}"},
        "connectors": {"pandalab": {"type": "pandalab", "settings": {}}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    extract = ps_file(tmp_path, (MARIE, "MARIE", MARIE_BOX))
    assert main(["directory", "import", "-c", str(path), str(extract)]) == 0
    assert "1 secure mailbox(es)" in capsys.readouterr().out

    assert main(["directory", "show", "-c", str(path), MARIE]) == 0

    out = capsys.readouterr().out
    assert f"Marie.Dupont@medecin.{DOMAIN}  (PER, from ps)" in out
    assert main(["directory", "show", "-c", str(path), PAUL]) == 1


def test_professional_record_defaults_to_no_mailbox() -> None:
    record = Record(Professional(MARIE, "Marie", "DUPONT", None, None, "ps"))

    assert record.mailboxes == ()
