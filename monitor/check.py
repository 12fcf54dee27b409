"""`sdloop monitor check`: the report, the evidence drawn from it and the retraining log, and the policy's decision.

The one composition of report and policy, shared by the command (exit 0 healthy, 1 retraining recommended, for cron
or CI) and the scheduler's monitoring job (which pulls the retraining forward on a retrain decision).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from monitor.config import MonitorConfig
from monitor.policy import Decision, Evidence, decide
from monitor.retrain_log import RetrainLog
from monitor.store import Store, open_store


@dataclass
class CheckResult:
    report: Any          # monitor.report.MonitorReport
    evidence: Evidence
    decision: Decision

    def lines(self) -> list[str]:
        out = [f"verdict: {self.decision.action.upper().replace('_', ' ')}"]
        out += [f"  - {r}" for r in self.decision.reasons]
        out.append(f"report: {self.report.html}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.decision.action, "retrain": self.decision.retrain, "reasons": self.decision.reasons,
                "report": str(self.report.html), "summary": str(self.report.summary),
                "evidence": {k: v for k, v in self.evidence.__dict__.items()}}


def new_feedback_since(store: Store, since: Optional[dt.datetime]) -> int:
    """Feedback rows written (or changed) since ``since`` (all of them when None)."""
    return store.count_feedback(since)


def evidence(report: Any, store: Store, now: dt.datetime) -> Evidence:
    """What the policy decides on: the report's failed tests, and the retraining log's last entry."""
    last = RetrainLog(store).last()
    since = last["started"] if last else None
    hours = (now - since).total_seconds() / 3600 if since else None
    return Evidence(enough_data=bool(report.enough_data), drift=list(report.drift_reasons()),
                    bad_feedback=list(report.feedback_reasons()), service=list(report.service_reasons()),
                    new_feedback=new_feedback_since(store, since), hours_since_retrain=hours,
                    last_outcome=last["status"] if last else None,
                    reference_wait=getattr(report, "wait", None))


def run_check(cfg: MonitorConfig, store: Optional[Store] = None, now: Optional[dt.datetime] = None,
              since: Optional[dt.datetime] = None, until: Optional[dt.datetime] = None,
              reference: Optional[Any] = None,
              out_dir: Optional[Path] = None) -> CheckResult:
    """Build the report for the current window and decide."""
    from monitor.report import build_report
    from monitor.report_files import prune_reports

    store = store or open_store()
    now = now or dt.datetime.now(dt.timezone.utc)
    report = build_report(store, cfg, since=since, until=until, reference=reference, out_dir=out_dir, now=now)
    if out_dir is None:
        prune_reports(cfg.keep_reports)
    ev = evidence(report, store, now)
    return CheckResult(report, ev, decide(ev, cfg))
