"""The scheduler's jobs: module-level functions its job store references by name (``monitor.jobs:monitor_job``).

A stored job keeps only this textual reference and its keyword arguments, so these functions must stay importable
under these names. Each returns a small JSON-able summary that the scheduler writes into ``job_runs``; an exception
is recorded there as a failed run (``monitor.lock.Busy`` as skipped) and the scheduler carries on. The recording
itself (RecordingExecutor, the ``job_runs`` rows) lives here too, beside what it records.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from typing import Any, Optional

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.executors.base import MaxInstancesReachedError
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.triggers.base import BaseTrigger

from monitor.config import MonitorConfig
from monitor.lock import Busy
from monitor.store import Store
from sdloop.errors import one_line

log = logging.getLogger("sdloop.scheduler")


def _config(settings: Optional[dict[str, Any]]) -> MonitorConfig:
    """The scheduler passes its own settings; without them (a manual call) the workspace's monitor.yaml applies."""
    return MonitorConfig.from_dict(settings) if settings else MonitorConfig.load()


class JobSkipped(Exception):
    """A job that decided not to run (the scheduled retraining inside its cooldown or without new feedback):
    recorded as skipped, with ``summary``."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


class JobFailed(Exception):
    """A job that ran to its end with a failed result (a retraining whose phase failed): recorded as failed, with
    ``summary`` kept in its job_runs row."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


def monitor_job(settings: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Run the monitoring check; when its verdict is "retrain", make the retrain job due now."""
    from monitor.check import run_check
    from monitor.scheduler import pull_forward_retrain
    from monitor.store import open_store

    result = run_check(_config(settings), open_store())
    summary = result.to_dict()
    if result.decision.retrain:
        summary["retrain_pulled_forward_to"] = _iso(pull_forward_retrain())
    log.info("monitor check: %s", "; ".join(result.lines()))
    return summary


def retrain_job(settings: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Run a scheduled retraining. It takes the retrain lock itself: a retraining already running raises
    monitor.lock.Busy, which the scheduler records as skipped; a failed retraining is recorded as failed."""
    from monitor.check import new_feedback_since
    from monitor.policy import scheduled
    from monitor.retrain import retrain
    from monitor.retrain_log import RetrainLog
    from monitor.store import open_store

    cfg, store = _config(settings), open_store()
    last = RetrainLog(store).last()
    hours = (_now() - last["started"]).total_seconds() / 3600 if last else None
    decision = scheduled(new_feedback_since(store, last["started"] if last else None), hours,
                         last["status"] if last else None, cfg)
    if not decision.retrain:
        raise JobSkipped("; ".join(decision.reasons), decision.to_dict())
    outcome = retrain(cfg, trigger="schedule", progress=False, say=log.info, store=store)
    summary = {"retrain_id": outcome.id, "outcome": outcome.status, "reasons": list(outcome.reasons),
               "champion": outcome.champion, "challenger": outcome.challenger,
               "run_dir": str(outcome.run_dir) if outcome.run_dir else None}
    if outcome.status == "failed":
        raise JobFailed(f"retraining {outcome.id} failed: " + "; ".join(outcome.reasons), summary)
    return summary


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _iso(value: Optional[dt.datetime]) -> Optional[str]:
    return value.astimezone(dt.timezone.utc).isoformat() if value is not None else None


# -- the record of every run: job_runs ---------------------------------------------------------------------------------

class RecordingExecutor(ThreadPoolExecutor):
    """A thread pool that writes a ``job_runs`` row for each run before the job starts, and refuses a scheduled
    time that already has one."""

    def __init__(self, store: Store, max_workers: int = 2) -> None:
        super().__init__(max_workers)
        self.store = store
        self.rows: dict[tuple[str, float], int] = {}
        self.rows_lock = threading.Lock()

    def submit_job(self, job: Any, run_times: list[dt.datetime]) -> None:
        recorded = self.store.job_run_scheduled_times(job.id)
        fresh = [t for t in run_times if _iso(t) not in recorded]
        if not fresh:
            log.warning("job %s: the run scheduled at %s is already recorded; not running it again", job.id,
                        _iso(run_times[-1]))
            return
        previous = max(recorded, default=None)
        ids = [self._start_row(job, t, previous) for t in fresh]
        try:
            super().submit_job(job, fresh)
        except MaxInstancesReachedError:
            for row_id in ids:
                self.store.finish_job_run(row_id, "skipped", {"reason": "the previous run of this job is still going"})
            raise
        except BaseException as e:
            for row_id in ids:
                self.store.finish_job_run(row_id, "skipped", {"reason": f"not started: {one_line(e)}"})
            raise

    def _start_row(self, job: Any, when: dt.datetime, previous: Optional[str]) -> int:
        summary: dict[str, Any] = {"scheduled": _iso(when)}
        missed = _missed_since(job.trigger, previous, when)
        if missed:
            summary["coalesced"] = missed + 1
        row_id = self.store.start_job_run(job.id, summary)
        with self.rows_lock:
            self.rows[(job.id, when.timestamp())] = row_id
        return row_id

    def finished(self, event: JobExecutionEvent) -> None:
        """Listener: the job ran (ok / failed / skipped) or was missed beyond the grace time."""
        with self.rows_lock:
            row_id = self.rows.pop((event.job_id, event.scheduled_run_time.timestamp()), None)
        if row_id is None:
            return
        if event.code == EVENT_JOB_MISSED:
            late = (_now() - event.scheduled_run_time).total_seconds()
            self.store.finish_job_run(row_id, "skipped", {"reason": f"missed by {late:.0f} s, more than the grace "
                                                                   "time (misfire_grace_s)"})
        elif event.code == EVENT_JOB_ERROR:
            exc = event.exception
            status = "skipped" if isinstance(exc, (Busy, JobSkipped)) else "failed"
            extra = dict(exc.summary) if isinstance(exc, (JobFailed, JobSkipped)) else {}
            self.store.finish_job_run(row_id, status, {**_jsonable(extra), "error": one_line(exc),
                                                       "type": type(exc).__name__})
            if status == "failed":
                log.error("job %s failed: %s", event.job_id, one_line(exc))
        else:
            self.store.finish_job_run(row_id, "ok", _jsonable(event.retval))


def _jsonable(value: Any) -> dict[str, Any]:
    """A job's return value as the summary JSON object."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        value = {"result": value}
    return json.loads(json.dumps(value, default=str))


def _missed_since(trigger: BaseTrigger, previous: Optional[str], when: dt.datetime) -> int:
    """How many fire times of ``trigger`` lie strictly between the last recorded run and this one (folded into this
    run by coalescing); 0 when unknown."""
    if previous is None:
        return 0
    t: Optional[dt.datetime] = dt.datetime.fromisoformat(previous)
    count = 0
    while count < 100000:
        t = trigger.get_next_fire_time(t, t + dt.timedelta(microseconds=1)) if t else None
        if t is None or t >= when - dt.timedelta(microseconds=1):
            return count
        count += 1
    return count


def close_interrupted(store: Store) -> int:
    """Rows a killed scheduler left ``running``: failed, interrupted. Only called while holding the scheduler lock."""
    return store.close_running_job_runs("interrupted: the scheduler stopped during this run")


def last_runs(store: Store, job_id: str, limit: int = 10) -> list[dict[str, Any]]:
    """The newest ``job_runs`` rows of a job, newest first (started/finished as aware UTC datetimes)."""
    return store.last_job_runs(job_id, limit)
