"""The directory's store and importers on both engines (SQLite file, fresh PostgreSQL database),
a FHIR endpoint over real HTTP, and a 100,000-line extract imported in well under a minute."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bridge.config import DatabaseConfig
from bridge.db.database import open_database
from bridge.db.directory import GHOST, NATIVE, DirectoryStore
from bridge.db.stores import Stores
from bridge.directory.fhir import API_KEY_HEADER, FhirFetchError
from bridge.directory.importer import import_fhir_endpoint, import_file
from bridge.directory.sample import write_extract

DATA = Path(__file__).parents[1] / "data" / "directory"
GHOST_MARIE = "@eimis_pandalab_810099000019:eimis.example"


@pytest.fixture
async def stores(database_url: str) -> AsyncIterator[Stores]:
    db = await open_database(DatabaseConfig(url=database_url))
    try:
        yield Stores.of(db)
    finally:
        await db.stop()


async def test_importing_the_ps_sample_stores_valid_lines_and_reports_the_others(
    stores: Stores,
) -> None:
    store = stores.directory

    report = await import_file(store, DATA / "ps_sample.txt", progress=False)

    assert report.source == "ps"
    assert report.lines == 12 and report.records == 5
    assert [r.position for r in report.rejected] == [4, 5, 6, 8, 10]
    assert (report.added, report.changed) == (4, 0)
    assert await store.count() == 4
    marie = await store.get("810099000019")
    assert marie is not None and marie.display_name == "Marie DUPONT - Médecin"
    assert marie.updated_at == report.stamp
    assert await store.get("810099000018") is None, "no entry for an invalid IDNPS"

    again = await import_file(store, DATA / "ps_sample.txt", progress=False)

    assert (again.added, again.changed) == (0, 0), "an unchanged entry is not rewritten"
    assert (await store.get("810099000019")).updated_at == report.stamp  # type: ignore[union-attr]


async def test_fhir_import_updates_entries_and_lists_native_matrix_ids(stores: Stores) -> None:
    store = stores.directory
    await import_file(store, DATA / "ps_sample.txt", progress=False)

    report = await import_file(store, DATA / "fhir_bundle.json", progress=False)

    assert report.source == "fhir"
    assert report.records == 4 and len(report.rejected) == 3
    assert (report.added, report.changed, report.mxids) == (3, 1, 2)
    marie = await store.get("810099000019")
    assert marie is not None and marie.display_name == "Marie DUPONT - Médecin"
    assert marie.source == "fhir"
    (claire,) = await store.mxids("810099000050")
    assert (claire.mxid, claire.kind, claire.connector, claire.preferred) == (
        "@claire.petit:eimis.localhost",
        NATIVE,
        None,
        False,
    )
    found = await store.by_mxid("@ana.garcia:eimis.localhost")
    assert found is not None and found.idnps == "810099000043"


async def test_connector_users_fill_gaps_but_never_overwrite_ans_entries(stores: Stores) -> None:
    store = stores.directory
    await import_file(store, DATA / "ps_sample.txt", progress=False)

    entry = await store.record_connector_user(
        "pandalab", "810099000019", "Marie", "Dupont-Vendor", "Docteur", GHOST_MARIE
    )

    assert entry.display_name == "Marie DUPONT - Médecin" and entry.source == "ps"
    (ghost,) = await store.mxids("810099000019")
    assert (ghost.mxid, ghost.kind, ghost.connector) == (GHOST_MARIE, GHOST, "pandalab")

    new = await store.record_connector_user(
        "medipeps", "810099000027", "Lucie", "Faure", "Sage-femme", "@eimis_medipeps_x:e"
    )
    assert new.display_name == "Lucie FAURE - Sage-femme" and new.source == "connector:medipeps"
    renamed = await store.record_connector_user(
        "medipeps", "810099000027", "Lucie", "Faure-Martin", "Sage-femme", "@eimis_medipeps_x:e"
    )
    assert renamed.display_name == "Lucie FAURE-MARTIN - Sage-femme"


async def test_prefer_marks_one_matrix_id_and_clears_the_others(stores: Stores) -> None:
    store = stores.directory
    await import_file(store, DATA / "ps_sample.txt", progress=False)
    await store.add_mxid("810099000019", GHOST_MARIE, GHOST, "pandalab")
    await store.add_mxid("810099000019", "@marie:eimis.example", NATIVE)

    assert await store.prefer("810099000019", GHOST_MARIE)
    assert {m.mxid: m.preferred for m in await store.mxids("810099000019")} == {
        GHOST_MARIE: True,
        "@marie:eimis.example": False,
    }
    assert await store.prefer("810099000019", "@marie:eimis.example")
    assert {m.mxid: m.preferred for m in await store.mxids("810099000019")} == {
        GHOST_MARIE: False,
        "@marie:eimis.example": True,
    }
    assert not await store.prefer("810099000019", "@nobody:eimis.example")


async def test_ghosts_to_rename_after_an_import_changes_their_entry(stores: Stores) -> None:
    store = stores.directory
    await stores.ghosts.upsert(GHOST_MARIE, "pandalab", "810099000019", "Marie D - Médecin")
    first = await import_file(store, DATA / "ps_sample.txt", progress=False)

    (rename,) = await store.renames(0)
    assert (rename.mxid, rename.old_name, rename.new_name) == (
        GHOST_MARIE,
        "Marie D - Médecin",
        "Marie DUPONT - Médecin",
    )
    await stores.ghosts.upsert(GHOST_MARIE, "pandalab", "810099000019", rename.new_name)
    assert await store.renames(0) == []

    await import_file(store, DATA / "fhir_bundle.json", progress=False)

    # "Marie Dupont" (FHIR) after "MARIE DUPONT" (extract): the same name once written the
    # French way, so no rename; a new family name is one.
    assert await store.renames(first.stamp) == []
    await store.record_connector_user(
        "medipeps", "810099000027", "lucie", "faure", "Sage-femme", "@eimis_medipeps_x:e"
    )
    await stores.ghosts.upsert("@eimis_medipeps_x:e", "medipeps", "810099000027", "Lucie F")
    (rename,) = await store.renames(first.stamp)
    assert rename.new_name == "Lucie FAURE - Sage-femme"
    await store.backfill_ghosts()
    assert [m.mxid for m in await store.mxids("810099000019")] == [GHOST_MARIE]


async def test_a_100k_line_extract_imports_in_well_under_a_minute(
    stores: Stores, tmp_path: Path
) -> None:
    path = tmp_path / "PS_LibreAcces_Personne_activite_big.txt"
    bad = write_extract(path, 100_000, bad_every=1000)

    report = await import_file(stores.directory, path, progress=False)

    assert report.lines == 100_001
    assert len(report.rejected) == bad == 100
    assert all("Luhn" in r.reason for r in report.rejected)
    assert report.rejected[0].position == 1001  # the 1000th data line, after the header
    assert await stores.directory.count() == 100_000 - bad
    print(f"100k lines in {report.seconds:.2f} s ({report.lines_per_s:,.0f} lines/s)")
    assert report.seconds < 30, f"{report.seconds:.1f} s for 100,000 lines"


# --- A FHIR endpoint ------------------------------------------------------------------------------


def fhir_server(pages: list[dict[str, Any]], key: str, seen: list[str]) -> web.Application:
    async def search(request: web.Request) -> web.Response:
        seen.append(str(request.rel_url))
        if request.headers.get(API_KEY_HEADER) != key:
            return web.json_response({"resourceType": "OperationOutcome"}, status=401)
        page = int(request.query.get("page", "0"))
        bundle = dict(pages[page])
        if page + 1 < len(pages):
            bundle["link"] = [
                {"relation": "next", "url": str(request.url.with_query({"page": page + 1}))}
            ]
        return web.json_response(bundle, content_type="application/fhir+json")

    app = web.Application()
    app.router.add_get("/fhir/v2/Practitioner", search)
    return app


@pytest.fixture
async def fhir_endpoint() -> AsyncIterator[tuple[str, list[str]]]:
    bundle = json.loads((DATA / "fhir_bundle.json").read_text(encoding="utf-8"))
    entries = bundle["entry"]
    pages = [
        {**bundle, "entry": entries[:4]},  # Claire (role, endpoint) and Marie
        {**bundle, "entry": entries[4:]},
    ]
    seen: list[str] = []
    runner = web.AppRunner(fhir_server(pages, "test-key", seen))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/fhir/v2", seen
    finally:
        await runner.cleanup()


async def test_fetch_from_a_fhir_endpoint_follows_pages_with_the_api_key(
    stores: Stores, fhir_endpoint: tuple[str, list[str]]
) -> None:
    url, seen = fhir_endpoint

    report = await import_fhir_endpoint(stores.directory, url, "test-key", page_size=4)

    assert len(seen) == 2 and "_count=4" in seen[0]
    assert report.lines == 11 and report.records == 4 and report.added == 4
    assert [str(r) for r in report.rejected][0].startswith("entry 5: Practitioner/p3")
    claire = await stores.directory.get("810099000050")
    assert claire is not None and claire.display_name == "Claire PETIT - Sage-Femme"


async def test_fetch_with_a_wrong_api_key_fails_clearly(
    stores: Stores, fhir_endpoint: tuple[str, list[str]]
) -> None:
    url, _ = fhir_endpoint
    with pytest.raises(FhirFetchError, match="refused the API key") as error:
        await import_fhir_endpoint(stores.directory, url, "wrong-key")
    assert "wrong-key" not in str(error.value)
    assert await stores.directory.count() == 0


def test_store_is_part_of_the_stores() -> None:
    assert "directory" in Stores.__dataclass_fields__
    assert DirectoryStore.upsert_batch.__doc__
