"""Monitoring at small numbers (issue 18, item 4): drift scores with no reference spread, windows per model version,
the report's counts and the Evidently workspace's dashboard.

Each scenario writes generations with past timestamps into a real sqlite store and builds the real Evidently report.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Any

import pytest

from monitor.config import MonitorConfig
from monitor.report import build_report
from monitor.store import Store
from monitor.windows import choose_reference, explicit_window

NOW = dt.datetime(2026, 11, 20, 12, 0, tzinfo=dt.timezone.utc)
HOUR = dt.timedelta(hours=1)
COLOURS = ("red", "blue", "green", "yellow")


def _cfg(**over: Any) -> MonitorConfig:
    return MonitorConfig.from_dict({"min_generations": 16, "min_feedback": 8, "current_hours": 24, **over})


def _log(store: Store, start: dt.datetime, n: int, words: int = 9, version: str = "sdloop:aaa",
         rating: int = 4, step: dt.timedelta = dt.timedelta(minutes=1), extra: int = 0) -> list[str]:
    """``n`` generations one ``step`` apart from ``start``: prompts of exactly ``words`` words (``extra`` of them one
    word longer), constant-ish images, each rated ``rating`` by one client."""
    ids = []
    for i in range(n):
        when = start + step * i
        prompt = " ".join([COLOURS[i % 4], "circle"] + ["shape"] * (words - 2 + (1 if i < extra else 0)))
        gid = store.log_generation(prompt=prompt, negative_prompt="", params={"steps": 4}, model_version=version,
                                   latency_s=1.0 + 0.01 * (i % 5), created=when,
                                   descriptors={"brightness": 0.5 + 0.001 * (i % 3), "contrast": 0.2,
                                                "sharpness": 0.01, "colourfulness": 30.0 + (i % 4)})
        store.add_feedback(gid, f"client-{i}", rating=rating, thumbs=1 if rating >= 4 else -1,
                           created=when + dt.timedelta(seconds=30))
        ids.append(gid)
    return ids


def _promote(tag: str, when: dt.datetime) -> None:
    """A champion pointer as export/registry.py writes it."""
    from sdloop.atomic import write_json_atomic
    from sdloop.champion import champion_path

    write_json_atomic(champion_path(), {"name": "sdloop", "champion": tag, "stack": [tag], "history": [
        {"when": when.strftime("%Y-%m-%dT%H:%M:%SZ"), "action": "promote", "tag": tag, "previous": None}]})


def _tests(rep: Any) -> dict[str, Any]:
    return {t.name: t for t in rep.tests}


# -- 1. drift with no reference spread --------------------------------------------------------------------------------

def test_drift_score_with_no_reference_spread_is_finite_and_meaningful() -> None:
    from evidently.legacy.calculations.stattests import wasserstein_stat_test
    from evidently.legacy.core import ColumnType
    import pandas as pd

    from monitor.drift import drift_score, spread_floor

    ref = [9.0] * 16
    assert drift_score("prompt_words", ref, [9.0] * 16) == 0.0
    # Evidently's own normed Wasserstein divides by max(std, 0.001): a third of prompts one word longer is ~330
    evidently = wasserstein_stat_test(pd.Series(ref), pd.Series([10.0] * 5 + [9.0] * 11), ColumnType.Numerical, 0.5)
    assert evidently.drift_score > 300
    assert spread_floor("prompt_words", ref) == 1.0  # one word (a tenth of the mean, 0.9, is less)
    assert spread_floor("prompt_chars", [50.0] * 16) == 5.0  # a tenth of the mean (one character is less)
    mild = drift_score("prompt_words", ref, [10.0] * 5 + [9.0] * 11)
    assert mild == pytest.approx(5 / 16) and mild < 0.5                   # a little longer: no drift
    clear = drift_score("prompt_words", ref, [12.0] * 16)
    assert math.isfinite(clear) and clear == pytest.approx(3.0) and clear > 0.5  # clearly longer: drift
    # with spread in the reference the score is Evidently's (std above the floor)
    spread = [5.0, 9.0, 13.0, 7.0, 11.0, 9.0]
    ev = wasserstein_stat_test(pd.Series(spread), pd.Series([12.0] * 6), ColumnType.Numerical, 0.5)
    assert drift_score("prompt_words", spread, [12.0] * 6) == pytest.approx(ev.drift_score)
    # a descriptor whose mean is 0 (no unseen words in the reference) floors at its unit
    assert spread_floor("prompt_unseen_share", [0.0] * 16) == 0.05
    assert drift_score("prompt_unseen_share", [0.0] * 16, [1 / 9] * 16) == pytest.approx((1 / 9) / 0.05)


def test_report_on_constant_prompt_lengths(workspace: Path) -> None:
    store = Store()
    cfg = _cfg()
    ref = explicit_window(NOW - 10 * HOUR, NOW - 9 * HOUR)
    _log(store, ref.since, 20)                                         # every reference prompt: 9 words
    _log(store, NOW - 8 * HOUR, 20)                                    # the same again
    _log(store, NOW - 6 * HOUR, 20, extra=6)                           # 6 of 20 one word longer
    _log(store, NOW - 4 * HOUR, 20, words=12)                          # every prompt 12 words

    def words_drift(start: dt.datetime) -> Any:
        rep = build_report(store, cfg, since=start, until=start + HOUR, reference=ref, now=NOW, workspace=False)
        assert rep.enough_data
        return _tests(rep)["prompt_words drift"]

    same, mild, clear = words_drift(NOW - 8 * HOUR), words_drift(NOW - 6 * HOUR), words_drift(NOW - 4 * HOUR)
    assert same.status == "pass" and same.value == 0.0
    assert mild.status == "pass" and mild.value == pytest.approx(0.3)
    assert clear.status == "fail" and clear.value == pytest.approx(3.0)
    assert all(math.isfinite(t.value) for t in (same, mild, clear))
    store.close()


# -- 2. windows per model version -------------------------------------------------------------------------------------

def test_new_champion_is_judged_only_on_its_own_traffic(workspace: Path) -> None:
    from monitor.check import run_check

    store = Store()
    cfg = _cfg(min_generations=10, min_feedback=5, min_new_feedback=0)
    promoted = NOW - 5 * HOUR
    old = set(_log(store, promoted - 3 * HOUR, 40, version="sdloop:old", rating=1))  # the old champion: hated
    _promote("sdloop:new", promoted)
    new = set(_log(store, promoted + HOUR, 4, version="sdloop:new", rating=5))
    old |= set(_log(store, promoted + HOUR + 30 * dt.timedelta(seconds=1), 3, version="sdloop:old", rating=1))

    # 4 of its own generations: the verdict waits, and says how many it has and needs
    check = run_check(cfg, store=store, now=NOW)
    assert check.decision.action == "wait", check.decision.reasons
    reason = check.decision.reasons[0]
    assert "sdloop:new has served 4 generation(s)" in reason and "needs 10" in reason and "6 more" in reason
    assert check.report.reference is None and "4 generation(s)" in check.report.wait
    assert "wait for 6 more" in "\n".join(check.report.lines())
    assert "verdict: WAIT" in check.lines()[0]

    # 24 of its own: the reference is its first 10, the current window its 24; the old one's 43 are in neither
    new |= set(_log(store, promoted + 2 * HOUR, 20, version="sdloop:new", rating=5))
    choice = choose_reference(store, cfg, now=NOW)
    assert choice.window is not None and choice.window.model_version == "sdloop:new" and choice.wait is None
    rep = build_report(store, cfg, now=NOW, workspace=False)
    assert rep.enough_data and rep.reference == choice.window
    assert rep.counts["reference"]["generations"] == 10 and rep.counts["current"]["generations"] == 24
    assert rep.current.model_version == "sdloop:new" and "sdloop:new's generations" in rep.current.how
    from monitor.frames import window_pair

    cur, ref = window_pair(store, rep.current, rep.reference)
    assert set(cur.frame["generation_id"]) == new and set(ref.frame["generation_id"]) <= new
    assert rep.mean_rating == {"current": 5.0, "reference": 5.0}  # the old champion's 1s count nowhere
    assert run_check(cfg, store=store, now=NOW).decision.action == "healthy"
    store.close()


def test_policy_waits_for_the_champions_own_reference() -> None:
    from monitor.policy import Evidence, decide

    why = "the champion sdloop:new has served 4 generation(s) since its promotion; ... needs 10: wait for 6 more"
    decision = decide(Evidence(enough_data=False, reference_wait=why, service=["error rate 9%"]), _cfg())
    assert decision.action == "wait" and not decision.retrain and decision.reasons[0] == f"no verdict yet: {why}"
    assert decision.service == ["error rate 9%"] and "error rate 9%" in decision.reasons[1]
    assert decide(Evidence(enough_data=False), _cfg()).action == "not_enough_data"  # no champion: as before


def test_a_window_frozen_by_the_old_rule_is_not_used(workspace: Path) -> None:
    """A reference frozen from the traffic before the promotion (the earlier rule) holds none of the champion's own
    generations: the champion's own first generations are used instead."""
    store = Store()
    cfg = _cfg(min_generations=10)
    promoted = NOW - 5 * HOUR
    _log(store, promoted - 2 * HOUR, 20, version="sdloop:old")
    _promote("sdloop:new", promoted)
    store.freeze_reference("sdloop:new", promoted - 3 * HOUR, promoted, "frozen by the old rule", promoted)
    assert choose_reference(store, cfg, now=NOW).window is None
    _log(store, promoted + HOUR, 12, version="sdloop:new")
    ref = choose_reference(store, cfg, now=NOW).window
    assert ref is not None and ref.since == promoted and "first 10 generations" in ref.how
    store.close()


