"""The retraining's parts alone: the gate case by case, the retraining log's recovery after a killed process, the
retrain lock, the store's migration of an existing database, and the command line's one-line refusals."""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from monitor.config import MonitorConfig
from monitor.gate import export_gate, quality_gate

CFG = MonitorConfig(kid_margin=0.01, val_loss_margin=0.02, latency_margin=0.5)


def _comparison(kid_a: float | None, kid_b: float | None) -> dict:
    if kid_a is None:
        return {"metrics": {"kid": {"computed": False, "reason": "too few images"}}}
    return {"metrics": {"kid": {"computed": True, "values": {"a": {"value": kid_a}, "b": {"value": kid_b}}}}}


@pytest.mark.parametrize("kid, val, passed, failed", [
    ((0.10, 0.10), (0.50, 0.50, True), True, []),
    ((0.10, 0.105), (0.50, 0.515, True), True, []),                 # worse, but within both margins
    ((0.10, 0.13), (0.50, 0.50, True), False, ["kid"]),
    ((0.10, 0.09), (0.50, 0.60, False), False, ["val_loss"]),
    ((0.10, 0.30), (0.50, 0.90, True), False, ["kid", "val_loss"]),
    ((None, None), (0.5, 0.5, False), True, []),                      # KID not computed: skipped, loss decides
])
def test_quality_gate(kid: tuple, val: tuple, passed: bool, failed: list[str]) -> None:
    gate = quality_gate(_comparison(*kid), val, CFG)
    assert gate.passed is passed
    assert [c.name for c in gate.checks if c.passed is False] == failed
    assert len(gate.reasons) == len(failed)
    for reason in gate.reasons:  # both figures and the margin are in the line
        assert "champion" in reason and "margin" in reason
    if kid[0] is None:
        assert [c.passed for c in gate.checks] == [None, True]


@pytest.mark.parametrize("champ, chall, budget, passed, failed", [
    (0.10, 0.14, 0.0, True, []),
    (0.10, 0.16, 0.0, False, ["latency"]),                            # over the champion's x 1.5
    (0.10, 0.16, 0.2, True, []),                                      # an explicit budget replaces the margin
    (None, 0.16, 0.0, True, []),                                      # no champion figure: skipped
])
def test_export_gate(champ: float | None, chall: float, budget: float, passed: bool, failed: list[str]) -> None:
    cfg = MonitorConfig(latency_margin=0.5, latency_budget_s=budget)
    gate = export_gate({"latency": {"export_s": champ}} if champ else {},
                       {"latency": {"export_s": chall}, "parity": {"passed": True}}, cfg)
    assert gate.passed is passed and [c.name for c in gate.checks if c.passed is False] == failed
    broken = export_gate({}, {"latency": {"export_s": chall}, "parity": {"passed": False}}, cfg)
    assert not broken.passed and "parity" in broken.reasons[0]


def test_a_killed_retraining_is_marked_and_a_finished_promotion_stands(tmp_path: Path) -> None:
    from monitor.retrain_log import RetrainLog, format_history
    from monitor.store import Store

    store = Store(f"sqlite:///{tmp_path / 'm.db'}")
    log = RetrainLog(store)
    killed = log.begin("schedule", "sdloop:a")
    with log.step(killed, "data"):
        pass
    step = log.step(killed, "train")
    step.__enter__()  # the process dies here: the row stays "running"
    promoted = log.begin("manual", "sdloop:a")
    for name in ("data", "train", "compare", "export", "publish", "gate", "promote"):
        with log.step(promoted, name):
            pass
    assert sorted(log.mark_interrupted()) == sorted([killed, promoted])
    rows = {r["id"]: r for r in log.history()}
    assert rows[killed]["status"] == "interrupted" and "not changed" in rows[killed]["reasons"][0]
    assert [s["status"] for s in rows[killed]["steps"]] == ["ok", "interrupted"]
    assert rows[promoted]["status"] == "promoted" and "stands" in rows[promoted]["reasons"][0]
    assert log.mark_interrupted() == []
    text = format_history(log.history())
    assert "INTERRUPTED" in text and "PROMOTED" in text
    with pytest.raises(RuntimeError):
        with log.step(promoted, "extra"):
            raise RuntimeError("boom")
    failed = log.history()[0]["steps"][-1]
    assert failed["status"] == "failed" and failed["detail"]["error"] == "boom" and "Traceback" in \
        failed["detail"]["traceback"]
    store.close()


