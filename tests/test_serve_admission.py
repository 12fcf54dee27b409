"""Issue 17, item 2, through HTTP as a client calls: a bounded queue per worker (429 with Retry-After past it), time
in the queue counted against the deadline, the deadline checked before the first step, and a request that its measured
steps cannot finish in time refused before any step. Plus the pure ``bento.admission`` bookkeeping."""

from __future__ import annotations

import threading
from typing import Any, Iterator

import pytest
from serve_support import Champion, promote, wait_for
from test_serve import TINY, _client, _env, champ  # noqa: F401 - the shared fixtures (used by name)


@pytest.fixture()
def serving(champ: Champion, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:  # noqa: F811
    from sdloop.champion import current_champion_tag

    monkeypatch.setenv("SDLOOP_QUEUE", "1")
    if current_champion_tag() is None:
        promote(champ, champ.tags[0])
    with _client() as c:
        wait_for(lambda: c.get("/readyz").status_code == 200)
        yield c


def _steps() -> float:
    from bento.runtime import STEPS

    return STEPS._value.get()


def _waiting() -> float:
    from bento.runtime import WAITING

    return WAITING._value.get()


def test_a_full_queue_is_refused_with_429_and_retry_after(serving,  # noqa: ANN001
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    from bento.runtime import ERRORS

    original = ORTStableDiffusionPipeline.__call__
    running, release = threading.Event(), threading.Event()

    def held(self, *args, **kwargs):  # noqa: ANN001,ANN002,ANN003,ANN202 - the real pipeline, once released
        running.set()
        assert release.wait(60)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ORTStableDiffusionPipeline, "__call__", held)
    results: dict[str, Any] = {}

    def send(name: str, body: dict) -> None:
        results[name] = serving.post("/txt2img_json", json=body)

    first = threading.Thread(target=send, args=("running", TINY))
    first.start()
    assert running.wait(60)  # the first request holds the pipeline
    second = threading.Thread(target=send, args=("queued", TINY))
    second.start()
    wait_for(lambda: _waiting() == 1)  # the second waits for it: the queue (1) is full
    busy_before = ERRORS.labels(endpoint="txt2img_json", reason="busy")._value.get()
    steps_before = _steps()
    r = serving.post("/txt2img_json", json=TINY)
    assert r.status_code == 429, r.text
    assert set(r.json()) == {"error", "status"} and r.json()["status"] == "busy" and "busy" in r.json()["error"]
    assert int(r.headers["retry-after"]) >= 1
    assert ERRORS.labels(endpoint="txt2img_json", reason="busy")._value.get() == busy_before + 1
    release.set()
    first.join(60)
    second.join(60)
    assert results["running"].status_code == 200 and results["queued"].status_code == 200
    assert _steps() - steps_before == 2 * TINY["steps"] and _waiting() == 0


def test_time_waiting_in_the_queue_counts_and_runs_no_step(serving,  # noqa: ANN001
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    original = ORTStableDiffusionPipeline.__call__
    running, release = threading.Event(), threading.Event()

    def held(self, *args, **kwargs):  # noqa: ANN001,ANN002,ANN003,ANN202
        running.set()
        assert release.wait(60)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ORTStableDiffusionPipeline, "__call__", held)
    results: list = []
    first = threading.Thread(target=lambda: results.append(serving.post("/txt2img_json", json=TINY)))
    first.start()
    assert running.wait(60)
    before = _steps()
    r = serving.post("/txt2img_json", json={**TINY, "timeout_s": 0.3})  # waits for the pipeline past its deadline
    assert r.status_code == 504 and r.json()["status"] == "timeout" and "waiting for the pipeline" in r.json()["error"]
    assert _steps() == before
    release.set()
    first.join(60)
    assert results[0].status_code == 200


def test_a_deadline_that_passed_before_the_first_step_runs_none(serving) -> None:  # noqa: ANN001
    before = _steps()
    r = serving.post("/txt2img_json", json={**TINY, "timeout_s": 1e-6})
    assert r.status_code == 504 and r.json()["status"] == "timeout", r.text
    assert "after 0 denoising step" in r.json()["error"]
    assert _steps() == before


def test_a_request_its_measured_steps_cannot_finish_is_refused_up_front(serving) -> None:  # noqa: ANN001
    big = {**TINY, "width": 256, "height": 256}
    assert serving.post("/txt2img_json", json={**big, "steps": 4, "timeout_s": 60}).status_code == 200  # measured
    before = _steps()
    r = serving.post("/txt2img_json", json={**big, "steps": 200, "timeout_s": 0.2})
    assert r.status_code == 504 and r.json()["status"] == "timeout", r.text
    assert "200 steps at 256x256" in r.json()["error"] and "nothing was run" in r.json()["error"]
    assert _steps() == before
    # a shape not measured yet is judged by the model's cost measured at load: hopeless, so refused before any step
    # too (a shape it admits is stopped by its deadline within one step: test_serve's deadline test)
    r = serving.post("/txt2img_json", json={**TINY, "width": 240, "height": 240, "steps": 200, "timeout_s": 0.2})
    assert r.status_code == 504 and "predicted from the model's measured cost" in r.json()["error"], r.text
    assert _steps() == before
    assert serving.post("/txt2img_json", json=big | {"steps": 2}).status_code == 200


def test_admission_bookkeeping() -> None:
    from bento.admission import Admission, QueueFull, WontFinish

    a = Admission(queue=2)
    for _ in range(3):  # one running, two waiting
        a.enter()
    assert a.waiting == 2
    with pytest.raises(QueueFull) as e:
        a.enter()
    assert e.value.retry_after == 3  # three ahead, one second each until a request was timed
    a.ran(4.0)
    assert a.retry_after(3) == 12
    a.leave()
    a.enter()  # room again
    shape = (64, 64, 1, True)
    a.check_time(shape, 1000, 0.01)  # never measured: not refused by a guess
    a.stepped(shape, 0.01)
    a.check_time(shape, 10, 0.2)
    with pytest.raises(WontFinish):
        a.check_time(shape, 30, 0.2)


def test_the_queue_setting_is_checked() -> None:
    from bento.config import ServeConfig
    from sdloop.configfile import ConfigError

    assert ServeConfig.from_env({}).queue == 4 and ServeConfig.from_env({"SDLOOP_QUEUE": "0"}).queue == 0
    with pytest.raises(ConfigError, match="SDLOOP_QUEUE"):
        ServeConfig.from_env({"SDLOOP_QUEUE": "-1"})


def test_the_deadline_counts_from_arrival(serving, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    import time

    import bento.guard

    check_body = bento.guard.check_body

    def slow(*args: Any) -> Any:  # time spent between arrival and the handler (a body check, a busy thread pool)
        time.sleep(0.4)
        return check_body(*args)

    monkeypatch.setattr(bento.guard, "check_body", slow)
    before = _steps()
    r = serving.post("/txt2img_json", json={**TINY, "timeout_s": 0.2})
    assert r.status_code == 504 and "after 0 denoising step" in r.json()["error"], r.text
    assert _steps() == before
    assert serving.post("/txt2img_json", json={**TINY, "timeout_s": 30}).status_code == 200


def test_the_cpu_arena_is_off_so_a_large_request_gives_its_memory_back(serving) -> None:  # noqa: ANN001
    assert serving.get("/info").json()["cpu_mem_arena"] is False
