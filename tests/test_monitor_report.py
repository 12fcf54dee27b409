"""The monitoring report (monitor/report.py) on synthetic traffic written into a real store with past timestamps.

One sqlite store per module holds every scenario in its own stretch of time (a reference day, then a day without
drift, one with prompt drift, one with brighter images, one with bad feedback, one with a trickle); each test builds a
real Evidently report of one stretch against the reference. Prompt drift thresholds here are 0.5 reference standard
deviations (wasserstein): two random samples of 60 from one distribution already differ by ~0.2, so a 0.1 would flag
the noise of random prompt lengths.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import sqlalchemy as sa

from monitor.config import MonitorConfig
from monitor.report import MonitorReport, build_report
from monitor.store import Store, reference_windows
from monitor.windows import explicit_window, parse_window, reference_window
from sdloop.errors import UserError

NOW = dt.datetime(2026, 11, 20, 12, 0, tzinfo=dt.timezone.utc)
DAY = dt.timedelta(hours=24)
VOCAB_A = ("red blue green yellow circle square triangle star small large bright dark soft striped dotted "
           "shape on white background centred pattern outline filled").split()
VOCAB_B = ("portrait astronaut riding horse cyberpunk city neon rain photorealistic detailed cinematic lighting "
           "mountain sunset oil painting").split()
N = 60


def _cfg(**over: Any) -> MonitorConfig:
    return MonitorConfig.from_dict({"min_generations": 30, "min_feedback": 10, "prompt_drift_threshold": 0.5,
                                    "image_drift_threshold": 0.5, **over})


def _fill(store: Store, start: dt.datetime, seed: int, n: int = N, vocab: list[str] = VOCAB_A, words: int = 5,
          brightness: float = 0.5, ratings: tuple[int, ...] = (3, 4, 4, 5), down: float = 0.1,
          version: str = "sdloop:aaa") -> None:
    """``n`` generations spread over the day from ``start``, each rated and voted on by one client. Descriptors
    and latencies are the normal distribution's quantiles in a seeded random order, so two windows of the same traffic
    hold the same distribution (no sampling noise for the drift tests to trip over); prompts are random words."""
    from statistics import NormalDist

    rng = np.random.default_rng(seed)
    z = [NormalDist().inv_cdf((i + 0.5) / n) for i in range(n)]

    def col(mean: float, sd: float) -> list[float]:
        return [mean + sd * z[i] for i in rng.permutation(n)]

    cols = {"brightness": col(brightness, 0.05), "contrast": col(0.2, 0.03), "sharpness": col(0.01, 0.002),
            "colourfulness": col(30.0, 5.0), "latency_s": col(1.0, 0.1)}
    for i in range(n):
        when = start + DAY * (i + 0.5) / n
        prompt = " ".join(rng.choice(vocab, words + i % 3))
        gid = store.log_generation(
            prompt=prompt, negative_prompt="", params={"steps": 4}, model_version=version,
            latency_s=cols["latency_s"][i], created=when,
            descriptors={k: cols[k][i] for k in ("brightness", "contrast", "sharpness", "colourfulness")})
        store.add_feedback(gid, "client-1", rating=int(rng.choice(ratings)), thumbs=-1 if rng.random() < down else 1,
                           created=when + dt.timedelta(minutes=5))


def _populate(store: Store) -> None:
    _fill(store, NOW - 10 * DAY, seed=1)                                   # the reference day
    _fill(store, NOW - 8 * DAY, seed=2)                                    # same traffic: no drift
    _fill(store, NOW - 6 * DAY, seed=3, vocab=VOCAB_B, words=10)           # new subjects, longer prompts
    _fill(store, NOW - 4 * DAY, seed=4, brightness=0.7)                    # brighter images
    _fill(store, NOW - 2 * DAY, seed=5, ratings=(1, 2), down=0.8)          # unhappy users
    _fill(store, NOW - 1 * DAY, seed=6, n=5)                               # a trickle
    for i in range(3):
        store.log_failure("txt2img", "timeout", "took too long", created=NOW - 2 * DAY + dt.timedelta(hours=i))


REF = explicit_window(NOW - 10 * DAY, NOW - 9 * DAY, "explicit")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path_factory.mktemp('monitor') / 'monitor.db'}")
    _populate(s)
    yield s
    s.close()


def _report(store: Store, home: Path, start: dt.datetime, cfg: MonitorConfig | None = None,
            **kw: Any) -> MonitorReport:
    return build_report(store, cfg or _cfg(), since=start, until=start + DAY, reference=kw.pop("reference", REF),
                        out_dir=kw.pop("out_dir", None), now=NOW, **kw)


def _by_name(rep: MonitorReport) -> dict[str, Any]:
    return {t.name: t for t in rep.tests}


def test_no_drift_passes_and_writes_files(store: Store, workspace: Path) -> None:
    rep = _report(store, workspace, NOW - 8 * DAY)
    tests = _by_name(rep)
    assert rep.enough_data and rep.status == "pass", [t.text for t in rep.tests if t.status != "pass"]
    drift = [t for t in rep.tests if t.group in ("prompts", "images") and t.name != "prompt text drift"]
    assert len(drift) == 10 and all(t.status == "pass" for t in drift)  # 4 + 4 columns and the two shares
    assert rep.drift_reasons() == rep.feedback_reasons() == rep.service_reasons() == []
    assert rep.counts["current"] == {"generations": N, "feedback": N, "rated": N, "failures": 0}
    assert tests["current generations"].threshold == 30 and tests["rating drift"].threshold == 0.2
    # files: a new timestamped folder under monitor/reports with the three files
    assert rep.html.parent.parent == workspace / "monitor" / "reports"
    page = rep.html.read_text(encoding="utf-8")
    assert "sdloop-summary" in page and "healthy" in page and len(page) > 100_000  # Evidently's page, our summary
    evidently = json.loads(rep.json.read_text())
    assert {"metrics", "tests"} <= set(evidently) and len(evidently["tests"]) >= 10
    summary = json.loads(rep.summary.read_text())
    assert summary["status"] == "pass" and summary["reference"]["how"] == "explicit"
    # the run is in the Evidently workspace that `evidently ui --workspace ...` serves
    from evidently.ui.workspace import Workspace

    ws = Workspace(str(workspace / "monitor" / "evidently"))
    projects = ws.search_project("sdloop")
    assert len(projects) == 1
    assert [str(r) for r in ws.list_runs(projects[0].id)] == [rep.workspace_run]
    run = ws.get_run(projects[0].id, rep.workspace_run)
    assert run is not None and run.name.startswith("pass: 2026-11-12T12:00:00Z")
    again = _report(store, workspace, NOW - 8 * DAY, out_dir=workspace / "mine")
    assert again.html == workspace / "mine" / "report.html" and again.html.is_file()
    assert len(ws.search_project("sdloop")) == 1 and len(ws.list_runs(projects[0].id)) == 2  # one project, 2 runs
    _report(store, workspace, NOW - 8 * DAY, out_dir=workspace / "mine", workspace=False)  # ours: rewritten
    (workspace / "theirs").mkdir()
    (workspace / "theirs" / "report.html").write_text("a user's page")
    with pytest.raises(UserError, match="not an sdloop report folder"):
        _report(store, workspace, NOW - 8 * DAY, out_dir=workspace / "theirs", workspace=False)
    assert (workspace / "theirs" / "report.html").read_text() == "a user's page"
    (workspace / "notes").mkdir()
    (workspace / "notes" / "todo.txt").write_text("a user's file")  # any non-empty folder of the user's
    with pytest.raises(UserError, match="not an sdloop report folder"):
        _report(store, workspace, NOW - 8 * DAY, out_dir=workspace / "notes", workspace=False)
    assert sorted(p.name for p in (workspace / "notes").iterdir()) == ["todo.txt"]


def test_prompt_drift(store: Store, workspace: Path) -> None:
    rep = _report(store, workspace, NOW - 6 * DAY)
    tests = _by_name(rep)
    assert rep.status == "fail"
    assert tests["prompt drift"].status == "fail" and tests["prompt drift"].value >= 0.5
    assert tests["prompt_words drift"].status == "fail" and tests["prompt_unseen_share drift"].status == "fail"
    assert tests["image drift"].status == "pass"
    assert len(rep.drift_reasons()) == 1 and rep.drift_reasons()[0].startswith("prompt drift")
    assert "prompt_unseen_share" in rep.drift_reasons()[0]
    assert tests["prompt text drift"].status == "fail" and not tests["prompt text drift"].decisive
    assert rep.feedback_reasons() == []


def test_image_drift_names_the_descriptor(store: Store, workspace: Path) -> None:
    # one of four descriptors moves: that is a group drift when the share limit is a quarter
    rep = _report(store, workspace, NOW - 4 * DAY, cfg=_cfg(drift_share=0.25))
    tests = _by_name(rep)
    assert tests["brightness drift"].status == "fail" and tests["brightness drift"].value > 2
    assert all(tests[f"{c} drift"].status == "pass" for c in ("contrast", "sharpness", "colourfulness"))
    assert [r.split(":")[0] for r in rep.drift_reasons()] == ["image drift"]
    assert "brightness" in rep.drift_reasons()[0] and "contrast" not in rep.drift_reasons()[0]
    assert tests["prompt drift"].status == "pass" and rep.feedback_reasons() == []
    # with the default share (half the columns) the same day is not an image drift
    assert _report(store, workspace, NOW - 4 * DAY).drift_reasons() == []


def test_bad_feedback(store: Store, workspace: Path) -> None:
    rep = _report(store, workspace, NOW - 2 * DAY)
    tests = _by_name(rep)
    assert tests["rating drift"].value > 0.2 and tests["rating drift"].status == "fail"
    assert rep.mean_rating["current"] < 2 < 3.5 < rep.mean_rating["reference"]
    reasons = rep.feedback_reasons()
    assert [r.split(" ")[0] for r in reasons] == ["mean", "thumbs-down", "rating"], reasons
    assert rep.drift_reasons() == []
    # 3 failures in 63 requests: 4.8 %, under the default 5 %; a stricter limit fails it
    assert tests["error rate"].status == "pass" and tests["error rate"].value == pytest.approx(3 / 63)
    strict = _report(store, workspace, NOW - 2 * DAY, cfg=_cfg(max_error_rate=0.01), workspace=False)
    assert strict.service_reasons() and "3 failed of 63" in strict.service_reasons()[0]


def test_upward_rating_drift_is_not_bad_feedback(store: Store, workspace: Path) -> None:
    # the unhappy day as the reference, a normal day as current: ratings drift, but up
    rep = _report(store, workspace, NOW - 8 * DAY, reference=explicit_window(NOW - 2 * DAY, NOW - DAY), workspace=False)
    assert _by_name(rep)["rating drift"].status == "fail"
    assert rep.feedback_reasons() == []


def test_not_enough_data_still_writes(store: Store, workspace: Path) -> None:
    rep = _report(store, workspace, NOW - 1 * DAY)
    assert not rep.enough_data and rep.status == "not_enough_data"
    assert rep.drift_reasons() == rep.feedback_reasons() == rep.service_reasons() == []
    tests = _by_name(rep)
    assert tests["current generations"].status == "fail" and tests["current generations"].value == 5
    assert {t.status for t in rep.tests if t.name != "current generations"} <= {"not_enough_data", "pass"}
    assert "not enough data" in rep.html.read_text(encoding="utf-8")
    assert json.loads(rep.summary.read_text())["status"] == "not_enough_data" and rep.json.is_file()
    # nothing at all in the window, and no reference: still one page and a summary
    empty = build_report(store, _cfg(), since=NOW + DAY, until=NOW + 2 * DAY, now=NOW)
    assert empty.reference is None and empty.status == "not_enough_data" and empty.workspace_run is None
    assert empty.html.is_file() and json.loads(empty.summary.read_text())["counts"]["current"]["generations"] == 0


def test_report_page_renders_offline_in_a_browser(store: Store, workspace: Path) -> None:
    """The page a person opens: our verdict on top, Evidently's widgets drawn by its inlined scripts (no network)."""
    from headless_chromium import Browser, missing

    if missing():
        pytest.skip(missing())
    rep = _report(store, workspace, NOW - 6 * DAY, workspace=False)
    with Browser() as driver:
        driver.get(rep.html.as_uri())
        summary = driver.find_element("id", "sdloop-summary").text
        assert "problems found" in summary and "prompt drift" in summary
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(driver, 30).until(lambda d: "Drift in column" in d.find_element("tag name", "body").text)


