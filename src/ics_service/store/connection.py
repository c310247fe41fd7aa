"""Connecting to a store: URL parsing, engines per dialect, and database errors as StoreErrors.

SQLite (a file, in WAL mode so several processes can share it) and PostgreSQL
(psycopg 3) are the two dialects. Everything dialect-specific about opening one lives here.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import sqlite3
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

from ..errors import StoreError, StoreLost, install_hint
from ..redact import secret_name

log = logging.getLogger(__name__)

#: Seconds to wait for a PostgreSQL server before saying it cannot be reached (libpq waits
#: forever by default, and a firewall that drops packets would hang every command).
PG_CONNECT_TIMEOUT = 5

#: The PostgreSQL advisory lock that serializes migrations (any constant; per database).
_MIGRATION_LOCK = 0x1C5_5C4E

_HOW_TO_NAME_A_STORE = "use sqlite:///PATH or postgresql://USER@HOST/DB"


def safe_url(url: str) -> str:
    """The URL with its password hidden, in its user information or its query (libpq takes
    `?password=`; any name that `secret_name` takes for a secret), also when it does not
    parse."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        hidden = re.sub(r"(//[^/:@]*:)[^/@]*@", r"\1***@", url)
        return re.sub(
            r"([?&])([^=&]*)=([^&#]*)",
            lambda m: f"{m[1]}{m[2]}={'***' if secret_name(m[2]) else m[3]}",
            hidden,
        )
    secret = [k for k in parsed.query if secret_name(k)]
    if parsed.password is None and not secret:
        # Rendering escapes characters (sqlite:///file:PATH would read file%3APATH): without
        # a secret, the URL as the user wrote it is the clearer name.
        return url
    if secret:
        parsed = parsed.update_query_dict({k: "***" for k in secret})
    return parsed.render_as_string(hide_password=True).replace("%2A%2A%2A", "***")


def open_engine(url: str, *, create: bool = True) -> Engine:
    """An engine on the store at url; with create=False a missing SQLite file is an error."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise StoreError(f"bad store URL {safe_url(url)!r}; {_HOW_TO_NAME_A_STORE}") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(parsed, safe_url(url), create=create)
    if backend == "postgresql":
        return _postgresql_engine(parsed)
    raise StoreError(f"unsupported store {backend!r} in {safe_url(url)!r}; {_HOW_TO_NAME_A_STORE}")


def sqlite_file(parsed: URL) -> Path | None:
    """The file a SQLite URL opens, or None for an in-memory database."""
    database = parsed.database or ""
    if parsed.query.get("uri") == "true" and database.startswith("file:"):
        # sqlite:///file:PATH?mode=ro&uri=true: SQLite's own URI syntax (read-only mode).
        if parsed.query.get("mode") == "memory":
            return None
        database = unquote(database.removeprefix("file:").removeprefix("//localhost"))
        if database.startswith("//"):  # file:///PATH
            database = database[2:]
    if database in ("", ":memory:"):
        return None
    return Path(database)


def _sqlite_engine(parsed: URL, shown: str, *, create: bool) -> Engine:
    path = sqlite_file(parsed)
    if path is None:
        raise StoreError(
            f"the store {shown!r} is an in-memory SQLite database, which forgets every "
            "execution when the command ends: a store must be a file, sqlite:///PATH"
        )
    if path.is_dir():
        raise StoreError(
            f"the execution store {shown} is a folder: a store must be a file, "
            f"e.g. sqlite:///{path / 'ics.db'}"
        )
    if not path.exists():
        if not create or parsed.query.get("mode") == "ro":  # read-only never creates
            raise StoreError(
                f"no execution store at {path}: nothing has run with this store yet "
                "(or --store/ICS_STORE points elsewhere)"
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(
                f"cannot open the execution store {shown}: cannot create its folder "
                f"({e.strerror}: {e.filename}); choose a path in a folder you can write"
            ) from None
    engine = create_engine(parsed, connect_args={"timeout": 30})
    event.listen(engine, "connect", _sqlite_pragmas)
    guard = FileGuard(path, shown)
    _GUARDS[engine] = guard
    event.listen(engine, "checkout", guard.on_checkout)
    # Before SQLite opens (and would create) the path again for a new connection.
    event.listen(engine, "do_connect", guard.on_connect)
    return engine


class FileGuard:
    """Notices that a SQLite store's file was deleted or replaced under an open store.

    SQLite keeps writing to the file it opened, so a store whose file is deleted goes on
    committing into a file nobody can open again: every record since is lost without an
    error. The guard remembers the file (device and inode) the first time a connection is
    taken, and each later checkout (every transaction and read) checks that the path is
    still that file: if not, StoreLost. `Store.verify()` checks once more at the end.
    """

    def __init__(self, path: Path, shown: str) -> None:
        self.path = path
        self.shown = shown
        self.identity: tuple[int, int] | None = None
        #: Once lost, lost for good: a file created at the path later (by SQLite itself,
        #: for a new connection) may even get the lost file's inode number.
        self.lost: str | None = None

    def on_checkout(self, _dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        self.check()

    def on_connect(self, *_args: Any) -> None:
        if self.identity is not None:
            self.check()

    def check(self) -> None:
        if self.lost is not None:
            raise StoreLost(self.lost)
        try:
            st = os.stat(self.path)
            now: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            now = None
        except OSError:
            return  # unreadable metadata: SQLite itself says what is wrong
        if self.identity is None:
            self.identity = now
            return
        if now == self.identity:
            return
        what = "deleted" if now is None else "replaced by another file"
        self.lost = (
            f"the execution store {self.shown} was {what} while this process used it: what "
            "it recorded since then is lost (results files and capture keep their copies); "
            "do not delete a store that a running command, ics serve or ics watch uses: "
            "stop them first, then run again"
        )
        raise StoreLost(self.lost)


#: The FileGuard of each SQLite engine.
_GUARDS: weakref.WeakKeyDictionary[Engine, FileGuard] = weakref.WeakKeyDictionary()


def file_guard(engine: Engine) -> FileGuard | None:
    """The engine's FileGuard (a SQLite store), or None."""
    return _GUARDS.get(engine)


def _postgresql_engine(parsed: URL) -> Engine:
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in parsed.query:  # the URL's own setting wins
        connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT
    try:
        return create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
    except (ImportError, NoSuchModuleError):
        raise StoreError(f"a PostgreSQL store needs psycopg: {install_hint('postgres')}") from None


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # Connections switching a new file to WAL at once can deadlock on the lock upgrade;
    # SQLite then fails one of them at once, without a busy wait: try again.
    for attempt in itertools.count(1):
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or attempt >= 100:
                raise
            time.sleep(min(0.01 * attempt, 0.2))
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def lock_for_migration(conn: Connection) -> None:
    """Serialize migrations, and make SQLite's DDL part of the migrating transaction."""
    if conn.dialect.name == "sqlite":
        # pysqlite opens a transaction only before INSERT/UPDATE/DELETE, so DDL would
        # otherwise commit on its own. BEGIN IMMEDIATE also takes the write lock now
        # (waiting up to busy_timeout for another migrating store).
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    elif conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})


