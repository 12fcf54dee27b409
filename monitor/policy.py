"""The retraining policy: a pure function from what the monitor found to what to do about it, with its reasons.

Kept free of I/O and of the clock so every case can be tested by itself and a decision can be replayed from its
evidence: the caller (``monitor.check``) reads the report, counts the feedback and looks up the last retraining,
then asks ``decide``. The rules, in order:

1. The champion has not yet served the generations its own reference window needs (``reference_wait``): ``wait``,
   saying how many it has and needs (judging it on the previous champion's traffic would judge the wrong model).
   Otherwise, the report had too little data for a verdict: ``not_enough_data`` (a verdict on a handful of rows is
   noise).
2. No drift and no bad feedback: ``healthy``. Service problems (latency, error rate) are reported in the reasons but
   never retrained on: a new LoRA does not make the server faster or the requests succeed.
3. Drift or bad feedback, but the last retraining (whatever its outcome: a rejected or failed one counts, or a
   failing retraining would run every hour) was less than ``cooldown_hours`` ago: ``wait``, saying how long.
4. Drift or bad feedback, but fewer than ``min_new_feedback`` feedback rows since the last retraining: there is
   nothing new to learn from yet, ``not_enough_data``, saying how many more are needed.
5. Otherwise ``retrain``.

Every reason is one line a person reads, with the numbers that led to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from monitor.config import MonitorConfig

ACTIONS = ("retrain", "wait", "not_enough_data", "healthy")


@dataclass(frozen=True)
class Evidence:
    """What the decision rests on (each list: one line per failed test of the monitoring report)."""

    enough_data: bool
    drift: list[str] = field(default_factory=list)          # prompt or image descriptor drift
    bad_feedback: list[str] = field(default_factory=list)   # low mean rating, many thumbs down, ratings drifting down
    service: list[str] = field(default_factory=list)        # latency, error rate: reported, never retrained on
    new_feedback: int = 0                                    # feedback rows since the last retraining (or ever)
    hours_since_retrain: Optional[float] = None              # since the last retraining started; None: never
    last_outcome: Optional[str] = None                       # e.g. "promoted", "rejected", "failed"
    reference_wait: Optional[str] = None                     # the champion's own reference is not full yet: why

    def __post_init__(self) -> None:
        for name in ("drift", "bad_feedback", "service"):  # our own copies: a caller's later edits change nothing
            object.__setattr__(self, name, [str(line) for line in getattr(self, name)])
        if self.new_feedback < 0:
            raise ValueError(f"new_feedback={self.new_feedback} is negative; count the feedback rows.")
        h = self.hours_since_retrain
        if h is not None and math.isnan(h):
            raise ValueError("hours_since_retrain is NaN; pass None when there was no retraining.")


@dataclass(frozen=True)
class Decision:
    """What to do, and why (one line per reason). ``wait_hours``/``feedback_needed`` say how far from retraining."""

    action: str
    reasons: list[str]
    wait_hours: Optional[float] = None       # with "wait": hours until the cooldown ends
    feedback_needed: Optional[int] = None    # with "not_enough_data" for lack of feedback: how many more rows
    service: list[str] = field(default_factory=list)  # service problems to alert on, whatever the action

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"action {self.action!r} is not one of {ACTIONS}")

    @property
    def retrain(self) -> bool:
        return self.action == "retrain"

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "retrain": self.retrain, "reasons": list(self.reasons),
                "wait_hours": self.wait_hours, "feedback_needed": self.feedback_needed,
                "service": list(self.service)}


def _hours(h: float) -> str:
    return f"{h:.1f} h"


def _last(evidence: Evidence) -> str:
    """'the last retraining (rejected) started 3.0 h ago' or 'no retraining yet'."""
    if evidence.hours_since_retrain is None:
        return "no retraining yet"
    outcome = f" ({evidence.last_outcome})" if evidence.last_outcome else ""
    return f"the last retraining{outcome} started {_hours(max(0.0, evidence.hours_since_retrain))} ago"


def decide(evidence: Evidence, cfg: MonitorConfig) -> Decision:
    """The action the evidence calls for under ``cfg``'s cooldown and feedback minimum; see the module docstring."""
    service = [f"service (reported, not retrained on: retraining does not fix it): {line}"
               for line in evidence.service]
    if not evidence.enough_data and evidence.reference_wait:
        return Decision("wait", [f"no verdict yet: {evidence.reference_wait}"] + service,
                        service=list(evidence.service))
    if not evidence.enough_data:
        return Decision("not_enough_data",
                        [f"the monitoring report has too little data for a verdict (each window needs at least "
                         f"{cfg.min_generations} generations, the current one {cfg.min_feedback} rated ones); "
                         "wait for more traffic"] + service,
                        service=list(evidence.service))
    problems = [f"drift: {line}" for line in evidence.drift] + \
               [f"bad feedback: {line}" for line in evidence.bad_feedback]
    if not problems:
        head = "no drift and no bad feedback" + (": the model is fine, but the service is not" if service else "")
        return Decision("healthy", [head] + service, service=list(evidence.service))

    since = "since the last retraining" if evidence.hours_since_retrain is not None else "so far (never retrained)"
    feedback_line = f"{evidence.new_feedback} new feedback row(s) {since}; at least {cfg.min_new_feedback} needed"
    short = max(0, cfg.min_new_feedback - evidence.new_feedback)
    h = evidence.hours_since_retrain
    if h is not None and max(0.0, h) < cfg.cooldown_hours:
        left = cfg.cooldown_hours - max(0.0, h)
        lines = problems + [f"{_last(evidence)}, inside the {_hours(cfg.cooldown_hours)} cooldown: wait "
                            f"{_hours(left)} more"]
        if short:
            lines.append(f"{feedback_line}: {short} more to go")
        return Decision("wait", lines + service, wait_hours=left, feedback_needed=short or None,
                        service=list(evidence.service))
    if short:
        return Decision("not_enough_data",
                        problems + [f"{feedback_line}: {short} more before retraining on it"] + service,
                        feedback_needed=short, service=list(evidence.service))
    cooldown = f"{_last(evidence)}" + (f" (cooldown {_hours(cfg.cooldown_hours)} over)" if h is not None else "")
    return Decision("retrain", problems + [feedback_line, cooldown] + service, service=list(evidence.service))


