"""The retraining log: one row per retraining and one per step, in the monitoring store (``sdloop retrain history``).

Each step's row is committed when it starts and again when it ends, so a retraining killed mid-way leaves a row that
says where it stopped. Rows left ``running`` by a process that died are marked ``interrupted`` by the next retraining,
which holds the retrain lock (monitor/lock.py) and therefore knows nobody else is running.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import traceback
import uuid
from typing import Any, Iterator, Optional

from monitor.store import Store
from sdloop.errors import UserError

FINAL = ("promoted", "rejected", "failed", "interrupted")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class RetrainLog:
    """Read and write the retraining log of one store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def mark_interrupted(self, champion: Optional[str] = None) -> list[str]:
        """Mark retrainings (and their steps) left running by a dead process as interrupted; return their ids.
        One whose promote step finished, or whose challenger is the ``champion`` now (killed inside the promote
        step, after the pointer moved), is marked promoted. Call only while holding the retrain lock."""
        return self.store.close_running_retrains(
            champion,
            promoted_reason="the process stopped after the promotion, before the log was closed; the promotion stands",
            interrupted_reason="the process stopped before the retraining finished (killed or crashed); the champion "
                               "was not changed")

    def begin(self, trigger: str, champion: Optional[str]) -> str:
        """A new retraining's row (``running``); returns its id."""
        rid = uuid.uuid4().hex[:12]
        self.store.begin_retrain(rid, trigger, champion, os.getpid())
        return rid

    def update(self, rid: str, **values: Any) -> None:
        """Set columns of a retraining's row (challenger, run_dir, status, reasons)."""
        self.store.update_retrain(rid, {k: _jsonable(v) if k == "reasons" else v for k, v in values.items()})

    def finish(self, rid: str, status: str, reasons: list[str], **values: Any) -> None:
        assert status in FINAL, status
        self.update(rid, status=status, reasons=list(reasons), finished=_now(), **values)

    @contextlib.contextmanager
    def step(self, rid: str, name: str) -> Iterator[dict[str, Any]]:
        """Log one step: a ``running`` row now, ``ok`` (with the detail the block filled in) or ``failed`` (with the
        error's first line) at the end. Exceptions pass through."""
        detail: dict[str, Any] = {}
        sid = self.store.start_retrain_step(rid, name)
        status = "failed"
        try:
            yield detail
            status = "ok"
        except BaseException as e:
            detail["error"] = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if not isinstance(e, Exception):  # KeyboardInterrupt / SystemExit: the run stops here
                status = "interrupted"
            elif not isinstance(e, UserError):
                detail["traceback"] = traceback.format_exc(limit=8)
            raise
        finally:
            self.store.finish_retrain_step(sid, status, _jsonable(detail))

    def history(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest retrainings first, each with its steps in order."""
        return self.store.retrain_history(limit)

    def last(self) -> Optional[dict[str, Any]]:
        """The most recent retraining (any outcome), or None."""
        rows = self.history(limit=1)
        return rows[0] if rows else None


def format_history(rows: list[dict[str, Any]]) -> str:
    """The log as a person reads it: one block per retraining, one line per step."""
    if not rows:
        return "no retraining yet (`sdloop retrain` runs one; `sdloop scheduler start` runs them on a schedule)"
    out = []
    for r in rows:
        took = f", {(r['finished'] - r['started']).total_seconds():.0f} s" if r["finished"] else ""
        out.append(f"{r['started']:%Y-%m-%d %H:%M:%S} {r['id']} {r['status'].upper()} (trigger {r['trigger']}, "
                   f"champion {r['champion'] or '-'}, challenger {r['challenger'] or '-'}{took})")
        for s in r["steps"]:
            took = f" {(s['finished'] - s['started']).total_seconds():.1f} s" if s["finished"] else ""
            extra = s["detail"].get("error") or s["detail"].get("summary") or ""
            out.append(f"    {s['step']:10s} {s['status']:11s}{took:>9s}  {extra}".rstrip())
        for reason in r["reasons"] or []:
            out.append(f"    - {reason}")
    return "\n".join(out)
