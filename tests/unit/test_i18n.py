"""The message catalogs (issue 14 point 6): ``bridge/i18n.py`` and its check, French by default.

Every text people read is an English message id translated from ``bridge/locale``; ``make test``
runs ``python -m bridge.devtools.catalogs check``, which fails when a text has no French.
"""

from __future__ import annotations

import asyncio
import copy
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from babel.messages.catalog import Catalog
from babel.messages.mofile import write_mo
from babel.messages.pofile import write_po

from bridge import i18n
from bridge.admin.room import HELP, NOT_ADMIN, REFUSAL
from bridge.config import ConfigError, parse_config
from bridge.devtools import demo
from bridge.devtools.catalogs import Text, problems
from bridge.i18n import N_, UnknownLocale, _, ngettext, set_locale

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = {
    "homeserver": {"url": "http://127.0.0.1:8008", "domain": "eimis.example"},
    "appservice": {
        "address": "http://127.0.0.1:29340",
        "as_token": "as-token-value",
        "hs_token": "hs-token-value",
    },
}


@pytest.fixture
def english() -> Iterator[None]:
    set_locale("en")
    try:
        yield
    finally:
        set_locale("fr")


@pytest.fixture
def locale_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty catalog directory of our own: nothing loaded, nothing active (restored after)."""
    monkeypatch.setattr(i18n, "LOCALE_DIR", tmp_path)
    monkeypatch.setattr(i18n, "_loaded", {})
    monkeypatch.setattr(i18n, "_active", None)
    monkeypatch.setattr(i18n, "_active_locale", i18n.DEFAULT_LOCALE)
    return tmp_path


def write_catalog(locale: str, translations: dict[str, str], *, mo: bool, mtime: float) -> None:
    """A ``.po`` (and its ``.mo`` when ``mo``) in the patched ``LOCALE_DIR``, dated ``mtime``."""
    catalog = Catalog(locale=locale, domain=i18n.DOMAIN)
    for msgid, string in translations.items():
        catalog.add(msgid, string)
    path = i18n.po_path(locale) if not mo else i18n.mo_path(locale)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        (write_mo if mo else write_po)(f, catalog)
    os.utime(path, (mtime, mtime))


# The repository's catalogs ----------------------------------------------------------------------


def test_the_catalog_check_passes_on_the_repository_as_make_test_runs_it() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bridge.devtools.catalogs", "check"],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all translated in French" in result.stdout


def test_french_is_the_default_and_english_is_available(english: None) -> None:
    assert i18n.current_locale() == "en"
    assert _(HELP) == HELP, "English: the message id itself"
    assert _("{n} professional(s) found:").format(n=2) == "2 professional(s) found:"
    set_locale("fr")
    assert i18n.current_locale() == "fr"
    assert _(HELP).startswith("Je trouve les professionnels de santé joignables par le pont")
    assert _("{n} professional(s) found:").format(n=2) == "2 professionnel(s) trouvé(s) :"


def test_french_plurals_have_babels_three_forms() -> None:
    def saw(n: int) -> str:
        return ngettext(
            "the added Matrix user saw {n} message from before",
            "the added Matrix user saw {n} messages from before",
            n,
        ).format(n=n)

    assert saw(1) == "l'utilisateur Matrix ajouté a vu 1 message d'avant son arrivée"
    assert saw(0) == "l'utilisateur Matrix ajouté a vu 0 message d'avant son arrivée"
    assert saw(2) == "l'utilisateur Matrix ajouté a vu 2 messages d'avant son arrivée"
    assert saw(1_000_000).endswith("1000000 messages d'avant son arrivée")


def test_n_marks_a_text_without_translating_it() -> None:
    assert N_("Verified on every side.") == "Verified on every side."
    assert _(N_("Verified on every side.")) == "Vérifié de chaque côté."


# What the check reports ---------------------------------------------------------------------------


def catalogs(fr: Catalog, en: Catalog | None = None) -> dict[str, Catalog]:
    if en is None:
        en = Catalog(locale="en", domain=i18n.DOMAIN)
        for message in fr:
            if message.id:
                en.add(message.id, "")
    return {"fr": fr, "en": en}


def test_a_complete_catalog_has_no_problem() -> None:
    fr = Catalog(locale="fr", domain=i18n.DOMAIN)
    fr.add("{name} reacted {emoji}", "{name} a réagi {emoji}")
    fr.add(("{n} person", "{n} people"), ("{n} personne", "{n} personnes", "{n} personnes"))
    texts = [
        Text("{name} reacted {emoji}", "bridge/x.py:1"),
        Text(("{n} person", "{n} people"), "bridge/x.py:2"),
    ]

    assert problems(texts, catalogs(fr)) == []


def test_the_check_reports_a_text_without_french() -> None:
    fr = Catalog(locale="fr", domain=i18n.DOMAIN)
    fr.add("Cancelled.", "")
    fr.add(("{n} person", "{n} people"), ("{n} personne", "", "{n} personnes"))
    texts = [
        Text("Cancelled.", "bridge/x.py:3"),
        Text(("{n} person", "{n} people"), "bridge/x.py:4"),
    ]

    found = problems(texts, catalogs(fr))

    assert found == [
        "bridge/x.py:3: 'Cancelled.' has no French translation",
        "bridge/x.py:4: '{n} person' has no French translation",
    ]


def test_the_check_reports_a_fuzzy_translation() -> None:
    fr = Catalog(locale="fr", domain=i18n.DOMAIN)
    fr.add("Cancelled.", "Annulé.", flags=["fuzzy"])

    found = problems([Text("Cancelled.", "bridge/x.py:5")], catalogs(fr))

    assert found == ["bridge/x.py:5: 'Cancelled.' has no French translation"]


def test_the_check_reports_a_text_missing_from_a_catalog() -> None:
    fr = Catalog(locale="fr", domain=i18n.DOMAIN)
    fr.add("Cancelled.", "Annulé.")
    en = Catalog(locale="en", domain=i18n.DOMAIN)
    texts = [Text("Cancelled.", "bridge/x.py:6"), Text("New text.", "bridge/x.py:7")]

    found = problems(texts, {"fr": fr, "en": en})

    assert found == [
        "bridge/x.py:6: 'Cancelled.' is not in the en catalog",
        "bridge/x.py:7: 'New text.' is not in the fr catalog",
        "bridge/x.py:7: 'New text.' is not in the en catalog",
    ]


def test_the_check_reports_a_french_translation_whose_placeholders_differ() -> None:
    fr = Catalog(locale="fr", domain=i18n.DOMAIN)
    fr.add("{name} reacted {emoji}", "{nom} a réagi {emoji}")
    fr.add("{name} left", "Un participant est parti")
    fr.add(("{n} person", "{n} people"), ("{n} personne", "{n} personnes", "des personnes"))
    texts = [
        Text("{name} reacted {emoji}", "bridge/x.py:8"),
        Text("{name} left", "bridge/x.py:9"),
        Text(("{n} person", "{n} people"), "bridge/x.py:10"),
    ]

    found = problems(texts, catalogs(fr))

    assert found == [
        "bridge/x.py:8: the French of '{name} reacted {emoji}' has placeholders "
        "['emoji', 'nom'], the text ['emoji', 'name']",
        "bridge/x.py:9: the French of '{name} left' has placeholders [], the text ['name']",
        "bridge/x.py:10: the French of '{n} person' has placeholders [], the text ['n']",
    ]


# Loading the catalogs -----------------------------------------------------------------------------


def test_a_missing_mo_is_compiled_in_memory_from_the_po(locale_dir: Path) -> None:
    write_catalog("fr", {"Cancelled.": "Annulé."}, mo=False, mtime=1_000)

    assert _("Cancelled.") == "Annulé."
    assert not i18n.mo_path("fr").exists(), "compiled in memory, nothing written"


def test_a_stale_mo_gives_way_to_the_newer_po(locale_dir: Path) -> None:
    write_catalog("fr", {"Cancelled.": "Annulé (ancien)."}, mo=True, mtime=1_000)
    write_catalog("fr", {"Cancelled.": "Annulé."}, mo=False, mtime=2_000)

    assert i18n.translations("fr").gettext("Cancelled.") == "Annulé."


def test_an_up_to_date_mo_is_read_as_compiled(locale_dir: Path) -> None:
    write_catalog("fr", {"Cancelled.": "Annulé (du .po)."}, mo=False, mtime=1_000)
    write_catalog("fr", {"Cancelled.": "Annulé (du .mo)."}, mo=True, mtime=2_000)

    assert i18n.translations("fr").gettext("Cancelled.") == "Annulé (du .mo)."


def test_an_unknown_locale_or_a_missing_catalog_is_an_unknown_locale(locale_dir: Path) -> None:
    with pytest.raises(UnknownLocale, match="'de'"):
        set_locale("de")
    with pytest.raises(UnknownLocale, match="'de'"):
        i18n.translations("de")
    with pytest.raises(UnknownLocale, match="missing"):
        i18n.translations("en")  # a known locale, but this directory has no catalog


def test_the_config_accepts_fr_and_en_and_names_bridge_locale_otherwise() -> None:
    assert parse_config(copy.deepcopy(CONFIG)).bridge.locale == "fr"
    assert parse_config({**copy.deepcopy(CONFIG), "bridge": {"locale": "en"}}).bridge.locale == "en"

    with pytest.raises(ConfigError, match=r"bridge\.locale"):
        parse_config({**copy.deepcopy(CONFIG), "bridge": {"locale": "de"}})


# The demo's transcript and the bot's texts, in both languages -----------------------------------


def test_the_demos_lines_are_french() -> None:
    async def never() -> bool:
        return False

    with pytest.raises(TimeoutError) as timeout:
        asyncio.run(demo.wait_for(_("the added Matrix user to see what follows"), never, -1))

    assert str(timeout.value) == (
        "délai dépassé en attendant que l'utilisateur Matrix ajouté voie la suite"
    )
    assert _("Verified on every side.") == "Vérifié de chaque côté."
    assert _("{side} saw:").format(side="x") == "x a vu :"
    still = _(
        "Still running. Log in with any Matrix client at {url} as {first} or {second} "
        "(passwords in {state_dir}/demo.json); the sandboxes' users are listed there too. "
        "Ctrl-C to stop."
    )
    assert still.startswith("Toujours en marche. Connectez-vous avec n'importe quel client Matrix")


def test_the_demos_lines_in_english(english: None) -> None:
    async def never() -> bool:
        return False

    with pytest.raises(TimeoutError) as timeout:
        asyncio.run(demo.wait_for(_("the added Matrix user to see what follows"), never, -1))

    assert str(timeout.value) == "timed out waiting for the added Matrix user to see what follows"
    assert _("Verified on every side.") == "Verified on every side."
    assert _("{side} saw:").format(side="x") == "x saw:"


def test_the_bots_texts_for_non_admins_follow_the_locale(english: None) -> None:
    assert _(REFUSAL).startswith("Hello. I am the eimis-bridge bot")
    assert _(NOT_ADMIN).startswith("This command is for the bridge's administrators")
    set_locale("fr")
    assert _(REFUSAL).startswith("Bonjour. Je suis le robot du pont eimis-bridge")
    assert _(NOT_ADMIN) == (
        "Cette commande est réservée aux administrateurs du pont. Ici : find, dm et aide "
        "(tapez « aide »)."
    )