def test_window_parsing_and_mistakes() -> None:
    w = parse_window("2026-11-01..2026-11-02T12:00Z")
    assert w.since == dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    assert (w.until - w.since).total_seconds() == 36 * 3600
    for bad in ("2026-11-01", "yesterday..today", "2026-11-02..2026-11-01"):
        with pytest.raises(UserError) as e:
            parse_window(bad)
        assert "\n" not in str(e.value)


# -- the frozen reference window ---------------------------------------------------------------------------------------

def _promote(tag: str, when: dt.datetime) -> None:
    """A champion pointer as export/registry.py writes it."""
    from sdloop.atomic import write_json_atomic
    from sdloop.champion import champion_path

    write_json_atomic(champion_path(), {"name": "sdloop", "champion": tag, "stack": [tag], "history": [
        {"when": when.strftime("%Y-%m-%dT%H:%M:%SZ"), "action": "promote", "tag": tag, "previous": None}]})


def test_reference_freezes_before_promotion_and_never_moves(workspace: Path) -> None:
    """Before its promotion, only the champion's own generations count (a version that served before: a rollback):
    another version's traffic there is not its reference (issue 18)."""
    store = Store()
    cfg = _cfg(reference_hours=24)
    assert reference_window(store, cfg, now=NOW) is None  # no champion at all
    _fill(store, NOW - 3 * DAY, seed=1, n=40, version="sdloop:zzz")  # another version's: never bbb's reference
    promoted = NOW - 2 * DAY
    _promote("sdloop:bbb", promoted)
    assert reference_window(store, cfg, now=NOW) is None
    _fill(store, NOW - 3 * DAY, seed=7, n=40, version="sdloop:bbb")  # bbb served that day too
    ref = reference_window(store, cfg, now=NOW)
    assert (ref.since, ref.until) == (promoted - DAY, promoted) and "sdloop:bbb was promoted" in ref.how
    assert ref.model_version == "sdloop:bbb"
    _fill(store, NOW - 2 * DAY, seed=2, n=40, version="sdloop:bbb")  # more traffic, later
    later = reference_window(store, cfg.__class__.from_dict({**cfg.to_dict(), "reference_hours": 48}),
                             now=NOW + 5 * DAY)
    assert later == ref  # frozen: neither new traffic nor a changed setting moves it
    with store.engine.begin() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(reference_windows)).scalar() == 1
    # the report uses it
    rep = build_report(store, cfg, since=NOW - 2 * DAY, until=NOW - DAY, now=NOW, workspace=False)
    assert rep.reference == ref and rep.enough_data
    store.close()


