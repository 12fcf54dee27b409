"""How the monitoring store (and the scheduler's own database) connect: engines, private sqlite files, database locks.

Part of ``monitor.store``. The sqlite files hold what users typed and said (prompts, comments, client ids) and, for the
scheduler's database, the jobs it runs, so they are created 0600 whatever the umask, and a file an older sdloop left
world-readable is tightened when it is opened. SQLite gives the ``-wal`` and ``-shm`` files it creates the database
file's mode; ones that already exist are tightened too. Every other file sdloop writes keeps honouring the umask.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import zlib
from typing import Any, Callable, Iterator

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from sdloop.errors import UserError
from sdloop.masking import mask_url

log = logging.getLogger("sdloop.store")

PRIVATE_MODE = 0o600
SQLITE_SIBLINGS = ("-wal", "-shm", "-journal")


class StoreError(UserError):
    """The monitoring store cannot be opened or used (bad URL, unreachable server, missing driver)."""


def _tighten(path: str) -> None:
    """chmod to 0600 when group or others may read or write; a file we do not own stays as it is (with a warning):
    refusing to start would stop the service over a mode only the owner can fix. By path, never through a file
    descriptor: closing any descriptor of an sqlite file drops every POSIX lock this process holds on it, and a
    connection that lost its locks can be told it is alone and lose another process's commits."""
    try:
        if stat.S_IMODE(os.stat(path).st_mode) & 0o077:
            os.chmod(path, PRIVATE_MODE)
    except FileNotFoundError:
        pass
    except PermissionError:
        log.warning("%s is readable by other users and is not ours to chmod; run `chmod 600 %s` as its owner", path,
                    path)


def private_sqlite_file(path: str) -> None:
    """Create the sqlite database ``path`` 0600 (before sqlite would create it with the umask's mode) or tighten the
    existing file and its journal siblings. A path we cannot create is left to sqlite, whose error the caller
    reports. A new file is created exclusively, so the descriptor closed here is never one of a file this process
    already has open in sqlite."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE))
    except FileExistsError:
        pass
    except OSError:
        return
    for suffix in ("", *SQLITE_SIBLINGS):
        _tighten(path + suffix)


def make_engine(url: str, setting: str = "SDLOOP_STORE_URL") -> Engine:
    """An engine for ``url``; for sqlite: a private file, WAL, full sync, foreign keys, a busy timeout and one pooled
    connection. ``setting`` names the variable a bad URL came from (the message tells the user what to fix)."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise StoreError(f"store URL {mask_url(url)!r} is not a database URL; set {setting} to e.g. "
                         "postgresql+psycopg://user:pass@host/db, or unset it for the workspace's sqlite file.") \
            from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            private_sqlite_file(parsed.database)
        engine = sa.create_engine(url, pool_size=1, max_overflow=0, pool_timeout=120,
                                  connect_args={"timeout": 60, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
            cur = dbapi_conn.cursor()
            for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON", "busy_timeout=60000"):
                cur.execute(f"PRAGMA {pragma}")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    try:
        return sa.create_engine(url, pool_size=8, max_overflow=16, pool_timeout=120, pool_pre_ping=True)
    except ModuleNotFoundError as e:
        raise StoreError(f"the database driver for {parsed.drivername} is not installed ({e.name}); for PostgreSQL "
                         "install psycopg[binary] and use postgresql+psycopg://...") from None


@contextlib.contextmanager
def advisory_lock(url: str, name: str, busy: Callable[[str], Exception]) -> Iterator[None]:
    """On PostgreSQL, hold the session advisory lock named ``name`` for the block, on a connection of its own (a
    session lock lives as long as its connection), or raise ``busy(host)`` at once when another session holds it:
    processes on other hosts sharing the database are excluded too. Nothing to do on sqlite: one host, and the
    caller's file lock already excludes the others."""
    if not url or not url.startswith("postgresql"):
        yield
        return
    key = zlib.crc32(name.encode())
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            if not conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
                raise busy(str(engine.url.host))
            try:
                yield
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    finally:
        engine.dispose()
