"""A real `bentoml serve` (started through `sdloop serve`, 2 worker processes) on 127.0.0.1, called with
bentoml.SyncHTTPClient and plain HTTP, stopped by its PID; and `bentoml build` writing a Bento with its Dockerfile."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest
from serve_support import Champion, promote, shared_store, stop_server, wait_for

ROOT = Path(__file__).resolve().parent.parent
TINY = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64}
TOKEN = "test-admin-token"
PASSWORD = "pw-never-printed"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


@pytest.fixture(scope="module")
def champ(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Champion:
    c = shared_store(tiny_run, tmp_path_factory)
    old = {k: os.environ.get(k) for k in ("SDLOOP_HOME", "BENTOML_HOME")}
    os.environ.update({"SDLOOP_HOME": str(c.home), "BENTOML_HOME": str(c.bentoml_home)})
    try:
        from sdloop.champion import current_champion_tag

        if current_champion_tag() is None:
            promote(c, c.tags[0])
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return c


@pytest.fixture(scope="module")
def server(champ: Champion, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    port = _free_port()
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    # the store the replicas of a scaled-out service share, when this session has one (.ci/run starts it); with a
    # password (the test server trusts local connections), which must never reach the server's output
    store_url = champ.env()["SDLOOP_STORE_URL"]
    if os.environ.get("SDLOOP_TEST_POSTGRES_URL"):
        import sqlalchemy as sa

        store_url = sa.engine.make_url(os.environ["SDLOOP_TEST_POSTGRES_URL"]).set(password=PASSWORD) \
            .render_as_string(hide_password=False)
    env = {**os.environ, **champ.env(), "SDLOOP_STORE_URL": store_url, "SDLOOP_POLL_S": "0.5",
           "SDLOOP_ADMIN_TOKEN": TOKEN, "BENTOML_DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sdloop_cli", "serve", "--port", str(port), "--workers", "2",
                                 "--threads", "4", "--torch-threads", "1"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: proc.poll() is not None or _get(url + "/readyz")[0] == 200, timeout=180, every=0.5)
        assert proc.poll() is None, log.read_text()[-3000:]
        yield {"url": url, "proc": proc, "log": log, "port": port, "store_url": store_url}
    finally:
        stop_server(proc)


def test_sync_client_and_plain_http(server: dict, champ: Champion) -> None:
    import bentoml

    with bentoml.SyncHTTPClient(server["url"], timeout=120) as client:
        out = client.txt2img_json(**TINY, seed=3)
        out = out if isinstance(out, dict) else out.model_dump()
        assert out["model_version"] in champ.tags and out["images"][0]["seed"] == 3
        gid = out["images"][0]["generation_id"]
        fb = client.feedback(generation_id=gid, rating=4, client_id="carol")
        fb = fb if isinstance(fb, dict) else fb.model_dump()
        assert fb["status"] == "stored" and fb["updated"] is False
    code, headers, body = _post(server["url"] + "/txt2img", {**TINY, "seed": 3})
    assert code == 200 and body[:8] == b"\x89PNG\r\n\x1a\n" and headers["x-seed"] == "3"
    code, _, body = _post(server["url"] + "/txt2img", {**TINY, "height": 100})
    assert code == 400 and json.loads(body)["detail"][0]["loc"] == ["height"]
    code, _, body = _post(server["url"] + "/feedback", {"generation_id": "f" * 32, "rating": 1})
    assert code == 404
    code, _, body = _post(server["url"] + "/txt2img_json", {**TINY, "steps": 200, "width": 256, "height": 256,
                                                              "timeout_s": 0.2})
    assert code == 504 and json.loads(body)["status"] == "timeout"
    from monitor.store import Store

    store = Store(server["store_url"])  # the monitor's error rate counts what produced no image
    try:
        import sqlalchemy as sa
        from monitor.store import failures

        with store.engine.begin() as conn:
            kinds = conn.execute(sa.select(failures.c.kind, failures.c.endpoint)).all()
        assert ("timeout", "txt2img_json") in [tuple(k) for k in kinds]
    finally:
        store.close()


def test_info_and_the_native_size_over_http(server: dict, champ: Champion) -> None:
    code, body = _get(server["url"] + "/info")
    info = json.loads(body)
    assert code == 200 and info["status"] == "ready" and info["model_version"] in champ.tags
    assert info["providers"] == ["CPUExecutionProvider"] and info["backend"] == "onnx"
    assert info["intra_op_num_threads"] == 1 and info["threads_from"] == "SDLOOP_TORCH_THREADS"  # --torch-threads 1
    assert info["allow_spinning"] is False and info["last_error"] is None
    assert (info["native_width"], info["native_height"]) == (64, 64) and info["measured_latency"]["export_s"] > 0
    code, headers, body = _post(server["url"] + "/txt2img", {"prompt": "a red circle", "steps": 2})
    from PIL import Image
    import io

    assert code == 200 and Image.open(io.BytesIO(body)).size == (64, 64)


def test_a_second_server_on_the_same_port_is_one_line(server: dict, champ: Champion) -> None:
    env = {**os.environ, **champ.env(), "BENTOML_DO_NOT_TRACK": "true"}
    out = subprocess.run([sys.executable, "-m", "sdloop_cli", "serve", "--port", str(server["port"])], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == f"error: port {server['port']} on 127.0.0.1 is already in use (another server?); stop it " \
                         "or choose another with --port.\n"


def test_metrics_count_generations_feedback_errors_and_latency(server: dict) -> None:
    _post(server["url"] + "/txt2img_json", TINY)
    _post(server["url"] + "/txt2img", {**TINY, "prompt": "circle " * 100})
    code, text = _get(server["url"] + "/metrics")
    text = text.decode()
    assert code == 200
    for name in ("sdloop_generations_total", "sdloop_errors_total", "sdloop_generation_latency_seconds_bucket",
                 "sdloop_denoise_steps_total", "bentoml_service_request_total"):
        assert name in text, name
    assert 'reason="prompt_too_long"' in text


def test_admin_auth(server: dict) -> None:
    assert _post(server["url"] + "/admin/reload", {})[0] == 401
    assert _post(server["url"] + "/admin/reload", {}, {"Authorization": "Bearer nope"})[0] == 401
    code, _, body = _post(server["url"] + "/admin/reload", {}, {"Authorization": f"Bearer {TOKEN}"})
    assert code == 200 and json.loads(body)["status"] == "ok"


def test_concurrent_feedback_over_http_loses_no_row(server: dict, champ: Champion) -> None:
    from monitor.store import Store

    gid = json.loads(_post(server["url"] + "/txt2img_json", TINY)[2])["images"][0]["generation_id"]

    def post(i: int) -> int:
        return _post(server["url"] + "/feedback", {"generation_id": gid, "rating": 1 + i % 5,
                                                   "client_id": f"load-{i}"})[0]

    with ThreadPoolExecutor(max_workers=16) as pool:
        codes = list(pool.map(post, range(200)))
    assert codes == [200] * 200
    rows = Store(server["store_url"]).feedback_for(gid)
    assert sorted(r["client_id"] for r in rows) == sorted(f"load-{i}" for i in range(200))


def test_promotion_reaches_every_worker_without_failing_requests(server: dict, champ: Champion) -> None:
    from sdloop.champion import current_champion_tag

    os.environ.update({"SDLOOP_HOME": str(champ.home), "BENTOML_HOME": str(champ.bentoml_home)})
    start = current_champion_tag()
    other = champ.tags[1] if start == champ.tags[0] else champ.tags[0]
    seen: list[tuple[int, str]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            code, _, body = _post(server["url"] + "/txt2img_json", TINY)
            seen.append((code, json.loads(body).get("model_version", "") if code == 200 else body.decode()))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(seen) >= 4, timeout=60)
        promote(champ, other)
        switched = len(seen)
        # bounded: both workers poll every 0.5 s; after that, 8 answers in a row come from the new champion
        wait_for(lambda: len(seen) > switched + 8 and all(v == other for _, v in seen[-8:]), timeout=90)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert all(code == 200 for code, _ in seen), [s for s in seen if s[0] != 200][:3]
    assert seen[0][1] == start


def _steps_run(url: str) -> float:
    """Denoising steps the server's workers have run (their metrics summed by BentoML's multiprocess collector)."""
    code, text = _get(url + "/metrics")
    assert code == 200
    return sum(float(line.split()[-1]) for line in text.decode().splitlines()
               if line.startswith("sdloop_denoise_steps_total"))


def test_clients_that_disconnect_cancel_their_generations_within_a_step(server: dict) -> None:
    body = json.dumps({**TINY, "steps": 200, "width": 256, "height": 256, "timeout_s": 600}).encode()
    before = _steps_run(server["url"])
    sockets = []
    for _ in range(3):  # both workers busy, one more waiting in a queue
        s = socket.create_connection(("127.0.0.1", server["port"]), timeout=30)
        s.sendall(b"POST /txt2img_json HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        sockets.append(s)
    wait_for(lambda: _steps_run(server["url"]) - before >= 2, timeout=60, every=0.2)  # they are denoising
    for s in sockets:
        s.close()
    # within a step each: the counter stops well short of the 600 steps the three asked for, and stays there
    wait_for(lambda: _stable(server["url"]), timeout=30, every=0.1)
    ran = _steps_run(server["url"]) - before
    assert ran < 300, f"{ran} steps ran for three clients that went away"
    started = __import__("time").monotonic()
    code, _, _ = _post(server["url"] + "/txt2img_json", TINY)  # the next caller is not kept waiting by them
    assert code == 200 and __import__("time").monotonic() - started < 30
    wait_for(lambda: server["log"].read_text().count("status=499") >= 3, timeout=30)  # BentoML's access log


def _stable(url: str) -> bool:
    import time

    first = _steps_run(url)
    time.sleep(1.0)
    return _steps_run(url) == first



def test_stopped_by_pid(server: dict) -> None:
    proc = server["proc"]
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) is not None
    log = server["log"].read_text(errors="replace")
    assert log.startswith("serving the champion of") and PASSWORD not in log  # masked in every line
    wait_for(lambda: _get(server["url"] + "/livez")[0] == 0, timeout=30)
    with socket.socket() as s:  # the port is free again: no worker was left behind holding it
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", server["port"]))


def test_bentoml_build_writes_a_bento_with_a_non_root_dockerfile(champ: Champion, tmp_path: Path) -> None:
    from sdloop.champion import current_champion_tag

    env = {**os.environ, **champ.env(), "BENTOML_DO_NOT_TRACK": "true"}
    out = subprocess.run([sys.executable, "-m", "bentoml", "build", str(ROOT), "--output", "tag"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    tag = out.stdout.strip().splitlines()[-1].split("__tag__:")[-1]
    name, version = tag.split(":")
    bento = champ.bentoml_home / "bentos" / name / version
    os.environ.update({"SDLOOP_HOME": str(champ.home), "BENTOML_HOME": str(champ.bentoml_home)})
    info = (bento / "bento.yaml").read_text()
    assert current_champion_tag() in info  # the Bento carries the champion model
    docker = (bento / "env" / "docker" / "Dockerfile").read_text()
    lines = [ln.strip() for ln in docker.splitlines() if ln.strip() and not ln.startswith("#")]
    copies = [ln for ln in lines if ln.startswith("COPY")]
    assert copies and all("--chown=bentoml:bentoml" in ln for ln in copies)
    user = [i for i, ln in enumerate(lines) if ln.startswith("USER ")]
    assert lines[user[-1]] == "USER bentoml" and user[-1] > lines.index(copies[-1])
    assert "SDLOOP_MODEL_TAG" in docker and "torch==2.13.0" in (bento / "env/python/requirements.txt").read_text()
    for path in [*bento.rglob("*"), *Path(current_champion_path(champ)).rglob("*")]:
        if path.is_file():
            assert path.stat().st_mode & stat.S_IROTH, f"{path} is not readable by the container's user"
    assert (bento / "src" / "bento" / "service.py").is_file() and (bento / "src" / "monitor" / "store.py").is_file()
    # what the service imports is all in the Bento: imported from the Bento's sources, no module of ours may come
    # from anywhere else (this checkout's editable install would quietly fill the gaps here, not in the container)
    code = ("import sys, bento.service, bento.handlers, bento.runtime, monitor.store, sdloop.exportload, "
            "sdloop.modelstore; print('\\n'.join(sorted(m.__file__ for n, m in list(sys.modules.items()) "
            "if n.split('.')[0] in ('bento', 'monitor', 'sdloop') and getattr(m, '__file__', None))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=bento / "src", env={**env, "SDLOOP_PACK_CHAMPION": "0"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    files = out.stdout.split()
    assert any(f.endswith("store_engine.py") for f in files)
    assert [f for f in files if not f.startswith(str(bento / "src"))] == []


def test_containerize(champ: Champion) -> None:
    """`bentoml containerize` builds the image from the Dockerfile checked above; it needs a docker engine."""
    import shutil

    engine = shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True, timeout=30)
    if not engine or engine.returncode != 0:
        pytest.skip("bentoml containerize needs a running docker engine, which this machine lacks (the docker CLI "
                    "cannot reach a daemon); the Bento's Dockerfile is checked by reading it instead")
    if os.environ.get("SDLOOP_TEST_CONTAINERIZE") != "1":
        pytest.skip("a docker engine is here, but the image build downloads packages: set SDLOOP_TEST_CONTAINERIZE=1")
    env = {**os.environ, **champ.env(), "BENTOML_DO_NOT_TRACK": "true"}
    out = subprocess.run([sys.executable, "-m", "bentoml", "containerize", "sdloop:latest", "-t", "sdloop:test"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stderr[-3000:]


def current_champion_path(champ: Champion) -> str:
    from bento.runtime import model_dir
    from sdloop.champion import current_champion_tag

    return str(model_dir(current_champion_tag())[1])


def test_bentoml_build_without_a_champion_refuses_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "SDLOOP_HOME": str(tmp_path / "home"), "BENTOML_HOME": str(tmp_path / "bentoml"),
           "BENTOML_DO_NOT_TRACK": "true"}
    env.pop("SDLOOP_PACK_CHAMPION", None)
    out = subprocess.run([sys.executable, "-m", "bentoml", "build", str(ROOT), "--output", "tag"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0, out.stdout[-2000:]
    text = (out.stdout + out.stderr).strip()
    assert "Traceback" not in text and "no champion to pack" in text and "sdloop models promote" in text, text
    assert not (tmp_path / "bentoml" / "bentos").exists() or not any((tmp_path / "bentoml" / "bentos").rglob("*"))
