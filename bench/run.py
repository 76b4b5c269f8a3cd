"""Every benchmark, one table: ``make bench``.

Runs, in order: throughput (core Matrix -> vendor on SQLite and PostgreSQL with its two
baselines, vendor -> Matrix, and the profiles), scale, end-to-end latency through Synapse, the
200 MB media memory benchmark, a 100,000-line directory import, the encryption overhead
(encrypted vs plain DMs through Synapse: latency and the bridge's CPU per message), and hostile
formatted messages (conversion time against size, ``/live`` while five are converted), and a
backfill of 1,000 messages into a new portal against Synapse's own send rate. Each figure
that has a target is a ratio against a baseline measured in the same run, or an absolute the
target names.
All figures are merged into ``bench/results/latest.json``; the table is printed at the end. A
benchmark that fails is reported (``<name>_error``) and the others still run.

Usage: ``python bench/run.py
[--only throughput,scale,e2e,media,directory,encryption,conversion,backfill,discovery]
[--discovery-entries 100000] [--events 5000] [--profile-events 2000] [--samples 200]
[--media-mb 200]``. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, merge_results, stop_on_signals  # noqa: E402

# (key, label, target text, check) for the table; a None check is a figure without a target.
Check = Callable[[float], bool] | None
ROWS: list[tuple[str, str, str, Check]] = [
    (
        "core_events_per_s_sqlite",
        "core Matrix->vendor, SQLite (events/s)",
        ">= 2500",
        lambda v: v >= 2500,
    ),
    ("core_events_per_s_postgres", "core Matrix->vendor, PostgreSQL (events/s)", "", None),
    ("core_baseline_naive_events_per_s", "  baseline (a) naive forwarder (events/s)", "", None),
    (
        "core_baseline_naive_uvloop_events_per_s",
        "  same, on uvloop like the bridge (events/s)",
        "",
        None,
    ),
    (
        "core_baseline_client_ceiling_events_per_s",
        "  baseline (b) client ceiling, 32 in flight (events/s)",
        "",
        None,
    ),
    ("core_ratio_vs_baseline", "core / naive forwarder", ">= 1.2", lambda v: v >= 1.2),
    ("core_ratio_vs_baseline_same_loop", "  core / naive forwarder on uvloop", "", None),
    ("core_ratio_vs_client_ceiling", "core / client ceiling", ">= 0.6", lambda v: v >= 0.6),
    ("core_order_violations", "core order violations (SQLite + PostgreSQL)", "0", lambda v: v == 0),
    ("core_undelivered", "  core messages never delivered", "0", lambda v: v == 0),
    ("core_baseline_naive_order_violations", "  naive forwarder order violations", "", None),
    (
        "vendor_to_matrix_events_per_s",
        "vendor->Matrix, SQLite (events/s)",
        ">= 2500",
        lambda v: v >= 2500,
    ),
    ("vendor_to_matrix_order_violations", "vendor->Matrix order violations", "0", lambda v: v == 0),
    (
        "vendor_to_matrix_undelivered",
        "  vendor->Matrix messages never delivered",
        "0",
        lambda v: v == 0,
    ),
    ("e2e_bridge_latency_ms_p50", "e2e PandaLab->Medipeps via Synapse p50 (ms)", "", None),
    ("e2e_bridge_latency_ms_p99", "e2e PandaLab->Medipeps via Synapse p99 (ms)", "", None),
    ("e2e_synapse_as_latency_ms_p50", "  baseline Synapse send->appservice p50 (ms)", "", None),
    ("e2e_synapse_as_latency_ms_p99", "  baseline Synapse send->appservice p99 (ms)", "", None),
    ("e2e_overhead_ratio_p50", "e2e overhead ratio p50", "<= 1.25", lambda v: v <= 1.25),
    ("e2e_overhead_ratio_p99", "e2e overhead ratio p99", "", None),
    ("scale_startup_s", "scale: start-up to /ready, 1M-row DB (s)", "< 2", lambda v: v < 2),
    ("scale_startup_s_empty_db", "  same, empty DB (s)", "", None),
    ("scale_rss_mb", "scale: RSS after start, 1M-row DB (MB)", "< 200", lambda v: v < 200),
    ("scale_rss_mb_after_core", "  RSS after a core run (MB)", "", None),
    (
        "scale_lookup_ratio",
        "scale: per-message lookups, 1M-row / empty DB",
        "<= 1.5",
        lambda v: v <= 1.5,
    ),
    ("scale_sql_lookup_ratio", "  bare SQL lookups, 1M-row / empty DB", "", None),
    ("scale_core_events_per_s", "  core at scale (events/s)", "", None),
    ("media_rss_rise_ratio_to_file_size", "media: RSS rise / 200 MB file", "", None),
    (
        "directory_import_s_sqlite",
        "directory: 100,000-line PS_LibreAcces import, SQLite (s)",
        "< 60",
        lambda v: v < 60,
    ),
    ("directory_import_s_postgres", "  same, PostgreSQL (s)", "", None),
    (
        "e2ee_native_to_vendor_ms_p50",
        "e2ee: native->PandaLab p50, encrypted DM (ms)",
        "",
        None,
    ),
    ("plain_native_to_vendor_ms_p50", "  same, plain DM (ms)", "", None),
    (
        "e2ee_vendor_to_native_ms_p50",
        "e2ee: PandaLab->native p50, encrypted DM (ms)",
        "",
        None,
    ),
    ("plain_vendor_to_native_ms_p50", "  same, plain DM (ms)", "", None),
    (
        "e2ee_latency_ratio_p50",
        "e2ee latency ratio encrypted/plain p50 (worse way)",
        "<= 1.3",
        lambda v: v <= 1.3,
    ),
    ("e2ee_latency_ratio_p99", "e2ee latency ratio encrypted/plain p99 (worse way)", "", None),
    ("e2ee_bridge_cpu_ms_per_message", "e2ee: bridge CPU per message, encrypted (ms)", "", None),
    ("plain_bridge_cpu_ms_per_message", "  same, plain (ms)", "", None),
    ("e2ee_cpu_ratio", "e2ee: bridge CPU ratio encrypted/plain", "", None),
    ("profile_core_db_round_trips_per_event", "profile: DB round trips per core event", "", None),
    (
        "profile_core_cpu_ms_per_event_profiled",
        "profile: bridge CPU ms per core event (under cProfile)",
        "",
        None,
    ),
    ("conversion_ms_1kb", "conversion: hostile HTML, 1 KB, slowest family (ms)", "", None),
    ("conversion_ms_10kb", "  same, 10 KB (ms)", "", None),
    ("conversion_ms_40kb", "  same, 40 KB (ms)", "", None),
    (
        "conversion_per_kb_ratio_40_vs_1",
        "conversion: time per KB, 40 KB / 1 KB (linear: ~1)",
        "<= 1.5",
        lambda v: v <= 1.5,
    ),
    (
        "conversion_live_ms_max",
        "conversion: /live max while 5 x 40 KB convert (ms)",
        "< 1000",
        lambda v: v < 1000,
    ),
    ("conversion_hostile_delivered_s", "  the 5 delivered after (s)", "", None),
    ("backfill_s", "backfill: 1,000 messages into a new portal (s)", "", None),
    ("backfill_msgs_per_s", "  backfill (messages/s)", "", None),
    (
        "synapse_send_msgs_per_s",
        "  baseline Synapse appservice send with ts (messages/s)",
        "",
        None,
    ),
    ("backfill_vs_synapse", "backfill / Synapse's own send rate", "", None),
    ("discovery_entries", "directory entries published in the user directory", "", None),
    ("discovery_publish_s", "  publish them (register + name ghosts) (s)", "", None),
    ("discovery_ghosts_per_s", "  ghosts published per second", "", None),
    (
        "discovery_baseline_synapse_per_s",
        "  baseline Synapse alone, register + name (users/s)",
        "",
        None,
    ),
    (
        "discovery_vs_synapse",
        "publish rate / Synapse's own rate",
        ">= 0.5",
        lambda v: v >= 0.5,
    ),
    ("user_search_p50_ms_no_ghosts", "user directory search p50, no ghosts (ms)", "", None),
    ("user_search_p50_ms_with_ghosts", "user directory search p50, with ghosts (ms)", "", None),
    ("user_search_p95_ms_with_ghosts", "user directory search p95, with ghosts (ms)", "", None),
    (
        "user_search_ratio_with_vs_without",
        "user search p50 with / without ghosts",
        "",
        None,
    ),
]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(results: dict[str, Any]) -> str:
    lines = [
        f"{'metric':<58} {'value':>12}  {'target':<8} met",
        f"{'-' * 58} {'-' * 12}  {'-' * 8} ---",
    ]
    for key, label, target, check in ROWS:
        value = results.get(key)
        if value is None:
            shown, met = "-", ("n/a" if check else "")
        else:
            shown = _fmt(value)
            met = ("yes" if check(float(value)) else "NO") if check else ""
        lines.append(f"{label:<58} {shown:>12}  {target:<8} {met}")
    return "\n".join(lines)


def targets_met(results: dict[str, Any]) -> dict[str, bool]:
    return {
        key: bool(check(float(results[key])))
        for key, _, _, check in ROWS
        if check is not None and key in results
    }


def _tree_state() -> dict[str, Any]:
    """Which code was measured: the commit, and the files changed on top of it."""
    import subprocess

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [
        line[3:]
        for line in git("status", "--porcelain").splitlines()
        if line[3:].startswith(("bridge/", "connectors/"))
    ]
    return {
        "bench_git_head": git("rev-parse", "--short", "HEAD"),
        "bench_git_uncommitted_code": dirty,
    }


async def _media(media_memory: Any, size_mb: int) -> dict[str, Any]:
    """The media benchmark, then its work directory (Synapse state, ~2 x the file) removed."""
    import glob
    import shutil
    import tempfile

    pattern = str(Path(tempfile.gettempdir()) / "eimis-bench-*")
    before = set(glob.glob(pattern))
    try:
        return dict(await media_memory.run(size_mb))
    finally:
        for path in set(glob.glob(pattern)) - before:
            shutil.rmtree(path, ignore_errors=True)


async def _directory(directory_import: Any) -> dict[str, Any]:
    """A 100,000-line PS_LibreAcces extract imported into an empty directory, then again."""
    from common import postgres_database

    async with postgres_database("eimis_bench_directory") as pg_url:
        measured = await directory_import.measure(100_000, pg_url)
    figures: dict[str, Any] = {}
    for engine, run in measured.items():
        key = "postgres" if engine == "postgresql" else engine
        figures[f"directory_import_lines_per_s_{key}"] = run["first_import_lines_per_s"]
        figures[f"directory_import_s_{key}"] = run["first_import_s"]
        figures[f"directory_reimport_lines_per_s_{key}"] = run["reimport_lines_per_s"]
        figures[f"directory_import_rejected_{key}"] = run["rejected"]
    return figures


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    stop_on_signals()
    import backfill
    import conversion
    import directory_import
    import discovery
    import e2e_latency
    import encryption
    import media_memory
    import scale
    import throughput

    only = (
        set(args.only.split(","))
        if args.only
        else {
            "throughput",
            "scale",
            "e2e",
            "media",
            "directory",
            "encryption",
            "conversion",
            "backfill",
            "discovery",
        }
    )
    if RESULTS.exists():  # errors of earlier runs are not this run's
        old = json.loads(RESULTS.read_text())
        merge_results({}, drop=tuple(k for k in old if k.endswith("_error")))
    started = time.monotonic()
    results: dict[str, Any] = {"bench_loadavg_1min_at_start": round(os.getloadavg()[0], 2)}

    def log(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {line}", flush=True)

    steps: list[tuple[str, Callable[[], Any]]] = [
        (
            "throughput",
            lambda: throughput.run(args.events, profile_events=args.profile_events, log=log),
        ),
        ("scale", lambda: scale.run(log=log)),
        ("e2e", lambda: e2e_latency.run(args.samples, log=log)),
        ("media", lambda: _media(media_memory, args.media_mb)),
        ("directory", lambda: _directory(directory_import)),
        ("encryption", lambda: encryption.run(args.samples, log=log)),
        ("conversion", lambda: conversion.run(log=log)),
        ("backfill", lambda: backfill.run(1000, log=log)),
        ("discovery", lambda: discovery.run(args.discovery_entries, log=log)),
    ]
    for name, step in steps:
        if name not in only:
            continue
        log(f"== {name}")
        step_started = time.monotonic()
        try:
            figures = await step()
            results.update(figures)
            results[f"bench_seconds_{name}"] = round(time.monotonic() - step_started, 1)
            merge_results(
                {**figures, f"bench_seconds_{name}": results[f"bench_seconds_{name}"]},
                drop=(f"{name}_error",),
            )
        except Exception as error:
            traceback.print_exc()
            results[f"{name}_error"] = f"{type(error).__name__}: {error}"[:500]
            merge_results({f"{name}_error": results[f"{name}_error"]})
    results["bench_seconds_total"] = round(time.monotonic() - started, 1)
    results["bench_loadavg_1min_at_end"] = round(os.getloadavg()[0], 2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated: throughput,scale,e2e,media,directory,encryption,conversion,"
        "backfill,discovery",
    )
    parser.add_argument(
        "--discovery-entries",
        type=int,
        default=100_000,
        help="directory entries made searchable by the discovery benchmark (default 100000)",
    )
    parser.add_argument("--events", type=int, default=5_000)
    parser.add_argument("--profile-events", type=int, default=2_000)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--media-mb", type=int, default=200)
    args = parser.parse_args()
    try:
        results = asyncio.run(main_async(args))
    except asyncio.CancelledError:
        print("Interrupted: every server the benchmarks started is stopped.", file=sys.stderr)
        sys.exit(130)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    merge_results(
        {
            **results,
            "bench_run_at": stamp,
            "bench_cpu_count": os.cpu_count(),
            **_tree_state(),
        }
    )
    merge_results({"targets_met": targets_met(results)})
    print()
    print(table(results))
    load = results.get("bench_loadavg_1min_at_start", 0.0)
    if load > 0.5:
        print(
            f"\nWARNING: the machine was busy when the run started (load average {load:.2f} "
            "over 1 min on 2 cores): figures are lower than on a quiet machine."
        )
    errors = {k: v for k, v in results.items() if k.endswith("_error")}
    for key, value in errors.items():
        print(f"{key}: {value}")
    print(
        f"\nAll figures: {RESULTS.relative_to(ROOT)}; profiles: bench/results/profile_*.txt; "
        f"total {results['bench_seconds_total']:.0f} s"
    )
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
