"""The directory's loaders (PS_LibreAcces extract, FHIR Bundle), the several-MXIDs rule, and the
progress bar: unit tests, no database."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from bridge.db.directory import GHOST, NATIVE, ProfessionalMxid, Record, display_name
from bridge.directory import fhir, ps_libreacces
from bridge.directory.choice import choose, reachable
from bridge.directory.progress import Progress
from bridge.directory.records import DirectoryFormatError, Rejected, matrix_id
from bridge.directory.sample import HEADER, extract_line

DATA = Path(__file__).parents[1] / "data" / "directory"


def parse_ps(path: Path, **kwargs: object) -> tuple[list[Record], list[Rejected]]:
    with path.open("rb") as f:
        items = list(ps_libreacces.parse(f, **kwargs))  # type: ignore[arg-type]
    return (
        [i for i in items if isinstance(i, Record)],
        [i for i in items if isinstance(i, Rejected)],
    )


# --- PS_LibreAcces ------------------------------------------------------------------------------


def test_ps_sample_good_lines_become_records() -> None:
    records, _ = parse_ps(DATA / "ps_sample.txt")

    by_idnps = {r.professional.idnps: r.professional for r in records}
    assert list(by_idnps) == ["810099000019", "0009900010", "810099000035", "810000001916"]
    marie = by_idnps["810099000019"]
    assert (marie.given_name, marie.family_name) == ("MARIE", "DUPONT")
    assert (marie.profession_code, marie.profession_label) == ("10", "Médecin")
    assert marie.source == "ps"
    assert marie.display_name == "Marie DUPONT - Médecin"
    assert by_idnps["810099000035"].display_name == "NOEL - Masseur-Kinésithérapeute"
    # One line per activity: the same person twice (lines 2 and 7) is not an error.
    assert [r.professional.idnps for r in records].count("810099000019") == 2


def test_ps_sample_bad_lines_are_reported_with_line_number_and_reason() -> None:
    _, rejected = parse_ps(DATA / "ps_sample.txt")

    reasons = {r.position: r.reason for r in rejected}
    assert sorted(reasons) == [4, 5, 6, 8, 10]
    assert "invalid IDNPS" in reasons[4] and "Luhn" in reasons[4]
    assert "missing name" in reasons[5] and "Nom d'exercice" in reasons[5]
    assert reasons[6] == "has 10 columns where the header has 57"
    assert "starts with '8' (RPPS) or '0' (ADELI)" in reasons[8]
    assert "'8' + 11 digits" in reasons[10]
    assert str(rejected[0]) == f"line 4: {reasons[4]}"


def test_ps_columns_are_found_by_name_in_any_order_with_matrix_ids() -> None:
    def foreign(mxid: str) -> str | None:
        return "ours" if mxid.startswith("@eimis_") else None

    records, rejected = parse_ps(DATA / "ps_shuffled_mxid.txt", foreign_mxid=foreign)

    assert [r.professional.idnps for r in records] == ["810099000043", "810099000043"]
    assert records[0].professional.display_name == "Ana GARCIA - Médecin"
    assert records[0].native_mxids == ("@ana.garcia:eimis.localhost",)
    assert records[1].native_mxids == ("@ana:other.example", "@ana.garcia:eimis.localhost")
    assert [(r.position, r.reason) for r in rejected] == [
        # The line, the column and the rule; never the content (issue 11, point 14).
        (3, "column 2, Matrix ID 1: not a Matrix user ID (@user:server)"),
        (4, "@eimis_pandalab_810099000068:eimis.localhost: ours"),
    ]


def test_ps_without_trailing_separator_and_windows_1252_and_crlf() -> None:
    line = extract_line("810099000019", "LEFÈVRE", "AGNÈS", "10", "Médecin").removesuffix("|")
    raw = (HEADER + "\r\n").encode("utf-8") + (line + "\r\n").encode("cp1252")

    (record,) = ps_libreacces.parse(io.BytesIO(raw))

    assert isinstance(record, Record)
    assert record.professional.display_name == "Agnès LEFÈVRE - Médecin"


def test_ps_idnps_from_type_and_identifier_when_the_national_column_is_absent() -> None:
    text = (
        "Type d'identifiant PP|Identifiant PP|Nom d'exercice|Prénom d'exercice\n"
        "0|009900010|LEROY|PAUL\n"
    )

    (record,) = ps_libreacces.parse(io.StringIO(text))

    assert isinstance(record, Record) and record.professional.idnps == "0009900010"
    assert record.professional.profession_label is None
    assert record.professional.display_name == "Paul LEROY"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the file is empty"),
        ("a|b|c\n1|2|3\n", "no column 'Identification nationale PP', \"Nom d'exercice\""),
        ("Identification nationale PP|Nom d'exercice\n", 'no column "Prénom d\'exercice"'),
    ],
)
def test_ps_file_that_is_not_an_extract_is_refused_as_a_whole(text: str, message: str) -> None:
    with pytest.raises(DirectoryFormatError) as error:
        list(ps_libreacces.parse(io.StringIO(text)))
    assert message in str(error.value)


# --- FHIR ---------------------------------------------------------------------------------------


def test_fhir_bundle_practitioners_with_roles_and_endpoints() -> None:
    bundle = json.loads((DATA / "fhir_bundle.json").read_text(encoding="utf-8"))

    items = list(fhir.parse_bundle(bundle))

    records = {i.professional.idnps: i for i in items if isinstance(i, Record)}
    assert list(records) == ["810099000050", "810099000019", "0009900028", "810099000043"]
    claire = records["810099000050"]
    assert claire.professional.display_name == "Claire PETIT - Sage-Femme"
    assert claire.professional.profession_code == "50"
    assert claire.native_mxids == ("@claire.petit:eimis.localhost",)  # Endpoint.address
    # RPPS identifier only; profession from the DP profile's qualification, label from the code.
    assert records["810099000019"].professional.display_name == "Marie DUPONT - Médecin"
    assert records["0009900028"].professional.display_name == "Jules BONNET - Orthophoniste"
    ana = records["810099000043"]
    assert ana.native_mxids == ("@ana.garcia:eimis.localhost",)  # telecom matrix: URI
    assert ana.professional.profession_code is None  # its only role is inactive
    assert all(r.professional.source == "fhir" for r in records.values())

    rejected = [str(i) for i in items if isinstance(i, Rejected)]
    assert rejected == [
        "entry 5: Practitioner/p3: invalid IDNPS: the RPPS part of this IDNPS fails its Luhn "
        "check digit",
        "entry 6: Practitioner/p4: missing name (no family name)",
        "entry 11: Practitioner/p7 has no IDNPS, RPPS or ADELI identifier",
    ]


def test_fhir_document_that_is_not_a_bundle_is_refused() -> None:
    with pytest.raises(DirectoryFormatError, match="not a FHIR Bundle"):
        list(fhir.parse_bundle({"resourceType": "Practitioner"}))
    with pytest.raises(DirectoryFormatError, match="not JSON"):
        fhir.load_bundle(b"PS|x")


def test_fhir_search_url_asks_for_roles_and_identifiers() -> None:
    url = fhir.search_url("https://fhir.example/v2/", identifiers=["810099000019"], page_size=50)

    assert url.startswith("https://fhir.example/v2/Practitioner?")
    assert "_revinclude=PractitionerRole%3Apractitioner" in url
    assert "_count=50" in url
    assert "identifier=urn%3Aoid%3A1.2.250.1.71.4.2.1%7C810099000019" in url


# --- Names, Matrix IDs, the choice ----------------------------------------------------------------


def test_display_name_format() -> None:
    assert display_name("FISTINIEN", "Grominoch", "Pédicure-Podologue") == (
        "Fistinien GROMINOCH - Pédicure-Podologue"
    )
    assert display_name("", "Grominoch", None) == "GROMINOCH"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("@alice:eimis.example", "@alice:eimis.example"),
        ("matrix:u/alice:eimis.example", "@alice:eimis.example"),
        ("@alice:eimis.example:8448", "@alice:eimis.example:8448"),
        ("alice", None),
        ("@alice", None),
        ("@ali ce:x", None),
    ],
)
def test_matrix_ids(value: str, expected: str | None) -> None:
    assert matrix_id(value) == expected


def mx(mxid: str, kind: str = GHOST, connector: str | None = None, preferred: bool = False):
    return ProfessionalMxid("810099000019", mxid, kind, connector, preferred)


def test_choice_preferred_then_native_then_first_connector_in_config_order() -> None:
    pandalab = mx("@eimis_pandalab_810099000019:hs", GHOST, "pandalab")
    medipeps = mx("@eimis_medipeps_810099000019:hs", GHOST, "medipeps")
    native_b = mx("@marie:b.example", NATIVE)
    native_a = mx("@marie:a.example", NATIVE)
    order = ["medipeps", "pandalab"]

    assert choose([pandalab, medipeps], order) == medipeps
    assert choose([pandalab, medipeps], ["pandalab", "medipeps"]) == pandalab
    assert choose([pandalab, native_b, native_a], order) == native_a
    preferred = mx("@eimis_pandalab_810099000019:hs", GHOST, "pandalab", preferred=True)
    assert choose([preferred, native_a, medipeps], order) == preferred
    # The asker's own vendor and connectors not configured are never chosen.
    assert choose([preferred, medipeps], order, exclude="pandalab") == medipeps
    assert choose([pandalab], ["medipeps"]) is None
    assert reachable([pandalab, native_a, medipeps], order) == [native_a, medipeps, pandalab]


# --- Progress -----------------------------------------------------------------------------------


def test_progress_bar_is_drawn_on_a_terminal_only() -> None:
    out = io.StringIO()
    bar = Progress(1000, label="x: ", stream=out, enabled=True, every_s=0)
    bar.update(500, 10)
    bar.close(1000, 20)
    text = out.getvalue()
    assert "\rx: [" + "#" * 15 + "." * 15 + "]  50% 10 lines" in text
    assert "100% 20 lines" in text and text.endswith("\n")

    quiet = io.StringIO()
    bar = Progress(1000, stream=quiet)  # a StringIO is not a TTY
    bar.update(500, 10)
    bar.close(1000, 20)
    assert quiet.getvalue() == ""
