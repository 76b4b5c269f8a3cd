"""Shared pytest fixtures for the whole suite (ports, PostgreSQL databases, real Synapse)."""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, Protocol
from urllib.parse import urlsplit, urlunsplit

import pytest
from aiohttp import ClientSession, ClientTimeout
from mautrix.util.async_db import Database

from bridge.config import DatabaseConfig
from bridge.db.database import open_database
from bridge.devtools.ports import free_port as _free_port
from bridge.devtools.synapse import LocalSynapse

# Admin connection used to create and drop one database per test. Override for a PostgreSQL
# elsewhere than the local trust-auth default.
POSTGRES_ADMIN_URL = os.environ.get(
    "EIMIS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def unavailable(reason: str) -> NoReturn:
    """A missing test dependency: a failure when CI is set, a skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by the fixtures they use, so `-m "not e2e"` / `-m "not postgres"` work."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "postgres_url" in names:
            item.add_marker(pytest.mark.postgres)
        if "synapse_factory" in names:
            item.add_marker(pytest.mark.e2e)


# -- ports -----------------------------------------------------------------------------------


@pytest.fixture
def free_port() -> Callable[[], int]:
    """A function returning a free TCP port on 127.0.0.1 (call it once per port needed)."""
    return _free_port


# -- PostgreSQL ------------------------------------------------------------------------------


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """The URL of a fresh, uniquely named PostgreSQL database, dropped after the test."""
    import asyncpg

    try:
        admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    except (TimeoutError, OSError, asyncpg.PostgresError) as e:
        unavailable(f"PostgreSQL is not reachable at {_redacted(POSTGRES_ADMIN_URL)}: {e!r}")
    name = f"eimis_test_{uuid.uuid4().hex[:16]}"
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield urlunsplit(urlsplit(POSTGRES_ADMIN_URL)._replace(path=f"/{name}"))
    finally:
        admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


# -- Synapse ---------------------------------------------------------------------------------


class SynapseFactory(Protocol):
    async def __call__(self, registrations: Sequence[Path] = (), **kwargs: Any) -> LocalSynapse: ...


@pytest.fixture
async def synapse_factory(tmp_path: Path) -> AsyncIterator[SynapseFactory]:
    """Start LocalSynapse homeservers in tmp_path; all are stopped after the test.

    ``await synapse_factory([registration_yaml], server_name=..., ...)`` returns a started
    LocalSynapse; keyword arguments go to LocalSynapse (``state_dir`` included).
    """
    if importlib.util.find_spec("synapse") is None:
        unavailable("matrix-synapse is not installed (pip install -e '.[test]')")
    started: list[LocalSynapse] = []

    async def start(registrations: Sequence[Path] = (), **kwargs: Any) -> LocalSynapse:
        state_dir = kwargs.pop("state_dir", tmp_path / f"synapse{len(started)}")
        homeserver = LocalSynapse(state_dir, appservice_registrations=registrations, **kwargs)
        started.append(homeserver)
        await homeserver.start()
        return homeserver

    try:
        yield start
    finally:
        errors: list[BaseException] = []
        for homeserver in reversed(started):
            try:
                await homeserver.stop()
            except Exception as e:  # noqa: BLE001 - stop the others anyway
                errors.append(e)
        if errors:
            raise errors[0]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The test runs twice: on a SQLite file, and on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'state' / 'bridge.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    """The bridge's database (schema up to date) on each engine."""
    database = await open_database(DatabaseConfig(url=database_url))
    try:
        yield database
    finally:
        await database.stop()


@pytest.fixture(scope="module")
async def http() -> AsyncIterator[ClientSession]:
    """One HTTP client for a test module (sandbox users, probes, proxies)."""
    # Bounded below the test timeout, so a request that hangs fails with its URL.
    async with ClientSession(timeout=ClientTimeout(total=60)) as session:
        yield session