# -- 3. the report's counts and the Evidently dashboard ----------------------------------------------------------------

def test_counts_are_whole_and_the_workspace_has_a_dashboard(workspace: Path) -> None:
    from evidently.ui.workspace import Workspace

    from monitor.dashboard import TAB

    store = Store()
    ref = explicit_window(NOW - 10 * HOUR, NOW - 9 * HOUR)
    _log(store, ref.since, 16)
    _log(store, NOW - 4 * HOUR, 16, words=12)
    rep = build_report(store, _cfg(), since=NOW - 4 * HOUR, until=NOW - 3 * HOUR, reference=ref, now=NOW)
    page = rep.html.read_text(encoding="utf-8")
    assert "16.000" not in page, "Evidently writes counts with three decimals"
    assert "Row count in dataset: Actual value 16 >= 16" in page and '{"value": "16", "label": ""}' in page
    assert "16 generations in the current window" in "\n".join(rep.lines())
    from monitor.report import histogram_bins

    evidently = json.loads(rep.json.read_text())
    assert {m["config"].get("nbinsx") for m in evidently["metrics"] if m["config"]["type"].endswith("ValueDrift")
            and m["config"]["column"] not in ("prompt", "rating")} == {4}  # sqrt(16) bins, not 10 for 16 rows
    assert (histogram_bins(1), histogram_bins(16), histogram_bins(40), histogram_bins(1000)) == (3, 4, 7, 10)

    ws = Workspace(str(workspace / "monitor" / "evidently"))
    project = ws.search_project("sdloop")[0]
    dash = project.dashboard.model()
    titles = [p.title for p in dash.panels]
    for title in ("Generations in the current window", "Share of drifted prompt descriptors",
                  "Share of drifted image descriptors", "Mean rating", "Thumbs-down share", "Rating drift (PSI)",
                  "95th percentile latency (s)"):
        assert title in titles
    assert [t.title for t in dash.tabs] == [TAB] and set(dash.tabs[0].panels) == {p.id for p in dash.panels}
    # a second report adds a run, not a second set of panels
    build_report(store, _cfg(), since=NOW - 4 * HOUR, until=NOW - 3 * HOUR, reference=ref, now=NOW)
    project = Workspace(str(workspace / "monitor" / "evidently")).search_project("sdloop")[0]
    assert len(project.dashboard.model().panels) == len(dash.panels)

    # every series of every panel is one line with a point per run, read as `evidently ui` reads them
    import asyncio

    from evidently.ui.service.base import SeriesFilter
    from evidently.ui.service.storage.local.base import InMemoryDataStorage

    data = InMemoryDataStorage(str(workspace / "monitor" / "evidently"))

    def series(metric: Any) -> list[Any]:
        got = asyncio.run(data.get_data_series(project.id, [SeriesFilter(
            tags=metric.tags, metadata=metric.metadata, metric=metric.metric, metric_labels=metric.metric_labels)],
            None, None))
        return [s.values for s in got.series]

    for panel in dash.panels:
        for metric in panel.values:
            values = series(metric)
            assert len(values) == 1 and len(values[0]) == 2, (panel.title, metric.legend, values)
    share = next(p for p in dash.panels if p.title == "Share of drifted prompt descriptors").values[0]
    assert series(share) == [[pytest.approx(0.5)] * 2]  # words and characters drifted, 2 of 4
    rows = next(p for p in dash.panels if p.title == "Generations in the current window").values[0]
    assert series(rows) == [[16, 16]]
    store.close()


