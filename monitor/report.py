"""The monitoring report: an Evidently 0.7 Report of the current window against the champion's frozen reference.

What it tests, each with its threshold from MonitorConfig (nothing left to an Evidently default):

- prompts: drift of the offline prompt descriptors (monitor/frames.py) per column, and the share of drifted columns
  against ``drift_share`` (the verdict); Evidently's own text drift of the prompt column (a domain classifier, works
  offline) is shown beside it for a person to read, not counted;
- images: drift of brightness, contrast, sharpness and colourfulness per column and as a share (the verdict);
- feedback: mean rating, thumbs-down share, and rating drift by PSI (ratings 1-5 are declared numerical, or Evidently
  would treat a column with <= 5 values as categorical); a rating drift only counts as bad feedback when the mean
  went down;
- service: 95th percentile latency and the error rate (failed requests over all requests, from the failures table);
- volume: the row count, replacing Evidently's default row-count test with ``min_generations``.

With too little data (no frozen reference yet, or fewer than ``min_generations`` generations in a window) there is no
verdict: every test says ``not_enough_data`` and the report still shows what the current window holds. Files go to
``monitor_dir()/reports/<UTC time>/`` (report.html with our summary on top, Evidently's report.json, our
summary.json), and every run with an Evidently snapshot is added to the Evidently workspace at
``monitor_dir()/evidently`` (project "sdloop"), so ``evidently ui --workspace <that folder>`` shows the history.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

os.environ.setdefault("DO_NOT_TRACK", "1")  # Evidently's telemetry: off before it is ever imported

from monitor.drift import method_for
from monitor.frames import IMAGE_COLUMNS, NUMERIC_COLUMNS, PROMPT_COLUMNS, WindowData, window_pair, words
from monitor.report_files import add_to_workspace, out_dir_for, write_files
from monitor.windows import Window, champion_current, choose_reference, current_window, iso
from sdloop.atomic import write_json_atomic

if TYPE_CHECKING:
    from monitor.config import MonitorConfig
    from monitor.store import Store

TEXT_DRIFT_MIN_ROWS = 10  # its TF-IDF classifier fails on a handful of prompts
GROUPS = ("volume", "prompts", "images", "feedback", "service")


@dataclass
class TestResult:
    """One check of the report. ``decisive``: counts towards the verdict (per-column drift details do not; their
    group's drift share does)."""

    __test__ = False  # not a pytest class

    name: str
    group: str
    status: str  # "pass" | "fail" | "not_enough_data"
    value: Optional[float]
    threshold: Optional[float]
    text: str
    decisive: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MonitorReport:
    current: Window
    reference: Optional[Window]
    counts: dict[str, dict[str, int]]
    tests: list[TestResult]
    enough_data: bool
    html: Path
    json: Path
    summary: Path
    created: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    mean_rating: dict[str, Optional[float]] = field(default_factory=dict)
    workspace_run: Optional[str] = None
    build_s: float = 0.0
    wait: Optional[str] = None  # no reference yet because the champion has served too few generations: why


    @property
    def status(self) -> str:
        """``not_enough_data``, ``fail`` (a decisive test failed) or ``pass``."""
        if not self.enough_data:
            return "not_enough_data"
        return "fail" if any(t.decisive and t.status == "fail" for t in self.tests) else "pass"

    def _failed(self, *groups: str) -> list[TestResult]:
        return [t for t in self.tests if t.group in groups and t.decisive and t.status == "fail"]

    def drift_reasons(self) -> list[str]:
        """Prompt or image drift, one line each (with the drifted columns and their scores)."""
        return [t.text for t in self._failed("prompts", "images")]

    def feedback_reasons(self) -> list[str]:
        """Bad mean rating, too many thumbs down, ratings drifted DOWNWARD (an upward drift is good news)."""
        out = []
        for t in self._failed("feedback"):
            if t.name == "rating drift":
                cur, ref = self.mean_rating.get("current"), self.mean_rating.get("reference")
                if cur is None or ref is None or cur >= ref:
                    continue
            out.append(t.text)
        return out

    def service_reasons(self) -> list[str]:
        """Latency or error rate over their limits."""
        return [t.text for t in self._failed("service")]

    def lines(self) -> list[str]:
        """The report as text for the terminal: windows, counts, every test, the files."""
        ref = f"{iso(self.reference.since)}..{iso(self.reference.until)} ({self.reference.how})" \
            if self.reference else f"none yet ({self.wait or 'no champion, or not enough traffic since its promotion'})"
        out = [f"status: {self.status.upper().replace('_', ' ')}",
               f"current:   {iso(self.current.since)}..{iso(self.current.until)} ({self.current.how}) "
               f"{self.counts.get('current')}", f"reference: {ref} {self.counts.get('reference', '')}".rstrip()]
        mark = {"pass": "pass", "fail": "FAIL", "not_enough_data": "n/a "}
        out += [f"  {mark.get(t.status, t.status)} {t.group:8s} {t.text}" for t in self.tests]
        out += [f"report: {self.html}", f"json:   {self.json}"]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "enough_data": self.enough_data, "created": iso(self.created),
                "current": self.current.to_dict(), "reference": self.reference.to_dict() if self.reference else None,
                "counts": self.counts, "mean_rating": self.mean_rating,
                "reasons": {"drift": self.drift_reasons(), "feedback": self.feedback_reasons(),
                            "service": self.service_reasons()},
                "tests": [t.to_dict() for t in self.tests], "html": str(self.html), "json": str(self.json),
                "summary": str(self.summary), "workspace_run": self.workspace_run, "build_s": round(self.build_s, 3),
                "wait": self.wait}


