"""The service through Service.to_asgi() and starlette's TestClient: the real service class, the real onnxruntime
pipeline of the tiny run's export, the real model store and champion pointer, a real sqlite store."""

from __future__ import annotations

import base64
import io
import re
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from serve_support import Champion, fresh_workspace, promote, publish_variant, shared_store, tamper, wait_for, \
    workspace_env

TINY = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def champ(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Champion:
    return shared_store(tiny_run, tmp_path_factory)


@pytest.fixture(autouse=True)
def _env(champ: Champion, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for k, v in champ.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("SDLOOP_POLL_S", "0.2")
    monkeypatch.setenv("SDLOOP_WORKERS", "1")
    monkeypatch.delenv("SDLOOP_ADMIN_TOKEN", raising=False)
    monkeypatch.setenv("SDLOOP_IMAGE_DIR", str(tmp_path / "images"))
    for key in ("SDLOOP_TORCH_THREADS", "SDLOOP_MAX_SIDE", "SDLOOP_MODEL_TAG", "SDLOOP_BACKEND"):
        monkeypatch.delenv(key, raising=False)


_APP: list = []


def _client():  # noqa: ANN202
    """A TestClient on the service's ASGI app (built once per process: BentoML registers its metrics on build);
    each `with` runs the app's lifespan, so each test gets a fresh service instance and its own model loading."""
    from starlette.testclient import TestClient

    from bento.service import SDService

    if not _APP:
        _APP.append(SDService.to_asgi())
    return TestClient(_APP[0])


@pytest.fixture()
def client(champ: Champion) -> Iterator:
    """A service whose champion is loaded (the first version promoted if none was)."""
    from sdloop.champion import current_champion_tag

    if current_champion_tag() is None:
        promote(champ, champ.tags[0])
    with _client() as c:
        wait_for(lambda: c.get("/readyz").status_code == 200)
        yield c


def test_not_ready_until_a_champion_is_loaded(champ: Champion, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    # the same published versions in a fresh workspace whose pointer names no champion yet
    fresh = Champion(tmp_path / "home", tmp_path / "home" / "bentoml", champ.tags)
    shutil.copytree(champ.bentoml_home / "models", fresh.bentoml_home / "models")
    for k, v in fresh.env().items():
        monkeypatch.setenv(k, v)
    with _client() as c:
        assert c.get("/livez").status_code == 200
        assert c.get("/readyz").status_code == 503
        r = c.post("/txt2img_json", json=TINY)
        assert r.status_code == 503 and r.json()["status"] == "not_ready" and "promote" in r.json()["error"]
        promote(fresh, fresh.tags[1])
        wait_for(lambda: c.get("/readyz").status_code == 200)
        assert c.post("/txt2img_json", json=TINY).json()["model_version"] == fresh.tags[1]


def test_a_request_to_a_worker_still_loading_waits_for_its_model(champ: Champion) -> None:
    from sdloop.champion import current_champion_tag

    if current_champion_tag() is None:
        promote(champ, champ.tags[0])
    with _client() as c:  # no wait for /readyz: with several workers, another one may have answered it
        r = c.post("/txt2img_json", json=TINY)
        assert r.status_code == 200 and r.json()["model_version"] == current_champion_tag()


@pytest.mark.parametrize("change, field", [
    ({"width": 65}, "width"), ({"height": 4096}, "height"), ({"width": 4}, "width"), ({"steps": 0}, "steps"),
    ({"steps": 100000}, "steps"), ({"guidance_scale": -1}, "guidance_scale"), ({"num_images": 0}, "num_images"),
    ({"num_images": 99}, "num_images"), ({"seed": -1}, "seed"), ({"prompt": ""}, "prompt"),
    ({"timeout_s": 0}, "timeout_s"), ({"colour": "red"}, "colour"), ({"steps": "many"}, "steps"),
])
def test_bad_txt2img_requests_get_400_naming_the_field(client, change: dict, field: str) -> None:  # noqa: ANN001
    r = client.post("/txt2img", json={**TINY, **change})
    assert r.status_code == 400, r.text
    assert [d["loc"][-1] for d in r.json()["detail"]] == [field]


def test_missing_prompt_and_too_long_prompt(client) -> None:  # noqa: ANN001
    r = client.post("/txt2img", json={"steps": 2})
    assert r.status_code == 400 and r.json()["detail"][0]["loc"] == ["prompt"]
    r = client.post("/txt2img", json={**TINY, "prompt": "circle " * 100})
    assert r.status_code == 400 and r.json()["status"] == "prompt_too_long"
    assert int(re.search(r"prompt has (\d+) tokens", r.json()["error"]).group(1)) > 77
    assert "at most 77" in r.json()["error"]
    r = client.post("/txt2img", json={**TINY, "negative_prompt": "blur " * 90})
    assert r.status_code == 400 and "negative_prompt has" in r.json()["error"]
    r = client.post("/txt2img", json={**TINY, "num_images": 2})
    assert r.status_code == 400 and "txt2img_json" in r.json()["error"]


def test_png_and_json_answers_and_every_generation_is_logged(client, champ: Champion,  # noqa: ANN001
                                                             tmp_path: Path) -> None:
    from PIL import Image

    from monitor.store import open_store
    from sdloop.descriptors import image_descriptors

    r = client.post("/txt2img", json={**TINY, "seed": 11})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-seed"] == "11" and r.headers["x-model-version"] in champ.tags
    png = Image.open(io.BytesIO(r.content))
    assert png.size == (64, 64)
    r = client.post("/txt2img", json={**TINY, "width": 72})  # a multiple of 8 the tiny UNet's graph cannot take
    assert r.status_code == 400 and r.json()["error"].startswith("width:") and "multiples of 16" in r.json()["error"]
    r = client.post("/txt2img", json={**TINY, "seed": 11})
    r2 = client.post("/txt2img_json", json={**TINY, "num_images": 2, "width": 80})
    body = r2.json()
    assert r2.status_code == 200 and len(body["images"]) == 2
    s0, s1 = (im["seed"] for im in body["images"])
    assert s1 == s0 + 1  # the seed was random and is returned
    store = open_store()
    row = store.get_generation(r.headers["x-generation-id"])
    assert row["prompt"] == "a red circle" and row["params"]["seed"] == 11 and row["params"]["steps"] == 2
    assert row["model_version"] == r.headers["x-model-version"] and row["latency_s"] > 0
    assert row["descriptors"] == pytest.approx(image_descriptors(png))
    assert Path(row["image_path"]).read_bytes() == r.content and Path(row["image_path"]).is_relative_to(tmp_path)
    for im in body["images"]:
        logged = store.get_generation(im["generation_id"])
        decoded = Image.open(io.BytesIO(base64.b64decode(im["image_png_base64"])))
        assert decoded.size == (80, 64) and logged["params"]["seed"] == im["seed"]
    # the same seed gives the same image
    again = client.post("/txt2img", json={**TINY, "seed": 11})
    assert again.content == r.content and again.headers["x-generation-id"] != r.headers["x-generation-id"]


def test_deadline_interrupts_the_generation(client, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    from bento.runtime import STEPS

    original = ORTStableDiffusionPipeline.__call__

    def slowed(self, *args, **kwargs):  # noqa: ANN001,ANN002,ANN003,ANN202 - each step 20 ms slower than measured
        step = kwargs["callback_on_step_end"]

        def slow_step(*a):  # noqa: ANN002,ANN202
            time.sleep(0.02)
            return step(*a)

        return original(self, *args, **{**kwargs, "callback_on_step_end": slow_step})

    # after the model was measured: the worker admits the request (its steps look fast enough) and the deadline,
    # not the up-front estimate, has to stop it
    monkeypatch.setattr(ORTStableDiffusionPipeline, "__call__", slowed)
    before = STEPS._value.get()
    r = client.post("/txt2img_json", json={**TINY, "steps": 200, "timeout_s": 1.0})
    assert r.status_code == 504 and r.json()["status"] == "timeout"
    assert "during denoising" in r.json()["error"], r.text
    ran = STEPS._value.get() - before
    assert 1 <= ran < 200, ran
    time.sleep(1.0)
    assert STEPS._value.get() - before == ran  # nothing keeps denoising after the client got its answer
    assert client.post("/txt2img_json", json=TINY).status_code == 200  # and the pipeline lock was released


def test_a_request_its_measured_cost_says_cannot_finish_runs_no_step(client) -> None:  # noqa: ANN001
    from bento.runtime import STEPS

    before = STEPS._value.get()
    r = client.post("/txt2img_json", json={**TINY, "steps": 200, "width": 256, "height": 256, "timeout_s": 0.3})
    assert r.status_code == 504 and r.json()["status"] == "timeout", r.text
    assert "nothing was run" in r.json()["error"]
    assert STEPS._value.get() == before


def test_one_pipeline_serves_one_request_at_a_time(client, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    original = ORTStableDiffusionPipeline.__call__
    active, most, calls, guard = [0], [0], [0], threading.Lock()

    def counted(self, *args, **kwargs):  # noqa: ANN001,ANN002,ANN003,ANN202 - a probe around the real pipeline
        with guard:
            active[0] += 1
            calls[0] += 1
            most[0] = max(most[0], active[0])
        try:
            time.sleep(0.05)  # widen the window in which an unguarded second request would overlap
            return original(self, *args, **kwargs)
        finally:
            with guard:
                active[0] -= 1

    monkeypatch.setattr(ORTStableDiffusionPipeline, "__call__", counted)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(client.post("/txt2img_json", json=TINY)))
               for _ in range(5)]  # one running and SDLOOP_QUEUE's default 4 waiting: none is refused
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [200] * 5
    assert calls[0] == 5 and most[0] == 1


def test_feedback_round_trip_update_and_404(client) -> None:  # noqa: ANN001
    from monitor.store import open_store

    gid = client.post("/txt2img_json", json=TINY).json()["images"][0]["generation_id"]
    r = client.post("/feedback", json={"generation_id": gid, "rating": 2, "comment": "blurry", "tags": ["blur"]},
                    headers={"X-Client-Id": "alice"})
    assert r.status_code == 200 and r.json()["updated"] is False
    r2 = client.post("/feedback", json={"generation_id": gid, "rating": 5, "thumbs": "up"},
                     headers={"X-Client-Id": "alice"})
    assert r2.json() == {"status": "stored", "feedback_id": r.json()["feedback_id"], "updated": True}
    client.post("/feedback", json={"generation_id": gid, "thumbs": "down", "client_id": "bob"})
    rows = {f["client_id"]: f for f in open_store().feedback_for(gid)}
    assert set(rows) == {"alice", "bob"} and (rows["alice"]["rating"], rows["alice"]["thumbs"]) == (5, 1)
    assert rows["bob"]["thumbs"] == -1 and rows["bob"]["rating"] is None
    r = client.post("/feedback", json={"generation_id": "0" * 32, "rating": 3})
    assert r.status_code == 404 and r.json()["status"] == "not_found"
    for bad, field in (({"rating": 6}, "rating"), ({"thumbs": "sideways"}, "thumbs"), ({"tags": [""]}, "tags")):
        r = client.post("/feedback", json={"generation_id": gid, **bad})
        assert r.status_code == 400 and r.json()["detail"][0]["loc"][0] == field
    r = client.post("/feedback", json={"generation_id": gid})
    assert r.status_code == 400 and "rating" in r.text


def test_admin_reload_auth(champ: Champion, monkeypatch: pytest.MonkeyPatch) -> None:
    from sdloop.champion import current_champion_tag

    if current_champion_tag() is None:
        promote(champ, champ.tags[0])
    with _client() as c:
        wait_for(lambda: c.get("/readyz").status_code == 200)
        r = c.post("/admin/reload")
        assert r.status_code == 403 and r.json()["status"] == "disabled"
    monkeypatch.setenv("SDLOOP_ADMIN_TOKEN", "s3cret")  # read once, when the service starts
    with _client() as c:
        wait_for(lambda: c.get("/readyz").status_code == 200)
        assert c.post("/admin/reload").status_code == 401
        r = c.post("/admin/reload", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = c.post("/admin/reload", headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["model_version"]
        assert "s3cret" not in c.get("/info").text


def test_new_champion_is_picked_up_while_requests_run(client, champ: Champion) -> None:  # noqa: ANN001
    from sdloop.champion import current_champion_tag

    start = current_champion_tag()
    other = champ.tags[1] if start == champ.tags[0] else champ.tags[0]
    seen: list[tuple[int, str]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            r = client.post("/txt2img_json", json=TINY)
            seen.append((r.status_code, r.json().get("model_version", r.text)))

    workers = [threading.Thread(target=load) for _ in range(3)]
    for t in workers:
        t.start()
    try:
        wait_for(lambda: len(seen) >= 3)
        promote(champ, other)
        wait_for(lambda: any(v == other for _, v in seen[-3:]), timeout=60)
    finally:
        stop.set()
        for t in workers:
            t.join()
    assert all(code == 200 for code, _ in seen), [s for s in seen if s[0] != 200][:3]
    versions = [v for _, v in seen]
    assert versions[0] == start and versions[-1] == other


def test_pytorch_backend_is_the_configured_fallback(champ: Champion, monkeypatch: pytest.MonkeyPatch) -> None:
    from sdloop.champion import current_champion_tag

    if current_champion_tag() is None:
        promote(champ, champ.tags[0])
    monkeypatch.setenv("SDLOOP_BACKEND", "pytorch")
    with _client() as c:
        wait_for(lambda: c.get("/readyz").status_code == 200)
        r = c.post("/txt2img_json", json={**TINY, "seed": 4})
        assert r.status_code == 200 and r.json()["model_version"] == current_champion_tag()
        from monitor.store import open_store

        assert open_store().get_generation(r.json()["images"][0]["generation_id"])["params"]["backend"] == "pytorch"
        r = c.post("/txt2img_json", json={**TINY, "steps": 200, "width": 256, "height": 256, "timeout_s": 0.2})
        assert r.status_code == 504 and r.json()["status"] == "timeout"
        info = c.get("/info").json()
        assert info["backend"] == "pytorch" and info["providers"] == ["torch"] and info["native_width"] == 64


@pytest.mark.parametrize("flags, says", [(["--workers", "-1"], "--workers -1 is out of range"),
                                         (["--port", "70000"], "--port 70000 is out of range"),
                                         (["--threads", "0"], "--threads 0 is out of range")])
def test_sdloop_serve_refuses_bad_flags_in_one_line(flags: list, says: str, capsys: pytest.CaptureFixture) -> None:
    from sdloop_cli.main import main

    assert main(["serve", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {says}") and err.count("\n") == 1


# -- the export as its manifest says, the default size, refused versions ---------------------------------------------

def _use(workspace: Champion, monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    for k, v in {**workspace.env(), **env}.items():
        monkeypatch.setenv(k, v)


def test_default_size_is_the_native_size_and_other_sizes_stay_within_the_limits(client) -> None:  # noqa: ANN001
    from PIL import Image

    from monitor.store import open_store

    info = client.get("/info").json()
    assert (info["native_width"], info["native_height"]) == (64, 64)  # the tiny base draws 64 px
    assert (info["default_width"], info["default_height"]) == (64, 64)
    assert info["limits"] == {"side_multiple": 16, "min_side": 16, "max_side": 256, "max_tokens": 77,
                              "max_steps": 999}
    r = client.post("/txt2img", json={"prompt": "a red circle", "steps": 2})  # the README's curl: no size
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (64, 64)
    assert open_store().get_generation(r.headers["x-generation-id"])["params"]["width"] == 64
    r = client.post("/txt2img_json", json={"prompt": "a red circle", "steps": 2, "width": 32})
    assert r.status_code == 200
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]["image_png_base64"])))
    assert image.size == (32, 64)
    r = client.post("/txt2img", json={"prompt": "a red circle", "steps": 2, "height": 512})
    assert r.status_code == 400 and r.json()["status"] == "invalid"
    assert r.json()["error"].startswith("height:") and "16 to 256 pixels in multiples of 16" in r.json()["error"]
    assert "64x64 natively" in r.json()["error"]


def test_the_operators_max_side_caps_the_models_limits(champ: Champion, monkeypatch: pytest.MonkeyPatch) -> None:
    from sdloop.champion import current_champion_tag

    if current_champion_tag() is None:
        promote(champ, champ.tags[0])
    _client()  # the request schema is built (SDLOOP_MAX_SIDE 1024) before the worker reads its 128 below
    monkeypatch.setenv("SDLOOP_MAX_SIDE", "128")
    with _client() as c:
        wait_for(lambda: c.get("/readyz").status_code == 200)
        assert c.get("/info").json()["limits"]["max_side"] == 128
        r = c.post("/txt2img", json={"prompt": "a red circle", "steps": 2, "width": 192})
        assert r.status_code == 400 and "16 to 128 pixels" in r.json()["error"]


def test_the_export_runs_as_its_manifest_says(champ: Champion, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    fresh = fresh_workspace(champ, tmp_path)

    def one_thread(m: dict) -> None:
        m["runtime"].update(intra_op_num_threads=1, inter_op_num_threads=1, allow_spinning=False)

    tag = publish_variant(champ, fresh, tmp_path, one_thread)
    _use(fresh, monkeypatch)
    promote(fresh, tag)
    with _client() as c:
        wait_for(lambda: c.get("/readyz").status_code == 200)
        info = c.get("/info").json()
        assert info["model_version"] == tag and info["backend"] == "onnx" and info["last_error"] is None
        assert info["providers"] == ["CPUExecutionProvider"]
        # read back from the UNet's onnxruntime session, not from the manifest
        assert (info["intra_op_num_threads"], info["inter_op_num_threads"]) == (1, 1)
        assert info["allow_spinning"] is False and info["threads_from"] == "manifest"
        assert info["manifest_threads"] == 1 and info["measured_latency"]["export_s"] > 0
        assert c.post("/txt2img_json", json=TINY).status_code == 200
    monkeypatch.setenv("SDLOOP_TORCH_THREADS", "2")  # the operator's per-worker value wins, and both are shown
    with _client() as c:
        wait_for(lambda: c.get("/readyz").status_code == 200)
        info = c.get("/info").json()
        assert (info["intra_op_num_threads"], info["manifest_threads"]) == (2, 1)
        assert info["threads_from"] == "SDLOOP_TORCH_THREADS" and info["allow_spinning"] is False


def test_a_cuda_export_is_refused_on_a_cpu_machine_not_run_on_the_cpu(champ: Champion, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the export would run")
    fresh = fresh_workspace(champ, tmp_path)

    def cuda(m: dict) -> None:
        m["target"] = m["runtime"]["target"] = "cuda"
        m["runtime"]["providers"] = [["CUDAExecutionProvider", {}], ["CPUExecutionProvider", {}]]

    tag = publish_variant(champ, fresh, tmp_path, cuda)
    _use(fresh, monkeypatch, SDLOOP_MODEL_TAG=tag)  # a container's version (no champion pointer)
    with _client() as c:
        wait_for(lambda: c.get("/info").json()["last_error"])
        assert c.get("/readyz").status_code == 503
        info = c.get("/info").json()
        assert info["status"] == "not_ready" and info["model_version"] is None
        assert info["last_error"].startswith(f"{tag} was refused") and "CUDAExecutionProvider" in info["last_error"]
        r = c.post("/txt2img_json", json=TINY)
        assert r.status_code == 503 and r.json()["status"] == "not_ready"
        assert "CUDAExecutionProvider" in r.json()["error"]


def test_a_tampered_version_is_refused_and_the_champion_keeps_serving(champ: Champion, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    fresh = fresh_workspace(champ, tmp_path)
    good, bad = fresh.tags
    _use(fresh, monkeypatch, SDLOOP_POLL_S="3600", SDLOOP_ADMIN_TOKEN="t")  # loads at start and on reload only
    promote(fresh, good)
    with _client() as c:
        wait_for(lambda: c.get("/readyz").status_code == 200)
        promote(fresh, bad)  # it passed its smoke test; then a byte of it changes on disk
        tamper(fresh, bad)
        r = c.post("/admin/reload", headers={"Authorization": "Bearer t"})
        assert r.status_code == 500 and r.json()["status"] == "reload_failed"
        assert "unet/model.onnx" in r.json()["error"] and f"still serving {good}" in r.json()["error"]
        info = c.get("/info").json()
        assert info["model_version"] == good and info["last_error"].startswith(f"{bad} was refused")
        r = c.post("/txt2img_json", json=TINY)
        assert r.status_code == 200 and r.json()["model_version"] == good


def test_a_refused_champion_is_logged_once_and_answers_503_with_the_reason(
        champ: Champion, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from export import registry

    fresh = fresh_workspace(champ, tmp_path)
    good, bad = fresh.tags
    _use(fresh, monkeypatch, SDLOOP_POLL_S="0.1")
    promote(fresh, good)
    promote(fresh, bad)
    tamper(fresh, bad)  # what a restart meets after the champion's files were damaged
    with caplog.at_level(logging.INFO, logger="sdloop.serve"), _client() as c:
        wait_for(lambda: c.get("/info").json()["last_error"])
        r = c.post("/txt2img", json=TINY)
        assert r.status_code == 503 and "unet/model.onnx" in r.json()["error"]
        assert "SHA-256" in r.json()["error"] and c.get("/readyz").status_code == 503
        time.sleep(1.5)  # 15 polls
        refused = [rec for rec in caplog.records if "was refused" in rec.getMessage()]
        assert len(refused) == 1 and refused[0].exc_info is None, [rec.getMessage() for rec in refused]
        assert "\n" not in refused[0].getMessage() and "no model is served" in refused[0].getMessage()
        with workspace_env(fresh.home, fresh.bentoml_home):
            registry.rollback("its files were damaged")
        wait_for(lambda: c.get("/info").json()["model_version"] == good)
        assert c.get("/info").json()["last_error"] is None
        assert c.post("/txt2img", json=TINY).status_code == 200


# -- `sdloop serve` checks what every worker would fail on, before it starts -------------------------------------------

@pytest.fixture()
def serve_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A workspace for `sdloop serve`; the variables it sets for the server are restored after the test."""
    monkeypatch.setenv("SDLOOP_HOME", str(tmp_path / "home"))
    for key in ("BENTOML_HOME", "SDLOOP_STORE_URL", "SDLOOP_WORKERS", "SDLOOP_THREADS", "SDLOOP_BACKEND",
                "SDLOOP_TORCH_THREADS", "SDLOOP_DEADLINE_S", "SDLOOP_POLL_S"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr("os.execv", lambda *a: (_ for _ in ()).throw(AssertionError(f"exec'd {a}")))
    return tmp_path / "home"


@pytest.mark.parametrize("key, value, says", [
    ("SDLOOP_DEADLINE_S", "abc", "SDLOOP_DEADLINE_S='abc' has the wrong type: expected a number (float). Default "
                                 "deadline of a request"),
    ("SDLOOP_POLL_S", "-1", "SDLOOP_POLL_S=-1.0 is invalid: a number of seconds in (0, 3600]"),
    ("SDLOOP_MAX_SIDE", "big", "SDLOOP_MAX_SIDE='big' has the wrong type: expected an integer (int)"),
    ("SDLOOP_WORKERS", "1.5", "SDLOOP_WORKERS=1.5 has the wrong type: expected an integer (int)"),
    ("SDLOOP_BACKEND", "tensorflow", "SDLOOP_BACKEND='tensorflow' is invalid: one of onnx, pytorch"),
    ("SDLOOP_STORE_URL", "not a url", "store URL 'not a url' is not a database URL"),
])
def test_sdloop_serve_refuses_bad_settings_in_one_line(serve_env: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture, key: str, value: str,
                                                       says: str) -> None:
    from sdloop_cli.main import main

    monkeypatch.setenv(key, value)
    assert main(["serve", "--port", str(_free_port())]) == 2
    out = capsys.readouterr()
    assert out.err.startswith(f"error: {says}") and out.err.count("\n") == 1 and out.out == "", out


def test_sdloop_serve_masks_the_store_password(serve_env: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    from sdloop_cli.main import main

    monkeypatch.setenv("SDLOOP_STORE_URL", "postgresql+psycopg://sdloop:hunter2-secret@127.0.0.1:1/sdloop")
    assert main(["serve", "--port", str(_free_port())]) == 2  # nothing listens on port 1
    out = capsys.readouterr()
    assert out.err.count("\n") == 1 and "hunter2" not in out.err + out.out
    assert "sdloop:***@127.0.0.1:1" in out.err


def test_sdloop_serve_prints_the_store_masked_before_it_starts(serve_env: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture,
                                                               postgres_db: str) -> None:
    import sqlalchemy as sa

    from sdloop_cli.main import main

    url = sa.engine.make_url(postgres_db).set(password="hunter2-secret").render_as_string(hide_password=False)
    monkeypatch.setenv("SDLOOP_STORE_URL", url)  # the test server trusts local connections: any password works
    with pytest.raises(AssertionError, match="exec'd"):
        main(["serve", "--port", str(_free_port())])
    out = capsys.readouterr().out
    assert out.startswith("serving the champion of") and ":***@" in out and "hunter2" not in out


def test_sdloop_serve_refuses_a_busy_port_in_one_line(serve_env: Path, capsys: pytest.CaptureFixture) -> None:
    import socket

    from sdloop_cli.main import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: port {port} on 127.0.0.1 is already in use (another server?); stop it or choose " \
                  "another with --port.\n"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("url, shown", [
    ("postgresql+psycopg://sdloop:hunter2@db:5432/sdloop", "postgresql+psycopg://sdloop:***@db:5432/sdloop"),
    ("postgresql://u:p@ss/w@rd@db/x", "postgresql://u:***@db/x"),  # an unescaped @ or / in the password
    ("postgresql://db/x?user=u&password=hunter2&sslmode=require",
     "postgresql://db/x?user=u&password=***&sslmode=require"),
    ("sqlite:////srv/a@b/monitor.db", "sqlite:////srv/a@b/monitor.db"),
    ("postgresql://u@db/x", "postgresql://u@db/x"),
    ("postgres//u:hunter2@db", "postgres//u:***@db"),  # not a URL at all: still hidden
])
def test_mask_url(url: str, shown: str) -> None:
    from sdloop.masking import mask_text, mask_url

    assert mask_url(url) == shown
    if "hunter2" in url:
        assert "hunter2" not in mask_text(f"cannot connect to {url}: password 'hunter2' rejected", url)


def test_more_steps_than_the_scheduler_has_is_a_400_not_a_500(client,  # noqa: ANN001
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from bento.runtime import Loaded

    assert client.get("/info").json()["limits"]["max_steps"] == 999  # 1000 training timesteps: 1000 steps fail
    # SDLOOP_MAX_STEPS may allow up to 10000 (read at import): here the scheduler's limit is made smaller instead
    monkeypatch.setattr(Loaded, "max_steps", property(lambda self: 3))
    r = client.post("/txt2img_json", json={**TINY, "steps": 4})
    assert r.status_code == 400 and r.json()["status"] == "invalid", r.text
    assert "at most 3 steps" in r.json()["error"]
