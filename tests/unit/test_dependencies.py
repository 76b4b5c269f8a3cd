"""What the bridge is built on, as the encryption issue asks: vodozemac for Olm/Megolm, and no
libolm anywhere (python-olm wraps the deprecated libolm, CVE-2024-45191/2/3)."""

from __future__ import annotations

import importlib.metadata
import importlib.util


def test_python_olm_is_not_in_the_dependency_tree() -> None:
    assert importlib.util.find_spec("olm") is None
    assert importlib.util.find_spec("_libolm") is None
    names = {(d.metadata["Name"] or "").lower() for d in importlib.metadata.distributions()}
    assert "python-olm" not in names


def test_vodozemac_is_the_pinned_series() -> None:
    version = importlib.metadata.version("vodozemac")
    assert version.startswith("0.10."), version
    requires = [r.replace(" ", "") for r in importlib.metadata.requires("eimis-bridge") or []]
    [pin] = [r for r in requires if r.startswith("vodozemac")]
    assert set(pin.removeprefix("vodozemac").split(",")) == {">=0.10", "<0.11"}, pin
