"""The ``IHE_XDM.zip`` package of MSSanté mails, read safely.

``read_xdm(data)`` opens the zip with hard limits (at most 100 entries, each at most 20 MB
uncompressed, 50 MB in all, a compression ratio of at most 100, no absolute or ``..`` path) and
refuses anything else with a clear reason (``XdmRefused``): sizes are checked as declared AND
while reading, so a zip that lies about its sizes is caught too. It finds
``IHE_XDM/SUBSET01/METADATA.XML`` (any case) and parses that ebRIM SubmitObjectsRequest with
``defusedxml`` (no entity expansion, no external entities or DTD retrieval: a "billion laughs"
or XXE metadata is refused): the documents (title, MIME type, URI in the zip and its bytes,
creation time, class and type code display names), the patient's INS (``patientId`` with its
OID) and the author.

The INS identifies the patient: it may be written in the message to the professional (it is
what they need to file the documents), but never in logs, room names or display names; its
``repr`` hides it so that a stray log line cannot show it.
"""

from __future__ import annotations

import io
import posixpath
import zipfile
from dataclasses import dataclass, field
from xml.etree.ElementTree import Element

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

MAX_ENTRIES = 100
MAX_ENTRY_BYTES = 20 * 1024 * 1024
MAX_TOTAL_BYTES = 50 * 1024 * 1024
MAX_RATIO = 100
METADATA_PATH = "IHE_XDM/SUBSET01/METADATA.XML"
XDM_FILENAME = "IHE_XDM.zip"

RIM = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"
# XDS scheme ids (IHE ITI TF-3 4.2.5)
CLASS_CODE = "urn:uuid:41a5887f-8865-4c09-adf7-e362475b143a"
TYPE_CODE = "urn:uuid:f0306f51-975f-434e-a61c-c59651d33983"
DOC_AUTHOR = "urn:uuid:93606bcf-9494-43ec-9b4e-a7748d1a838d"
DOC_PATIENT_ID = "urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427"
SET_PATIENT_ID = "urn:uuid:6b5aea1a-874d-4603-a4bc-96a0a7b38446"
INS_OIDS = {
    "1.2.250.1.213.1.4.8": "INS-NIR",
    "1.2.250.1.213.1.4.9": "INS-NIA",
    "1.2.250.1.213.1.4.10": "INS-NIR (test)",
    "1.2.250.1.213.1.4.11": "INS-NIA (test)",
}


class XdmRefused(Exception):
    """The package is not read; ``str()`` says why (no content, no identifier)."""


def is_xdm_filename(name: str) -> bool:
    return name.strip().lower() == XDM_FILENAME.lower()


@dataclass(frozen=True)
class PatientId:
    value: str = field(repr=False)
    oid: str

    @property
    def kind(self) -> str:
        return INS_OIDS.get(self.oid, "identifiant")

    def __repr__(self) -> str:
        return f"PatientId(<hidden>, oid={self.oid})"

    def __str__(self) -> str:
        return "<INS hidden>"


@dataclass(frozen=True)
class XdmDocument:
    title: str
    mime_type: str
    uri: str
    creation_time: str | None
    class_display: str | None
    type_display: str | None
    data: bytes | None = field(default=None, repr=False)
    """The document's bytes from the zip (None when the URI names no entry)."""


@dataclass(frozen=True)
class XdmMetadata:
    documents: tuple[XdmDocument, ...]
    patient: PatientId | None
    author: str | None


def _safe_name(name: str) -> str:
    if "\x00" in name:
        raise XdmRefused("an entry name contains a NUL character")
    normal = name.replace("\\", "/")
    if normal.startswith("/") or (len(normal) > 1 and normal[1] == ":"):
        raise XdmRefused("an entry has an absolute path")
    if ".." in normal.split("/"):
        raise XdmRefused("an entry has a '..' path (traversal)")
    return posixpath.normpath(normal)


