"""The message catalogs' tools (``bridge.i18n``): check, update, compile.

``python -m bridge.devtools.catalogs check`` (``make test`` runs it): every text the code marks
(``_()``, ``ngettext()``, ``N_()`` in ``bridge/``) has a French translation that is neither
empty nor fuzzy, every translation keeps its message id's ``{placeholders}``, and the English
catalog lists every text. Exit status 1 with the list of what is wrong.

``update``: extracts the texts into ``bridge/locale/eimis.pot`` and merges them into each
locale's ``.po`` (new texts arrive untranslated, so ``check`` fails until they are translated).
``compile``: writes the ``.mo`` files (``make`` does it after installing).
All three use Babel, the maintained gettext toolkit for Python.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from babel.messages.catalog import Catalog
from babel.messages.extract import DEFAULT_KEYWORDS, extract_from_dir
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po, write_po

from bridge.i18n import DEFAULT_LOCALE, DOMAIN, LOCALE_DIR, LOCALES, mo_path, po_path

SOURCE_DIR = LOCALE_DIR.parent
POT = LOCALE_DIR / f"{DOMAIN}.pot"
_PLACEHOLDER = re.compile(r"\{([a-zA-Z_][a-zA-Z0-9_]*)[^{}]*\}")
_SKIP_FILES = ("devtools/catalogs.py",)


@dataclass(frozen=True)
class Text:
    msgid: str | tuple[str, str]
    where: str

    @property
    def key(self) -> str:
        return self.msgid if isinstance(self.msgid, str) else self.msgid[0]


def extract(source: Path = SOURCE_DIR) -> list[Text]:
    """The texts marked in the code, with where each is first used."""
    found: dict[str | tuple[str, str], str] = {}
    for filename, lineno, message, _comments, _context in extract_from_dir(
        str(source),
        method_map=[("**.py", "python")],
        keywords=DEFAULT_KEYWORDS,
        comment_tags=("Translators:",),
    ):
        if any(filename.endswith(skip) for skip in _SKIP_FILES):
            continue
        if isinstance(message, tuple):
            message = (message[0], message[1])
        if not message:
            continue
        found.setdefault(message, f"bridge/{filename}:{lineno}")
    return [Text(msgid, where) for msgid, where in found.items()]


def read_catalog(locale: str) -> Catalog:
    with po_path(locale).open("rb") as f:
        return read_po(f, locale=locale, domain=DOMAIN)


def _placeholders(text: str) -> set[str]:
    return set(_PLACEHOLDER.findall(text))


def problems(texts: Iterable[Text], catalogs: dict[str, Catalog]) -> list[str]:
    """What is wrong, one line each; empty when the catalogs cover the code."""
    found = []
    for text in texts:
        for locale, catalog in catalogs.items():
            message = catalog.get(text.key)
            if message is None:
                found.append(f"{text.where}: {text.key!r} is not in the {locale} catalog")
                continue
            if locale != DEFAULT_LOCALE:
                continue
            strings = message.string if isinstance(message.string, tuple) else (message.string,)
            if message.fuzzy or not all(strings):
                found.append(f"{text.where}: {text.key!r} has no French translation")
                continue
            ids = text.msgid if isinstance(text.msgid, tuple) else (text.msgid,)
            expected = set().union(*(_placeholders(i) for i in ids))
            for string in strings:
                if _placeholders(string) != expected:
                    found.append(
                        f"{text.where}: the French of {text.key!r} has placeholders "
                        f"{sorted(_placeholders(string))}, the text {sorted(expected)}"
                    )
    return found


def check() -> int:
    texts = extract()
    catalogs = {locale: read_catalog(locale) for locale in LOCALES}
    wrong = problems(texts, catalogs)
    if wrong:
        print(f"Message catalogs: {len(wrong)} problem(s)", file=sys.stderr)
        for line in wrong:
            print(f"  {line}", file=sys.stderr)
        print(
            "Run `python -m bridge.devtools.catalogs update`, then translate in "
            f"{po_path(DEFAULT_LOCALE).relative_to(SOURCE_DIR.parent)}.",
            file=sys.stderr,
        )
        return 1
    print(f"Message catalogs: {len(texts)} texts, all translated in French, listed in English.")
    return 0


def update() -> int:
    texts = extract()
    template = Catalog(domain=DOMAIN, project="eimis-bridge", charset="utf-8")
    for text in texts:
        template.add(text.msgid, locations=[(text.where.rsplit(":", 1)[0], 0)])
    POT.parent.mkdir(parents=True, exist_ok=True)
    with POT.open("wb") as f:
        write_po(f, template, omit_header=False, width=100, no_location=True, sort_output=True)
    for locale in LOCALES:
        path = po_path(locale)
        if path.exists():
            catalog = read_catalog(locale)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            catalog = Catalog(locale=locale, domain=DOMAIN, project="eimis-bridge")
        catalog.update(template, no_fuzzy_matching=True)
        catalog.fuzzy = False
        with path.open("wb") as f:
            write_po(
                f, catalog, width=100, no_location=True, sort_output=True, ignore_obsolete=True
            )
    print(f"{len(texts)} texts; catalogs updated: {', '.join(LOCALES)}")
    return 0


def compile_all() -> int:
    for locale in LOCALES:
        catalog = read_catalog(locale)
        with mo_path(locale).open("wb") as f:
            write_mo(f, catalog, use_fuzzy=False)
    print(f"Catalogs compiled: {', '.join(LOCALES)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bridge.devtools.catalogs")
    parser.add_argument("action", choices=("check", "update", "compile"))
    args = parser.parse_args(argv)
    return {"check": check, "update": update, "compile": compile_all}[args.action]()


if __name__ == "__main__":
    sys.exit(main())
