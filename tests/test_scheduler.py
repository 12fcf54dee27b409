"""The scheduler as a real process on a temporary workspace's sqlite store: its jobs survive SIGKILL without
duplicates, missed runs are coalesced, one scheduler per workspace, SIGTERM stops it cleanly, failing jobs are
recorded and do not stop it, and the retrain job can be pulled forward from inside and outside the process.

Most schedulers here run the small functions below (the scheduler takes the jobs' textual references as an
argument), so runs come every 1.2 s and fail or pull forward on cue; one runs the real monitor.jobs on an empty
workspace. Waits poll the store with deadlines; nothing asserts how long anything took.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest
import sqlalchemy as sa

from monitor.config import MonitorConfig
from monitor.lock import holder, scheduler_lock_path
from monitor.scheduler import (_store_scheduler, cron_trigger, ensure_jobs, format_status, last_runs,
                               pull_forward_retrain, run_scheduler, scheduler_status, stored_jobs)
from monitor.scheduler_db import JOBS_TABLE, SchedulerDB
from monitor.store import Store, job_runs

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
INTERVAL_MIN = 0.02  # 1.2 s
INTERVAL_S = INTERVAL_MIN * 60
FAR_CRON = "0 3 1 1 *"  # 3:00 on 1 January: never during a test unless pulled forward


# -- the jobs the test schedulers run (imported by reference, "test_scheduler:tick") --------------------------------

def tick(settings: Optional[dict] = None) -> dict:
    return {"pid": os.getpid(), "every": settings["monitor_every_minutes"] if settings else None}


def flaky_then_pull(settings: Optional[dict] = None) -> dict:
    """Fails on its first run, pulls the retrain job forward on its second, ticks afterwards."""
    counter = Path(os.environ["SDLOOP_HOME"]) / "flaky.count"
    n = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(n))
    if n == 1:
        raise RuntimeError("boom: the first run fails on purpose\nsecond line")
    if n == 2:
        from monitor.scheduler import _iso

        return {"action": "retrain", "pulled": _iso(pull_forward_retrain())}
    return {"action": "healthy", "n": n}


def busy(settings: Optional[dict] = None) -> dict:
    from monitor.lock import Busy

    raise Busy("another retraining is running (pid 1, since 2026-01-01T00:00:00Z); wait for it to finish")


# -- helpers --------------------------------------------------------------------------------------------------------

SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[4])
from monitor.config import MonitorConfig
from monitor.scheduler import run_scheduler
from sdloop.errors import UserError
try:
    run_scheduler(MonitorConfig.from_dict(json.loads(sys.argv[1])), funcs=json.loads(sys.argv[2]),
                  wake_s=float(sys.argv[3]))
except UserError as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    sys.exit(2)
"""


