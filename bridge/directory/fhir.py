"""FHIR R4 Bundles of ``Practitioner`` / ``PractitionerRole`` (the Annuaire Santé's API and
profiles: ``as-practitioner``, ``as-practitionerrole``), and fetching them from an endpoint.

From each Practitioner:

* the IDNPS: the identifier of system ``urn:oid:1.2.250.1.71.4.2.1`` (or typed ``IDNPS``); else
  ``8`` + the RPPS identifier (system ``https://rpps.esante.gouv.fr`` or typed ``RPPS``); else
  ``0`` + an ADELI one (typed ``ADELI``). Checked like every IDNPS;
* the name: the ``usual`` HumanName, else ``official``, else the first (family, given names);
* the profession: a coding of ``TRE_G15-ProfessionSante`` in the ``code`` of a PractitionerRole
  whose ``practitioner`` is this one, else in the Practitioner's ``qualification`` (the AS DP
  profile); the label is the coding's ``display``, else the code's well-known label;
* native Matrix IDs: the ``address`` of an ``Endpoint`` a role points at (TI-Messenger's way of
  publishing them), and ``matrix:u/...`` URIs in ``telecom``;
* personal secure mailboxes (the Annuaire Santé's ``mailbox-mss``): a ``telecom`` of system
  ``email`` of the Practitioner or its roles that carries the mailbox metadata extension
  (``as-mailbox-mss-metadata``, or its later name ``as-ext-mailbox-mss-metadata``; only type
  ``PER`` or no type), or whose address is in the national secure-mail domain or one of the
  configured ``mailbox_domains`` (a subdomain counts). An invalid address there rejects the
  entry; any other e-mail address is not a secure mailbox and is ignored.

The endpoint is read with the ``ESANTE-API-KEY`` header (the key is never logged), page after
page through the Bundles' ``next`` links. The key only goes to the configured base URL's origin
(scheme, host, port): a ``next`` link or a redirect elsewhere is refused, and each page is read
up to ``MAX_PAGE_BYTES``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any
from urllib.parse import urlencode

from aiohttp import ClientError, ClientSession, ClientTimeout

from bridge.db.directory import Professional
from bridge.directory.records import (
    DirectoryFormatError,
    Record,
    Rejected,
    mailbox_address,
    matrix_id,
)
from connectors.http import ResponseRefused, get_on_origin, read_capped, same_origin
from connectors.idnps import Idnps, InvalidIdnps

log = logging.getLogger("eimis.directory.fhir")

SOURCE = "fhir"
IDNPS_SYSTEM = "urn:oid:1.2.250.1.71.4.2.1"
RPPS_SYSTEMS = frozenset({"https://rpps.esante.gouv.fr", "http://rpps.fr"})
PROFESSION_SYSTEM = (
    "https://mos.esante.gouv.fr/NOS/TRE_G15-ProfessionSante/FHIR/TRE-G15-ProfessionSante"
)
API_KEY_HEADER = "ESANTE-API-KEY"
MAILBOX_EXTENSIONS = frozenset(
    {
        "https://interop.esante.gouv.fr/ig/fhir/annuaire/StructureDefinition/as-mailbox-mss-metadata",
        "https://interop.esante.gouv.fr/ig/fhir/annuaire/StructureDefinition/as-ext-mailbox-mss-metadata",
    }
)
"""The Annuaire Santé's mailbox metadata extension on a ContactPoint (its two published names)."""
NATIONAL_MAILBOX_DOMAINS = ("mssante.fr",)
"""The national secure-mail space's domain (an ANS address fact, like the URLs above): an
e-mail telecom under it is a secure mailbox even without the metadata extension."""
PERSONAL_MAILBOX = "PER"
MAX_PAGE_BYTES = 16 * 1024 * 1024
"""Longest Bundle page read (a page of 100 Practitioners with their roles is a few hundred KB);
a larger answer is refused, not read."""