def read_entries(data: bytes) -> dict[str, bytes]:
    """The zip's files by (normalised) name, every limit enforced. Raises ``XdmRefused``."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError):
        raise XdmRefused("the attachment is not a readable zip file") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > MAX_ENTRIES:
            raise XdmRefused(f"the zip has {len(infos)} entries, over the {MAX_ENTRIES} accepted")
        declared_total = 0
        for info in infos:
            _safe_name(info.filename)
            if info.file_size > MAX_ENTRY_BYTES:
                raise XdmRefused("an entry is larger than 20 MB uncompressed")
            if info.file_size > MAX_RATIO * max(info.compress_size, 1) and info.file_size > 1024:
                raise XdmRefused("an entry's compression ratio is over 100 (zip bomb)")
            declared_total += info.file_size
        if declared_total > MAX_TOTAL_BYTES:
            raise XdmRefused("the zip is larger than 50 MB uncompressed")
        entries: dict[str, bytes] = {}
        total = 0
        for info in infos:
            if info.is_dir():
                continue
            name = _safe_name(info.filename)
            try:
                with archive.open(info) as handle:
                    content = handle.read(MAX_ENTRY_BYTES + 1)
            except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError, EOFError):
                raise XdmRefused("an entry cannot be read (corrupt or encrypted)") from None
            # The sizes read, not the sizes declared: a lying header is caught here.
            if len(content) > MAX_ENTRY_BYTES:
                raise XdmRefused("an entry is larger than 20 MB uncompressed")
            if len(content) > MAX_RATIO * max(info.compress_size, 1) and len(content) > 1024:
                raise XdmRefused("an entry's compression ratio is over 100 (zip bomb)")
            total += len(content)
            if total > MAX_TOTAL_BYTES:
                raise XdmRefused("the zip is larger than 50 MB uncompressed")
            entries[name] = content
        return entries


def _find(entries: dict[str, bytes], path: str) -> tuple[str, bytes] | None:
    wanted = path.lower()
    for name, content in entries.items():
        if name.lower() == wanted:
            return name, content
    return None


def _q(tag: str) -> str:
    return f"{{{RIM}}}{tag}"


def _localized(element: Element) -> str | None:
    node = element.find(f"{_q('Name')}/{_q('LocalizedString')}")
    value = node.get("value") if node is not None else None
    return value.strip() if value and value.strip() else None


def _slot(element: Element, name: str) -> list[str]:
    for slot in element.findall(_q("Slot")):
        if slot.get("name") == name:
            return [(v.text or "").strip() for v in slot.iter(_q("Value"))]
    return []


def _classification(element: Element, scheme: str) -> Element | None:
    for node in element.findall(_q("Classification")):
        if node.get("classificationScheme") == scheme:
            return node
    return None


def _patient(value: str) -> PatientId | None:
    """``id^^^&oid&ISO`` (HL7 CX) -> PatientId."""
    ident, _, authority = value.partition("^^^")
    parts = authority.split("&")
    oid = parts[1] if len(parts) > 1 else ""
    return PatientId(ident.strip(), oid.strip()) if ident.strip() else None


def _person(xcn: str) -> str | None:
    """An HL7 XCN (``id^FAMILY^Given^...``) as ``Given FAMILY``."""
    parts = xcn.split("^")
    family = parts[1].strip() if len(parts) > 1 else ""
    given = parts[2].strip() if len(parts) > 2 else ""
    name = " ".join(p for p in (given, family) if p)
    return name or (xcn.strip() or None)


def parse_metadata(xml: bytes, entries: dict[str, bytes] | None = None) -> XdmMetadata:
    """Parse METADATA.XML (ebRIM). ``entries`` (the zip's files) give each document's bytes."""
    try:
        root = SafeET.fromstring(xml, forbid_dtd=True)
    except DefusedXmlException:
        raise XdmRefused("METADATA.XML declares a DTD or entities (refused)") from None
    except SafeET.ParseError:
        raise XdmRefused("METADATA.XML is not well-formed XML") from None
    documents = []
    patient: PatientId | None = None
    author: str | None = None
    for obj in root.iter(_q("ExtrinsicObject")):
        uri = next(iter(_slot(obj, "URI")), "")
        creation = next(iter(_slot(obj, "creationTime")), None)
        klass = _classification(obj, CLASS_CODE)
        kind = _classification(obj, TYPE_CODE)
        data = None
        if entries is not None and uri:
            try:
                found = _find(entries, posixpath.join("IHE_XDM/SUBSET01", _safe_name(uri)))
            except XdmRefused:
                found = None
            data = found[1] if found else None
        documents.append(
            XdmDocument(
                title=_localized(obj) or uri or "document",
                mime_type=obj.get("mimeType") or "application/octet-stream",
                uri=uri,
                creation_time=creation or None,
                class_display=_localized(klass) if klass is not None else None,
                type_display=_localized(kind) if kind is not None else None,
                data=data,
            )
        )
        for ext in obj.findall(_q("ExternalIdentifier")):
            if patient is None and ext.get("identificationScheme") == DOC_PATIENT_ID:
                patient = _patient(ext.get("value") or "")
        node = _classification(obj, DOC_AUTHOR)
        if author is None and node is not None:
            author = next((p for p in map(_person, _slot(node, "authorPerson")) if p), None)
    if patient is None:
        for ext in root.iter(_q("ExternalIdentifier")):
            if ext.get("identificationScheme") == SET_PATIENT_ID:
                patient = _patient(ext.get("value") or "")
                break
    return XdmMetadata(tuple(documents), patient, author)


def read_xdm(data: bytes) -> XdmMetadata:
    """Read an ``IHE_XDM.zip``. Raises ``XdmRefused`` with the reason."""
    entries = read_entries(data)
    found = _find(entries, METADATA_PATH)
    if found is None:
        raise XdmRefused("the zip has no IHE_XDM/SUBSET01/METADATA.XML")
    return parse_metadata(found[1], entries)


def _date_fr(value: str | None) -> str | None:
    """An HL7 DTM (``YYYYMMDD[hhmm[ss]]``) as ``JJ/MM/AAAA``."""
    if not value or len(value) < 8 or not value[:8].isdigit():
        return None
    return f"{value[6:8]}/{value[4:6]}/{value[0:4]}"


def summary_fr(meta: XdmMetadata) -> str:
    """A readable French summary, for the message shown to the professional. It names the
    patient's INS (what the recipient needs): never log it or put it in a name."""
    items = []
    for doc in meta.documents:
        label = doc.title
        kind = doc.type_display or doc.class_display
        if kind and kind != doc.title:
            label = f"{label} ({kind})"
        date = _date_fr(doc.creation_time)
        if date:
            label = f"{label}, du {date}"
        items.append(label)
    lines = [f"Documents médicaux ({len(items)}) : " + (" ; ".join(items) or "aucun")]
    if meta.patient is not None:
        lines.append(f"Patient : {meta.patient.kind} {meta.patient.value} (OID {meta.patient.oid})")
    if meta.author:
        lines.append(f"Auteur : {meta.author}")
    return "\n".join(lines)
