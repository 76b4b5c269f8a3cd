"""Directory import: a synthetic 100,000-line ANS PS_LibreAcces extract imported into a fresh
database through the bridge's own importer (header-driven parser, IDNPS checks, batched
``executemany`` upserts), first into an empty directory, then again over itself (every line
compared, nothing rewritten).

For ``bench/run.py``: ``await measure(lines=100_000)`` returns a dict of results (lines/s of
both passes, seconds, rejected lines) for SQLite and, with ``postgres_url``, PostgreSQL.
Usage: ``python bench/directory_import.py [--lines N] [--postgres URL]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge.config import DatabaseConfig  # noqa: E402
from bridge.db.database import open_database  # noqa: E402
from bridge.db.directory import DirectoryStore  # noqa: E402
from bridge.directory.importer import import_file  # noqa: E402
from bridge.directory.sample import write_extract  # noqa: E402


async def _one(database_url: str, extract: Path) -> dict[str, Any]:
    db = await open_database(DatabaseConfig(url=database_url))
    try:
        store = DirectoryStore(db)
        first = await import_file(store, extract, progress=False)
        again = await import_file(store, extract, progress=False)
        return {
            "lines": first.lines,
            "rejected": len(first.rejected),
            "professionals": await store.count(),
            "first_import_s": round(first.seconds, 3),
            "first_import_lines_per_s": round(first.lines_per_s),
            "reimport_s": round(again.seconds, 3),
            "reimport_lines_per_s": round(again.lines_per_s),
            "reimport_changed": again.written,
        }
    finally:
        await db.stop()


async def measure(lines: int = 100_000, postgres_url: str | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="eimis-directory-bench-") as tmp:
        work = Path(tmp)
        extract = work / "PS_LibreAcces_Personne_activite_bench.txt"
        write_extract(extract, lines, bad_every=1000)
        results = {"sqlite": await _one(f"sqlite:{work / 'bridge.db'}", extract)}
        if postgres_url:
            results["postgresql"] = await _one(postgres_url, extract)
    return results


async def _fresh_postgres(admin_url: str) -> tuple[str, Any]:
    import uuid
    from urllib.parse import urlsplit, urlunsplit

    import asyncpg

    name = f"eimis_bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()

    async def drop() -> None:
        conn = await asyncpg.connect(admin_url)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()

    return urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}")), drop


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    drop = None
    url = None
    if args.postgres:
        url, drop = await _fresh_postgres(args.postgres)
    try:
        return await measure(args.lines, url)
    finally:
        if drop is not None:
            await drop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument(
        "--postgres",
        metavar="ADMIN_URL",
        help="also PostgreSQL, in a database made (and dropped) through this admin URL",
    )
    results = asyncio.run(main_async(parser.parse_args()))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