# Labels of TRE_G15 codes, for a coding without a display.
PROFESSIONS = {
    "10": "Médecin",
    "21": "Pharmacien",
    "26": "Audioprothésiste",
    "40": "Chirurgien-Dentiste",
    "50": "Sage-Femme",
    "60": "Infirmier",
    "70": "Masseur-Kinésithérapeute",
    "80": "Pédicure-Podologue",
    "91": "Orthophoniste",
}


class FhirFetchError(Exception):
    """The FHIR endpoint could not be read; the message says why (never the key)."""


def _type_codes(identifier: dict[str, Any]) -> set[str]:
    codings = (identifier.get("type") or {}).get("coding") or []
    return {str(c.get("code", "")).upper() for c in codings if isinstance(c, dict)}


def _idnps(practitioner: dict[str, Any]) -> str | None:
    """The raw IDNPS of a Practitioner (unchecked), or None when it has no usable identifier."""
    identifiers = [i for i in practitioner.get("identifier") or [] if isinstance(i, dict)]
    for identifier in identifiers:
        types = _type_codes(identifier)
        if "IDNPS" in types or (identifier.get("system") == IDNPS_SYSTEM and not types):
            return str(identifier.get("value", ""))
    for identifier in identifiers:
        if identifier.get("system") in RPPS_SYSTEMS or "RPPS" in _type_codes(identifier):
            return "8" + str(identifier.get("value", ""))
    for identifier in identifiers:
        if "ADELI" in _type_codes(identifier):
            return "0" + str(identifier.get("value", ""))
    return None


def _name(practitioner: dict[str, Any]) -> tuple[str, str]:
    names = [n for n in practitioner.get("name") or [] if isinstance(n, dict)]
    for use in ("usual", "official", None):
        for name in names:
            if use is None or name.get("use") == use:
                given = " ".join(str(g).strip() for g in name.get("given") or [] if g)
                return given, str(name.get("family") or "").strip()
    return "", ""


def _profession(concepts: Sequence[Any]) -> tuple[str, str | None] | None:
    for concept in concepts:
        if not isinstance(concept, dict):
            continue
        for coding in concept.get("coding") or []:
            if isinstance(coding, dict) and coding.get("system") == PROFESSION_SYSTEM:
                code = str(coding.get("code") or "").strip()
                if code:
                    label = str(coding.get("display") or "").strip() or PROFESSIONS.get(code)
                    return code, label
    return None


def _telecom_mxids(resource: dict[str, Any]) -> list[str]:
    found = []
    for telecom in resource.get("telecom") or []:
        value = str((telecom or {}).get("value") or "") if isinstance(telecom, dict) else ""
        if value.startswith("matrix:"):
            mxid = matrix_id(value)
            if mxid:
                found.append(mxid)
    return found


def _mailbox_type(extension: dict[str, Any]) -> str | None:
    """The ``type`` code of a mailbox metadata extension (None: not given)."""
    for sub in extension.get("extension") or []:
        if isinstance(sub, dict) and sub.get("url") == "type":
            for coding in (sub.get("valueCodeableConcept") or {}).get("coding") or []:
                if isinstance(coding, dict) and coding.get("code"):
                    return str(coding["code"]).strip().upper()
    return None


def _in_domains(value: str, domains: Sequence[str]) -> bool:
    domain = value.rpartition("@")[2].strip().lower()
    return any(domain == d or domain.endswith("." + d) for d in domains)


def _telecom_mailboxes(
    resource: dict[str, Any], domains: Sequence[str]
) -> tuple[list[str], str | None]:
    """The personal secure mailboxes in a resource's ``telecom``, or why one is refused."""
    found: list[str] = []
    for index, telecom in enumerate(resource.get("telecom") or [], start=1):
        if not isinstance(telecom, dict) or telecom.get("system") != "email":
            continue
        value = telecom.get("value")
        value = value if isinstance(value, str) else ""
        marks = [
            e
            for e in telecom.get("extension") or []
            if isinstance(e, dict) and e.get("url") in MAILBOX_EXTENSIONS
        ]
        if marks:
            if any(_mailbox_type(m) not in (None, PERSONAL_MAILBOX) for m in marks):
                continue  # an organisation's, an application's or a practice's mailbox
        elif not _in_domains(value, domains):
            continue  # an ordinary e-mail address
        address, reason = mailbox_address(value)
        if address is None:
            return [], f"telecom {index}: {reason}"
        found.append(address)
    return found, None


