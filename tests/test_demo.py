"""The demo, as `make demo` runs it: every side must see the scripted conversation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_demo_once_verifies_the_conversation_on_every_side(tmp_path: Path) -> None:
    state = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "demo", "--once", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Verified on every side." in result.stdout
    for side in ("on pandalab saw:", "on medipeps saw:", "on Matrix saw:"):
        assert side in result.stdout

    demo = json.loads((state / "demo.json").read_text())
    assert demo["homeserver_url"].startswith("http://127.0.0.1:")
    assert demo["native_users"][0]["user_id"].startswith("@")
    assert demo["native_users"][0]["password"]
    assert set(demo["sandboxes"]) == {"pandalab", "medipeps", "webhook"}  # every type
    for sandbox in demo["sandboxes"].values():
        assert sandbox["url"].startswith("http://127.0.0.1:")
        assert len(sandbox["users"]) >= 2
    # The secrets it generated stay out of what it prints.
    registration = (state / "registration.yaml").read_text()
    for line in registration.splitlines():
        if line.startswith(("as_token:", "hs_token:")):
            assert line.split(":", 1)[1].strip() not in result.stdout + result.stderr
