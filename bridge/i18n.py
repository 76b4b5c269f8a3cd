"""What people read from the bridge, in their language: gettext catalogs (domain ``eimis``).

Every text a clinician or a vendor user can read (notices, stand-ins for what a vendor cannot
show, system messages, send-status reasons, the bot's answers, the demo's transcript) is
written in the code as an English message id inside ``_()`` (or ``ngettext()``, or ``N_()`` for
a text translated later) and translated from ``bridge/locale/<locale>/LC_MESSAGES/eimis.po``.
French is the default locale (``bridge.locale`` in the config); English is available.

Catalogs are compiled (``.mo``) by ``make`` after installing and by the Dockerfile when the
image is built (``pybabel compile``). A compiled catalog missing or older than its ``.po``
(a checkout edited since) is compiled in memory from the ``.po`` with Babel at first use, so a
text is never missing at run time. ``python -m bridge.devtools.catalogs check`` (run by
``make test``) fails when a text in the code has no French translation.

Placeholders are named (``_("{name} reacted {emoji}").format(name=..., emoji=...)``) so a
translation may put them in another order.
"""

from __future__ import annotations

import gettext
import io
import logging
import threading
from pathlib import Path

DOMAIN = "eimis"
LOCALES = ("fr", "en")
DEFAULT_LOCALE = "fr"
LOCALE_DIR = Path(__file__).resolve().parent / "locale"

log = logging.getLogger("eimis.i18n")

_lock = threading.Lock()
_loaded: dict[str, gettext.NullTranslations] = {}
_active: gettext.NullTranslations | None = None
_active_locale = DEFAULT_LOCALE


class UnknownLocale(ValueError):
    """A locale the bridge has no catalog for."""


def po_path(locale: str) -> Path:
    return LOCALE_DIR / locale / "LC_MESSAGES" / f"{DOMAIN}.po"


def mo_path(locale: str) -> Path:
    return LOCALE_DIR / locale / "LC_MESSAGES" / f"{DOMAIN}.mo"


def _compile_in_memory(po: Path) -> gettext.GNUTranslations:
    # Babel is a dependency for this fallback only; imported lazily to keep start-up light.
    from babel.messages.mofile import write_mo
    from babel.messages.pofile import read_po

    with po.open("rb") as f:
        catalog = read_po(f, locale=po.parent.parent.name, domain=DOMAIN)
    buffer = io.BytesIO()
    write_mo(buffer, catalog, use_fuzzy=False)
    buffer.seek(0)
    return gettext.GNUTranslations(buffer)


def translations(locale: str) -> gettext.NullTranslations:
    """The catalog of ``locale`` (compiled if it must be); ``UnknownLocale`` when none."""
    if locale not in LOCALES:
        raise UnknownLocale(f"no catalog for locale {locale!r}; use one of {', '.join(LOCALES)}")
    with _lock:
        found = _loaded.get(locale)
        if found is not None:
            return found
        po, mo = po_path(locale), mo_path(locale)
        if mo.exists() and (not po.exists() or mo.stat().st_mtime >= po.stat().st_mtime):
            with mo.open("rb") as f:
                found = gettext.GNUTranslations(f)
        elif po.exists():
            log.info("Compiling the %s catalog in memory (run `make` to compile it once)", locale)
            found = _compile_in_memory(po)
        else:
            raise UnknownLocale(f"the {locale!r} catalog is missing from {LOCALE_DIR}")
        _loaded[locale] = found
        return found


def set_locale(locale: str) -> None:
    """Make ``locale`` the language of every text (``bridge.locale``; at start)."""
    global _active, _active_locale
    found = translations(locale)
    with _lock:
        _active, _active_locale = found, locale


def current_locale() -> str:
    return _active_locale


def _catalog() -> gettext.NullTranslations:
    if _active is None:
        set_locale(DEFAULT_LOCALE)
    assert _active is not None
    return _active


def _(message: str) -> str:
    """``message`` (an English message id) in the active locale."""
    return _catalog().gettext(message)


def ngettext(singular: str, plural: str, n: int) -> str:
    """The form for ``n`` of a text that has a singular and a plural."""
    return _catalog().ngettext(singular, plural, n)


def N_(message: str) -> str:
    """Marks a text for the catalogs without translating it yet (module-level constants): the
    code calls ``_()`` on it where it is shown."""
    return message
