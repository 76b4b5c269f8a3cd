"""``eimis-bridge directory import|fetch|show|prefer`` as an operator runs them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml
from aiohttp import web

from bridge.cli import main

DATA = Path(__file__).parents[1] / "data" / "directory"


def write_config(tmp_path: Path, **directory: object) -> Path:
    config = {
        "homeserver": {"url": "http://127.0.0.1:1", "domain": "eimis.localhost"},
        "appservice": {"address": "http://127.0.0.1:2", "as_token": "a", "hs_token": "h"},
        "database": {"url": "sqlite:bridge.db"},
        "connectors": {
            "medipeps": {"type": "medipeps", "settings": {}},
            "pandalab": {"type": "pandalab", "settings": {}},
        },
    }
    if directory:
        config["directory"] = directory
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path)


def test_import_reports_what_it_stored_and_the_rejected_lines(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rejects = tmp_path / "rejected.txt"

    status = main(
        [
            "directory",
            "import",
            "-c",
            str(config),
            str(DATA / "ps_sample.txt"),
            "--rejected-file",
            str(rejects),
            "--show-rejected",
            "2",
        ]
    )

    out = capsys.readouterr().out
    assert status == 0
    assert "Read 12 lines" in out and "5 valid, 5 rejected" in out
    assert "4 professional(s) added, 0 changed" in out
    assert "  line 4: invalid IDNPS: the RPPS part of this IDNPS fails its Luhn" in out
    assert "  line 5: missing name" in out
    assert "... and 3 more" in out
    assert rejects.read_text(encoding="utf-8").splitlines()[2] == (
        "line 6: has 10 columns where the header has 57"
    )


def test_import_of_a_fhir_bundle_is_recognised_and_show_gives_the_choice(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["directory", "import", "-c", str(config), str(DATA / "fhir_bundle.json")]) == 0
    assert "Read 11 entries" in capsys.readouterr().out

    assert main(["directory", "show", "-c", str(config), "810099000050"]) == 0
    out = capsys.readouterr().out
    assert "810099000050 (RPPS)  Claire PETIT - Sage-Femme" in out
    assert "-> @claire.petit:eimis.localhost  (native)" in out


def test_prefer_adds_a_native_account_and_makes_it_the_choice(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["directory", "import", "-c", str(config), str(DATA / "fhir_bundle.json")])
    capsys.readouterr()

    status = main(["directory", "prefer", "-c", str(config), "810099000050", "@claire:b.example"])

    assert status == 0
    assert "now go to @claire:b.example" in capsys.readouterr().out
    main(["directory", "show", "-c", str(config), "810099000050"])
    out = capsys.readouterr().out
    assert "-> @claire:b.example  (native, preferred)" in out
    assert "   @claire.petit:eimis.localhost  (native)" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["show", "810099000018"], "Invalid IDNPS '810099000018': the RPPS part"),
        (["show", "7123"], "starts with '8' (RPPS) or '0' (ADELI)"),
        (["prefer", "81009900001X", "@a:b"], "has digits only"),
        (["prefer", "810099000019", "marie"], "'marie' is not a Matrix user ID"),
        (["import", "/nonexistent/extract.txt"], "Cannot read /nonexistent/extract.txt"),
        (["import", str(DATA / "fhir_bundle.json"), "--format", "ps"], "not a PS_LibreAcces"),
        (["fetch"], "Set directory.fhir_url"),
        (["fetch", "--identifier", "123"], "Set directory.fhir_url"),
    ],
)
def test_bad_input_gets_a_clear_message_and_exit_2(
    config: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    action, *rest = argv

    assert main(["directory", action, "-c", str(config), *rest]) == 2
    assert message in capsys.readouterr().err


def test_show_of_someone_not_in_the_directory_exits_1(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["directory", "show", "-c", str(config), "810099000019"]) == 1
    assert "No professional 810099000019 in the directory." in capsys.readouterr().err


async def test_fetch_reads_the_configured_endpoint_with_the_key_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    keys: list[str | None] = []
    bundle = (DATA / "fhir_bundle.json").read_bytes()

    async def search(request: web.Request) -> web.Response:
        keys.append(request.headers.get("ESANTE-API-KEY"))
        return web.Response(body=bundle, content_type="application/fhir+json")

    app = web.Application()
    app.router.add_get("/fhir/Practitioner", search)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    monkeypatch.setenv("EIMIS_TEST_ESANTE_KEY", "s3cret-key")
    config = write_config(
        tmp_path, fhir_url=f"http://127.0.0.1:{port}/fhir", fhir_api_key="${EIMIS_TEST_ESANTE_KEY}"
    )
    try:
        status = await asyncio.to_thread(
            main, ["directory", "fetch", "-c", str(config), "--identifier", "810099000050"]
        )
    finally:
        await runner.cleanup()

    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert keys == ["s3cret-key"]
    assert "4 professional(s) added" in captured.out
    assert "s3cret-key" not in captured.out + captured.err
