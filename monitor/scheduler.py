"""The scheduler: one APScheduler 3.11 process per workspace that runs the monitoring check and the retraining.

Jobs live in a ``SQLAlchemyJobStore`` (table ``apscheduler_jobs``) in the monitoring store's database, so a restart
neither loses nor duplicates them: the process starts its scheduler paused, adds the jobs that are missing,
reschedules one whose trigger changed (monitor interval, retrain crontab), updates changed options, then resumes.
Both jobs are stored by textual reference (``monitor.jobs:monitor_job``), run with ``coalesce=True``,
``max_instances=1`` and ``misfire_grace_time = cfg.misfire_grace_s``: runs missed while the scheduler was down are
folded into one if the newest is within the grace time, and skipped otherwise.

``run_scheduler`` blocks until SIGTERM/SIGINT (or ``stop_event``), then lets a running job finish, shuts the
scheduler down and releases the scheduler lock; a second signal abandons a running job and exits at once. It uses a
``BackgroundScheduler`` with the calling thread blocking on the stop event: ``BlockingScheduler.start(paused=True)``
would block inside its own loop before the jobs could be added, and a signal handler must not shut a scheduler down
from inside its loop's thread.

Every run is recorded in the store's ``job_runs`` table: a row ``running`` when the run is handed to the executor,
then ``ok`` (the job's returned summary), ``failed`` (the error's first line) or ``skipped`` (the retrain lock was
busy, the previous run still ran, or the run was missed beyond the grace time). The row's summary holds the
``scheduled`` run time; a time already recorded is never run twice (the window between handing a run over and
storing the job's next run time, where a kill could otherwise repeat it). Rows left ``running`` by a killed
scheduler are marked failed at the next start.

The job store is shared with other processes: ``pull_forward_retrain()`` in ``sdloop monitor check`` (cron) edits the
stored job, and the running scheduler, which sleeps until its next due job, notices within ``wake_s`` (default 30 s)
because it wakes up that often to re-read its store.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import signal
import threading
from typing import Any, Iterator, Mapping, Optional

import sqlalchemy as sa
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, EVENT_JOB_MISSED
from apscheduler.jobstores.base import JobLookupError
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import BaseScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from monitor.config import MonitorConfig
from monitor.jobs import RecordingExecutor, _iso, close_interrupted, last_runs
from monitor.lock import hold, holder, scheduler_lock_path
from monitor.store import make_engine, open_store

log = logging.getLogger("sdloop.scheduler")

JOB_IDS = ("monitor", "retrain")
DEFAULT_FUNCS: dict[str, str] = {"monitor": "monitor.jobs:monitor_job", "retrain": "monitor.jobs:retrain_job"}
JOBS_TABLE = "apscheduler_jobs"
WAKE_S = 30.0  # the longest a running scheduler sleeps before re-reading its job store (edits by other processes)
RETRY_S = 30.0  # wait after the job store failed (database unreachable) before trying again

_running: Optional[BaseScheduler] = None  # this process's running scheduler, for pull_forward_retrain()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _crontab_days(field: str) -> str:
    """A crontab weekday field (0 or 7 = Sunday, names, ranges, lists, steps) as APScheduler 3 day names."""
    if field == "*":
        return field
    days: set[int] = set()
    for token in field.lower().split(","):
        part, _, step = token.partition("/")
        if part == "*":
            lo, hi = 0, 6
        else:
            a, _, b = part.partition("-")
            lo = _DAYS.index(a[:3]) if a[:3] in _DAYS else int(a)
            hi = (_DAYS.index(b[:3]) if b[:3] in _DAYS else int(b)) if b else (6 if step else lo)
        if not (0 <= lo <= 7 and 0 <= hi <= 7 and lo <= hi and (not step or int(step) > 0)):
            raise ValueError("a day is out of 0-7 or a range runs backwards")
        days.update(d % 7 for d in range(lo, hi + 1, int(step) if step else 1))
    return ",".join(_DAYS[d] for d in sorted(days))


def cron_trigger(expr: str) -> CronTrigger:
    """A CronTrigger for a standard crontab line. APScheduler 3's ``CronTrigger.from_crontab`` numbers weekdays
    from Monday = 0 (its documented historical mistake), so "0 3 * * 0" would run on Mondays, not Sundays; here the
    weekday field is translated to day names first, so crontab numbers mean what crontab says."""
    values = expr.split()
    if len(values) != 5:
        raise ValueError(f"a crontab line has 5 fields (minute hour day month weekday), got {len(values)}")
    try:
        days = _crontab_days(values[4])
    except ValueError as e:
        raise ValueError(f"weekday field {values[4]!r} is not crontab syntax ({e})") from None
    return CronTrigger(minute=values[0], hour=values[1], day=values[2], month=values[3], day_of_week=days)


def triggers(cfg: MonitorConfig) -> dict[str, BaseTrigger]:
    """The trigger each job should have under ``cfg``."""
    return {"monitor": IntervalTrigger(seconds=cfg.monitor_every_minutes * 60.0),
            "retrain": cron_trigger(cfg.retrain_cron)}


def _trigger_key(trigger: BaseTrigger) -> str:
    """What makes two triggers the same schedule: the fields and the time zone (not the interval's start date)."""
    return f"{trigger} {getattr(trigger, 'timezone', '')}"


def _options(cfg: MonitorConfig) -> dict[str, Any]:
    return {"coalesce": True, "max_instances": 1, "misfire_grace_time": int(cfg.misfire_grace_s)}


def ensure_jobs(scheduler: BaseScheduler, cfg: MonitorConfig,
                funcs: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """Make the started (paused) scheduler's store hold exactly the jobs ``cfg`` asks for; return what was done per
    job: "added", "rescheduled", "updated" or "unchanged".

    ``funcs`` maps job id to the textual reference of its function (default ``DEFAULT_FUNCS``); each job gets the
    settings as ``settings=cfg.to_dict()``, so it runs with exactly the scheduler's configuration. A changed trigger
    is rescheduled from now (its next run follows the new settings); changed options or settings are updated in
    place, keeping the next run time."""
    funcs = {**DEFAULT_FUNCS, **(funcs or {})}
    wanted = triggers(cfg)
    kwargs = {"settings": cfg.to_dict()}
    done: dict[str, str] = {}
    for job_id in JOB_IDS:
        job = scheduler.get_job(job_id)
        if job is None:
            scheduler.add_job(funcs[job_id], wanted[job_id], id=job_id, name=f"sdloop {job_id}", kwargs=kwargs,
                              replace_existing=True, **_options(cfg))
            done[job_id] = "added"
            continue
        changes: dict[str, Any] = {}
        if job.func_ref != funcs[job_id]:
            changes.update(func=funcs[job_id], args=(), kwargs=kwargs)
        elif dict(job.kwargs) != kwargs:
            changes["kwargs"] = kwargs
        changes.update({k: v for k, v in _options(cfg).items() if getattr(job, k) != v})
        if changes:
            scheduler.modify_job(job_id, **changes)
        if _trigger_key(job.trigger) != _trigger_key(wanted[job_id]):
            scheduler.reschedule_job(job_id, trigger=wanted[job_id])
            done[job_id] = "rescheduled"
        else:
            done[job_id] = "updated" if changes else "unchanged"
    return done


# -- the scheduler process ------------------------------------------------------------------------------------------

def _jobstore(url: str) -> SQLAlchemyJobStore:
    # The store's engine settings (sqlite: WAL, busy timeout, BEGIN IMMEDIATE) so the scheduler, the service and
    # `sdloop monitor check` share one database file without "database is locked" failures.
    return SQLAlchemyJobStore(engine=make_engine(url), tablename=JOBS_TABLE)


def run_scheduler(cfg: MonitorConfig, *, funcs: Optional[Mapping[str, str]] = None,
                  stop_event: Optional[threading.Event] = None, wake_s: float = WAKE_S,
                  url: Optional[str] = None) -> None:
    """Run the workspace's scheduler until SIGTERM/SIGINT or ``stop_event`` (blocking). Raises ``monitor.lock.Busy``
    (one line: who holds it) when another scheduler runs on this workspace.

    ``funcs`` replaces the jobs' functions by textual reference (tests); ``wake_s`` bounds how long the scheduler
    sleeps before re-reading its store, i.e. how soon it sees edits made by other processes; ``url`` defaults to
    ``sdloop.workspace.store_url()``."""
    global _running
    stop = stop_event or threading.Event()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from sdloop.workspace import store_url

    with hold(scheduler_lock_path(), "scheduler", db_url=url or store_url()):
        store = open_store(url)
        interrupted = close_interrupted(store)
        if interrupted:
            log.warning("%d job run(s) were interrupted when the scheduler last stopped; marked failed", interrupted)
        executor = RecordingExecutor(store)
        scheduler = BackgroundScheduler(jobstores={"default": _jobstore(store.url)},
                                        executors={"default": executor}, timezone=_local_zone(),
                                        job_defaults=_options(cfg), jobstore_retry_interval=RETRY_S)
        scheduler.add_listener(executor.finished, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR | EVENT_JOB_MISSED)
        restore = _install_signals(stop)
        try:
            scheduler.start(paused=True)
            done = ensure_jobs(scheduler, cfg, funcs)
            _running = scheduler
            scheduler.resume()
            for job in scheduler.get_jobs():
                log.info("job %s (%s): %s, next run %s", job.id, done.get(job.id, "?"), job.trigger,
                         _iso(job.next_run_time))
            log.info("scheduler running (pid %d); SIGTERM or Ctrl-C stops it", os.getpid())
            while not stop.wait(wake_s):
                scheduler.wakeup()  # re-read the job store: other processes may have pulled a job forward
            log.info("stopping: waiting for running jobs to finish (a second signal abandons them)")
        finally:
            _running = None
            if scheduler.running:
                _shutdown(scheduler, wait=True)
            restore()
        log.info("scheduler stopped")


def _local_zone() -> Any:
    from tzlocal import get_localzone

    return get_localzone()


def _install_signals(stop: threading.Event) -> Any:
    """SIGTERM/SIGINT set ``stop``; a second one exits at once. Only in the main thread (else a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, _frame: Any) -> None:
        if stop.is_set():
            log.warning("second signal: abandoning running jobs")
            os._exit(128 + signum)  # the kernel releases the locks; the next start marks the run interrupted
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    return lambda: [signal.signal(s, h) for s, h in previous.items()]


# -- outside the scheduler process ----------------------------------------------------------------------------------

@contextlib.contextmanager
def _store_scheduler(url: Optional[str] = None) -> Iterator[BaseScheduler]:
    """A scheduler on the workspace's job store that never runs jobs (started paused): to read or edit the stored
    jobs from another process through APScheduler's own API."""
    scheduler = BackgroundScheduler(jobstores={"default": _jobstore(url or open_store().url)},
                                    timezone=_local_zone())
    scheduler.start(paused=True)
    try:
        yield scheduler
    finally:
        _shutdown(scheduler, wait=False)


def _shutdown(scheduler: BaseScheduler, wait: bool) -> None:
    """Shut down without a last look for due jobs: APScheduler 3.11's loop runs one more round after shutdown()
    sets its state, which would submit a due job to the stopped executor (an error) and move the job to its next
    time, losing the run. Detaching the job store first leaves that round nothing to do."""
    scheduler.remove_jobstore("default")
    scheduler.shutdown(wait=wait)


def pull_forward_retrain(when: Optional[dt.datetime] = None, url: Optional[str] = None) -> Optional[dt.datetime]:
    """Make the "retrain" job due now (or at ``when``); return its new next run time, or None when no scheduler has
    ever stored the job (run `sdloop scheduler start`).

    Inside the scheduler process this goes through the running scheduler, which wakes at once. From another process
    (``sdloop monitor check`` run by cron) it edits the stored job; the running scheduler picks it up within its
    ``wake_s``. After the run, the job returns to its crontab."""
    when = when or _now()
    scheduler = _running
    if scheduler is not None and scheduler.running:
        try:
            return scheduler.modify_job("retrain", next_run_time=when).next_run_time
        except (JobLookupError, KeyError):
            pass  # the scheduler is stopping (its store detached): edit the stored job instead
    with _store_scheduler(url) as offline:
        try:
            return offline.modify_job("retrain", next_run_time=when).next_run_time
        except JobLookupError:
            return None


def stored_jobs(url: Optional[str] = None) -> dict[str, dict[str, Any]]:
    """The jobs in the job store, read without importing their functions (APScheduler deletes a stored job whose
    function it cannot import while loading it, so a reader in another environment must not go through it): id ->
    {trigger, next_run, func, misfire_grace_time}."""
    import pickle

    engine = make_engine(url or open_store().url)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table(JOBS_TABLE):
                return {}
            rows = conn.execute(sa.text(f"SELECT id, job_state FROM {JOBS_TABLE}")).all()
    finally:
        engine.dispose()
    out = {}
    for job_id, blob in rows:
        state = pickle.loads(blob)
        out[job_id] = {"trigger": state["trigger"], "next_run": state["next_run_time"], "func": state["func"],
                       "misfire_grace_time": state["misfire_grace_time"]}
    return out


def scheduler_status(cfg: MonitorConfig, url: Optional[str] = None) -> list[dict[str, Any]]:
    """Each job as the job store holds it, without starting a scheduler: id, trigger, next_run (None: not scheduled
    or paused), stored (False: no scheduler has added it yet), trigger_current (False: the settings changed since; a
    restart reschedules it), last (the newest job_runs row or None) and scheduler (the lock holder's pid and since,
    or None when no scheduler runs)."""
    store = open_store(url)
    running = holder(scheduler_lock_path())
    wanted = triggers(cfg)
    jobs = stored_jobs(store.url)
    out = []
    for job_id in JOB_IDS:
        job = jobs.get(job_id)
        runs = last_runs(store, job_id, limit=1)
        out.append({"id": job_id, "stored": job is not None,
                    "trigger": str(job["trigger"]) if job else str(wanted[job_id]),
                    "trigger_current": job is None or _trigger_key(job["trigger"]) == _trigger_key(wanted[job_id]),
                    "next_run": job["next_run"] if job else None,
                    "last": runs[0] if runs else None, "scheduler": running})
    return out


def format_status(rows: list[dict[str, Any]]) -> str:
    """``scheduler_status`` as lines a person reads (``sdloop scheduler status``)."""
    sched = rows[0]["scheduler"] if rows else None
    lines = [f"scheduler: running (pid {sched.get('pid')}, since {sched.get('since')})" if sched
             else "scheduler: not running (start it with `sdloop scheduler start`)"]
    for r in rows:
        nxt = _iso(r["next_run"]) if r["next_run"] else ("not scheduled yet" if not r["stored"] else "paused")
        note = "" if r["trigger_current"] else " (settings changed: a restart reschedules it)"
        last = r["last"]
        if last:
            what = last["summary"].get("error") or last["summary"].get("reason") or last["summary"].get("action") or ""
            result = f"{last['status']} at {_iso(last['started'])}" + (f": {what}" if what else "")
        else:
            result = "never ran"
        lines.append(f"{r['id']}: {r['trigger']}{note}; next run {nxt}; last run {result}")
    return "\n".join(lines)