def test_the_retrain_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path: Path) -> None:
    from monitor.lock import Busy, hold, holder

    path = tmp_path / "retrain.lock"
    child = subprocess.Popen([sys.executable, "-c", (
        "import time, sys; from pathlib import Path; from monitor.lock import hold\n"
        f"with hold(Path({str(path)!r}), 'retraining'):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(Busy, match=f"pid {child.pid}"):
            with hold(path, "retraining"):
                pass
        assert holder(path)["pid"] == child.pid
    finally:
        child.kill()
        child.wait()
    assert holder(path) is None  # the kernel dropped it with the process: no stale lock
    with hold(path, "retraining") as me:
        assert me["pid"] == os.getpid()


def test_an_existing_version_2_store_migrates_keeping_its_rows(tmp_path: Path) -> None:
    from monitor.store import MIGRATIONS, SCHEMA_VERSION, Store

    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = Store(url, migrate=False)
    with old.engine.begin() as conn:  # a database as the serving release left it: versions 1 and 2 only
        from monitor.store import _versions

        _versions.create(conn)
        for version in (1, 2):
            MIGRATIONS[version - 1](conn)
            conn.execute(_versions.insert().values(version=version, applied=dt.datetime.now(dt.timezone.utc)))
        # its rows, as that release's SQL wrote them (today's methods name columns of later versions)
        from monitor.store import feedback, generations

        now, gid = dt.datetime.now(dt.timezone.utc), "00000000-0000-0000-0000-000000000001"
        conn.execute(generations.insert().values(id=gid, created=now, prompt="a red circle", negative_prompt="",
                                                 params={}, model_version="sdloop:a", latency_s=0.1, descriptors={}))
        conn.execute(feedback.insert().values(generation_id=gid, client_id="alice", rating=4, tags=[], created=now,
                                              updated=now))
    old.close()
    new = Store(url)
    assert new.schema_version() == SCHEMA_VERSION >= 3
    assert new.get_generation(gid)["prompt"] == "a red circle" and new.count("feedback") == 1
    new.log_failure("txt2img", "timeout", "too slow")
    assert new.count("failures") == 1
    new.close()
    tables = {r[0] for r in sqlite3.connect(tmp_path / "old.db").execute("SELECT name FROM sqlite_master")}
    assert {"failures", "reference_windows", "retrains", "retrain_steps", "job_runs"} <= tables


@pytest.mark.parametrize("argv, words", [
    (["retrain"], "no champion to retrain"),
    (["monitor", "check", "--since", "yesterday"], "not a time"),
    (["monitor", "report", "--reference", "7d"], "SINCE..UNTIL"),
    (["monitor", "check", "--set", "min_feedback=lots"], "min_feedback"),
    (["monitor", "check", "--set", "drop_rating=5"], "drop_rating"),
    (["retrain", "--set", "max_steps.x=1"], "mapping settings"),
    (["monitor", "check", "--config", "/nonexistent/monitor.yaml"], "does not exist"),
    (["scheduler", "start", "--set", "retrain_cron=every sunday"], "retrain_cron"),
])
def test_mistakes_are_one_line(workspace: Path, capsys: pytest.CaptureFixture, argv: list[str], words: str) -> None:
    from sdloop_cli.main import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and len(err.strip().splitlines()) == 1, err


def test_check_on_an_empty_workspace_says_not_enough_data(workspace: Path, capsys: pytest.CaptureFixture) -> None:
    from sdloop_cli.main import main

    assert main(["monitor", "check", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["action"] == "not_enough_data" and not out["retrain"]
    assert Path(out["report"]).is_file()
    assert main(["retrain", "history"]) == 0
    assert "no retraining yet" in capsys.readouterr().out
    assert main(["monitor", "check", "--help-config"]) == 0
    assert "kid_margin" in capsys.readouterr().out


def test_old_reports_are_pruned_but_nothing_else(workspace: Path) -> None:
    from monitor.report_files import prune_reports
    from sdloop.workspace import monitor_dir

    root = monitor_dir() / "reports"
    for i in range(5):
        folder = root / f"2026112{i}T000000Z"
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({"current": {}, "tests": [], "status": "pass"}))
    mine = root / "my-notes"
    mine.mkdir()
    (mine / "summary.json").write_text("{}")
    gone = prune_reports(2)
    assert [p.name for p in gone] == ["20261120T000000Z", "20261121T000000Z", "20261122T000000Z"]
    assert sorted(p.name for p in root.iterdir()) == ["20261123T000000Z", "20261124T000000Z", "my-notes"]


@pytest.mark.parametrize("new, hours, action", [
    (25, None, "retrain"), (25, 30.0, "retrain"), (25, 3.0, "wait"), (5, 30.0, "not_enough_data"), (5, 3.0, "wait"),
])
def test_the_scheduled_retraining_keeps_the_cooldown_and_the_feedback_minimum(new: int, hours: float | None,
                                                                              action: str) -> None:
    from monitor.policy import scheduled

    decision = scheduled(new, hours, "rejected" if hours else None, MonitorConfig(cooldown_hours=24,
                                                                                  min_new_feedback=20))
    assert decision.action == action and decision.reasons
    if action == "wait":
        assert decision.wait_hours == pytest.approx(24 - hours)
    if action == "not_enough_data":
        assert decision.feedback_needed == 15 and "15 more" in decision.reasons[0]


def test_a_mapping_setting_changes_one_key_and_keeps_the_files_others(workspace: Path) -> None:
    from monitor.config import MonitorConfig as Config

    workspace.mkdir(parents=True)
    (workspace / "monitor.yaml").write_text("train_overrides: {max_steps: 4, learning_rate: 0.001}\n")
    cfg = Config.load(overrides={"train_overrides": {"alpha": 512}})
    assert cfg.train_overrides == {"max_steps": 4, "learning_rate": 0.001, "alpha": 512}


@pytest.mark.parametrize("argv, words", [
    (["monitor", "check", "--since", "99999999d"], "before year 1"),
    (["retrain", "history", "--limit", "0"], "at least 1"),
    (["monitor", "check", "--set", "monitor_every_minutes=100000"], "minutes"),
])
def test_more_mistakes_are_one_line(workspace: Path, capsys: pytest.CaptureFixture, argv: list[str],
                                    words: str) -> None:
    from sdloop_cli.main import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and len(err.strip().splitlines()) == 1, err


def test_no_quality_evidence_is_a_rejection() -> None:
    gate = quality_gate(_comparison(None, None), (None, None, False), CFG)
    assert not gate.passed and "neither KID nor a validation loss" in gate.reasons[0]


def test_the_error_rate_counts_requests_not_images(tmp_path: Path) -> None:
    from monitor.frames import window_data
    from monitor.store import Store
    from monitor.windows import Window

    store = Store(f"sqlite:///{tmp_path / 'm.db'}")
    for n, images in ((4, 4), (2, 1)):  # one request for 4 images, two requests for one each
        for _ in range(n):
            store.log_generation(prompt="a red circle", negative_prompt="", params={"num_images": images},
                                 model_version="sdloop:a", latency_s=0.1, descriptors={})
    store.log_failure("txt2img_json", "timeout", "too slow")
    now = dt.datetime.now(dt.timezone.utc)
    data = window_data(store, Window(now - dt.timedelta(hours=1), now + dt.timedelta(seconds=1), "test"))
    assert (data.generations, data.requests, data.failures) == (6, 3, 1)
    store.close()


def test_hosts_sharing_one_postgresql_exclude_each_other(tmp_path: Path, postgres_db: str) -> None:
    """Two 'hosts' (different lock files, so the file lock does not meet) on one database: the advisory lock does."""
    from monitor.lock import Busy, hold

    url = postgres_db
    child = subprocess.Popen([sys.executable, "-c", (
        "import time; from pathlib import Path; from monitor.lock import hold\n"
        f"with hold(Path({str(tmp_path / 'a.lock')!r}), 'retraining', db_url={url!r}):\n"
        "    print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(Busy, match="shares this database"):
            with hold(tmp_path / "b.lock", "retraining", db_url=url):
                pass
        with hold(tmp_path / "b.lock", "scheduler", db_url=url):  # another lock name is free
            pass
    finally:
        child.kill()
        child.wait()
    with hold(tmp_path / "b.lock", "retraining", db_url=url):  # released with the dead session
        pass


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_the_retraining_trains_with_its_own_objective_not_the_champions(objective: str, tmp_path: Path) -> None:
    """A champion a dpo retraining made (its config.yaml says dpo) is retrained with the settings' objective: sft
    on the plain retraining data (the README's `sdloop retrain` after the demo failed on this), dpo on preferences."""
    from monitor.retrain import _Ctx, _train_values

    run = tmp_path / "champion"
    run.mkdir()
    (run / "sdloop_run.json").write_text("{}")
    (run / "config.yaml").write_text("objective: dpo\nlearning_rate: 0.0001\nmax_steps: 200\n")
    cfg = MonitorConfig(objective=objective, train_overrides={"max_steps": 40})
    ctx = _Ctx(cfg=cfg, log=None, rid="r", champion=None, champion_run=run, work=tmp_path, progress=False,
               say=print)
    values = _train_values(ctx, tmp_path / "data", tmp_path / "out")
    assert values["objective"] == objective and values["max_steps"] == 40 and values["learning_rate"] == 0.0001
    assert values["init_lora"] == str(run)
