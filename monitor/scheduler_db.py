"""The scheduler's own database: APScheduler's job store, and the plain rows other processes read and write.

APScheduler's ``SQLAlchemyJobStore`` keeps each job as a pickle (table ``apscheduler_jobs``), and unpickling a row
runs whatever code its writer chose. So the job store lives in a database of its own, ``$SDLOOP_SCHEDULER_URL``
(default ``$SDLOOP_HOME/scheduler.db``, a 0600 sqlite file), which the service is never given, not in the monitoring
store that every serving replica can write; and only the scheduler process loads its rows. Beside the job store, two
plain tables that anyone may read without running code:

- ``scheduler_jobs``: what each job is (its function's textual reference, its trigger as text, its next run time),
  rewritten by the scheduler whenever a job is added, changed or run. ``sdloop scheduler status`` reads only this.
- ``scheduler_requests``: a run another process asked for (``sdloop monitor check --pull-forward`` from cron). The
  running scheduler applies it within its wake interval, or at its next start, and deletes it.

An ``apscheduler_jobs`` table that an older sdloop left in the monitoring store is ignored: never read, never
unpickled; the scheduler adds its jobs afresh to this database at its first start.

This module and ``monitor/store*.py`` are the only ones that import SQLAlchemy (a test checks it).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from typing import Any, Optional

import sqlalchemy as sa
from apscheduler.events import (EVENT_JOB_ADDED, EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MODIFIED, EVENT_JOB_REMOVED,
                                EVENT_JOB_SUBMITTED)
from apscheduler.job import Job
from apscheduler.jobstores.base import JobLookupError
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.base import BaseScheduler
from apscheduler.triggers.base import BaseTrigger
from sqlalchemy.engine import Engine

from monitor.store import StoreError, make_engine
from sdloop.errors import one_line

log = logging.getLogger("sdloop.scheduler")
JOBS_TABLE = "apscheduler_jobs"
SETTING = "SDLOOP_SCHEDULER_URL"

_metadata = sa.MetaData()

scheduler_jobs = sa.Table(
    "scheduler_jobs", _metadata,
    sa.Column("id", sa.String(100), primary_key=True),
    sa.Column("func", sa.Text, nullable=False),
    sa.Column("trigger", sa.Text, nullable=False),
    sa.Column("trigger_key", sa.Text, nullable=False),
    sa.Column("next_run", sa.DateTime(timezone=True), nullable=True),
    sa.Column("misfire_grace_time", sa.Integer, nullable=True),
    sa.Column("written", sa.DateTime(timezone=True), nullable=False),
)

scheduler_requests = sa.Table(
    "scheduler_requests", _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(100), nullable=False),
    sa.Column("run_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("requested", sa.DateTime(timezone=True), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _utc(value: Optional[dt.datetime]) -> Optional[dt.datetime]:
    """Aware UTC (sqlite hands back naive datetimes; we store UTC)."""
    if value is None:
        return None
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


def _where(url: str) -> tuple[Any, ...]:
    """What identifies a database behind a URL (backend, host, port, database; an sqlite file by its real path)."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return ("sqlite", os.path.realpath(parsed.database or ":memory:"))
    return (parsed.get_backend_name(), parsed.host, parsed.port, parsed.database)


class SchedulerDB:
    """The scheduler's database at ``url`` (default ``sdloop.workspace.scheduler_url()``), refused when it is the
    monitoring store's (``monitoring_url``, default ``store_url()``). Readers never create it."""

    def __init__(self, url: Optional[str] = None, monitoring_url: Optional[str] = None) -> None:
        from sdloop.workspace import scheduler_url, store_url

        self.url = url or scheduler_url()
        try:
            mine = _where(self.url)
        except sa.exc.ArgumentError:
            raise StoreError(f"{SETTING} is not a database URL; set it to e.g. postgresql+psycopg://user:pass@host/db"
                             ", or unset it for the workspace's scheduler.db.") from None
        try:
            same = mine == _where(monitoring_url or store_url())
        except sa.exc.ArgumentError:
            same = False  # a bad SDLOOP_STORE_URL: the monitoring store says so itself when it is opened
        if same:
            raise StoreError(f"{SETTING} names the monitoring store's database, which every serving replica can "
                             "write; give the scheduler a database of its own (or unset it for the workspace's "
                             "scheduler.db).")
        self._engine: Optional[Engine] = None
        self._created = False

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self.url, setting=SETTING)
        return self._engine

    def _exists(self) -> bool:
        """False for an sqlite file nobody has made yet: a status command must not create the scheduler's file."""
        parsed = sa.engine.make_url(self.url)
        return parsed.get_backend_name() != "sqlite" or not parsed.database or os.path.exists(parsed.database)

    def _create(self) -> None:
        """The plain tables, once per process; serialised by sqlite's write lock or PostgreSQL's advisory lock."""
        if self._created:
            return
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(740319)"))
            _metadata.create_all(conn, checkfirst=True)
        self._created = True

    def _has(self, conn: Any, table: sa.Table) -> bool:
        return bool(sa.inspect(conn).has_table(table.name))

    def jobstore(self) -> SQLAlchemyJobStore:
        """APScheduler's job store on this database. It unpickles what it loads: for the scheduler process only
        (and for tests that seed it), never for a command that merely reports."""
        return SQLAlchemyJobStore(engine=make_engine(self.url, setting=SETTING), tablename=JOBS_TABLE)

    # -- what the jobs are: written by the scheduler, read by anyone ---------------------------------------------

    def write_jobs(self, jobs: list[dict[str, Any]]) -> None:
        """Replace the job descriptions by ``jobs`` (id, func, trigger, trigger_key, next_run, misfire_grace_time),
        in one transaction so a reader sees either the old set or the new one."""
        self._create()
        now = _now()
        with self.engine.begin() as conn:
            conn.execute(scheduler_jobs.delete())
            if jobs:
                # UTC before storing: sqlite keeps an aware time's wall clock and drops its offset
                conn.execute(scheduler_jobs.insert(), [{**j, "next_run": _utc(j["next_run"]), "written": now}
                                                       for j in jobs])

    def jobs(self) -> dict[str, dict[str, Any]]:
        """The jobs as the scheduler last described them: id -> {func, trigger, trigger_key, next_run (aware UTC, or
        None when paused), misfire_grace_time, written}. Plain columns: nothing is unpickled."""
        if not self._exists():
            return {}
        with self.engine.connect() as conn:
            if not self._has(conn, scheduler_jobs):
                return {}
            rows = conn.execute(sa.select(scheduler_jobs)).mappings().all()
        return {r["id"]: {**dict(r), "next_run": _utc(r["next_run"]), "written": _utc(r["written"])} for r in rows}

    # -- runs other processes ask for ----------------------------------------------------------------------------

    def request_run(self, job_id: str, when: dt.datetime) -> None:
        """Ask the scheduler to make ``job_id`` due at ``when`` (it applies the request when it next wakes)."""
        self._create()
        with self.engine.begin() as conn:
            conn.execute(scheduler_requests.insert().values(job_id=job_id, run_at=_utc(when), requested=_now(),
                                                            pid=os.getpid()))

    def pending(self) -> list[tuple[int, str, dt.datetime]]:
        """Requests not applied yet, oldest first: (id, job_id, run_at)."""
        if not self._exists():
            return []
        with self.engine.connect() as conn:
            if not self._has(conn, scheduler_requests):
                return []
            rows = conn.execute(sa.select(scheduler_requests.c.id, scheduler_requests.c.job_id,
                                          scheduler_requests.c.run_at).order_by(scheduler_requests.c.id)).all()
        return [(int(i), str(j), _utc(t)) for i, j, t in rows]

    def done(self, ids: list[int]) -> None:
        """Delete applied requests (after applying them: a crash in between applies one again, which the job's
        record of scheduled times makes harmless)."""
        if not ids:
            return
        with self.engine.begin() as conn:
            conn.execute(scheduler_requests.delete().where(scheduler_requests.c.id.in_(ids)))

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


