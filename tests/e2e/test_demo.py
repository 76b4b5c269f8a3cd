"""The demo, as `make demo` runs it: every side must see the scripted conversation."""

from __future__ import annotations

import json
import os
import signal
import socket
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
    assert "Vérifié de chaque côté." in result.stdout  # the transcript is in French
    # A vendor user found from any Matrix client's people search (the user directory).
    assert "tapé dans la recherche de personnes de n'importe quel client Matrix trouve :" in (
        result.stdout
    )
    assert "(@eimis_" in result.stdout
    for side in ("sur pandalab a vu :", "sur medipeps a vu :", "sur Matrix a vu :"):
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


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_the_running_demo_stops_every_server_it_started_on_sigint_and_sigterm(
    tmp_path: Path, sig: signal.Signals
) -> None:
    state = tmp_path / "demo"
    demo = subprocess.Popen(
        [sys.executable, "-m", "bridge", "demo", "--state-dir", str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    synapse_pid = None
    try:
        assert demo.stdout is not None
        lines = []
        for line in demo.stdout:  # until it says it keeps running (or it ends)
            lines.append(line)
            if line.startswith("Toujours en marche."):
                break
        assert "Vérifié de chaque côté.\n" in lines, "".join(lines)
        synapse_pid = int((state / "synapse" / "synapse.pid").read_text())
        shown = json.loads((state / "demo.json").read_text())
        urls = [shown["homeserver_url"]] + [s["url"] for s in shown["sandboxes"].values()]
        demo.send_signal(sig)
        exit_status = demo.wait(timeout=120)
    finally:
        if demo.poll() is None:
            demo.kill()
        synapse_left = synapse_pid is not None and _alive(synapse_pid)
        if synapse_left:  # a failure must not leave its Synapse running
            os.kill(synapse_pid, signal.SIGKILL)
    assert exit_status == 0
    assert not synapse_left, "the demo's Synapse outlived it"
    for url in urls:  # and nothing answers where the sandboxes were
        host, port = url.removeprefix("http://").rsplit(":", 1)
        with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=5):
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