def _num(value: Any) -> Optional[float]:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _mean(data: Optional[WindowData], column: str) -> Optional[float]:
    if data is None or not data.frame[column].notna().any():
        return None
    return _num(data.frame[column].mean())


class _Plan:
    """Evidently metrics with the TestResult each becomes once the snapshot is in."""

    def __init__(self) -> None:
        self.metrics: list[Any] = []
        self.specs: list[dict[str, Any]] = []
        self.own: list[TestResult] = []  # tests computed by us (not Evidently metrics)

    def add(self, metric: Any, **spec: Any) -> None:
        self.metrics.append(metric)
        self.specs.append(spec)


def histogram_bins(rows: int) -> int:
    """Bins of the distribution histograms in Evidently's drift widgets: about the square root of the smaller
    window's rows, 3 to 10 (Evidently's default of 10 leaves 16 rows one or two per bin, mostly empty)."""
    return max(3, min(10, math.ceil(math.sqrt(max(rows, 1)))))


def _varied(prompts: list[str]) -> bool:
    """Whether some word is missing from some prompt: the text drift's TF-IDF drops words every prompt has, and
    fails when none is left (e.g. one prompt repeated)."""
    sets = [set(words(p)) for p in prompts]
    return bool(sets) and bool(set().union(*sets) - set.intersection(*sets))


