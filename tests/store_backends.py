"""The execution store's backends for tests: `store_url` runs a test on SQLite and PostgreSQL.

SQLite gets a fresh file per test. PostgreSQL gets a fresh database per test, created on the
server named by ICS_TEST_POSTGRES_URL (`make test` starts a local one with
`scripts/postgres.sh start` and sets it) and dropped afterwards. Without that variable the
PostgreSQL cases fail, saying how to run them, unless ICS_SKIP_POSTGRES=1 skips them on
purpose: a green run has run both backends.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError, ProgrammingError

POSTGRES_ENV = "ICS_TEST_POSTGRES_URL"
SKIP_ENV = "ICS_SKIP_POSTGRES"


def postgres_admin_url() -> URL:
    """ICS_TEST_POSTGRES_URL with the psycopg driver; fail when unset (unless skipped)."""
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1: PostgreSQL store tests skipped on purpose")
    raw = os.environ.get(POSTGRES_ENV, "").strip()
    if not raw:
        pytest.fail(
            f"{POSTGRES_ENV} is not set: run the tests with `make test` (it starts a local "
            f"PostgreSQL), or set {POSTGRES_ENV} (`scripts/postgres.sh start` prints one), "
            f"or set {SKIP_ENV}=1 to skip the PostgreSQL store tests on purpose",
            pytrace=False,
        )
    url = make_url(raw)
    if url.get_backend_name() != "postgresql":
        pytest.fail(f"{POSTGRES_ENV} must be a postgresql:// URL, not {raw!r}", pytrace=False)
    return url.set(drivername="postgresql+psycopg")


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[Engine]:
    """An AUTOCOMMIT engine on the test server, to create and drop scratch databases."""
    url = postgres_admin_url()
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as e:
        engine.dispose()
        pytest.fail(
            f"cannot reach the PostgreSQL server of {POSTGRES_ENV} "
            f"({url.render_as_string(hide_password=True)}): {e.orig}",
            pytrace=False,
        )
    yield engine
    engine.dispose()


def _postgres_database(admin: Engine) -> Iterator[str]:
    name = f"ics_t_{secrets.token_hex(6)}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        drop_database(admin, name)


def drop_database(admin: Engine, name: str, *, if_exists: bool = True) -> None:
    """DROP DATABASE ... WITH (FORCE), again for up to 10 s while the server refuses it.

    FORCE ends the other processes on the database, but only those the caller may signal:
    without pg_signal_backend (`scripts/postgres.sh` grants it), a process of no role the
    caller belongs to (every test connects as the one role, so most likely an autovacuum
    worker) makes the DROP fail until it is gone.
    """
    deadline = time.monotonic() + 10.0
    exists = "IF EXISTS " if if_exists else ""
    while True:
        try:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE {exists}"{name}" WITH (FORCE)'))
            return
        except ProgrammingError as e:
            if "pg_signal_backend" not in str(e.orig) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty execution store: a new SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
    else:
        yield from _postgres_database(request.getfixturevalue("postgres_admin"))


@pytest.fixture
def store_backend(store_url: str) -> str:
    """'sqlite' or 'postgresql': the backend of this test's `store_url`."""
    return make_url(store_url).get_backend_name()


@pytest.fixture(name="other_store_url")
def other_store_url_fixture(
    store_backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[str]:
    """A second empty store on the same backend as `store_url` (to compare two schemas)."""
    if store_backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'other.db'}"
    else:
        yield from _postgres_database(request.getfixturevalue("postgres_admin"))
