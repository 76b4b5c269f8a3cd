"""Benchmark: a 200 MB file crosses the bridge both ways with a bounded memory rise.

The bridge runs as its own process (``eimis-bridge run``), so its peak resident memory
(``VmHWM``) is its own. The baseline is the same process after a 1 MB file, measured in the same
run; the figure is the rise caused by the large file, and its ratio to the file's size (a bridge
that held the file whole would show a ratio of 1 or more).

Usage: ``python bench/media_memory.py [--size-mb 200]``; merges its keys into
``bench/results/latest.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, ClientTimeout

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from native_user import NativeUser, bridge_ready, file_chunks  # noqa: E402

from bridge.devtools.demo import SandboxUser, wait_for  # noqa: E402
from bridge.devtools.stack import LocalStack  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "latest.json"
CHUNK = 1024 * 1024


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


PDF_HEAD = b"%PDF-1.4\n"
MP4_HEAD = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom"
"""Files start as their declared type says: the bridge reads types from the content."""


def make_file(path: Path, size: int, head: bytes = b"") -> str:
    digest = hashlib.sha256()
    with path.open("wb") as out:
        digest.update(head)
        out.write(head)
        left = size - len(head)
        while left:
            chunk = os.urandom(min(CHUNK, left))
            digest.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


async def sha256_of_download(http: ClientSession, url: str) -> str:
    digest = hashlib.sha256()
    async with http.get(url, timeout=ClientTimeout(total=None)) as resp:
        resp.raise_for_status()
        async for chunk in resp.content.iter_chunked(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


async def run(size_mb: int) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="eimis-bench-"))
    # The space's file limit is raised for the large file (the default is 100 MiB).
    stack = LocalStack(
        work / "stack", config_overrides={"media": {"max_file_size": 300 * 1024 * 1024}}
    )
    await stack.start(with_bridge=False)
    bridge = subprocess.Popen(
        [sys.executable, "-m", "bridge", "run", "-c", str(stack.state_dir / "config.yaml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with ClientSession() as http:
            await wait_for("the bridge", lambda: bridge_ready(http, stack.bridge_url), 60)
            user_id, token = await stack.synapse.register_user("bench", "bench-password-1")
            native = NativeUser(http, stack.synapse.url, user_id, token)
            sandbox = stack.sandboxes["pandalab"]
            async with http.get(f"{sandbox.url}/_sandbox/users") as resp:
                alice = SandboxUser(http, sandbox, (await resp.json())["users"][0])
            ghost = f"@eimis_pandalab_{alice.idnps}:{stack.synapse.server_name}"
            room = (
                await native.call(
                    "POST",
                    "/_matrix/client/v3/createRoom",
                    json={"invite": [ghost], "is_direct": True, "preset": "trusted_private_chat"},
                )
            )["room_id"]
            opener = f"bench {time.time()}"
            await native.call(
                "PUT",
                f"/_matrix/client/v3/rooms/{room}/send/m.room.message/o1",
                json={"msgtype": "m.text", "body": opener},
            )

            async def alice_has(name: str) -> dict[str, Any] | None:
                for m in await alice.inbox():
                    if (m.get("attachment") or {}).get("name") == name:
                        return m
                return None

            async def matrix_to_vendor(name: str, size: int) -> float:
                path = work / name
                digest = make_file(path, size, PDF_HEAD)
                mxc = await native.upload(path, "application/pdf")
                await native.call(
                    "PUT",
                    f"/_matrix/client/v3/rooms/{room}/send/m.room.message/{name}",
                    json={
                        "msgtype": "m.file",
                        "body": name,
                        "url": mxc,
                        "info": {"mimetype": "application/pdf", "size": size},
                    },
                )
                message = await wait_for(f"{name} at PandaLab", lambda: alice_has(name), 600)
                got = await sha256_of_download(
                    http, f"{alice.base}/files/{message['attachment']['file_id']}"
                )
                assert got == digest, "the file arrived altered"
                path.unlink()
                return peak_rss_mb(bridge.pid)

            async def vendor_to_matrix(name: str, size: int) -> float:
                path = work / name
                digest = make_file(path, size, MP4_HEAD)
                async with http.post(
                    f"{alice.base}/files",
                    data=file_chunks(path),
                    headers={
                        "Content-Type": "video/mp4",
                        "X-Filename": name,
                        "Content-Length": str(size),
                    },
                    timeout=ClientTimeout(total=None),
                ) as resp:
                    file_id = (await resp.json())["file_id"]
                conversation = (await alice.conversations())[0]["conversation_id"]
                async with http.post(
                    f"{alice.base}/conversations/{conversation}/messages",
                    json={"text": "", "file_id": file_id},
                ) as resp:
                    resp.raise_for_status()

                async def arrived() -> str | None:
                    page = await native.call(
                        "GET",
                        f"/_matrix/client/v3/rooms/{room}/messages",
                        params={"dir": "b", "limit": "20"},
                    )
                    for event in page["chunk"]:
                        if (event.get("content") or {}).get("body") == name:
                            return str(event["content"]["url"])
                    return None

                mxc = await wait_for(f"{name} on Matrix", arrived, 600)
                server, media_id = mxc.removeprefix("mxc://").split("/", 1)
                digest_got = hashlib.sha256()
                async with http.get(
                    f"{stack.synapse.url}/_matrix/client/v1/media/download/{server}/{media_id}",
                    headers=native.headers,
                    timeout=ClientTimeout(total=None),
                ) as resp:
                    async for chunk in resp.content.iter_chunked(CHUNK):
                        digest_got.update(chunk)
                assert digest_got.hexdigest() == digest, "the file arrived altered"
                path.unlink()
                return peak_rss_mb(bridge.pid)

            started = time.monotonic()
            small = await matrix_to_vendor("small.pdf", 1024 * 1024)
            large = await matrix_to_vendor("large.pdf", size_mb * 1024 * 1024)
            to_vendor_s = time.monotonic() - started
            started = time.monotonic()
            large_back = await vendor_to_matrix("large.mp4", size_mb * 1024 * 1024)
            to_matrix_s = time.monotonic() - started
            file_mb = float(size_mb)
            return {
                "media_file_mb": file_mb,
                "media_bridge_peak_rss_mb_baseline": round(small, 1),
                "media_bridge_peak_rss_mb_after_matrix_to_vendor": round(large, 1),
                "media_bridge_peak_rss_mb_after_vendor_to_matrix": round(large_back, 1),
                "media_rss_rise_mb_matrix_to_vendor": round(large - small, 1),
                "media_rss_rise_mb_vendor_to_matrix": round(large_back - small, 1),
                "media_rss_rise_ratio_to_file_size": round(
                    (max(large, large_back) - small) / file_mb, 4
                ),
                "media_seconds_matrix_to_vendor": round(to_vendor_s, 1),
                "media_seconds_vendor_to_matrix": round(to_matrix_s, 1),
            }
    finally:
        bridge.terminate()
        bridge.wait(30)
        await stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    args = parser.parse_args()
    figures = asyncio.run(run(args.size_mb))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    merged.update(figures)
    RESULTS.write_text(json.dumps(merged, indent=2) + "\n")
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
