"""The whole loop end to end, through the front doors: a real `bentoml serve` (via `sdloop serve`) serves a champion
fine-tuned on the drawing base; clients generate and rate over HTTP; `sdloop monitor check` finds the bad feedback
and recommends retraining; a retraining killed mid-way leaves the champion serving and blocks no one; `sdloop
retrain` trains a challenger that passes the gate and is promoted, and the served version changes; a challenger made
worse on purpose is rejected while the champion keeps serving; `sdloop models rollback` brings the first one back.

One module fixture builds the champion (about a minute on 2 cores: a short run and one export); the phases share
it and run in order inside one test, because each is the next turn of the same loop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from serve_support import wait_for
from test_serve_real import ROOT, _post

REQUEST = {"steps": 4, "width": 64, "height": 64}
SETTINGS = {
    "min_generations": 6, "min_feedback": 4, "min_new_feedback": 4, "current_hours": 1, "cooldown_hours": 1,
    "train_overrides": {"max_steps": 4, "validation_every": 2, "sample_every": 4, "sample_steps": 2,
                        "sample_seeds": [0], "learning_rate": 1e-3, "early_stopping_patience": 0},
    "gate_images": 8, "gate_steps": 8, "kid_margin": 0.02, "latency_budget_s": 60.0,
    "min_raters": 1,  # one client rates each image here; the rater rules have their own tests (test_retrain_raters)
    "export_settings": {"steps": 2, "reps": 1, "prompts": ["a red circle"], "seeds": [0], "latency_images": 1},
}


@pytest.fixture(scope="module")
def loop_home(drawing_base: Path, synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A workspace whose champion is a short fine-tune of the drawing base, with the test's monitor settings."""
    from finetune.training.config import TrainConfig, tiny_overrides
    from finetune.training.train import train

    home = tmp_path_factory.mktemp("loop") / "home"
    env = {"SDLOOP_HOME": str(home), "BENTOML_HOME": str(home / "bentoml"),
           "SDLOOP_STORE_URL": f"sqlite:///{home / 'monitor.db'}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        from export import demo_step

        run = home / "runs" / "champion"
        train(TrainConfig.from_dict({**tiny_overrides(), "base": str(drawing_base), "data": str(synth_data),
                                     "output": str(run), "max_steps": 8, "validation_every": 4, "sample_every": 8,
                                     "sample_steps": 2, "sample_seeds": [0], "early_stopping_patience": 0}),
              progress=False)
        demo_step(run, progress=False, **SETTINGS["export_settings"])
        (home / "monitor.yaml").write_text(yaml.safe_dump(SETTINGS))
        yield home
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def server(loop_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`sdloop serve` with one worker on a free port, as the demo starts it (sdloop_cli.demo_loop.served)."""
    from sdloop_cli.demo_loop import served

    log = tmp_path_factory.mktemp("loop-log") / "server.log"
    with served(log) as url:
        yield {"url": url, "log": log}


def _served(url: str, prompt: str = "a red circle", seed: int = 0) -> tuple[str, str]:
    """(model version, generation id) of one generation over HTTP."""
    code, headers, body = _post(url + "/txt2img", {**REQUEST, "prompt": prompt, "seed": seed})
    assert code == 200, body[:300]
    return headers["x-model-version"], headers["x-generation-id"]


def _champion() -> str:
    from sdloop.champion import current_champion_tag

    tag = current_champion_tag()
    assert tag
    return tag


def _steps_of_running(store_url: str) -> list[str]:
    from monitor.retrain_log import RetrainLog
    from monitor.store import Store

    store = Store(store_url)
    try:
        rows = [r for r in RetrainLog(store).history(limit=5) if r["status"] == "running"]
        return [s["step"] for s in rows[0]["steps"]] if rows else []
    finally:
        store.close()


def test_the_loop(server: dict, loop_home: Path, capsys: pytest.CaptureFixture) -> None:
    from sdloop_cli.main import main

    url, first = server["url"], _champion()
    # 1. clients generate and rate: most images disliked, two loved
    prompts = ["a red circle", "a blue square", "a large green star", "a small yellow circle"]
    rated = []
    for i in range(8):
        version, gid = _served(url, prompts[i % 4], seed=i)
        assert version == first
        rating = 5 if i < 2 else 1
        body = {"generation_id": gid, "rating": rating, "client_id": f"client-{i}"}
        if rating == 1:
            body["thumbs"] = "down"
        assert _post(url + "/feedback", body)[0] == 200
        rated.append((gid, rating))
    assert (loop_home / "generations").is_dir()  # the service keeps the images retraining learns from

    # 2. the monitoring check finds the bad feedback and recommends retraining (exit 1)
    capsys.readouterr()
    assert main(["monitor", "check"]) == 1
    out = capsys.readouterr().out
    assert "RETRAIN" in out and "rating" in out.lower(), out
    report = Path(out.strip().splitlines()[-1].split("report: ", 1)[1])
    assert report.is_file() and report.suffix == ".html"

    # 3. a retraining killed mid-way: the champion keeps serving, an overlapping one is refused meanwhile
    store_url = os.environ["SDLOOP_STORE_URL"]
    proc = subprocess.Popen([sys.executable, "-m", "sdloop_cli", "retrain", "--quiet"], cwd=ROOT, env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is not None or "train" in _steps_of_running(store_url), timeout=300, every=0.2)
        assert proc.poll() is None, "the retraining ended before it could be killed"
        assert main(["retrain"]) == 2
        assert "another retraining is running" in capsys.readouterr().err
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert _champion() == first and _served(url)[0] == first

    # 4. the next retraining starts clean, passes the gate and is promoted; the service picks it up
    assert main(["retrain", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "PROMOTED" in out and "interrupted" in out, out
    second = _champion()
    assert second != first
    wait_for(lambda: _served(url)[0] == second, timeout=60, every=0.5)

    # 5. a challenger made worse on purpose (its LoRA scaled 64x) is rejected; the champion keeps serving.
    # Meanwhile someone rates one of the loved images low: it leaves the data, though the champion learned from it
    loved = [gid for gid, r in rated if r == 5]
    assert _post(url + "/feedback", {"generation_id": loved[0], "rating": 1, "thumbs": "down",
                                     "client_id": "late-critic"})[0] == 200
    assert main(["retrain", "--quiet", "--set", "train_overrides.alpha=512"]) == 0
    out = capsys.readouterr().out
    assert "REJECTED" in out and "KID" in out, out
    assert _champion() == second and _served(url)[0] == second

    # 6. the history tells all three; a rollback restores the first champion in the service
    assert main(["retrain", "history", "--json"]) == 0
    history = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in history] == ["rejected", "promoted", "interrupted"]
    assert [s["step"] for s in history[0]["steps"]] == ["data", "train", "compare"]
    assert "train" in [s["step"] for s in history[2]["steps"]]
    assert main(["models", "rollback", "--reason", "test"]) == 0
    wait_for(lambda: _served(url)[0] == first, timeout=60, every=0.5)
    # the retraining data holds the two loved generations and none of the disliked ones
    record = json.loads(Path(history[1]["steps"][0]["detail"]["record"]).read_text())
    decided = {f["generation_id"]: f["decision"] for f in record["files"] if f["source"] == "generation"}
    assert {gid: decided.get(gid) for gid, _ in rated} == {gid: ("in" if r == 5 else "out") for gid, r in rated}
    later = json.loads(Path(history[0]["steps"][0]["detail"]["record"]).read_text())
    mine = [f for f in later["files"] if f["generation_id"] == loved[0]]
    assert mine and all(f["decision"] == "out" for f in mine)
    assert any(f["source"] == "champion" and "rated low since" in f["reason"] for f in mine)
    # the other loved one stays (once: its copy in the champion's data and the generation are one image)
    assert [f["decision"] for f in later["files"] if loved[1] in (f["source_path"] or "")].count("in") == 1
