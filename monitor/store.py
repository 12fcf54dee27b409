"""The monitoring store: every generation the service makes and every piece of feedback on it, in one database.

The monitor and the retraining loop feed on these rows, so nothing written here may be lost: a call returns only once
its transaction is committed (sqlite in WAL mode with ``synchronous=FULL``: the commit is on disk). One module behind
SQLAlchemy 2 Core serves both backends:

- an embedded sqlite file in the workspace by default (``sdloop.workspace.store_url()``): one connection per worker
  process, every transaction ``BEGIN IMMEDIATE`` so a read-then-write never fails on a lock upgrade, and a busy
  timeout so several workers on one file wait for each other instead of failing;
- PostgreSQL when ``SDLOOP_STORE_URL`` names one (``postgresql+psycopg://...``): what several replicas behind a load
  balancer share.

The schema is versioned: ``schema_version`` holds one row per applied migration, and ``MIGRATIONS`` is the ordered
list of functions that take the schema from version N-1 to N. ``migrate()`` applies the missing ones under a lock
(sqlite's write lock, PostgreSQL's advisory lock), so workers starting together migrate once; running it again
changes nothing.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import uuid
from typing import Any, Callable, Optional

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from sdloop.errors import UserError

metadata = sa.MetaData()

generations = sa.Table(
    "generations", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("created", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("negative_prompt", sa.Text, nullable=False, default=""),
    sa.Column("params", sa.JSON, nullable=False),
    sa.Column("model_version", sa.String(200), nullable=False, index=True),
    sa.Column("latency_s", sa.Float, nullable=False),
    sa.Column("descriptors", sa.JSON, nullable=False),
    sa.Column("image_path", sa.Text, nullable=True),
)

feedback = sa.Table(
    "feedback", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("generation_id", sa.String(36), sa.ForeignKey("generations.id", ondelete="CASCADE"), nullable=False),
    sa.Column("client_id", sa.String(200), nullable=False),
    sa.Column("rating", sa.Integer, nullable=True),
    sa.Column("thumbs", sa.Integer, nullable=True),
    sa.Column("comment", sa.Text, nullable=True),
    sa.Column("tags", sa.JSON, nullable=False),
    sa.Column("created", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.UniqueConstraint("generation_id", "client_id", name="uq_feedback_generation_client"),
)


# Version 3: what the monitoring loop adds. Failed requests (the error rate), the frozen reference window of each
# champion, the retraining log (one row per retraining, one per step) and the scheduler's job results.
failures = sa.Table(
    "failures", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("endpoint", sa.String(100), nullable=False),
    sa.Column("kind", sa.String(100), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("model_version", sa.String(200), nullable=True),
)

reference_windows = sa.Table(
    "reference_windows", metadata,
    sa.Column("champion", sa.String(200), primary_key=True),
    sa.Column("since", sa.DateTime(timezone=True), nullable=False),
    sa.Column("until", sa.DateTime(timezone=True), nullable=False),
    sa.Column("frozen", sa.DateTime(timezone=True), nullable=False),
    sa.Column("how", sa.Text, nullable=False),
)

retrains = sa.Table(
    "retrains", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("started", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("finished", sa.DateTime(timezone=True), nullable=True),
    sa.Column("trigger", sa.String(100), nullable=False),
    sa.Column("status", sa.String(30), nullable=False),
    sa.Column("champion", sa.String(200), nullable=True),
    sa.Column("challenger", sa.String(200), nullable=True),
    sa.Column("run_dir", sa.Text, nullable=True),
    sa.Column("reasons", sa.JSON, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
)

retrain_steps = sa.Table(
    "retrain_steps", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("retrain_id", sa.String(36), sa.ForeignKey("retrains.id", ondelete="CASCADE"), nullable=False,
              index=True),
    sa.Column("step", sa.String(50), nullable=False),
    sa.Column("status", sa.String(30), nullable=False),
    sa.Column("started", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished", sa.DateTime(timezone=True), nullable=True),
    sa.Column("detail", sa.JSON, nullable=False),
)

job_runs = sa.Table(
    "job_runs", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(100), nullable=False, index=True),
    sa.Column("started", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished", sa.DateTime(timezone=True), nullable=True),
    sa.Column("status", sa.String(30), nullable=False),
    sa.Column("summary", sa.JSON, nullable=False),
)


class StoreError(UserError):
    """The monitoring store cannot be opened or used (bad URL, unreachable server, missing driver)."""


class UnknownGeneration(KeyError):
    """Feedback names a generation id the store has never logged (the service answers 404)."""


def _v1(conn: Connection) -> None:
    """Version 1: the generation log and the feedback table."""
    generations.create(conn)
    feedback.create(conn)


def _v2(conn: Connection) -> None:
    """Version 2: an index for the monitor's per-generation feedback joins (plain DDL: a migration must not change
    the module's Table objects, or version 1 would create it too)."""
    conn.execute(sa.text("CREATE INDEX ix_feedback_generation ON feedback (generation_id)"))


