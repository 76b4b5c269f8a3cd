"""The real-Synapse harness's checks that need no running Synapse: a start failure reports the
log's tail, a busy port and a non-SQLite database are refused up front."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from bridge.devtools.synapse import LocalSynapse, SynapseStartError


async def test_start_failure_reports_log_tail(tmp_path: Path) -> None:
    hs = LocalSynapse(tmp_path / "hs", extra_config={"database": {"name": "nosuchdb"}})
    with pytest.raises(SynapseStartError, match="exited with code 1") as info:
        await hs.start()
    assert "Unsupported database type 'nosuchdb'" in str(info.value)
    assert "tail of" in str(info.value)
    assert not hs.running


async def test_busy_port_is_refused_up_front(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        hs = LocalSynapse(tmp_path / "hs", port=busy.getsockname()[1])
        with pytest.raises(SynapseStartError, match="already in use"):
            await hs.start()


def test_only_sqlite_is_supported(tmp_path: Path) -> None:
    with pytest.raises(NotImplementedError, match="sqlite"):
        LocalSynapse(tmp_path, database="postgres")
