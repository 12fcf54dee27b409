"""The scheduler: one APScheduler 3.11 process per workspace that runs the monitoring check and the retraining.

Jobs live in a ``SQLAlchemyJobStore`` (table ``apscheduler_jobs``) in the scheduler's own database
(``monitor.scheduler_db``: ``$SDLOOP_SCHEDULER_URL``, default ``$SDLOOP_HOME/scheduler.db``), never in the monitoring
store that serving replicas write, because the job store holds pickles. A restart neither loses nor duplicates them:
the process starts its scheduler paused, adds the jobs that are missing, reschedules one whose trigger changed
(monitor interval, retrain crontab), updates changed options, then resumes.
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

Only this process loads the pickled jobs. It describes them in plain rows (``scheduler_jobs``: trigger as text, next
run time) whenever a job is added, changed or run, and ``sdloop scheduler status`` reads those. Another process that
wants the retraining now (``pull_forward_retrain()`` in ``sdloop monitor check --pull-forward``, from cron) writes a
request row; the running scheduler applies it within ``wake_s`` (default 30 s), when it wakes up to look for
requests, or at its next start.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import signal
import threading
from typing import Any, Iterator, Mapping, Optional

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, EVENT_JOB_MISSED
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import BaseScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from monitor.config import MonitorConfig
from monitor.jobs import RecordingExecutor, _iso, close_interrupted, last_runs
from monitor.lock import hold, holder, scheduler_lock_path
from monitor.scheduler_db import JobDescriber, SchedulerDB, apply_requests, describe, trigger_key
from monitor.store import open_store
from sdloop.errors import one_line

log = logging.getLogger("sdloop.scheduler")

JOB_IDS = ("monitor", "retrain")
DEFAULT_FUNCS: dict[str, str] = {"monitor": "monitor.jobs:monitor_job", "retrain": "monitor.jobs:retrain_job"}
WAKE_S = 30.0  # the longest a running scheduler sleeps before looking for requests of other processes
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
        if trigger_key(job.trigger) != trigger_key(wanted[job_id]):
            scheduler.reschedule_job(job_id, trigger=wanted[job_id])
            done[job_id] = "rescheduled"
        else:
            done[job_id] = "updated" if changes else "unchanged"
    return done


# -- the scheduler process ------------------------------------------------------------------------------------------

def run_scheduler(cfg: MonitorConfig, *, funcs: Optional[Mapping[str, str]] = None,
                  stop_event: Optional[threading.Event] = None, wake_s: float = WAKE_S,
                  url: Optional[str] = None, scheduler_url: Optional[str] = None) -> None:
    """Run the workspace's scheduler until SIGTERM/SIGINT or ``stop_event`` (blocking). Raises ``monitor.lock.Busy``
    (one line: who holds it) when another scheduler runs on this workspace.

    ``funcs`` replaces the jobs' functions by textual reference (tests); ``wake_s`` bounds how long the scheduler
    sleeps before looking for requests of other processes (a pull-forward); ``url`` (the monitoring store) defaults
    to ``sdloop.workspace.store_url()``, ``scheduler_url`` (its own database) to ``scheduler_url()``."""
    global _running
    stop = stop_event or threading.Event()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from sdloop.workspace import store_url

    db = SchedulerDB(scheduler_url, monitoring_url=url)
    with hold(scheduler_lock_path(), "scheduler", db_url=url or store_url()):
        store = open_store(url)
        interrupted = close_interrupted(store)
        if interrupted:
            log.warning("%d job run(s) were interrupted when the scheduler last stopped; marked failed", interrupted)
        executor = RecordingExecutor(store)
        scheduler = BackgroundScheduler(jobstores={"default": db.jobstore()},
                                        executors={"default": executor}, timezone=_local_zone(),
                                        job_defaults=_options(cfg), jobstore_retry_interval=RETRY_S)
        scheduler.add_listener(executor.finished, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR | EVENT_JOB_MISSED)
        describer = JobDescriber(scheduler, db)
        scheduler.add_listener(describer.mark, JobDescriber.EVENTS)
        restore = _install_signals(stop)
        try:
            scheduler.start(paused=True)
            done = ensure_jobs(scheduler, cfg, funcs)
            apply_requests(scheduler, db)  # pull-forwards asked for while no scheduler ran
            describer.start()
            _running = scheduler
            scheduler.resume()
            for job in scheduler.get_jobs():
                log.info("job %s (%s): %s, next run %s", job.id, done.get(job.id, "?"), job.trigger,
                         _iso(job.next_run_time))
            log.info("scheduler running (pid %d); SIGTERM or Ctrl-C stops it", os.getpid())
            while not stop.wait(wake_s):
                try:
                    apply_requests(scheduler, db)
                except Exception as e:  # noqa: BLE001 - the database may be away for a while: try again later
                    log.warning("could not read the scheduler's requests: %s", one_line(e))
                describer.mark()
            log.info("stopping: waiting for running jobs to finish (a second signal abandons them)")
        finally:
            _running = None
            if scheduler.running:
                describer.stop()
                _shutdown(scheduler, wait=True)
            restore()
            db.close()
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
def _store_scheduler(scheduler_url: Optional[str] = None) -> Iterator[BaseScheduler]:
    """A scheduler on the scheduler's own job store that never runs jobs (started paused), to seed or edit the
    stored jobs through APScheduler's API while no scheduler runs (tests do). It loads the pickled jobs, so no command
    uses it; on leaving, it describes the jobs in plain rows, as the running scheduler does."""
    db = SchedulerDB(scheduler_url)
    scheduler = BackgroundScheduler(jobstores={"default": db.jobstore()}, timezone=_local_zone())
    scheduler.start(paused=True)
    try:
        yield scheduler
        db.write_jobs(describe(scheduler.get_jobs()))
    finally:
        _shutdown(scheduler, wait=False)
        db.close()


def _shutdown(scheduler: BaseScheduler, wait: bool) -> None:
    """Shut down without a last look for due jobs: APScheduler 3.11's loop runs one more round after shutdown()
    sets its state, which would submit a due job to the stopped executor (an error) and move the job to its next
    time, losing the run. Detaching the job store first leaves that round nothing to do."""
    scheduler.remove_jobstore("default")
    scheduler.shutdown(wait=wait)


def pull_forward_retrain(when: Optional[dt.datetime] = None,
                         scheduler_url: Optional[str] = None) -> Optional[dt.datetime]:
    """Make the "retrain" job due now (or at ``when``); return that time, or None when no scheduler has ever stored
    the job (run `sdloop scheduler start`).

    Inside the scheduler process this goes through the running scheduler, which wakes at once. From another process
    (``sdloop monitor check`` run by cron) it writes a request into the scheduler's database, loading no job: the
    running scheduler applies it within its ``wake_s``, a stopped one at its next start. After the run, the job
    returns to its crontab."""
    when = when or _now()
    scheduler = _running
    if scheduler is not None and scheduler.running:
        try:
            return scheduler.modify_job("retrain", next_run_time=when).next_run_time
        except (JobLookupError, KeyError):
            pass  # the scheduler is stopping (its store detached): leave a request for its next start
    db = SchedulerDB(scheduler_url)
    try:
        if "retrain" not in db.jobs():
            return None
        db.request_run("retrain", when)
        return when
    finally:
        db.close()


def stored_jobs(scheduler_url: Optional[str] = None) -> dict[str, dict[str, Any]]:
    """The jobs as the scheduler last described them in its database's plain rows (nothing is unpickled): id ->
    {func, trigger (text), trigger_key, next_run, misfire_grace_time, written}."""
    db = SchedulerDB(scheduler_url)
    try:
        return db.jobs()
    finally:
        db.close()


def scheduler_status(cfg: MonitorConfig, url: Optional[str] = None,
                     scheduler_url: Optional[str] = None) -> list[dict[str, Any]]:
    """Each job as the scheduler last described it, without starting a scheduler or loading a stored job: id,
    trigger, next_run (None: not scheduled or paused), stored (False: no scheduler has added it yet), trigger_current
    (False: the settings changed since; a restart reschedules it), pulled_forward (a requested run time the scheduler
    has not applied yet, or None), last (the newest job_runs row or None) and scheduler (the lock holder's pid and
    since, or None when no scheduler runs)."""
    store = open_store(url)
    running = holder(scheduler_lock_path())
    wanted = triggers(cfg)
    db = SchedulerDB(scheduler_url, monitoring_url=store.url)
    try:
        jobs, pending = db.jobs(), db.pending()
    finally:
        db.close()
    out = []
    for job_id in JOB_IDS:
        job = jobs.get(job_id)
        runs = last_runs(store, job_id, limit=1)
        asked = [when for _, jid, when in pending if jid == job_id]
        out.append({"id": job_id, "stored": job is not None,
                    "trigger": job["trigger"] if job else str(wanted[job_id]),
                    "trigger_current": job is None or job["trigger_key"] == trigger_key(wanted[job_id]),
                    "next_run": job["next_run"] if job else None,
                    "pulled_forward": min(asked) if asked else None,
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
        if r.get("pulled_forward"):
            nxt += f" (pulled forward to {_iso(r['pulled_forward'])}: the scheduler applies it when it next wakes)"
        last = r["last"]
        if last:
            what = last["summary"].get("error") or last["summary"].get("reason") or last["summary"].get("action") or ""
            result = f"{last['status']} at {_iso(last['started'])}" + (f": {what}" if what else "")
        else:
            result = "never ran"
        lines.append(f"{r['id']}: {r['trigger']}{note}; next run {nxt}; last run {result}")
    return "\n".join(lines)
