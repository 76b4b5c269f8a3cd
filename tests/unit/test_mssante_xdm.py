"""IHE_XDM.zip: safe reading (limits, traversal, zip bombs, XML attacks), ebRIM metadata, the
French summary, and the fixture builder used by the tests and the demo."""

from __future__ import annotations

import io
import logging
import zipfile

import pytest

from connectors.mssante.xdm import (
    XdmRefused,
    is_xdm_filename,
    parse_metadata,
    read_entries,
    read_xdm,
    summary_fr,
)
from connectors.mssante.xdm_build import TEST_INS_OID, FixtureDocument, build_xdm, metadata_xml

INS = "279035121518989"
DOCS = [
    FixtureDocument("DOC0001.PDF", "CR de biologie", b"%PDF-1.4 biologie"),
    FixtureDocument(
        "DOC0002.XML",
        "CDA du compte rendu",
        b"<ClinicalDocument/>",
        mime_type="text/xml",
        creation_time="20240302",
        type_display="Compte rendu opératoire",
    ),
]


def zip_of(entries: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_a_package_is_read_with_its_documents_patient_and_author() -> None:
    meta = read_xdm(build_xdm(DOCS, patient_id=INS))
    assert [(d.title, d.mime_type, d.uri, d.data) for d in meta.documents] == [
        ("CR de biologie", "application/pdf", "DOC0001.PDF", b"%PDF-1.4 biologie"),
        ("CDA du compte rendu", "text/xml", "DOC0002.XML", b"<ClinicalDocument/>"),
    ]
    first = meta.documents[0]
    assert first.creation_time == "20240115103000"
    assert (first.class_display, first.type_display) == ("Compte rendu", "CR d'examens biologiques")
    assert meta.patient is not None
    assert (meta.patient.value, meta.patient.oid) == (INS, TEST_INS_OID)
    assert meta.author == "Claire MARTIN"


def test_the_ins_never_shows_in_reprs_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    meta = read_xdm(build_xdm(DOCS, patient_id=INS))
    logging.getLogger("test").warning("read %r / %s / %r", meta, meta.patient, meta.patient)
    assert INS not in repr(meta) and INS not in str(meta.patient) and INS not in caplog.text


def test_the_metadata_path_is_found_in_any_case() -> None:
    meta = read_xdm(build_xdm(DOCS, metadata_name="ihe_xdm/subset01/metadata.xml"))
    assert len(meta.documents) == 2


def test_summary_fr_is_readable_and_names_the_ins() -> None:
    summary = summary_fr(read_xdm(build_xdm(DOCS, patient_id=INS)))
    assert summary == (
        "Documents médicaux (2) : CR de biologie (CR d'examens biologiques), du 15/01/2024 ; "
        "CDA du compte rendu (Compte rendu opératoire), du 02/03/2024\n"
        f"Patient : INS-NIR (test) {INS} (OID {TEST_INS_OID})\n"
        "Auteur : Claire MARTIN"
    )


def test_is_xdm_filename() -> None:
    assert is_xdm_filename("IHE_XDM.zip") and is_xdm_filename("ihe_xdm.ZIP")
    assert not is_xdm_filename("other.zip")


@pytest.mark.parametrize(
    "entries, reason",
    [
        ({"../evil.txt": b"x"}, "'..' path"),
        ({"IHE_XDM/../../evil": b"x"}, "'..' path"),
        ({"/etc/passwd": b"x"}, "absolute path"),
        ({"C:/windows/x": b"x"}, "absolute path"),
        ({"a\\..\\b": b"x"}, "'..' path"),
        ({f"f{n}.txt": b"x" for n in range(101)}, "101 entries"),
        ({"bomb.bin": b"\x00" * (5 * 1024 * 1024)}, "compression ratio"),
        ({"README.TXT": b"no metadata"}, "no IHE_XDM/SUBSET01/METADATA.XML"),
    ],
)
def test_unsafe_or_incomplete_zips_are_refused(entries: dict[str, bytes], reason: str) -> None:
    with pytest.raises(XdmRefused, match=reason.replace("(", r"\(").replace(".", r"\.")):
        read_xdm(zip_of(entries))


def test_sizes_over_the_limits_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import connectors.mssante.xdm as xdm

    random_ish = bytes((n * 7919) % 251 for n in range(300_000))  # barely compressible
    monkeypatch.setattr(xdm, "MAX_ENTRY_BYTES", 200_000)
    with pytest.raises(XdmRefused, match="20 MB"):
        read_entries(zip_of({"big.bin": random_ish}, zipfile.ZIP_STORED))
    monkeypatch.setattr(xdm, "MAX_ENTRY_BYTES", 20 * 1024 * 1024)
    monkeypatch.setattr(xdm, "MAX_TOTAL_BYTES", 500_000)
    with pytest.raises(XdmRefused, match="50 MB"):
        read_entries(zip_of({"a.bin": random_ish, "b.bin": random_ish}, zipfile.ZIP_STORED))


def test_not_a_zip_is_refused() -> None:
    with pytest.raises(XdmRefused, match="not a readable zip"):
        read_xdm(b"PK\x03\x04 definitely not")


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>
<SubmitObjectsRequest>&lol2;</SubmitObjectsRequest>"""
XXE = b"""<?xml version="1.0"?>
<!DOCTYPE x [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><x>&xxe;</x>"""


@pytest.mark.parametrize("xml", [BILLION_LAUGHS, XXE])
def test_entities_and_dtds_in_the_metadata_are_refused(xml: bytes) -> None:
    with pytest.raises(XdmRefused, match="DTD or entities"):
        read_xdm(zip_of({"IHE_XDM/SUBSET01/METADATA.XML": xml}))


def test_broken_xml_is_refused() -> None:
    with pytest.raises(XdmRefused, match="not well-formed"):
        parse_metadata(b"<SubmitObjectsRequest><oops>")


def test_a_document_uri_that_escapes_the_subset_has_no_data() -> None:
    xml = metadata_xml([FixtureDocument("../../README.TXT", "x", b"")], INS)
    meta = parse_metadata(xml, {"README.TXT": b"readme"})
    assert meta.documents[0].data is None


def test_metadata_without_documents_or_patient() -> None:
    xml = b'<lcm:SubmitObjectsRequest xmlns:lcm="urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0"/>'
    meta = parse_metadata(xml)
    assert meta.documents == () and meta.patient is None and meta.author is None
    assert summary_fr(meta) == "Documents médicaux (0) : aucun"
