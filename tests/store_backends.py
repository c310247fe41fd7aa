"""The execution store's backends for tests: `store_url` runs a test on SQLite and PostgreSQL.

SQLite gets a fresh file per test. PostgreSQL gets a fresh database per test, created on the
server named by ICS_TEST_POSTGRES_URL (`scripts/postgres.sh start` starts one and prints
it) and dropped afterwards. Without that variable the PostgreSQL cases are skipped, except
under CI (the environment variable CI set), where they fail: CI must run both backends.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError

POSTGRES_ENV = "ICS_TEST_POSTGRES_URL"


def running_in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def postgres_admin_url() -> URL:
    """ICS_TEST_POSTGRES_URL with the psycopg driver; skip (or fail under CI) when unset."""
    raw = os.environ.get(POSTGRES_ENV, "").strip()
    if not raw:
        msg = f"{POSTGRES_ENV} is not set; `scripts/postgres.sh start` prints one"
        if running_in_ci():
            pytest.fail(f"{msg}. CI must run the PostgreSQL store tests.", pytrace=False)
        pytest.skip(msg)
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
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


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
