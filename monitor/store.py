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

Every query of the monitoring database lives in this module and its helpers (``store_schema``: tables and
migrations; ``store_engine``: engines, private sqlite files, database locks; ``store_reads``: what reports and the
retraining data read; ``store_log``: the retraining log and the scheduler's job runs; ``store_keys``: API keys;
``store_jobs``: generation jobs),
behind the one public class ``Store`` and its named methods: no other module imports SQLAlchemy or the tables (a test
checks it).

API keys (schema version 4, ``monitor/store_keys.py`` says how they are made, hashed and used): ``create_key``,
``list_keys``, ``find_key``, ``revoke_key`` for ``sdloop keys``; ``key_for(presented)`` (the active key record or
None), ``may_rate(key, generation_id)`` and ``key_made_generation(key_id, generation_id)`` for the service; and
``log_generation`` / ``add_feedback`` take the ``api_key_id`` of the key behind the request (None without keys).

Generation jobs (schema version 5, ``monitor/store_jobs.py``; the service's ``/jobs`` routes in ``bento/jobs.py``):
``create_job``, ``get_job``, ``start_job``, ``job_progress``, ``finish_job``, ``cancel_job``, ``jobs_to_cancel``,
``touch_jobs`` and ``purge_jobs``: the state every worker and replica shares about a job.

Two-candidate pairs and choices (schema version 6, ``monitor/store_pairs.py``; the service's ``candidates: 2`` and
``POST /choose``): ``create_pair``, ``get_pair``, ``may_choose``, ``add_choice``, ``pair_choices``,
``count_choices``: the DPO pairs of a preference retraining.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import uuid
from typing import Any, Optional

import sqlalchemy as sa

from monitor.store_engine import StoreError, advisory_lock, make_engine, private_sqlite_file
from monitor.store_jobs import _JobQueries
from monitor.store_keys import SCOPES, ApiKey, ApiKeyError, _KeyQueries
from monitor.store_log import _LogQueries
from monitor.store_pairs import ChoiceOfAnotherKey, NotInPair, UnknownPair, _PairQueries
from monitor.store_reads import _ReportQueries
from monitor.store_schema import (MIGRATIONS, SCHEMA_VERSION, _now, _stamp, _utc, _versions, api_keys, failures,
                                  choices, feedback, generations, job_runs, jobs, metadata, pairs,
                                  reference_windows, retrain_steps, retrains)
from sdloop.errors import UserError

# The tables are re-exported for tests that write rows as an old release or another process would; modules outside
# monitor/store*.py use Store's named methods (tests/test_store.py checks it).
__all__ = ["Store", "StoreError", "UnknownGeneration", "FeedbackOfAnotherKey", "UnknownPair", "NotInPair",
           "ChoiceOfAnotherKey", "ApiKey", "ApiKeyError", "SCOPES",
           "open_store", "make_engine", "advisory_lock", "private_sqlite_file", "MIGRATIONS", "SCHEMA_VERSION",
           "metadata", "generations", "feedback", "failures", "reference_windows", "retrains", "retrain_steps",
           "job_runs", "api_keys", "jobs", "pairs", "choices"]


class UnknownGeneration(KeyError):
    """Feedback names a generation id the store has never logged (the service answers 404)."""


class FeedbackOfAnotherKey(UserError):
    """Feedback would replace a row another API key wrote (the same client id under another key, or a row written
    without a key): refused, so one key can never overwrite another's rating (the service answers 409)."""


class Store(_ReportQueries, _LogQueries, _KeyQueries, _JobQueries, _PairQueries):
    """The monitoring database: the generation log, feedback, failures, frozen reference windows, the retraining log,
    the scheduler's job runs, API keys, generation jobs and two-candidate pairs with their choices, each read and
    written through a named method.
    Thread-safe; open one per process."""

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
                       generation_id: Optional[str] = None, created: Optional[dt.datetime] = None,
                       api_key_id: Optional[int] = None) -> str:
        """Record one generated image; return its id. Committed before this returns. ``created`` (default now) is
        for imports and simulations of past traffic. ``api_key_id``: the key that asked for it (``ApiKey.id``; None
        without keys), which ``may_rate`` and the retraining data's rater identity read."""
        gid = generation_id or str(uuid.uuid4())
        extra = {} if api_key_id is None else {"api_key_id": int(api_key_id)}
        with self.engine.begin() as conn:
            conn.execute(generations.insert().values(
                id=gid, created=_stamp(created), prompt=prompt, negative_prompt=negative_prompt or "", params=params,
                model_version=model_version, latency_s=float(latency_s), descriptors=descriptors,
                image_path=image_path, **extra))
        return gid

    def log_failure(self, endpoint: str, kind: str, message: str, model_version: Optional[str] = None,
                    created: Optional[dt.datetime] = None) -> None:
        """Record a request that did not produce an image (timeout, not ready, server error): the error rate."""
        with self.engine.begin() as conn:
            conn.execute(failures.insert().values(created=_stamp(created), endpoint=endpoint, kind=kind,
                                                  message=message[:2000], model_version=model_version))

    def add_feedback(self, generation_id: str, client_id: str, rating: Optional[int] = None,
                     thumbs: Optional[int] = None, comment: Optional[str] = None,
                     tags: Optional[list[str]] = None, created: Optional[dt.datetime] = None,
                     api_key_id: Optional[int] = None) -> dict[str, Any]:
        """Store a client's feedback on a generation: a repeat from the same client (and the same key) updates its
        row. Returns the row and whether it was created. Raises UnknownGeneration for an id never logged, and
        FeedbackOfAnotherKey when the (generation, client) row was written under another key or without one: a
        key never replaces another's rating. ``api_key_id``: the key that sent it (None without keys); the service
        checks ``may_rate`` first. Committed before this returns."""
        now = _stamp(created)
        values = {"generation_id": generation_id, "client_id": client_id, "rating": rating, "thumbs": thumbs,
                  "comment": comment, "tags": list(tags or []), "created": now, "updated": now}
        if api_key_id is not None:
            values["api_key_id"] = int(api_key_id)
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        stmt = insert(feedback).values(**values)
        same_key = feedback.c.api_key_id.is_(None) if api_key_id is None else feedback.c.api_key_id == int(api_key_id)
        stmt = stmt.on_conflict_do_update(  # the WHERE: a concurrent row of another key is left alone
            index_elements=["generation_id", "client_id"], where=same_key,
            set_={k: stmt.excluded[k] for k in ("rating", "thumbs", "comment", "tags", "updated")})
        mine = (feedback.c.generation_id == generation_id) & (feedback.c.client_id == client_id)
        with self.engine.begin() as conn:
            if conn.execute(sa.select(generations.c.id).where(generations.c.id == generation_id)).first() is None:
                raise UnknownGeneration(generation_id)
            before = conn.execute(sa.select(feedback.c.id, feedback.c.api_key_id).where(mine)).first()
            if before is not None and before.api_key_id != api_key_id:
                raise FeedbackOfAnotherKey(f"client {client_id!r} already rated generation {generation_id} under "
                                           "another key; send another client id.")
            conn.execute(stmt)
            row = conn.execute(sa.select(feedback).where(mine)).mappings().one()
        if row["api_key_id"] != api_key_id:  # another key's row appeared between the check and the upsert
            raise FeedbackOfAnotherKey(f"client {client_id!r} already rated generation {generation_id} under "
                                       "another key; send another client id.")
        return {**self._row(row), "updated_existing": before is not None}

    # -- reads ----------------------------------------------------------------------------------------------------

    @staticmethod
    def _row(row: Any) -> dict[str, Any]:
        out = dict(row)
        for key in ("created", "updated"):
            if key in out:
                out[key] = _utc(out[key])
        return out

    def get_generation(self, generation_id: str) -> Optional[dict[str, Any]]:
        """One logged generation by id, or None."""
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