def _plan(cfg: "MonitorConfig", cur: WindowData, ref: Optional[WindowData], verdict: bool) -> _Plan:
    """The report's metrics; ``verdict`` False: current-only figures without tests (not enough data)."""
    from evidently.metrics import DriftedColumnsCount, MeanValue, QuantileValue, RowCount, ValueDrift
    from evidently.tests import gte, lt, lte

    p = _Plan()
    bins = histogram_bins(min(cur.generations, ref.generations if ref is not None else cur.generations))
    p.add(RowCount(tests=[gte(cfg.min_generations)]), name="current generations", group="volume",
          threshold=cfg.min_generations, fmt="{v:.0f} generations in the current window (at least {t:g} needed)")
    if verdict:
        for group, columns, method, thr in (("prompts", PROMPT_COLUMNS, cfg.prompt_drift_method,
                                             cfg.prompt_drift_threshold),
                                            ("images", IMAGE_COLUMNS, cfg.image_drift_method,
                                             cfg.image_drift_threshold)):
            for col in columns:
                p.add(ValueDrift(column=col, method=method_for(col, method), threshold=thr, nbinsx=bins),
                      name=f"{col} drift",
                      group=group, threshold=thr, decisive=False,
                      fmt=f"{col}: drift score {{v:.3g}} ({method}, threshold {{t:g}})")
            p.add(DriftedColumnsCount(columns=list(columns), per_column_method={c: method_for(c, method)
                                                                                for c in columns},
                                      threshold=thr, drift_share=cfg.drift_share, tests=[],
                                      share_tests=[lt(cfg.drift_share)]),
                  name=f"{group[:-1]} drift", group=group, threshold=cfg.drift_share, share=True, columns=columns,
                  fmt=f"{group[:-1]} drift: {{v:.0%}} of the {group[:-1]} descriptors drifted (limit {{t:.0%}})")
    if verdict and min(cur.generations, ref.generations if ref else 0) >= TEXT_DRIFT_MIN_ROWS \
            and _varied(list(cur.frame["prompt"]) + list(ref.frame["prompt"])):
        p.add(ValueDrift(column="prompt", method="perc_text_content_drift", threshold=cfg.prompt_text_threshold),
              name="prompt text drift", group="prompts", threshold=cfg.prompt_text_threshold, decisive=False,
              fmt="prompt text: a classifier tells the windows apart with ROC AUC {v:.3g} (Evidently text drift)")
    rated = int(cur.frame["rating"].notna().sum())
    voted = int(cur.frame["thumbs_down"].notna().sum())
    feedback = [("rating", rated, "mean rating", gte(cfg.min_mean_rating), cfg.min_mean_rating,
                 "mean rating {v:.2f} of {n} rated generations (at least {t:g} wanted)"),
                ("thumbs_down", voted, "thumbs down", lte(cfg.max_thumbs_down_share), cfg.max_thumbs_down_share,
                 "thumbs-down share {v:.0%} of {n} voted generations (at most {t:.0%} wanted)")]
    for col, n, name, test, thr, fmt in feedback:
        if n >= cfg.min_feedback and verdict:
            p.add(MeanValue(column=col, tests=[test]), name=name, group="feedback", threshold=thr,
                  fmt=fmt.replace("{n}", str(n)))
        else:
            if n:
                why = f"fewer than {cfg.min_feedback}" if n < cfg.min_feedback else "too little traffic"
                p.add(MeanValue(column=col, tests=[]), name=name, group="feedback", threshold=thr, no_verdict=True,
                      fmt=fmt.replace("{n}", str(n)) + f"; no verdict: {why}")
            else:
                p.own.append(TestResult(name, "feedback", "not_enough_data", None, thr,
                                        f"{name}: no feedback in the current window"))
    ref_rated = int(ref.frame["rating"].notna().sum()) if ref is not None else 0
    if verdict and rated >= cfg.min_feedback and ref_rated >= cfg.min_feedback:
        cur_m, ref_m = _mean(cur, "rating"), _mean(ref, "rating")
        p.add(ValueDrift(column="rating", method="psi", threshold=cfg.rating_psi_threshold), name="rating drift",
              group="feedback", threshold=cfg.rating_psi_threshold,
              fmt=f"rating drift: PSI {{v:.3g}} (threshold {{t:g}}); mean rating {ref_m:.2f} -> {cur_m:.2f}")
    else:
        p.own.append(TestResult("rating drift", "feedback", "not_enough_data", None, cfg.rating_psi_threshold,
                                f"rating drift: {rated} rated now, {ref_rated} in the reference; {cfg.min_feedback} "
                                "each needed"))
    p.add(QuantileValue(column="latency_s", quantile=0.95, tests=[lte(cfg.max_latency_p95_s)] if verdict else []),
          name="latency p95", group="service", threshold=cfg.max_latency_p95_s, no_verdict=not verdict,
          fmt="95th percentile latency {v:.3g} s (at most {t:g} s)")
    return p