def _v3(conn: Connection) -> None:
    """Version 3: failed requests, frozen reference windows, the retraining log and the scheduler's job results."""
    for table in (failures, reference_windows, retrains, retrain_steps, job_runs):
        table.create(conn)


# Ordered: MIGRATIONS[i] takes the schema from version i to i + 1. Append, never edit an applied one.
MIGRATIONS: list[Callable[[Connection], None]] = [_v1, _v2, _v3]
SCHEMA_VERSION = len(MIGRATIONS)

_versions = sa.Table("schema_version", sa.MetaData(),
                     sa.Column("version", sa.Integer, primary_key=True),
                     sa.Column("applied", sa.DateTime(timezone=True), nullable=False))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _stamp(value: Optional[dt.datetime]) -> dt.datetime:
    """A timestamp to store: now, or ``value`` in UTC (sqlite keeps the wall-clock time and drops the offset)."""
    if value is None:
        return _now()
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


def _utc(value: Optional[dt.datetime]) -> Optional[dt.datetime]:
    """sqlite returns naive datetimes (we wrote UTC); PostgreSQL returns aware ones."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.timezone.utc)


def make_engine(url: str) -> Engine:
    """An engine for ``url``; for sqlite: WAL, full sync, foreign keys, a busy timeout and one pooled connection."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise StoreError(f"store URL {url!r} is not a database URL; set SDLOOP_STORE_URL to e.g. "
                         "postgresql+psycopg://user:pass@host/db, or unset it for the workspace's sqlite file.") \
            from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(parsed.database)), exist_ok=True)
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