def parse_bundle(
    bundle: Any,
    *,
    foreign_mxid: Callable[[str], str | None] | None = None,
    mailbox_domains: Sequence[str] = (),
) -> Iterator[Record | Rejected]:
    """Records and rejections (numbered by Bundle entry, from 1) of one Bundle.

    ``mailbox_domains``: secure-mail domains besides the national one (an e-mail telecom in
    one of them, or a subdomain, is a secure mailbox)."""
    domains = tuple(
        dict.fromkeys(
            d.strip(" .").lower()
            for d in (*NATIONAL_MAILBOX_DOMAINS, *mailbox_domains)
            if d.strip(" .")
        )
    )
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        # What it is instead is never quoted: the document may be anything.
        what = "its resourceType is not 'Bundle'" if isinstance(bundle, dict) else "not an object"
        raise DirectoryFormatError(f"not a FHIR Bundle ({what})")
    entries = [e for e in bundle.get("entry") or [] if isinstance(e, dict)]
    resources: dict[str, dict[str, Any]] = {}
    roles: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        resource = entry.get("resource")
        if not isinstance(resource, dict):
            continue
        kind, rid = resource.get("resourceType"), resource.get("id")
        keys = [entry.get("fullUrl")] + ([f"{kind}/{rid}"] if rid else [])
        for key in keys:
            if key:
                resources[str(key)] = resource
    for entry in entries:
        resource = entry.get("resource") or {}
        if resource.get("resourceType") == "PractitionerRole" and resource.get("active", True):
            ref = str((resource.get("practitioner") or {}).get("reference") or "")
            target = resources.get(ref)
            if target is not None:
                roles.setdefault(id(target), []).append(resource)  # type: ignore[arg-type]

    for number, entry in enumerate(entries, start=1):
        practitioner = entry.get("resource")
        if not isinstance(practitioner, dict) or practitioner.get("resourceType") != "Practitioner":
            continue
        what = f"Practitioner/{_fhir_id(practitioner.get('id'))}"
        if practitioner.get("active") is False:
            yield Rejected(number, f"{what} is inactive", "entry")
            continue
        raw = _idnps(practitioner)
        if raw is None:
            yield Rejected(number, f"{what} has no IDNPS, RPPS or ADELI identifier", "entry")
            continue
        try:
            idnps = Idnps(raw)
        except InvalidIdnps as error:
            yield Rejected(number, f"{what}: invalid IDNPS: {error}", "entry")
            continue
        given, family = _name(practitioner)
        if not family:
            yield Rejected(number, f"{what}: missing name (no family name)", "entry")
            continue
        own_roles = roles.get(id(practitioner), [])
        profession = None
        for role in own_roles:
            profession = _profession(role.get("code") or [])
            if profession:
                break
        if profession is None:
            qualifications = practitioner.get("qualification") or []
            profession = _profession([q.get("code") for q in qualifications if isinstance(q, dict)])
        code, label = profession or (None, None)
        mxids = _telecom_mxids(practitioner)
        for role in own_roles:
            mxids += _telecom_mxids(role)
            for ref in role.get("endpoint") or []:
                endpoint = resources.get(str((ref or {}).get("reference") or ""))
                if endpoint and endpoint.get("resourceType") == "Endpoint":
                    mxid = matrix_id(str(endpoint.get("address") or ""))
                    if mxid:
                        mxids.append(mxid)
        refused = None
        for mxid in mxids:
            reason = foreign_mxid(mxid) if foreign_mxid is not None else None
            if reason is not None:
                refused = f"{what}: {mxid}: {reason}"
                break
        mailboxes: list[str] = []
        for resource in (practitioner, *own_roles):
            if refused is not None:
                break
            found, reason = _telecom_mailboxes(resource, domains)
            if reason is not None:
                whose = "" if resource is practitioner else "a PractitionerRole's "
                refused = f"{what}: {whose}{reason}"
            mailboxes += found
        if refused is not None:
            yield Rejected(number, refused, "entry")
            continue
        yield Record(
            Professional(idnps, given, family, code, label, SOURCE),
            tuple(dict.fromkeys(mxids)),
            tuple(dict.fromkeys(mailboxes)),
        )


