"""Build small ``IHE_XDM.zip`` packages: for tests and the demo (no sample files are stored).

The layout is IHE ITI XDM's: ``README.TXT``, ``INDEX.HTM``, ``IHE_XDM/SUBSET01/METADATA.XML``
(an ebRIM SubmitObjectsRequest) and the documents next to it. Use the test INS OID
(``1.2.250.1.213.1.4.10``) for made-up patients.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from xml.sax.saxutils import escape, quoteattr

from connectors.mssante.xdm import (
    CLASS_CODE,
    DOC_AUTHOR,
    DOC_PATIENT_ID,
    RIM,
    SET_PATIENT_ID,
    TYPE_CODE,
)

TEST_INS_OID = "1.2.250.1.213.1.4.10"


@dataclass(frozen=True)
class FixtureDocument:
    filename: str
    title: str
    data: bytes = field(repr=False)
    mime_type: str = "application/pdf"
    creation_time: str = "20240115103000"
    class_display: str = "Compte rendu"
    type_display: str = "CR d'examens biologiques"


def metadata_xml(
    documents: Sequence[FixtureDocument],
    patient_id: str,
    patient_oid: str = TEST_INS_OID,
    author: str = "810000001916^MARTIN^Claire",
) -> bytes:
    pid = quoteattr(f"{patient_id}^^^&{patient_oid}&ISO")
    objects = []
    for n, doc in enumerate(documents, 1):
        objects.append(f"""
  <rim:ExtrinsicObject id="Document{n:02d}" mimeType={quoteattr(doc.mime_type)}
      objectType="urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1">
    <rim:Slot name="creationTime"><rim:ValueList><rim:Value>{escape(doc.creation_time)}</rim:Value>
    </rim:ValueList></rim:Slot>
    <rim:Slot name="URI"><rim:ValueList><rim:Value>{escape(doc.filename)}</rim:Value>
    </rim:ValueList>
    </rim:Slot>
    <rim:Name><rim:LocalizedString value={quoteattr(doc.title)}/></rim:Name>
    <rim:Classification classificationScheme="{DOC_AUTHOR}" classifiedObject="Document{n:02d}"
        nodeRepresentation="">
      <rim:Slot name="authorPerson"><rim:ValueList><rim:Value>{escape(author)}</rim:Value>
      </rim:ValueList></rim:Slot>
    </rim:Classification>
    <rim:Classification classificationScheme="{CLASS_CODE}" classifiedObject="Document{n:02d}"
        nodeRepresentation="10">
      <rim:Name><rim:LocalizedString value={quoteattr(doc.class_display)}/></rim:Name>
    </rim:Classification>
    <rim:Classification classificationScheme="{TYPE_CODE}" classifiedObject="Document{n:02d}"
        nodeRepresentation="11502-2">
      <rim:Name><rim:LocalizedString value={quoteattr(doc.type_display)}/></rim:Name>
    </rim:Classification>
    <rim:ExternalIdentifier identificationScheme="{DOC_PATIENT_ID}" value={pid}
        registryObject="Document{n:02d}"/>
  </rim:ExtrinsicObject>""")
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<lcm:SubmitObjectsRequest xmlns:lcm="urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0"
    xmlns:rim="{RIM}">
 <rim:RegistryObjectList>{"".join(objects)}
  <rim:RegistryPackage id="SubmissionSet01">
    <rim:ExternalIdentifier identificationScheme="{SET_PATIENT_ID}" value={pid}
        registryObject="SubmissionSet01"/>
  </rim:RegistryPackage>
 </rim:RegistryObjectList>
</lcm:SubmitObjectsRequest>
""".encode()


def build_xdm(
    documents: Sequence[FixtureDocument],
    patient_id: str = "279035121518989",
    patient_oid: str = TEST_INS_OID,
    author: str = "810000001916^MARTIN^Claire",
    metadata_name: str = "IHE_XDM/SUBSET01/METADATA.XML",
) -> bytes:
    """An ``IHE_XDM.zip`` holding ``documents`` (the patient id is a made-up test INS)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("README.TXT", "Paquet IHE XDM de test\r\n")
        archive.writestr("INDEX.HTM", "<html><body>IHE XDM</body></html>")
        archive.writestr(metadata_name, metadata_xml(documents, patient_id, patient_oid, author))
        for doc in documents:
            archive.writestr(f"IHE_XDM/SUBSET01/{doc.filename}", doc.data)
    return buffer.getvalue()
