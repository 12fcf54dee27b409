"""Issue 17, item 3, through HTTP as a client calls: long generations as jobs. Submit (202 and an unguessable id),
status with progress (step i of n), the result (what /txt2img_json answers, its images logged like theirs), cancel of
a running job within a step and of a queued one at once, a cancel that lands on another worker, the job queue's bound
(429 with Retry-After), a job bound to the key that submitted it (another key gets 404), clean 4xx answers, a job
whose worker stopped reading as failed; plus the store's migration from version 4 (sqlite and PostgreSQL)."""

from __future__ import annotations

import base64
import datetime as dt
import io
import os
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
from serve_support import Champion, promote, stop_server, wait_for
from test_serve import TINY, _client, _env, champ  # noqa: F401 - the shared fixtures (used by name)

ENDED = ("done", "failed", "cancelled")


@pytest.fixture()
def serving(champ: Champion) -> Iterator[Any]:  # noqa: F811
    from sdloop.champion import current_champion_tag

    if current_champion_tag() is None:
        promote(champ, champ.tags[0])
    with _client() as c:
        wait_for(lambda: c.get("/readyz").status_code == 200)
        yield c


@pytest.fixture(params=["sqlite", "postgresql"])
def serving_both(request: pytest.FixtureRequest, champ: Champion, tmp_path: Path,  # noqa: F811
                 monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A service whose monitoring store is a fresh sqlite file, or a fresh PostgreSQL database (skipped without)."""
    url = f"sqlite:///{tmp_path / 'monitor.db'}" if request.param == "sqlite" \
        else request.getfixturevalue("postgres_db")
    monkeypatch.setenv("SDLOOP_STORE_URL", url)
    yield from _serve(champ)


def _serve(champ: Champion) -> Iterator[Any]:  # noqa: F811
    from sdloop.champion import current_champion_tag

    if current_champion_tag() is None:
        promote(champ, champ.tags[0])
    with _client() as c:
        wait_for(lambda: c.get("/readyz").status_code == 200)
        yield c


def _slow(monkeypatch: pytest.MonkeyPatch, per_step: float, gate: Optional[threading.Event] = None,
          running: Optional[threading.Event] = None) -> None:
    """The real pipeline, each denoising step ``per_step`` seconds longer; with ``gate``, held before its first step
    until the gate opens (``running`` is set once a generation is inside)."""
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    original = ORTStableDiffusionPipeline.__call__

    def slow(self, *args, **kwargs):  # noqa: ANN001,ANN002,ANN003,ANN202
        if running is not None:
            running.set()
        if gate is not None:
            assert gate.wait(60)
        on_step = kwargs["callback_on_step_end"]

        def stepped(*a: Any) -> Any:
            time.sleep(per_step)
            return on_step(*a)

        return original(self, *args, **{**kwargs, "callback_on_step_end": stepped})

    monkeypatch.setattr(ORTStableDiffusionPipeline, "__call__", slow)


def _steps() -> float:
    from bento.runtime import STEPS

    return STEPS._value.get()


def _jobs(state: str) -> float:
    from bento.jobs import JOBS

    return JOBS.labels(state=state)._value.get()


def _ended(client: Any, job_id: str, headers: Optional[dict] = None, timeout: float = 60) -> dict:
    def check() -> Any:
        body = client.get(f"/jobs/{job_id}", headers=headers or {}).json()
        return body if body["status"] in ENDED else None

    return wait_for(check, timeout)


def test_submit_progress_and_result_logged_like_txt2img(serving_both, champ: Champion,  # noqa: ANN001,F811
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    serving = serving_both
    from PIL import Image

    from monitor.store import open_store

    _slow(monkeypatch, 0.6)
    submitted, done = _jobs("submitted"), _jobs("done")
    r = serving.post("/jobs", json={**TINY, "steps": 4, "seed": 5, "num_images": 2, "timeout_s": 60})
    assert r.status_code == 202, r.text
    body = r.json()
    job_id = body["job_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", job_id) and body["status"] == "queued" and body["steps"] == 4
    assert body["status_url"] == f"/jobs/{job_id}" == r.headers["location"] == body["cancel_url"]
    assert body["result_url"] == f"/jobs/{job_id}/result"
    assert {"step", "model_version", "error", "created", "updated"} <= set(body)
    seen: list[tuple[str, int, int]] = []

    def finished() -> Any:
        s = serving.get(f"/jobs/{job_id}").json()
        seen.append((s["status"], s["step"], s["steps"]))
        return s if s["status"] in ENDED else None

    final = wait_for(finished, 60, 0.05)
    assert final["status"] == "done" and final["step"] == final["steps"] == 4 and final["error"] is None, final
    assert final["model_version"] in champ.tags
    progress = [step for state, step, n in seen if state == "running" and n == 4]
    assert len(set(progress) - {0}) >= 2 and progress == sorted(progress), seen  # step i of n, going up
    r = serving.get(f"/jobs/{job_id}/result")
    assert r.status_code == 200, r.text
    result = r.json()
    sync = serving.post("/txt2img_json", json={**TINY, "seed": 5}).json()
    assert set(result) == set(sync) and result["model_version"] == final["model_version"]
    store = open_store(os.environ["SDLOOP_STORE_URL"])
    assert [im["seed"] for im in result["images"]] == [5, 6]
    for im in result["images"]:
        png = Image.open(io.BytesIO(base64.b64decode(im["image_png_base64"])))
        assert png.format == "PNG" and png.size == (64, 64)
        row = store.get_generation(im["generation_id"])  # logged exactly as a txt2img generation is
        assert row["params"]["seed"] == im["seed"] and row["params"]["steps"] == 4 and row["prompt"] == TINY["prompt"]
        assert row["model_version"] == final["model_version"] and row["descriptors"] and row["api_key_id"] is None
    assert _jobs("submitted") == submitted + 1 and _jobs("done") == done + 1


def test_cancel_stops_a_running_job_within_a_step(serving, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    _slow(monkeypatch, 0.3)
    job_id = serving.post("/jobs", json={**TINY, "steps": 40, "timeout_s": 120}).json()["job_id"]
    wait_for(lambda: serving.get(f"/jobs/{job_id}").json()["step"] >= 2, 30, 0.05)
    cancelled, before = _jobs("cancelled"), _steps()
    r = serving.delete(f"/jobs/{job_id}")
    assert r.status_code in (200, 202) and r.json()["cancel_requested"] is True, r.text
    final = _ended(serving, job_id)
    assert final["status"] == "cancelled" and "cancelled" in final["error"] and final["step"] < 40, final
    assert _steps() - before <= 2  # the step in flight, and at most one that ended while the DELETE travelled
    assert _jobs("cancelled") == cancelled + 1
    r = serving.get(f"/jobs/{job_id}/result")
    assert r.status_code == 409 and r.json()["status"] == "not_done" and "cancelled" in r.json()["error"]
    r = serving.delete(f"/jobs/{job_id}")  # again: it stays cancelled
    assert r.status_code == 200 and r.json()["status"] == "cancelled"


def test_a_cancel_on_another_worker_reaches_the_running_job(serving,  # noqa: ANN001
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from monitor.store import open_store

    _slow(monkeypatch, 0.3)
    job_id = serving.post("/jobs", json={**TINY, "steps": 40, "timeout_s": 120}).json()["job_id"]
    wait_for(lambda: serving.get(f"/jobs/{job_id}").json()["step"] >= 1, 30, 0.05)
    asked = time.monotonic()
    open_store().cancel_job(job_id)  # what a DELETE answered by another worker or replica does: only the row
    final = _ended(serving, job_id, timeout=10)
    assert final["status"] == "cancelled" and time.monotonic() - asked < 3, final


def test_cancel_a_queued_job_at_once_and_result_before_done(serving,  # noqa: ANN001
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    gate, running = threading.Event(), threading.Event()
    _slow(monkeypatch, 0.0, gate, running)
    first = serving.post("/jobs", json={**TINY, "timeout_s": 60}).json()["job_id"]
    assert running.wait(30)  # the first holds the pipeline
    second = serving.post("/jobs", json={**TINY, "timeout_s": 60}).json()["job_id"]
    assert serving.get(f"/jobs/{second}").json()["status"] == "queued"
    r = serving.get(f"/jobs/{first}/result")
    assert r.status_code == 409 and r.json()["status"] == "not_done" and "running" in r.json()["error"], r.text
    assert set(r.json()) == {"error", "status"}
    r = serving.delete(f"/jobs/{second}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    assert serving.get(f"/jobs/{second}").json()["status"] == "cancelled"
    before = _steps()
    gate.set()
    assert _ended(serving, first)["status"] == "done"
    time.sleep(0.5)
    assert serving.get(f"/jobs/{second}").json()["status"] == "cancelled"
    assert _steps() - before == TINY["steps"]  # the cancelled one ran no step
    r = serving.post(f"/jobs/{first}/cancel")  # a job that ended cannot be cancelled
    assert r.status_code == 409 and r.json()["status"] == "finished"


def test_a_full_job_queue_is_429_with_retry_after(champ: Champion,  # noqa: F811
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from sdloop.champion import current_champion_tag

    monkeypatch.setenv("SDLOOP_JOBS", "1")
    if current_champion_tag() is None:
        promote(champ, champ.tags[0])
    gate, running = threading.Event(), threading.Event()
    with _client() as c:
        wait_for(lambda: c.get("/readyz").status_code == 200)
        _slow(monkeypatch, 0.0, gate, running)  # after the load, which may run the pipeline to measure it
        a = c.post("/jobs", json=TINY).json()["job_id"]
        assert running.wait(30)  # a runs; b fills the queue of 1
        b = c.post("/jobs", json=TINY)
        assert b.status_code == 202
        r = c.post("/jobs", json=TINY)
        assert r.status_code == 429 and r.json()["status"] == "busy" and "SDLOOP_JOBS" in r.json()["error"], r.text
        assert set(r.json()) == {"error", "status"} and int(r.headers["retry-after"]) >= 1
        gate.set()
        assert _ended(c, a)["status"] == "done" and _ended(c, b.json()["job_id"])["status"] == "done"
        assert c.post("/jobs", json=TINY).status_code == 202  # room again


def test_a_job_belongs_to_its_key(champ: Champion, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from monitor.store import open_store
    from sdloop.champion import current_champion_tag

    monkeypatch.setenv("SDLOOP_AUTH", "keys")
    store = open_store(champ.env()["SDLOOP_STORE_URL"])
    tag = uuid.uuid4().hex[:8]
    mine, mine_key = store.create_key(f"jobs-app-{tag}", ["generate"])
    _, other_key = store.create_key(f"jobs-other-{tag}", ["generate", "feedback"])
    _, admin_key = store.create_key(f"jobs-ops-{tag}", ["admin"])
    _, fb_key = store.create_key(f"jobs-fb-{tag}", ["feedback"])
    bearer = lambda k: {"Authorization": f"Bearer {k}"}  # noqa: E731
    if current_champion_tag() is None:
        promote(champ, champ.tags[0])
    with _client() as c:
        wait_for(lambda: c.get("/readyz").status_code == 200)
        r = c.post("/jobs", json=TINY)
        assert r.status_code == 401 and r.json()["status"] == "unauthorized"
        r = c.post("/jobs", json=TINY, headers=bearer(fb_key))
        assert r.status_code == 403 and "generate" in r.json()["error"]
        r = c.post("/jobs", json=TINY, headers=bearer(mine_key))
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        unknown = c.get(f"/jobs/{uuid.uuid4().hex}", headers=bearer(other_key))
        for method, path in (("GET", f"/jobs/{job_id}"), ("GET", f"/jobs/{job_id}/result"),
                             ("DELETE", f"/jobs/{job_id}"), ("POST", f"/jobs/{job_id}/cancel")):
            r = c.request(method, path, headers=bearer(other_key))
            assert r.status_code == 404 and r.json()["status"] == "not_found", (method, path, r.text)
            assert r.json()["error"].replace(job_id, "ID") == unknown.json()["error"].replace(
                unknown.url.path.split("/")[-1], "ID")  # the same answer as for an id that never existed
        for headers in ({}, bearer("sdk_unknown")):
            r = c.get(f"/jobs/{job_id}", headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        final = _ended(c, job_id, bearer(mine_key))
        assert final["status"] == "done"  # the other key's cancel did nothing
        assert c.get(f"/jobs/{job_id}", headers=bearer(admin_key)).json()["status"] == "done"
        r = c.get(f"/jobs/{job_id}/result", headers=bearer(mine_key))
        assert r.status_code == 200
        assert store.get_generation(r.json()["images"][0]["generation_id"])["api_key_id"] == mine.id


def test_bad_bodies_and_unknown_ids(serving) -> None:  # noqa: ANN001
    r = serving.post("/jobs", json={**TINY, "steps": "2"})
    assert r.status_code == 400 and r.json()["status"] == "invalid" and r.json()["detail"][0]["loc"] == ["steps"]
    r = serving.post("/jobs", json={"prompt": ""})
    assert r.status_code == 400 and r.json()["detail"][0]["loc"] == ["prompt"]
    r = serving.post("/jobs", content=b"a=1", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    # what the served version cannot take is refused at submit, never a job that fails later
    jobs_before = serving.get("/info").json()
    r = serving.post("/jobs", json={**TINY, "width": 72, "height": 64})
    assert r.status_code == 400 and r.json()["status"] == "invalid" and "try 64" in r.json()["error"], r.text
    assert jobs_before["budget"]["memory_limit_mib"] > 0
    for method, path in (("GET", "/jobs/{}"), ("GET", "/jobs/{}/result"), ("DELETE", "/jobs/{}"),
                         ("POST", "/jobs/{}/cancel")):
        for job_id in (uuid.uuid4().hex, "not-an-id", "0" * 500):
            r = serving.request(method, path.format(job_id))
            assert r.status_code == 404 and set(r.json()) == {"error", "status"}, (method, path, r.text)
            assert r.json()["status"] == "not_found" and "POST /jobs" in r.json()["error"]


def test_a_job_whose_worker_stopped_reads_as_failed(serving) -> None:  # noqa: ANN001
    import sqlalchemy as sa

    from monitor.store import jobs, open_store

    store = open_store()
    job_id = uuid.uuid4().hex
    store.create_job(job_id, {**TINY}, 2, None, "elsewhere:1")
    with store.engine.begin() as conn:  # its worker died a while ago: no heartbeat since
        conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(
            state="running", updated=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=120)))
    body = serving.get(f"/jobs/{job_id}").json()
    assert body["status"] == "failed" and "submit it again" in body["error"]
    assert serving.get(f"/jobs/{job_id}/result").status_code == 409


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield f"sqlite:///{tmp_path / 'monitor.db'}" if request.param == "sqlite" \
        else request.getfixturevalue("postgres_db")


def test_a_version_4_store_migrates_keeping_its_rows(url: str) -> None:
    from monitor.store import MIGRATIONS, SCHEMA_VERSION, Store, _versions, api_keys, feedback, generations

    old = Store(url, migrate=False)
    now = dt.datetime.now(dt.timezone.utc)
    with old.engine.begin() as conn:
        _versions.create(conn)
        for version in (1, 2, 3, 4):
            MIGRATIONS[version - 1](conn)
            conn.execute(_versions.insert().values(version=version, applied=now))
        conn.execute(api_keys.insert().values(name="app", key_hash="h" * 64, scopes=["generate"], created=now))
        conn.execute(generations.insert().values(id="g1", created=now, prompt="p", negative_prompt="", params={},
                                                 model_version="m", latency_s=0.1, descriptors={}, api_key_id=1))
        conn.execute(feedback.insert().values(generation_id="g1", client_id="alice", rating=4, tags=[], created=now,
                                              updated=now, api_key_id=1))
    old.close()
    new = Store(url)
    assert new.schema_version() == SCHEMA_VERSION >= 5  # 6: pairs and choices (tests/test_preference_data.py)
    assert new.get_generation("g1")["api_key_id"] == 1 and new.feedback_for("g1")[0]["rating"] == 4
    assert [k.name for k in new.list_keys()] == ["app"]
    job = new.create_job("a" * 32, {"prompt": "p"}, 3, api_key_id=1, worker="w")
    assert job["state"] == "queued" and job["step"] == 0 and job["cancel_requested"] is False
    assert new.start_job("a" * 32, "w")["state"] == "running" and new.start_job("a" * 32) is None
    assert new.job_progress("a" * 32, 1, 3) is False and new.jobs_to_cancel(["a" * 32]) == []
    assert new.cancel_job("a" * 32)["cancel_requested"] is True and new.jobs_to_cancel(["a" * 32]) == ["a" * 32]
    assert new.finish_job("a" * 32, "cancelled", error="x", step=1) and not new.finish_job("a" * 32, "done")
    assert new.get_job("a" * 32)["state"] == "cancelled" and new.touch_jobs(["a" * 32]) == 0
    assert new.purge_jobs(now) == 0 and new.purge_jobs(now + dt.timedelta(hours=1)) == 1
    assert new.get_job("a" * 32) is None and new.migrate() == []
    new.close()


def test_the_jobs_settings_are_checked() -> None:
    from bento.config import ServeConfig
    from sdloop.configfile import ConfigError

    cfg = ServeConfig.from_env({})
    assert cfg.jobs == 16 and cfg.job_ttl_s == 3600
    for env, value in (("SDLOOP_JOBS", "0"), ("SDLOOP_JOBS", "many"), ("SDLOOP_JOB_TTL_S", "5")):
        with pytest.raises(ConfigError, match=env):
            ServeConfig.from_env({env: value})


def _http(method: str, url: str, body: Optional[dict] = None) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_jobs_across_the_workers_of_a_real_server(champ: Champion, tmp_path: Path) -> None:  # noqa: F811
    """`sdloop serve` with 2 worker processes: a job submitted to one is read, cancelled and answered through
    whichever worker each request reaches (the state is the store's, not a process's)."""
    import subprocess
    import sys

    from sdloop.champion import current_champion_tag
    from test_serve import _free_port

    if current_champion_tag() is None:
        promote(champ, champ.tags[0])
    port, root = _free_port(), Path(__file__).resolve().parents[1]
    env = {**os.environ, **champ.env(), "SDLOOP_POLL_S": "0.5", "SDLOOP_MAX_STEPS": "1000",
           "BENTOML_DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sdloop_cli", "serve", "--port", str(port), "--workers", "2",
                                 "--threads", "4", "--torch-threads", "1"], cwd=root, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            try:
                return _http("GET", url + "/info")[1].get("status") == "ready"
            except OSError:
                return proc.poll() is not None

        wait_for(ready, 180, 0.5)
        assert proc.poll() is None, log.read_text()[-3000:]
        code, body = _http("POST", url + "/jobs", {**TINY, "seed": 3})
        assert code == 202, body
        small = body["job_id"]
        code, body = _http("POST", url + "/jobs", {**TINY, "width": 256, "height": 256, "steps": 500,
                                                   "timeout_s": 600})
        assert code == 202, body
        big = body["job_id"]
        seen = [_http("GET", f"{url}/jobs/{big}")[1] for _ in range(3)]
        started = wait_for(lambda: (lambda s: s if s["step"] >= 3 or s["status"] in ENDED else None)(
            _http("GET", f"{url}/jobs/{big}")[1]), 120, 0.2)
        assert started["status"] == "running", (started, log.read_text()[-3000:])
        for _ in range(10):  # the requests reach either worker: each reads the same job
            code, status = _http("GET", f"{url}/jobs/{big}")
            assert code == 200 and status["status"] == "running" and status["steps"] == 500, status
        code, body = _http("DELETE", f"{url}/jobs/{big}")
        assert code in (200, 202), body
        final = wait_for(lambda: (lambda s: s if s["status"] in ENDED else None)(_http("GET", f"{url}/jobs/{big}")[1]),
                         30, 0.2)
        assert final["status"] == "cancelled" and final["step"] < 500, (final, seen)
        final = wait_for(lambda: (lambda s: s if s["status"] in ENDED else None)(
            _http("GET", f"{url}/jobs/{small}")[1]), 60, 0.2)
        assert final["status"] == "done", final
        code, result = _http("GET", f"{url}/jobs/{small}/result")
        assert code == 200 and result["images"][0]["seed"] == 3
        assert _http("GET", f"{url}/jobs/{uuid.uuid4().hex}")[0] == 404
    finally:
        stop_server(proc)