class Store:
    """The generation log and the feedback table of one database. Thread-safe; open one per process."""

    def __init__(self, url: Optional[str] = None, migrate: bool = True) -> None:
        from sdloop.workspace import store_url

        self.url = url or store_url()
        self.engine = make_engine(self.url)
        self.dialect = self.engine.dialect.name
        if migrate:
            try:
                self.migrate()
            except sa.exc.OperationalError as e:
                raise StoreError(f"cannot open the monitoring store {self.engine.url!r}: "
                                 f"{str(e.orig).strip().splitlines()[0]}; check SDLOOP_STORE_URL and that the "
                                 "database is reachable and writable.") from None

    # -- schema ---------------------------------------------------------------------------------------------------

    def schema_version(self) -> int:
        """The highest applied migration (0 for an empty database)."""
        with self.engine.connect() as conn:
            if not sa.inspect(conn).has_table("schema_version"):
                return 0
            return int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(_versions.c.version), 0))).scalar())

    def migrate(self) -> list[int]:
        """Apply the migrations this database lacks, in order, in one locked transaction; return those applied."""
        applied: list[int] = []
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(740318)"))  # workers starting together wait here
            _versions.create(conn, checkfirst=True)
            current = int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(_versions.c.version), 0))).scalar())
            if current > SCHEMA_VERSION:
                raise StoreError(f"the monitoring store is at schema version {current}, newer than this sdloop's "
                                 f"{SCHEMA_VERSION}; upgrade sdloop.")
            for version in range(current + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[version - 1](conn)
                conn.execute(_versions.insert().values(version=version, applied=_now()))
                applied.append(version)
        return applied

    # -- writes ---------------------------------------------------------------------------------------------------

    def log_generation(self, *, prompt: str, negative_prompt: str, params: dict[str, Any], model_version: str,
                       latency_s: float, descriptors: dict[str, float], image_path: Optional[str] = None,
                       generation_id: Optional[str] = None, created: Optional[dt.datetime] = None) -> str:
        """Record one generated image; return its id. Committed before this returns. ``created`` (default now) is
        for imports and simulations of past traffic."""
        gid = generation_id or str(uuid.uuid4())
        with self.engine.begin() as conn:
            conn.execute(generations.insert().values(
                id=gid, created=_stamp(created), prompt=prompt, negative_prompt=negative_prompt or "", params=params,
                model_version=model_version, latency_s=float(latency_s), descriptors=descriptors,
                image_path=image_path))
        return gid

    def log_failure(self, endpoint: str, kind: str, message: str, model_version: Optional[str] = None,
                    created: Optional[dt.datetime] = None) -> None:
        """Record a request that did not produce an image (timeout, not ready, server error): the error rate."""
        with self.engine.begin() as conn:
            conn.execute(failures.insert().values(created=_stamp(created), endpoint=endpoint, kind=kind,
                                                  message=message[:2000], model_version=model_version))

    def add_feedback(self, generation_id: str, client_id: str, rating: Optional[int] = None,
                     thumbs: Optional[int] = None, comment: Optional[str] = None,
                     tags: Optional[list[str]] = None, created: Optional[dt.datetime] = None) -> dict[str, Any]:
        """Store a client's feedback on a generation: a repeat from the same client updates its row. Returns the row
        and whether it was created. Raises UnknownGeneration for an id never logged. Committed before this returns."""
        now = _stamp(created)
        values = {"generation_id": generation_id, "client_id": client_id, "rating": rating, "thumbs": thumbs,
                  "comment": comment, "tags": list(tags or []), "created": now, "updated": now}
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        stmt = insert(feedback).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=["generation_id", "client_id"],
            set_={k: stmt.excluded[k] for k in ("rating", "thumbs", "comment", "tags", "updated")})
        mine = (feedback.c.generation_id == generation_id) & (feedback.c.client_id == client_id)
        with self.engine.begin() as conn:
            if conn.execute(sa.select(generations.c.id).where(generations.c.id == generation_id)).first() is None:
                raise UnknownGeneration(generation_id)
            existed = conn.execute(sa.select(feedback.c.id).where(mine)).first() is not None
            conn.execute(stmt)
            row = conn.execute(sa.select(feedback).where(mine)).mappings().one()
        return {**self._row(row), "updated_existing": existed}

    # -- reads ----------------------------------------------------------------------------------------------------

    @staticmethod
    def _row(row: Any) -> dict[str, Any]:
        out = dict(row)
        for key in ("created", "updated"):
            if key in out:
                out[key] = _utc(out[key])
        return out

    def get_generation(self, generation_id: str) -> Optional[dict[str, Any]]:
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(generations).where(generations.c.id == generation_id)).mappings().first()
        return self._row(row) if row else None

    def generations(self, since: Optional[dt.datetime] = None, until: Optional[dt.datetime] = None,
                    limit: Optional[int] = None) -> list[dict[str, Any]]:
        """Logged generations in [since, until), oldest first (the monitor's windows)."""
        q = sa.select(generations).order_by(generations.c.created)
        if since is not None:
            q = q.where(generations.c.created >= since)
        if until is not None:
            q = q.where(generations.c.created < until)
        if limit is not None:
            q = q.limit(limit)
        with self.engine.begin() as conn:
            return [self._row(r) for r in conn.execute(q).mappings()]

    def feedback_for(self, generation_id: Optional[str] = None) -> list[dict[str, Any]]:
        """Feedback rows (of one generation, or all), oldest first."""
        q = sa.select(feedback).order_by(feedback.c.id)
        if generation_id is not None:
            q = q.where(feedback.c.generation_id == generation_id)
        with self.engine.begin() as conn:
            return [self._row(r) for r in conn.execute(q).mappings()]

    def count(self, table: str) -> int:
        """Rows in one of the store's tables (``generations``, ``feedback``, ``failures``, ...)."""
        t = metadata.tables[table]
        with self.engine.begin() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar())

    def close(self) -> None:
        self.engine.dispose()


_open: dict[tuple[int, str], Store] = {}
_open_lock = threading.Lock()


def open_store(url: Optional[str] = None) -> Store:
    """This process's store for ``url`` (default: the workspace's): one engine per worker process, migrated."""
    from sdloop.workspace import store_url

    key = (os.getpid(), url or store_url())
    with _open_lock:
        if key not in _open:
            _open[key] = Store(key[1])
        return _open[key]