def scheduled(new_feedback: int, hours_since_retrain: Optional[float], last_outcome: Optional[str],
              cfg: MonitorConfig) -> Decision:
    """The crontab retraining's own check: a periodic refresh needs no drift, but it keeps the cooldown (so a
    retraining pulled forward on Saturday is not repeated at Sunday 03:00) and the new-feedback minimum (nothing new
    to learn from is not worth hours of training)."""
    evidence = Evidence(enough_data=True, drift=[], bad_feedback=[], service=[], new_feedback=new_feedback,
                        hours_since_retrain=hours_since_retrain, last_outcome=last_outcome)
    h = evidence.hours_since_retrain
    if h is not None and max(0.0, h) < cfg.cooldown_hours:
        left = cfg.cooldown_hours - max(0.0, h)
        return Decision("wait", [f"{_last(evidence)}, inside the {_hours(cfg.cooldown_hours)} cooldown: the scheduled "
                                 f"retraining waits {_hours(left)} more"], wait_hours=left)
    short = max(0, cfg.min_new_feedback - new_feedback)
    if short:
        return Decision("not_enough_data", [f"{new_feedback} new feedback row(s) since the last retraining; at least "
                                            f"{cfg.min_new_feedback} needed: {short} more before retraining on them"],
                        feedback_needed=short)
    return Decision("retrain", [f"{new_feedback} new feedback row(s) to learn from", _last(evidence)])
