"""``eimis-bridge demo``: a local Synapse, the bridge, the vendor sandboxes and a scripted
conversation."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    demo = sub.add_parser("demo", help="local Synapse + bridge + sandboxes + a scripted chat")
    demo.add_argument(
        "--once",
        action="store_true",
        help="exit after the scripted conversation: 0 only if every side saw it",
    )
    demo.add_argument("--state-dir", type=Path, default=Path(".demo"))
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from bridge.devtools.demo import run_demo

    return asyncio.run(run_demo(args.state_dir, once=args.once))
