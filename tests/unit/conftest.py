"""Keeps tests/unit/ free of Synapse: a test here that needs one fails and says where it goes.

A test is end to end when it uses the ``synapse_factory`` fixture (directly or through another
fixture; tests/conftest.py marks it ``e2e``) or is marked ``@pytest.mark.e2e`` by hand (a stack
of its own, such as ``LocalStack``). Those belong in tests/e2e/.
"""

from __future__ import annotations

import pytest


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("e2e") is not None:
        pytest.fail(
            f"{item.nodeid} needs a real Synapse (it is marked e2e): move it to tests/e2e/",
            pytrace=False,
        )