# -- the running scheduler's side: describing its jobs, applying requests ----------------------------------------

def trigger_key(trigger: BaseTrigger) -> str:
    """What makes two triggers the same schedule: the fields and the time zone (not the interval's start date)."""
    return f"{trigger} {getattr(trigger, 'timezone', '')}"


def describe(jobs: list[Job]) -> list[dict[str, Any]]:
    """The jobs as plain rows for ``scheduler_jobs``: what a status command shows, without loading a pickle."""
    return [{"id": job.id, "func": job.func_ref, "trigger": str(job.trigger), "trigger_key": trigger_key(job.trigger),
             "next_run": job.next_run_time, "misfire_grace_time": job.misfire_grace_time}
            for job in sorted(jobs, key=lambda j: j.id)]


class JobDescriber:
    """Keeps ``scheduler_jobs`` in step with the running scheduler's jobs: APScheduler's job events only mark it
    stale (a listener runs in the scheduler's own thread, sometimes under its job store lock), and one thread of its
    own rewrites the rows, so writes never interleave and the newest state always lands last."""

    EVENTS = (EVENT_JOB_ADDED | EVENT_JOB_MODIFIED | EVENT_JOB_REMOVED | EVENT_JOB_SUBMITTED
              | EVENT_JOB_MAX_INSTANCES)

    def __init__(self, scheduler: BaseScheduler, db: SchedulerDB) -> None:
        self.scheduler, self.db = scheduler, db
        self.stale = threading.Event()
        self.stopping = False
        self.written: Optional[list[dict[str, Any]]] = None
        self.thread = threading.Thread(target=self._loop, name="sdloop-describe-jobs", daemon=True)

    def start(self) -> None:
        self.write()
        self.thread.start()

    def mark(self, _event: Any = None) -> None:
        self.stale.set()

    def write(self) -> None:
        """Rewrite the rows if the jobs changed since the last write (a failure is logged; the next event retries)."""
        try:
            rows = describe(self.scheduler.get_jobs())
            if rows != self.written:
                self.db.write_jobs(rows)
                self.written = rows
        except Exception as e:  # noqa: BLE001 - an unreachable database must not stop the scheduler
            log.warning("could not record the jobs for `sdloop scheduler status`: %s", one_line(e))

    def _loop(self) -> None:
        while True:
            self.stale.wait()
            self.stale.clear()
            if self.stopping:
                return
            self.write()

    def stop(self) -> None:
        """Write the last state, then stop (before the job store is detached: no empty set gets written)."""
        self.stopping = True
        self.stale.set()
        if self.thread.is_alive():
            self.thread.join(30)
        self.write()


def apply_requests(scheduler: BaseScheduler, db: SchedulerDB) -> None:
    """Make each requested job due at its requested time (the earliest, when several wait), then drop the requests."""
    pending = db.pending()
    earliest: dict[str, dt.datetime] = {}
    for _id, job_id, when in pending:
        earliest[job_id] = min(when, earliest.get(job_id, when))
    for job_id, when in earliest.items():
        try:
            scheduler.modify_job(job_id, next_run_time=when)
            log.info("job %s pulled forward to %s at another process's request", job_id, _utc(when).isoformat())
        except JobLookupError:
            log.warning("a request names job %r, which this scheduler does not have; dropped", job_id)
    db.done([i for i, _, _ in pending])