def _start(home: Path, settings: dict, funcs: dict, wake_s: float = 30.0) -> subprocess.Popen:
    env = {**os.environ, "SDLOOP_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("SDLOOP_STORE_URL", None)
    return subprocess.Popen([sys.executable, "-c", SCRIPT, json.dumps(settings), json.dumps(funcs), str(wake_s),
                             str(HERE)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for(what: str, check: Callable[[], Any], proc: Optional[subprocess.Popen] = None,
              deadline_s: float = 30.0) -> Any:
    """Poll until ``check()`` is truthy; fail with the scheduler's output if the deadline passes or it died."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the scheduler exited ({proc.returncode}) while waiting for {what}: {proc.stderr.read()}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def _runs(store: Store, job_id: str) -> list[dict]:
    return list(reversed(last_runs(store, job_id, limit=10000)))  # oldest first


def _ok(store: Store, job_id: str, n: int) -> Callable[[], bool]:
    return lambda: sum(r["status"] == "ok" for r in _runs(store, job_id)) >= n


def _job_ids() -> list[str]:
    """The ids in APScheduler's job table of the scheduler's own database (read by id only: nothing unpickled)."""
    db = SchedulerDB()
    try:
        with db.engine.connect() as conn:
            return sorted(r[0] for r in conn.execute(sa.text(f"SELECT id FROM {JOBS_TABLE}")))
    finally:
        db.close()


def _scheduled(row: dict) -> dt.datetime:
    return dt.datetime.fromisoformat(row["summary"]["scheduled"])


def _stop(proc: subprocess.Popen) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.communicate()


@pytest.fixture(autouse=True)
def _own_scheduler_db(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test's scheduler database follows its workspace (SDLOOP_HOME/scheduler.db)."""
    monkeypatch.delenv("SDLOOP_SCHEDULER_URL", raising=False)


SETTINGS = {"monitor_every_minutes": INTERVAL_MIN, "retrain_cron": FAR_CRON, "misfire_grace_s": 600}
TICKS = {"monitor": "test_scheduler:tick", "retrain": "test_scheduler:tick"}


# -- tests ----------------------------------------------------------------------------------------------------------

def test_restart_after_kill_keeps_one_of_each_job_and_coalesces_missed_runs(workspace: Path, procs: list) -> None:
    store = Store(f"sqlite:///{workspace / 'monitor.db'}")
    cfg = MonitorConfig.from_dict(SETTINGS)
    a = _start(workspace, SETTINGS, TICKS)
    procs.append(a)
    _wait_for("two monitor runs", _ok(store, "monitor", 2), a)
    assert _job_ids() == ["monitor", "retrain"]
    assert _runs(store, "monitor")[0]["summary"]["every"] == INTERVAL_MIN  # the job got the scheduler's settings

    status = {r["id"]: r for r in scheduler_status(cfg)}
    assert status["monitor"]["scheduler"]["pid"] == a.pid
    assert status["monitor"]["last"]["status"] in ("ok", "running")
    assert status["monitor"]["trigger"] == "interval[0:00:01.200000]"
    assert status["retrain"]["next_run"] > dt.datetime.now(dt.timezone.utc) and status["retrain"]["last"] is None
    text = format_status(scheduler_status(cfg))
    assert f"pid {a.pid}" in text and "retrain: cron[" in text and "never ran" in text

    # a second scheduler on the same workspace, as a user starts it: refused in one line, the first one unharmed
    env = {**os.environ, "SDLOOP_HOME": str(workspace)}
    b = subprocess.Popen([sys.executable, "-m", "sdloop_cli", "scheduler", "start"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(b)
    _, err = b.communicate(timeout=60)
    assert b.returncode == 2
    assert err.strip().splitlines() == [err.strip()] and err.startswith("error: another scheduler is running")
    assert f"pid {a.pid}" in err
    assert a.poll() is None

    # SIGKILL: the kernel drops the lock; let several runs pass while it is down
    a.kill()
    a.communicate()
    killed = dt.datetime.now(dt.timezone.utc)
    assert holder(scheduler_lock_path()) is None
    before = _runs(store, "monitor")
    time.sleep(4 * INTERVAL_S)

    c = _start(workspace, SETTINGS, TICKS)
    procs.append(c)
    ok_before = sum(r["status"] == "ok" for r in before)
    _wait_for("two monitor runs after the restart", _ok(store, "monitor", ok_before + 2), c)
    assert _job_ids() == ["monitor", "retrain"]
    runs = _runs(store, "monitor")
    times = [r["summary"]["scheduled"] for r in runs]
    assert len(times) == len(set(times)), "a scheduled run time ran twice"
    new = [r for r in runs if r["id"] > before[-1]["id"]]
    # the 3+ run times missed while the scheduler was down ran once: at most one new run belongs to the downtime
    # (a non-coalescing scheduler would run each one), and that run says how many it stood for
    started_c = new[0]["started"]
    assert sum(killed < _scheduled(r) < started_c - dt.timedelta(seconds=0.5) for r in new) <= 1
    assert new[0]["summary"].get("coalesced", 1) >= 3
    # a run the kill cut short (rare: the kill lands inside a tick) is marked interrupted, never left 'running'
    assert all(r["status"] == "ok" or r["summary"]["error"].startswith("interrupted")
               for r in _runs(store, "monitor") if r["id"] <= before[-1]["id"])

    # pull the retrain job forward from this process (as `sdloop monitor check` under cron would)
    assert not [r for r in _runs(store, "retrain")]
    new_time = pull_forward_retrain()
    assert new_time is not None and new_time <= dt.datetime.now(dt.timezone.utc)
    _stop(c)  # it sleeps up to wake_s (30 s) before re-reading the store: restart it with a short wake instead
    d = _start(workspace, SETTINGS, TICKS, wake_s=0.5)
    procs.append(d)
    _wait_for("the pulled-forward retrain run", _ok(store, "retrain", 1), d)
    assert stored_jobs()["retrain"]["next_run"].year >= dt.datetime.now().year  # back on its crontab

    # SIGTERM: a clean stop that releases the lock and leaves no run 'running'
    rc, err = _stop(d)
    assert rc == 0, err
    assert err.strip().splitlines()[-1].endswith("scheduler stopped")
    assert holder(scheduler_lock_path()) is None
    assert all(r["status"] == "ok" for r in _runs(store, "monitor") if r["id"] > before[-1]["id"])
    assert _job_ids() == ["monitor", "retrain"]


def test_a_running_scheduler_sees_a_pull_forward_from_another_process(workspace: Path, procs: list) -> None:
    store = Store(f"sqlite:///{workspace / 'monitor.db'}")
    p = _start(workspace, SETTINGS, TICKS, wake_s=0.5)
    procs.append(p)
    _wait_for("a monitor run", _ok(store, "monitor", 1), p)
    pull_forward_retrain()
    _wait_for("the pulled-forward retrain run", _ok(store, "retrain", 1), p)
    rc, err = _stop(p)
    assert rc == 0, err


def test_a_run_recorded_before_a_kill_is_not_repeated(workspace: Path, procs: list) -> None:
    """A kill between handing a run to the executor and storing the job's next run time leaves the job due at a
    time that already ran: the restarted scheduler must not run that time again."""
    store = Store(f"sqlite:///{workspace / 'monitor.db'}")
    with _store_scheduler() as s:
        ensure_jobs(s, MonitorConfig.from_dict(SETTINGS), TICKS)
    due = pull_forward_retrain(dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5))
    with store.engine.begin() as conn:
        conn.execute(job_runs.insert().values(job_id="retrain", started=due, finished=due, status="ok",
                                              summary={"scheduled": due.astimezone(dt.timezone.utc).isoformat()}))
        # and a monitor run the kill cut short
        conn.execute(job_runs.insert().values(job_id="monitor", started=due, status="running",
                                              summary={"scheduled": due.astimezone(dt.timezone.utc).isoformat()}))
    p = _start(workspace, SETTINGS, TICKS, wake_s=0.5)
    procs.append(p)
    _wait_for("a monitor run", _ok(store, "monitor", 1), p)
    _wait_for("the retrain job to move past the recorded time",
              lambda: stored_jobs()["retrain"]["next_run"] > dt.datetime.now(dt.timezone.utc), p)
    assert len(_runs(store, "retrain")) == 1
    cut = _runs(store, "monitor")[0]
    assert cut["status"] == "failed" and cut["summary"]["error"].startswith("interrupted") and cut["finished"]
    rc, err = _stop(p)
    assert rc == 0 and "already recorded; not running it again" in err
    assert "1 job run(s) were interrupted" in err


def test_a_run_missed_beyond_the_grace_time_is_skipped(workspace: Path, procs: list) -> None:
    store = Store(f"sqlite:///{workspace / 'monitor.db'}")
    settings = {**SETTINGS, "misfire_grace_s": 1}
    with _store_scheduler() as s:
        ensure_jobs(s, MonitorConfig.from_dict(settings), TICKS)
    pull_forward_retrain(dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=60))
    p = _start(workspace, settings, TICKS, wake_s=0.5)
    procs.append(p)
    rows = _wait_for("the retrain run's record", lambda: [r for r in _runs(store, "retrain") if r["finished"]], p)
    assert rows[0]["status"] == "skipped" and rows[0]["summary"]["reason"].startswith("missed by")
    assert stored_jobs()["retrain"]["next_run"] > dt.datetime.now(dt.timezone.utc)
    rc, err = _stop(p)
    assert rc == 0, err


def test_failing_job_is_recorded_and_the_monitor_job_pulls_the_retrain_forward(workspace: Path, procs: list) -> None:
    store = Store(f"sqlite:///{workspace / 'monitor.db'}")
    funcs = {"monitor": "test_scheduler:flaky_then_pull", "retrain": "test_scheduler:busy"}
    p = _start(workspace, SETTINGS, funcs)  # wake_s 30 s: only the in-process pull-forward can wake it in time
    procs.append(p)
    _wait_for("the pulled-forward retrain run", lambda: [r for r in _runs(store, "retrain") if r["finished"]], p)
    _wait_for("a monitor run after the pull", _ok(store, "monitor", 2), p)
    runs = _runs(store, "monitor")
    assert runs[0]["status"] == "failed"
    assert runs[0]["summary"]["error"] == "boom: the first run fails on purpose"
    assert runs[0]["summary"]["type"] == "RuntimeError" and runs[0]["finished"] >= runs[0]["started"]
    assert runs[1]["status"] == "ok" and runs[1]["summary"]["action"] == "retrain"
    retrain = _runs(store, "retrain")
    assert len(retrain) == 1 and retrain[0]["started"] >= runs[1]["started"]
    assert retrain[0]["status"] == "skipped" and retrain[0]["summary"]["type"] == "Busy"  # the retrain lock was held
    assert p.poll() is None
    rc, err = _stop(p)
    assert rc == 0, err


def test_the_real_jobs_on_an_empty_workspace(workspace: Path, procs: list) -> None:
    """monitor.jobs by their stored references: the check runs and says there is too little data; the retraining,
    pulled forward, fails in one line because there is no champion, and the scheduler carries on."""
    store = Store(f"sqlite:///{workspace / 'monitor.db'}")
    settings = {**SETTINGS, "monitor_every_minutes": 0.05, "min_new_feedback": 0}  # past the scheduled check
    p = _start(workspace, settings, {}, wake_s=0.5)
    procs.append(p)
    _wait_for("a real monitor check", _ok(store, "monitor", 1), p, deadline_s=60)
    check = next(r for r in _runs(store, "monitor") if r["status"] == "ok")["summary"]
    assert check["action"] == "not_enough_data" and Path(check["report"]).is_file()
    assert {j["func"] for j in stored_jobs().values()} == {"monitor.jobs:monitor_job", "monitor.jobs:retrain_job"}
    pull_forward_retrain()
    rows = _wait_for("the real retrain run", lambda: [r for r in _runs(store, "retrain") if r["finished"]], p)
    assert rows[0]["status"] == "failed" and rows[0]["summary"]["error"].startswith("there is no champion")
    _wait_for("another monitor check", _ok(store, "monitor", 2), p, deadline_s=60)
    rc, err = _stop(p)
    assert rc == 0, err


def test_ensure_jobs_adds_missing_and_reschedules_changed_triggers(workspace: Path) -> None:
    """In-process, paused: nothing runs; only the stored jobs change."""
    cfg = MonitorConfig.from_dict(SETTINGS)
    with _store_scheduler() as s:
        assert ensure_jobs(s, cfg, TICKS) == {"monitor": "added", "retrain": "added"}
        assert ensure_jobs(s, cfg, TICKS) == {"monitor": "unchanged", "retrain": "unchanged"}
        job = s.get_job("monitor")
        assert (job.coalesce, job.max_instances, job.misfire_grace_time) == (True, 1, 600)
        assert job.func_ref == "test_scheduler:tick"
    assert [r["trigger_current"] for r in scheduler_status(cfg)] == [True, True]

    changed = MonitorConfig.from_dict({**SETTINGS, "monitor_every_minutes": 2.0, "retrain_cron": "30 4 * * 1"})
    assert [r["trigger_current"] for r in scheduler_status(changed)] == [False, False]
    with _store_scheduler() as s:
        assert ensure_jobs(s, changed, TICKS) == {"monitor": "rescheduled", "retrain": "rescheduled"}
        assert str(s.get_job("monitor").trigger) == "interval[0:02:00]"
        nxt = s.get_job("retrain").next_run_time
        assert (nxt.minute, nxt.hour, nxt.weekday()) == (30, 4, 0)  # crontab 1 = Monday
        graced = MonitorConfig.from_dict({**changed.to_dict(), "misfire_grace_s": 60})
        assert ensure_jobs(s, graced, TICKS) == {"monitor": "updated", "retrain": "updated"}
        assert s.get_job("retrain").misfire_grace_time == 60
        assert s.get_job("retrain").next_run_time == nxt  # an option change keeps the next run
        assert len(s.get_jobs()) == 2


@pytest.mark.parametrize("expr,days", [("0 3 * * 0", "sun"), ("0 3 * * 7", "sun"),
                                       ("0 3 * * 1-5", "mon,tue,wed,thu,fri"), ("0 3 * * */2", "sun,tue,thu,sat"),
                                       ("0 3 * * sat-7", "sun,sat")])
def test_crontab_weekdays_mean_what_crontab_says(expr: str, days: str) -> None:
    """APScheduler 3's from_crontab reads weekday 0 as Monday; the default "0 3 * * 0" must run on Sundays."""
    trigger = cron_trigger(expr)
    assert f"day_of_week='{days}'" in str(trigger)
    sunday_noon = dt.datetime(2026, 11, 29, 12, tzinfo=dt.timezone.utc)
    if days == "sun":
        assert trigger.get_next_fire_time(None, sunday_noon).strftime("%a %H:%M") == "Sun 03:00"
    with pytest.raises(ValueError, match="crontab"):
        cron_trigger(expr.replace(expr.split()[4], "8"))


def test_status_and_pull_forward_without_any_scheduler(workspace: Path) -> None:
    cfg = MonitorConfig.from_dict({})
    rows = scheduler_status(cfg)
    assert [(r["id"], r["stored"], r["next_run"], r["last"], r["scheduler"]) for r in rows] == [
        ("monitor", False, None, None, None), ("retrain", False, None, None, None)]
    assert rows[1]["trigger"].startswith("cron[")
    assert "not running" in format_status(rows) and "not scheduled yet" in format_status(rows)
    assert pull_forward_retrain() is None


def test_status_through_the_command_line(workspace: Path, capsys: pytest.CaptureFixture) -> None:
    from sdloop_cli.main import main

    assert main(["scheduler", "status"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("scheduler: not running") and "retrain: cron[" in out and "day_of_week='sun'" in out


def test_in_a_thread_with_a_stop_event(workspace: Path) -> None:
    """The function form (no signals outside the main thread): the stop event ends it and releases the lock."""
    store = Store(f"sqlite:///{workspace / 'monitor.db'}")
    stop = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run_scheduler(MonitorConfig.from_dict(SETTINGS), funcs=TICKS, stop_event=stop, wake_s=0.2)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=target)
    t.start()
    try:
        _wait_for("a monitor run", _ok(store, "monitor", 1))
        assert holder(scheduler_lock_path())["pid"] == os.getpid()
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive() and not errors
    assert holder(scheduler_lock_path()) is None


@pytest.mark.parametrize("on_postgres", ["monitoring store", "scheduler database"])
def test_postgresql_job_store(workspace: Path, monkeypatch: pytest.MonkeyPatch, postgres_db: str,
                              on_postgres: str) -> None:
    """Either database on PostgreSQL (the other the workspace's sqlite file): they are never the same database."""
    env = "SDLOOP_STORE_URL" if on_postgres == "monitoring store" else "SDLOOP_SCHEDULER_URL"
    monkeypatch.setenv(env, postgres_db)
    from sdloop.workspace import store_url

    store = Store(store_url())
    stop = threading.Event()
    t = threading.Thread(target=run_scheduler, args=(MonitorConfig.from_dict(SETTINGS),),
                         kwargs={"funcs": TICKS, "stop_event": stop, "wake_s": 0.2})
    t.start()
    try:
        _wait_for("a monitor run", _ok(store, "monitor", 1))
        assert pull_forward_retrain() is not None
        _wait_for("the pulled-forward retrain run", _ok(store, "retrain", 1))
    finally:
        stop.set()
        t.join(30)
    assert _job_ids() == ["monitor", "retrain"]
    assert [r["stored"] for r in scheduler_status(MonitorConfig.from_dict(SETTINGS))] == [True, True]
    store.close()


# -- nothing outside the scheduler process unpickles ------------------------------------------------------------------

class _Planted:
    """A job row as an attacker writes it: unpickling it creates ``path`` (any code could run instead)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


def _plant(url: str, table: str, job_id: str, blob: bytes, create: bool) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        if create:
            conn.execute(sa.text(f"CREATE TABLE {table} (id VARCHAR(191) PRIMARY KEY, next_run_time FLOAT, "
                                 "job_state BLOB NOT NULL)"))
        conn.execute(sa.text(f"DELETE FROM {table} WHERE id = :id"), {"id": job_id})
        conn.execute(sa.text(f"INSERT INTO {table} (id, next_run_time, job_state) VALUES (:id, 0, :blob)"),
                     {"id": job_id, "blob": blob})
    engine.dispose()


def test_status_and_pull_forward_never_unpickle_a_job_row(workspace: Path, capsys: pytest.CaptureFixture) -> None:
    """A pickled row planted where the job table used to be (the monitoring store, which every serving replica can
    write) and in the scheduler's own job table: `sdloop scheduler status`, the status functions and a pull-forward
    read plain rows only, so the planted code never runs."""
    import pickle

    from sdloop_cli.main import main

    workspace.mkdir(parents=True)
    proof = workspace / "proof"
    pickle.loads(pickle.dumps(_Planted(proof))).close()  # the payload is live: loading it does create the file
    assert proof.exists()
    ran = workspace / "ran"
    blob = pickle.dumps(_Planted(ran))
    Store(f"sqlite:///{workspace / 'monitor.db'}").close()
    _plant(f"sqlite:///{workspace / 'monitor.db'}", JOBS_TABLE, "retrain", blob, create=True)  # the old place
    with _store_scheduler() as s:  # the scheduler's own store, as a scheduler leaves it
        ensure_jobs(s, MonitorConfig.from_dict(SETTINGS), TICKS)
    _plant(f"sqlite:///{workspace / 'scheduler.db'}", JOBS_TABLE, "retrain", blob, create=False)
    _plant(f"sqlite:///{workspace / 'scheduler.db'}", JOBS_TABLE, "evil", blob, create=False)

    assert main(["scheduler", "status"]) == 0
    out = capsys.readouterr().out
    assert "monitor: interval[0:00:01.200000]" in out and "retrain: cron[" in out
    assert main(["scheduler", "status", "--json"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == ["monitor", "retrain"]
    when = pull_forward_retrain()
    assert when is not None
    row = {r["id"]: r for r in scheduler_status(MonitorConfig.from_dict(SETTINGS))}["retrain"]
    assert row["pulled_forward"] == when and "pulled forward to" in format_status([row])
    assert set(stored_jobs()) == {"monitor", "retrain"}
    assert not ran.exists(), "a status command or the pull-forward unpickled a planted row"


def test_the_scheduler_database_is_never_the_monitoring_store(workspace: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    from sdloop_cli.main import main

    monkeypatch.setenv("SDLOOP_SCHEDULER_URL", f"sqlite:///{workspace / 'monitor.db'}")
    assert main(["scheduler", "status"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: SDLOOP_SCHEDULER_URL names the monitoring store's database") and "\n" not in err
    monkeypatch.setenv("SDLOOP_SCHEDULER_URL", "not a url")
    assert main(["scheduler", "status"]) == 2
    assert "SDLOOP_SCHEDULER_URL is not a database URL" in capsys.readouterr().err

