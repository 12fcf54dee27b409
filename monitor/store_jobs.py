"""Generation jobs in the monitoring store (schema version 5): what every worker and replica shares about a job.

Part of ``monitor.store``: a mixin of ``Store`` (the one public class); the service (``bento/jobs.py``) calls these
named methods, so every query of the monitoring database stays in ``monitor/store*.py``.

Why the store and not each worker's memory: a job is submitted to one worker, but its status, result and cancel
requests may land on any worker of any replica behind the load balancer. The row is the truth; the worker that owns
the job keeps it current: ``start_job`` (queued -> running, only if nobody cancelled it first), ``job_progress``
(step i of n), ``finish_job`` (done / failed / cancelled, once), and ``touch_jobs`` (the heartbeat of its queued
and running jobs, so a job whose worker died reads as failed instead of "running" for ever). ``cancel_job`` may run
on any worker: it ends a queued job at once and flags a running one, which its owner polls
(``jobs_to_cancel``). Every transition is one conditional UPDATE, so two workers never both win a race.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Iterable, Optional

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from monitor.store_schema import _now, _stamp, _utc, jobs

STATES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE = ("queued", "running")
FINISHED = ("done", "failed", "cancelled")


def _job(row: Any) -> dict[str, Any]:
    out = dict(row)
    for key in ("created", "updated"):
        out[key] = _utc(out[key])
    out["cancel_requested"] = bool(out["cancel_requested"])
    return out


class _JobQueries:
    """Creating, advancing, cancelling, reading and purging generation jobs."""

    engine: Engine

    def create_job(self, job_id: str, request: dict[str, Any], steps: int, api_key_id: Optional[int] = None,
                   worker: Optional[str] = None) -> dict[str, Any]:
        """Record a queued job (``request``: the validated request as JSON); committed before this returns."""
        now = _now()
        with self.engine.begin() as conn:
            conn.execute(jobs.insert().values(
                id=str(job_id), api_key_id=None if api_key_id is None else int(api_key_id), state="queued", step=0,
                steps=int(steps), request=request, model_version=None, error=None, result=None, created=now,
                updated=now, cancel_requested=False, worker=worker))
            row = conn.execute(sa.select(jobs).where(jobs.c.id == str(job_id))).mappings().one()
        return _job(row)

    def get_job(self, job_id: str) -> Optional[dict[str, Any]]:
        """One job by id, or None (never created, or purged)."""
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == str(job_id))).mappings().first()
        return _job(row) if row else None

    def start_job(self, job_id: str, worker: Optional[str] = None) -> Optional[dict[str, Any]]:
        """queued -> running; the job's row, or None when it is no longer queued (cancelled meanwhile, purged)."""
        with self.engine.begin() as conn:
            done = conn.execute(jobs.update().where(jobs.c.id == str(job_id), jobs.c.state == "queued",
                                                    jobs.c.cancel_requested.is_(False))
                                .values(state="running", worker=worker, updated=_now())).rowcount
            if not done:
                return None
            row = conn.execute(sa.select(jobs).where(jobs.c.id == str(job_id))).mappings().one()
        return _job(row)

    def job_progress(self, job_id: str, step: int, steps: int) -> bool:
        """Step ``step`` of ``steps`` done (also a heartbeat); return whether a cancel was requested."""
        with self.engine.begin() as conn:
            conn.execute(jobs.update().where(jobs.c.id == str(job_id), jobs.c.state == "running")
                         .values(step=int(step), steps=int(steps), updated=_now()))
            flag = conn.execute(sa.select(jobs.c.cancel_requested).where(jobs.c.id == str(job_id))).scalar()
        return bool(flag)

    def finish_job(self, job_id: str, state: str, *, result: Optional[dict[str, Any]] = None,
                   error: Optional[str] = None, model_version: Optional[str] = None,
                   step: Optional[int] = None) -> bool:
        """End a job as ``done``, ``failed`` or ``cancelled`` (once: a finished job stays as it ended); return
        whether this call ended it."""
        if state not in FINISHED:
            raise ValueError(f"a job ends as one of {FINISHED}, not {state!r}")
        values: dict[str, Any] = {"state": state, "updated": _now(), "result": result,
                                  "error": None if error is None else error[:2000]}
        if model_version is not None:
            values["model_version"] = model_version
        if step is not None:
            values["step"] = int(step)
        with self.engine.begin() as conn:
            return bool(conn.execute(jobs.update().where(jobs.c.id == str(job_id), jobs.c.state.in_(ACTIVE))
                                     .values(**values)).rowcount)

    def cancel_job(self, job_id: str) -> Optional[dict[str, Any]]:
        """Ask for a job's cancellation: a queued one is cancelled at once, a running one is flagged (its worker
        stops it within a step); a finished one is left as it is. The row after, or None for an unknown id."""
        now = _now()
        with self.engine.begin() as conn:
            conn.execute(jobs.update().where(jobs.c.id == str(job_id), jobs.c.state == "queued")
                         .values(state="cancelled", cancel_requested=True, error="cancelled before it started",
                                 updated=now))
            conn.execute(jobs.update().where(jobs.c.id == str(job_id), jobs.c.state == "running")
                         .values(cancel_requested=True))
            row = conn.execute(sa.select(jobs).where(jobs.c.id == str(job_id))).mappings().first()
        return _job(row) if row else None

    def jobs_to_cancel(self, job_ids: Iterable[str]) -> list[str]:
        """Those of ``job_ids`` whose cancellation was requested (on any worker) or that are no longer active."""
        ids = [str(i) for i in job_ids]
        if not ids:
            return []
        q = sa.select(jobs.c.id).where(jobs.c.id.in_(ids),
                                       sa.or_(jobs.c.cancel_requested.is_(True), jobs.c.state.not_in(ACTIVE)))
        with self.engine.begin() as conn:
            return [str(r) for r in conn.execute(q).scalars()]

    def touch_jobs(self, job_ids: Iterable[str]) -> int:
        """The heartbeat of a worker's queued and running jobs; return how many rows it touched."""
        ids = [str(i) for i in job_ids]
        if not ids:
            return 0
        with self.engine.begin() as conn:
            return int(conn.execute(jobs.update().where(jobs.c.id.in_(ids), jobs.c.state.in_(ACTIVE))
                                    .values(updated=_now())).rowcount)

    def purge_jobs(self, older_than: dt.datetime) -> int:
        """Delete jobs not updated since ``older_than`` (finished ones past their TTL, and active ones whose worker
        stopped long ago); return how many."""
        with self.engine.begin() as conn:
            return int(conn.execute(jobs.delete().where(jobs.c.updated < _stamp(older_than))).rowcount)
