"""The monitoring store's logs of the loop itself: the retraining log (``retrains``, ``retrain_steps``) and the
scheduler's record of every job run (``job_runs``).

Part of ``monitor.store``: a mixin of ``Store`` (the one public class). ``monitor.retrain_log`` and ``monitor.jobs``
decide what to write and word it; the queries are here, so every query of the monitoring database lives in
``monitor/store*.py``. Each call is one committed transaction: a row must say where a killed process stopped.
"""

from __future__ import annotations

from typing import Any, Optional

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from monitor.store_schema import _now, _utc, job_runs, retrain_steps, retrains


class _LogQueries:
    """Reads and writes of the retraining log and of the scheduler's job runs."""

    engine: Engine

    # -- the retraining log ---------------------------------------------------------------------------------------

    def close_running_retrains(self, champion: Optional[str], promoted_reason: str,
                               interrupted_reason: str) -> list[str]:
        """Mark retrainings (and their steps) left ``running`` by a dead process, in one transaction; return their
        ids. One whose promote step finished, or whose challenger is ``champion`` (killed inside the promote step,
        after the pointer moved), becomes ``promoted`` with ``promoted_reason``; the others ``interrupted``."""
        now = _now()
        with self.engine.begin() as conn:
            ids = list(conn.execute(sa.select(retrains.c.id).where(retrains.c.status == "running")).scalars())
            for rid in ids:
                conn.execute(retrain_steps.update().where(retrain_steps.c.retrain_id == rid)
                             .where(retrain_steps.c.status == "running").values(status="interrupted", finished=now))
                promoted = conn.execute(sa.select(retrain_steps.c.id).where(retrain_steps.c.retrain_id == rid)
                                        .where(retrain_steps.c.step == "promote")
                                        .where(retrain_steps.c.status == "ok")).first() is not None
                challenger = conn.execute(sa.select(retrains.c.challenger).where(retrains.c.id == rid)).scalar()
                promoted = promoted or (champion is not None and challenger == champion)
                conn.execute(retrains.update().where(retrains.c.id == rid).values(
                    status="promoted" if promoted else "interrupted", finished=now,
                    reasons=[promoted_reason if promoted else interrupted_reason]))
        return ids

    def begin_retrain(self, rid: str, trigger: str, champion: Optional[str], pid: int) -> None:
        """A ``running`` row for a retraining that starts now."""
        with self.engine.begin() as conn:
            conn.execute(retrains.insert().values(id=rid, started=_now(), trigger=trigger, status="running",
                                                  champion=champion, reasons=[], pid=pid))

    def update_retrain(self, rid: str, values: dict[str, Any]) -> None:
        """Set columns of a retraining's row (status, finished, challenger, run_dir, reasons as JSON-able values)."""
        with self.engine.begin() as conn:
            conn.execute(retrains.update().where(retrains.c.id == rid).values(**values))

    def start_retrain_step(self, rid: str, step: str) -> int:
        """A ``running`` row for one step of a retraining, committed now; returns the step row's id."""
        with self.engine.begin() as conn:
            return int(conn.execute(retrain_steps.insert().values(
                retrain_id=rid, step=step, status="running", started=_now(), detail={})).inserted_primary_key[0])

    def finish_retrain_step(self, step_id: int, status: str, detail: dict[str, Any]) -> None:
        """Close a step's row: its final status, end time and JSON-able detail."""
        with self.engine.begin() as conn:
            conn.execute(retrain_steps.update().where(retrain_steps.c.id == step_id).values(
                status=status, finished=_now(), detail=detail))

    def retrain_history(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest retrainings first, each with its steps in order (times as aware UTC), read in one transaction."""
        with self.engine.begin() as conn:
            rows = [dict(r) for r in conn.execute(
                sa.select(retrains).order_by(retrains.c.started.desc()).limit(limit)).mappings()]
            for row in rows:
                row["started"], row["finished"] = _utc(row["started"]), _utc(row["finished"])
                row["steps"] = [{**dict(s), "started": _utc(s["started"]), "finished": _utc(s["finished"])}
                                for s in conn.execute(sa.select(retrain_steps)
                                                      .where(retrain_steps.c.retrain_id == row["id"])
                                                      .order_by(retrain_steps.c.id)).mappings()]
        return rows

    # -- the scheduler's job runs ---------------------------------------------------------------------------------

    def start_job_run(self, job_id: str, summary: dict[str, Any]) -> int:
        """A ``running`` row for a run handed to the executor now; returns its id."""
        with self.engine.begin() as conn:
            return int(conn.execute(job_runs.insert().values(job_id=job_id, started=_now(), status="running",
                                                             summary=summary)).inserted_primary_key[0])

    def job_run_scheduled_times(self, job_id: str, limit: int = 50) -> set[str]:
        """The ``scheduled`` times (ISO strings) of a job's newest ``limit`` runs: a time in here never runs again."""
        q = (sa.select(job_runs.c.summary).where(job_runs.c.job_id == job_id)
             .order_by(job_runs.c.id.desc()).limit(limit))
        with self.engine.begin() as conn:
            return {s.get("scheduled") for (s,) in conn.execute(q) if isinstance(s, dict) and s.get("scheduled")}

    def finish_job_run(self, row_id: int, status: str, extra: dict[str, Any]) -> None:
        """Close a run's row: its status, end time, and ``extra`` merged into its summary."""
        with self.engine.begin() as conn:
            summary = conn.execute(sa.select(job_runs.c.summary).where(job_runs.c.id == row_id)).scalar() or {}
            conn.execute(job_runs.update().where(job_runs.c.id == row_id)
                         .values(finished=_now(), status=status, summary={**summary, **extra}))

    def close_running_job_runs(self, error: str) -> int:
        """Mark every run left ``running`` failed with ``error`` in its summary; return how many. Only the scheduler
        holding the scheduler lock may call this (it alone knows no run is really going)."""
        n = 0
        with self.engine.begin() as conn:
            for row_id, summary in conn.execute(sa.select(job_runs.c.id, job_runs.c.summary)
                                                .where(job_runs.c.status == "running")).all():
                conn.execute(job_runs.update().where(job_runs.c.id == row_id).values(
                    finished=_now(), status="failed", summary={**(summary or {}), "error": error}))
                n += 1
        return n

    def last_job_runs(self, job_id: str, limit: int = 10) -> list[dict[str, Any]]:
        """The newest ``job_runs`` rows of a job, newest first (started/finished as aware UTC datetimes)."""
        q = sa.select(job_runs).where(job_runs.c.job_id == job_id).order_by(job_runs.c.id.desc()).limit(limit)
        with self.engine.begin() as conn:
            rows = [dict(r) for r in conn.execute(q).mappings()]
        for r in rows:
            r["started"], r["finished"] = _utc(r["started"]), _utc(r["finished"])
        return rows