def test_reference_falls_back_to_champions_first_generations(workspace: Path) -> None:
    store = Store()
    cfg = _cfg()
    promoted = NOW - 3 * DAY
    _promote("sdloop:ccc", promoted)
    _fill(store, promoted - DAY, seed=1, n=10)                       # too little traffic before the promotion
    _fill(store, promoted, seed=2, n=20, version="sdloop:ccc")      # 20 of the 30 needed
    assert reference_window(store, cfg, now=NOW) is None
    rep = build_report(store, cfg, since=promoted, until=NOW, now=NOW, workspace=False)
    assert rep.status == "not_enough_data" and rep.reference is None
    _fill(store, promoted + DAY, seed=3, n=20, version="sdloop:ccc")
    ref = reference_window(store, cfg, now=NOW)
    firsts = store.generations(since=promoted)[:30]
    thirty_first = store.generations(since=promoted)[30]["created"]
    assert ref.since == promoted and firsts[-1]["created"] < ref.until <= thirty_first
    assert "first 30 generations" in ref.how
    _fill(store, promoted + 2 * DAY, seed=4, n=20, version="sdloop:ccc")
    assert reference_window(store, cfg, now=NOW + DAY) == ref
    # a new champion gets its own window; the old one's stays recorded
    _promote("sdloop:ddd", NOW)
    assert reference_window(store, cfg, now=NOW + DAY) != ref
    store.close()


# -- PostgreSQL --------------------------------------------------------------------------------------------------------

def test_postgresql_report_and_frozen_window(postgres_db: str, workspace: Path) -> None:
    store = Store(postgres_db)
    _fill(store, NOW - 4 * DAY, seed=1)                                  # the previous champion's: not a reference
    _promote("sdloop:eee", NOW - 3 * DAY)
    _fill(store, NOW - 3 * DAY, seed=2, version="sdloop:eee")
    _fill(store, NOW - 2 * DAY, seed=5, ratings=(1, 2), down=0.8, version="sdloop:eee")
    cfg = _cfg()
    rep = build_report(store, cfg, since=NOW - 2 * DAY, until=NOW - DAY, now=NOW, workspace=False)
    assert rep.reference is not None and rep.reference.since == NOW - 3 * DAY < rep.reference.until < NOW - 2 * DAY
    assert rep.enough_data and len(rep.feedback_reasons()) == 3 and rep.drift_reasons() == []
    assert reference_window(store, cfg, now=NOW + DAY) == rep.reference
    store.close()
