"""The retraining policy, case by case: each case names its evidence, the action expected, and numbers that must
appear in the reasons (a reason without its numbers tells the reader nothing)."""

from __future__ import annotations

import dataclasses

import pytest

from monitor.config import MonitorConfig
from monitor.policy import Decision, Evidence, decide

CFG = MonitorConfig.from_dict({"cooldown_hours": 24.0, "min_new_feedback": 20, "min_generations": 30,
                               "min_feedback": 10})
DRIFT = "prompt descriptors drifted: 3 of 4 columns (share 0.75 > 0.5)"
BAD = "mean rating 2.1 < 3.0"
SLOW = "latency p95 41.2 s > 30.0 s"

CASES = [
    # id, evidence, action, substrings every one of which must be in the joined reasons
    ("healthy", Evidence(True, new_feedback=50, hours_since_retrain=100.0), "healthy",
     ["no drift and no bad feedback"]),
    ("drift only", Evidence(True, drift=[DRIFT], new_feedback=25, hours_since_retrain=48.0, last_outcome="promoted"),
     "retrain", ["drift: " + DRIFT, "25 new feedback", "at least 20", "48.0 h ago", "(promoted)", "cooldown 24.0 h"]),
    ("bad feedback only", Evidence(True, bad_feedback=[BAD], new_feedback=20, hours_since_retrain=30.0), "retrain",
     ["bad feedback: mean rating 2.1 < 3.0", "20 new feedback"]),
    ("drift and bad feedback", Evidence(True, drift=[DRIFT], bad_feedback=[BAD], new_feedback=40,
                                        hours_since_retrain=25.0), "retrain", [DRIFT, BAD, "40 new feedback"]),
    ("inside the cooldown", Evidence(True, bad_feedback=[BAD], new_feedback=40, hours_since_retrain=6.5,
                                     last_outcome="promoted"), "wait",
     [BAD, "6.5 h ago", "24.0 h cooldown", "wait 17.5 h more"]),
    ("not enough new feedback", Evidence(True, drift=[DRIFT], new_feedback=7, hours_since_retrain=72.0),
     "not_enough_data", ["7 new feedback row(s) since the last retraining", "at least 20", "13 more"]),
    ("not enough data in the report", Evidence(False, drift=[DRIFT], bad_feedback=[BAD], new_feedback=99),
     "not_enough_data", ["too little data", "at least 30 generations", "10 rated"]),
    ("service problems only", Evidence(True, service=[SLOW], new_feedback=99, hours_since_retrain=100.0), "healthy",
     ["service is not", "not retrained on", SLOW]),
    ("service with drift", Evidence(True, drift=[DRIFT], service=[SLOW], new_feedback=99), "retrain",
     [DRIFT, SLOW, "not retrained on"]),
    ("first retraining ever", Evidence(True, bad_feedback=[BAD], new_feedback=21, hours_since_retrain=None),
     "retrain", ["21 new feedback row(s) so far (never retrained)", "no retraining yet"]),
    ("first ever, too little feedback", Evidence(True, bad_feedback=[BAD], new_feedback=0), "not_enough_data",
     ["0 new feedback row(s) so far (never retrained)", "20 more"]),
    ("last retraining rejected, inside the cooldown",
     Evidence(True, bad_feedback=[BAD], new_feedback=500, hours_since_retrain=1.0, last_outcome="rejected"), "wait",
     ["(rejected) started 1.0 h ago", "wait 23.0 h more"]),
    ("last retraining failed, inside the cooldown",
     Evidence(True, drift=[DRIFT], new_feedback=500, hours_since_retrain=0.25, last_outcome="failed"), "wait",
     ["(failed) started 0.2 h ago", "wait 23.8 h more"]),
    ("last retraining failed, cooldown over",
     Evidence(True, drift=[DRIFT], new_feedback=500, hours_since_retrain=24.0, last_outcome="failed"), "retrain",
     ["(failed) started 24.0 h ago", "cooldown 24.0 h over"]),
    ("cooldown and too little feedback", Evidence(True, drift=[DRIFT], new_feedback=5, hours_since_retrain=2.0),
     "wait", ["wait 22.0 h more", "15 more to go"]),
]


@pytest.mark.parametrize("evidence,action,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decide(evidence: Evidence, action: str, expected: list[str]) -> None:
    decision = decide(evidence, CFG)
    assert decision.action == action, decision.reasons
    assert decision.retrain == (action == "retrain")
    text = "\n".join(decision.reasons)
    for part in expected:
        assert part in text, f"{part!r} not in:\n{text}"
    assert all(line and "\n" not in line for line in decision.reasons)
    assert decision.service == evidence.service  # service problems are always handed on for alerting


def test_wait_and_shortfall_are_numbers() -> None:
    wait = decide(Evidence(True, drift=[DRIFT], new_feedback=50, hours_since_retrain=20.0), CFG)
    assert wait.wait_hours == pytest.approx(4.0) and wait.feedback_needed is None
    short = decide(Evidence(True, drift=[DRIFT], new_feedback=12, hours_since_retrain=30.0), CFG)
    assert short.feedback_needed == 8 and short.wait_hours is None
    assert short.to_dict()["action"] == "not_enough_data" and short.to_dict()["retrain"] is False


def test_thresholds_come_from_the_config() -> None:
    """The same evidence decides differently under another cooldown and feedback minimum."""
    evidence = Evidence(True, bad_feedback=[BAD], new_feedback=5, hours_since_retrain=3.0)
    assert decide(evidence, CFG).action == "wait"
    relaxed = MonitorConfig.from_dict({"cooldown_hours": 2.0, "min_new_feedback": 5})
    assert decide(evidence, relaxed).action == "retrain"
    zero = MonitorConfig.from_dict({"cooldown_hours": 2.0, "min_new_feedback": 0})
    assert decide(dataclasses.replace(evidence, new_feedback=0), zero).action == "retrain"


def test_a_failing_retraining_does_not_loop_hourly() -> None:
    """Hour after hour of bad feedback with a retraining that keeps failing: one retraining per cooldown."""
    retrains, since = [], None
    for hour in range(72):
        evidence = Evidence(True, bad_feedback=[BAD], new_feedback=100,
                            hours_since_retrain=None if since is None else float(hour - since),
                            last_outcome=None if since is None else "failed")
        if decide(evidence, CFG).retrain:
            retrains.append(hour)
            since = hour
    assert retrains == [0, 24, 48]


def test_evidence_is_frozen_and_keeps_its_own_lists() -> None:
    drift = [DRIFT]
    evidence = Evidence(True, drift=drift, new_feedback=30)
    drift.append("another")
    assert evidence.drift == [DRIFT]
    with pytest.raises(dataclasses.FrozenInstanceError):
        evidence.enough_data = False  # type: ignore[misc]
    with pytest.raises(ValueError, match="negative"):
        Evidence(True, new_feedback=-1)
    with pytest.raises(ValueError, match="not one of"):
        Decision("maybe", [])