# --- database errors as StoreErrors -------------------------------------------------------


@contextmanager
def store_errors(shown_url: str) -> Iterator[None]:
    """Turn any SQLAlchemy error raised in the block into a StoreError naming the store."""
    try:
        yield
    except SQLAlchemyError as e:
        # The SQLAlchemy error quotes the statement and its parameters: only a DEBUG log
        # line may show it, never the error that reaches users (or a JSON log's traceback).
        log.debug("store error on %s", shown_url, exc_info=True)
        raise store_error(e, shown_url) from None


def store_error(e: SQLAlchemyError, shown_url: str) -> StoreError:
    """A StoreError saying what failed and how to fix it, with no SQL and no parameters."""
    orig = getattr(e, "orig", None)
    # The driver's own message never holds the statement; its first line also leaves out
    # PostgreSQL's DETAIL and LINE context, which quote values and SQL.
    raw = str(orig) if orig is not None else (str(e.args[0]) if e.args else type(e).__name__)
    detail = raw.strip().splitlines()[0] if raw.strip() else type(orig or e).__name__
    code = getattr(orig, "sqlite_errorname", None)
    if code is not None:
        return StoreError(_sqlite_message(str(code), detail, shown_url))
    if orig is not None and getattr(orig, "sqlstate", "") is None:
        # psycopg's errors without an SQLSTATE never reached the server.
        return StoreError(
            f"cannot open the execution store {shown_url}: {detail}; is the PostgreSQL "
            "server running and reachable, and are the host, port, user and password right?"
        )
    return StoreError(f"the execution store {shown_url} failed: {detail}")


def _sqlite_message(code: str, detail: str, shown: str) -> str:
    # SQLite's extended codes (SQLITE_IOERR_WRITE...) share their primary code's fix.
    primary = "_".join(code.split("_")[:2])
    if primary == "SQLITE_READONLY":
        return (
            f"the execution store {shown} is read-only ({detail}): it can be read, but "
            "running or changing executions needs it writable (no mode=ro; a file and "
            "folder this user can write)"
        )
    if primary == "SQLITE_FULL":
        return (
            f"the disk of the execution store {shown} is full ({detail}): free some space, "
            "then resume the execution (`ics executions resume ID`)"
        )
    if primary == "SQLITE_IOERR":
        return f"I/O error on the execution store {shown} ({detail}): check its disk"
    if primary in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
        return (
            f"{shown} is not a usable execution store ({detail}): point --store/ICS_STORE "
            "at an ICS store, or at a new file"
        )
    if primary == "SQLITE_CANTOPEN":
        return (
            f"cannot open the execution store {shown} ({detail}): it must be a file in a "
            "folder this user can write"
        )
    if primary in ("SQLITE_BUSY", "SQLITE_LOCKED"):
        return (
            f"the execution store {shown} is busy ({detail}): another process holds it "
            "locked; try again when it is done"
        )
    return f"the execution store {shown} failed: {detail}"