_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def _fhir_id(value: Any) -> str:
    """A resource's id as FHIR defines one (1-64 of A-Z a-z 0-9 - .), else ``?``: anything else
    in that place is not quoted."""
    return value if isinstance(value, str) and _FHIR_ID.fullmatch(value) else "?"


def load_bundle(text: str | bytes) -> Any:
    """The JSON document; an error names the line, the column and the rule, never the text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DirectoryFormatError(
            f"not JSON (line {error.lineno}, column {error.colno}: {error.msg})"
        ) from None
    except UnicodeDecodeError as error:
        raise DirectoryFormatError(
            f"not JSON (byte {error.start}: not {error.encoding} text)"
        ) from None
    except ValueError:
        raise DirectoryFormatError("not JSON") from None


def search_url(base_url: str, *, identifiers: Sequence[str] = (), page_size: int = 100) -> str:
    """Practitioners with their roles (``_revinclude``), optionally only these IDNPS."""
    query: list[tuple[str, str]] = [
        ("_revinclude", "PractitionerRole:practitioner"),
        ("_count", str(page_size)),
    ]
    if identifiers:
        query.append(("identifier", ",".join(f"{IDNPS_SYSTEM}|{i}" for i in identifiers)))
    return f"{base_url.rstrip('/')}/Practitioner?{urlencode(query)}"


async def fetch_bundles(
    base_url: str,
    api_key: str | None,
    *,
    identifiers: Sequence[str] = (),
    page_size: int = 100,
    max_pages: int | None = None,
    session: ClientSession | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """Each page (a Bundle) of the search, following ``next`` links."""
    headers = {"Accept": "application/fhir+json"}
    if api_key:
        headers[API_KEY_HEADER] = api_key
    own = session is None
    http = session or ClientSession(timeout=ClientTimeout(total=120))
    url: str | None = search_url(base_url, identifiers=identifiers, page_size=page_size)
    pages = 0
    try:
        while url and (max_pages is None or pages < max_pages):
            if not same_origin(url, base_url):
                raise FhirFetchError(
                    f"the FHIR endpoint's page {pages} links its next page to another origin; "
                    "refused (the API key only goes to the configured endpoint's origin)"
                )
            try:
                async with await get_on_origin(http, url, origin=base_url, headers=headers) as resp:
                    if resp.status in (401, 403):
                        raise FhirFetchError(
                            f"the FHIR endpoint refused the API key (HTTP {resp.status}); check "
                            "directory.fhir_api_key"
                        )
                    if resp.status != 200:
                        raise FhirFetchError(
                            f"the FHIR endpoint answered HTTP {resp.status} for page {pages + 1}"
                        )
                    bundle = load_bundle(await read_capped(resp, MAX_PAGE_BYTES))
                    if not isinstance(bundle, dict):
                        raise DirectoryFormatError("not a FHIR Bundle (not a JSON object)")
            except ResponseRefused as error:
                raise FhirFetchError(f"the FHIR endpoint's page {pages + 1}: {error}") from None
            except (ClientError, TimeoutError) as error:
                reason = str(error) or type(error).__name__
                raise FhirFetchError(f"cannot reach the FHIR endpoint: {reason}") from None
            except DirectoryFormatError as error:
                raise FhirFetchError(f"the FHIR endpoint's page {pages + 1} is {error}") from None
            pages += 1
            yield bundle
            url = next(
                (
                    str(link.get("url"))
                    for link in bundle.get("link") or []
                    if isinstance(link, dict) and link.get("relation") == "next" and link.get("url")
                ),
                None,
            )
    finally:
        if own:
            await http.close()