def _own_tests(cfg: "MonitorConfig", cur: WindowData, ref: Optional[WindowData], reference: Optional[Window],
               verdict: bool, wait: Optional[str] = None) -> list[TestResult]:
    out = []
    if reference is None:
        out.append(TestResult("reference generations", "volume", "not_enough_data", None, cfg.min_generations,
                              f"no reference window yet: {wait}" if wait else "no reference window yet: no "
                              f"champion, or its first {cfg.min_generations} generations are not in yet"))
    else:
        n = ref.generations if ref is not None else 0
        out.append(TestResult("reference generations", "volume", "pass" if n >= cfg.min_generations else "fail",
                              float(n), cfg.min_generations,
                              f"{n} generations in the reference window (at least {cfg.min_generations} needed)"))
    requests = cur.requests + cur.failures
    rate = cur.failures / requests if requests else None
    status = ("not_enough_data" if rate is None or not verdict else
              "fail" if rate > cfg.max_error_rate else "pass")
    text = (f"error rate {rate:.1%} ({cur.failures} failed of {requests} requests; at most "
            f"{cfg.max_error_rate:.1%})" if rate is not None else "error rate: no requests in the current window")
    out.append(TestResult("error rate", "service", status, rate, cfg.max_error_rate, text))
    return out


def _results(plan: _Plan, snapshot: Any, verdict: bool) -> list[TestResult]:
    """Our TestResults from the snapshot: values by metric, statuses from Evidently's tests."""
    data = snapshot.dict()
    status_by_metric: dict[str, list[str]] = {}
    for t in data["tests"]:
        status_by_metric.setdefault(t["metric_config"]["metric_id"], []).append(str(t["status"]).upper())
    out: list[TestResult] = []
    for metric, spec in zip(data["metrics"], plan.specs):
        value = metric.get("value")
        if isinstance(value, dict):
            value = value.get("share") if spec.get("share") else value.get("count")
        value = _num(value)
        statuses = status_by_metric.get(metric["id"], [])
        if not verdict or spec.get("no_verdict") or not statuses:
            status = "not_enough_data"
        else:
            status = "pass" if all(s.endswith("SUCCESS") for s in statuses) else "fail"
        if spec["name"] == "current generations":  # the volume test speaks even without a verdict: it says why
            status = "pass" if statuses and all(s.endswith("SUCCESS") for s in statuses) else "fail"
        text = spec["fmt"].format(v=value if value is not None else float("nan"), t=spec["threshold"])
        out.append(TestResult(spec["name"], spec["group"], status, value, _num(spec["threshold"]), text,
                              spec.get("decisive", True)))
    for r in out:  # name the drifted columns in their group's verdict line
        if r.name in ("prompt drift", "image drift"):
            group = [c for c in out if c.group == r.group and not c.decisive and c.name != "prompt text drift"]
            drifted = [f"{c.name.removesuffix(' drift')} {c.value:.3g}" for c in group if c.status == "fail"]
            if drifted:
                r.text += ": " + ", ".join(drifted)
    return out


def _run_evidently(plan: _Plan, cur: WindowData, ref: Optional[WindowData], current: Window) -> Any:
    from evidently import DataDefinition, Dataset, Report

    definition = DataDefinition(numerical_columns=list(NUMERIC_COLUMNS), text_columns=["prompt"],
                                categorical_columns=["model_version"])
    columns = ["prompt", "model_version", *NUMERIC_COLUMNS]

    def ds(data: WindowData) -> Any:
        return Dataset.from_pandas(data.frame[columns].reset_index(drop=True), data_definition=definition)

    report = Report(plan.metrics, include_tests=True, tags=["sdloop"],
                    metadata={"since": iso(current.since), "until": iso(current.until), "how": current.how})
    with warnings.catch_warnings():  # constant columns (no punctuation anywhere) make numpy warn in correlations
        warnings.simplefilter("ignore", RuntimeWarning)
        snapshot = report.run(ds(cur), ds(ref) if ref is not None else None,
                              timestamp=current.until.astimezone(dt.timezone.utc).replace(tzinfo=None))
    whole_counts(snapshot)
    return snapshot


