"""Run the bridge (``python -m bridge run``) under cProfile, profiling only between signals.

``SIGUSR1`` starts profiling, ``SIGUSR2`` stops it and writes the stats to ``--out`` (pstats
format). Only the event-loop thread is profiled (aiosqlite's worker thread mostly waits on its
queue). With asyncio, each resumption of a coroutine counts as a call and ``cumtime`` covers only
the time a frame was on the stack, i.e. the CPU spent in it and below, not the time it awaited.

Usage: ``python bench/profile_bridge.py --out core.pstats -- run -c config.yaml``.
"""

from __future__ import annotations

import argparse
import cProfile
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("bridge_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    bridge_args = [a for a in args.bridge_args if a != "--"]
    profiler = cProfile.Profile()

    def start(*_: object) -> None:
        profiler.enable()

    def stop(*_: object) -> None:
        profiler.disable()
        profiler.dump_stats(args.out)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    from bridge.cli import main as bridge_main

    return bridge_main(bridge_args)


if __name__ == "__main__":
    sys.exit(main())
