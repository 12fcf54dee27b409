"""What the retraining policy says right now, for `sdloop retrain` to say what it overrides.

`sdloop retrain` is a person asking for a retraining: it runs whatever the policy says, but first it says, in one
line, the verdict `sdloop monitor check` would give now and that it runs anyway; ``--respect-policy`` makes it run
only on a RETRAIN verdict (for cron). The verdict is ``monitor.check.run_check``'s, from the same report and the same
retraining log, with the report written to a temporary folder (asking does not add a report to the list).
"""

from __future__ import annotations

import datetime as dt
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from monitor.config import MonitorConfig
from monitor.policy import Decision
from monitor.store import Store
from sdloop.errors import one_line


@dataclass(frozen=True)
class Verdict:
    """The policy's decision and the short reason a person reads in one line."""

    decision: Decision
    why: str
    source: str = "monitor check"

    @property
    def action(self) -> str:
        return self.decision.action.upper().replace("_", " ")

    @property
    def retrain(self) -> bool:
        return self.decision.retrain


def short_reason(decision: Decision, cfg: MonitorConfig, new_feedback: Optional[int] = None) -> str:
    """'cooldown: 2.0 h left; 3 of 20 new feedback rows' - the numbers that decided, without the report's prose."""
    parts = []
    if decision.wait_hours is not None:
        parts.append(f"cooldown: {decision.wait_hours:.1f} h left of {cfg.cooldown_hours:g} h")
    if decision.feedback_needed:
        have = cfg.min_new_feedback - decision.feedback_needed if new_feedback is None else new_feedback
        parts.append(f"{max(0, have)} of {cfg.min_new_feedback} new feedback rows")
    if not parts and decision.action == "not_enough_data":
        parts.append(f"too little traffic for a verdict: each window needs {cfg.min_generations} generations, "
                     f"the current one {cfg.min_feedback} rated")
    if not parts and decision.action == "healthy":
        parts.append("no drift and no bad feedback")
    if not parts and decision.reasons:
        parts.append(decision.reasons[0])
    return "; ".join(parts)


def current_verdict(cfg: MonitorConfig, store: Optional[Store] = None,
                    now: Optional[dt.datetime] = None) -> Verdict:
    """The verdict `sdloop monitor check` gives now. When the report cannot be built, the scheduled retraining's own
    check (cooldown and new feedback, from the retraining log) stands in, and the reason says so."""
    from monitor.check import run_check
    from monitor.store import open_store

    store = store or open_store()
    now = now or dt.datetime.now(dt.timezone.utc)
    try:
        with tempfile.TemporaryDirectory(prefix="sdloop-retrain-check-") as tmp:
            result = run_check(cfg, store=store, now=now, out_dir=Path(tmp))
        return Verdict(result.decision, short_reason(result.decision, cfg, result.evidence.new_feedback))
    except Exception as e:  # noqa: BLE001 - a report that cannot be built must not stop a retraining asked for
        from monitor.check import new_feedback_since
        from monitor.policy import scheduled
        from monitor.retrain_log import RetrainLog

        last = RetrainLog(store).last()
        since = last["started"] if last else None
        new = new_feedback_since(store, since)
        hours = (now - since).total_seconds() / 3600 if since else None
        decision = scheduled(new, hours, last["status"] if last else None, cfg)
        why = short_reason(decision, cfg, new)
        return Verdict(decision, f"{why}; the report could not be built: {one_line(e)}",
                       source="the scheduled retraining's check")


def override_line(verdict: Verdict, respect: bool) -> str:
    """The one line `sdloop retrain` prints before it runs (or, with ``--respect-policy``, instead of running)."""
    head = f"{verdict.source} says {verdict.action}" + (f" ({verdict.why})" if verdict.why else "")
    if verdict.retrain:
        return f"{head}; retraining as it recommends."
    if respect:
        return (f"{head}; not retraining (--respect-policy runs only on RETRAIN; `sdloop retrain` without it "
                "overrides the policy).")
    return (f"{head}; retraining anyway because you asked (sdloop retrain); `sdloop retrain --respect-policy` "
            "runs only when it says RETRAIN.")