_THOUSANDTHS = re.compile(r"\b(\d+)\.000\b")


def whole_counts(snapshot: Any) -> int:
    """Write the row counts in Evidently's widgets as whole numbers: its renderer prints every single value with
    three decimals ("Row count 16.000", "Actual value 16.000 >= 16.000"), and a count of generations has none.
    Only widgets about row counts are touched (a drift score of 3.000 stays as Evidently wrote it). Returns how many
    strings changed."""
    changed = 0

    def fix(text: Any) -> Any:
        nonlocal changed
        if isinstance(text, str) and _THOUSANDTHS.search(text):
            changed += 1
            return _THOUSANDTHS.sub(r"\1", text)
        return text

    def walk(widget: Any) -> None:
        params = getattr(widget, "params", None)
        title = str(getattr(widget, "title", "") or "")
        if isinstance(params, dict):
            if getattr(widget, "type", None) == "counter" and title.startswith("Row count"):
                for counter in params.get("counters") or []:
                    if isinstance(counter, dict):
                        counter["value"] = fix(counter.get("value"))
            for test in params.get("tests") or []:
                if isinstance(test, dict) and str(test.get("title", "")).startswith("Row count"):
                    test["title"], test["description"] = fix(test.get("title")), fix(test.get("description"))
        for child in getattr(widget, "widgets", None) or []:
            walk(child)

    for widget in list(getattr(snapshot, "_widgets", None) or []) + list(getattr(snapshot, "_tests_widgets", None)
                                                                         or []):
        walk(widget)
    return changed


def build_report(store: "Store", cfg: "MonitorConfig", since: Optional[dt.datetime] = None,
                 until: Optional[dt.datetime] = None, reference: Optional[Window] = None,
                 out_dir: Optional[Path] = None, now: Optional[dt.datetime] = None,
                 workspace: bool = True) -> MonitorReport:
    """Compare the current window (``since``/``until``, default the last ``current_hours``) with ``reference``
    (default: the champion's frozen window), write report.html, report.json and summary.json, and add the run to
    the Evidently workspace (``workspace=False``: skip that)."""
    import time

    start = time.perf_counter()
    created = dt.datetime.now(dt.timezone.utc)
    target, fresh = out_dir_for(out_dir, created)
    choice = choose_reference(store, cfg, now=now, explicit=reference)
    current = champion_current(current_window(cfg, now=now, since=since, until=until), choice)
    ref_window = choice.window
    cur, ref = window_pair(store, current, ref_window)
    enough = (ref is not None and cur.generations >= cfg.min_generations and ref.generations >= cfg.min_generations)
    plan = _plan(cfg, cur, ref, enough)
    snapshot = None
    if cur.generations:
        snapshot = _run_evidently(plan, cur, ref if enough else None, current)
        tests = _results(plan, snapshot, enough)
    else:
        tests = [TestResult("current generations", "volume", "fail", 0.0, float(cfg.min_generations),
                            f"no generations in the current window (at least {cfg.min_generations} needed)")]
    tests += plan.own + _own_tests(cfg, cur, ref, ref_window, enough, choice.wait)
    tests.sort(key=lambda t: GROUPS.index(t.group))
    counts = {"current": cur.counts(), **({"reference": ref.counts()} if ref is not None else {})}
    rep = MonitorReport(current=current, reference=ref_window, counts=counts, tests=tests, enough_data=enough,
                        html=target / "report.html", json=target / "report.json", summary=target / "summary.json",
                        created=created,
                        mean_rating={"current": _mean(cur, "rating"), "reference": _mean(ref, "rating")},
                        wait=choice.wait)
    if snapshot is not None and workspace:
        rep.workspace_run = add_to_workspace(snapshot, f"{rep.status}: {iso(current.since)}..{iso(current.until)}")
    write_files(rep, snapshot, target, fresh)
    rep.build_s = time.perf_counter() - start
    write_json_atomic(rep.summary, rep.to_dict())
    return rep
