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
from serve_support import Champion, promote, shared_store, wait_for

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


@pytest.mark.parametrize("change, field", [
    ({"width": 65}, "width"), ({"height": 4096}, "height"), ({"width": 32}, "width"), ({"steps": 0}, "steps"),
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


def test_deadline_interrupts_the_generation(client) -> None:  # noqa: ANN001
    from bento.runtime import STEPS

    before = STEPS._value.get()
    r = client.post("/txt2img_json", json={**TINY, "steps": 200, "width": 512, "height": 512, "timeout_s": 0.3})
    assert r.status_code == 504 and r.json()["status"] == "timeout"
    ran = STEPS._value.get() - before
    assert 1 <= ran < 200, ran
    time.sleep(1.0)
    assert STEPS._value.get() - before == ran  # nothing keeps denoising after the client got its answer
    assert client.post("/txt2img_json", json=TINY).status_code == 200  # and the pipeline lock was released


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
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [200] * 6
    assert calls[0] == 6 and most[0] == 1


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


def test_admin_reload_auth(client, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    r = client.post("/admin/reload")
    assert r.status_code == 403 and r.json()["status"] == "disabled"
    monkeypatch.setenv("SDLOOP_ADMIN_TOKEN", "s3cret")
    assert client.post("/admin/reload").status_code == 401
    r = client.post("/admin/reload", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = client.post("/admin/reload", headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["model_version"]


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


@pytest.mark.parametrize("flags, says", [(["--workers", "-1"], "--workers -1 is out of range"),
                                         (["--port", "70000"], "--port 70000 is out of range"),
                                         (["--threads", "0"], "--threads 0 is out of range")])
def test_sdloop_serve_refuses_bad_flags_in_one_line(flags: list, says: str, capsys: pytest.CaptureFixture) -> None:
    from sdloop_cli.main import main

    assert main(["serve", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {says}") and err.count("\n") == 1