# -- 4. the demo's progress -------------------------------------------------------------------------------------------

def test_demo_serve_and_users_show_progress(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    """The demo's server start and its simulated users write progress to stderr (they took ~35 s in silence)."""
    import base64
    import io

    from PIL import Image

    from sdloop_cli import demo_loop

    class FakeServer:
        pid = -1  # never signalled: poll() says it has exited by the time the block ends
        running = True

        def poll(self) -> Any:
            return None if self.running else 0

    server = FakeServer()
    polls = iter([0, 0, 200, 200])  # two polls before it is ready; the second start: ready at once
    png = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(png, format="PNG")
    image = {"generation_id": "g", "image_png_base64": base64.b64encode(png.getvalue()).decode()}

    def fake_call(url: str, body: Any = None, timeout: float = 120) -> tuple[int, Any]:
        if url.endswith("/readyz"):
            return next(polls), None
        return 200, {"images": [image]} if url.endswith("/txt2img_json") else {}

    monkeypatch.setattr(demo_loop.subprocess, "Popen", lambda *a, **kw: server)
    monkeypatch.setattr(demo_loop, "_call", fake_call)
    monkeypatch.setattr(demo_loop.time, "sleep", lambda s: None)
    monkeypatch.setattr(demo_loop, "simulated_rating", lambda img, prompt: (4, None))
    with demo_loop.served(tmp_path / "server.log", progress=True) as url:
        server.running = False
        with demo_loop._bar(True, total=3, desc="      users", unit="img", mininterval=0) as bar:
            assert demo_loop.wave(url, ["a", "b", "c"], seed=0, client="c", bar=bar) == [4, 4, 4]
            assert bar.n == 3
    err = capsys.readouterr().err
    assert "starting the server" in err and "users" in err and "3/3" in err
    with demo_loop.served(tmp_path / "server.log") as url:  # progress off (--quiet): nothing
        pass
    assert capsys.readouterr().err == ""
