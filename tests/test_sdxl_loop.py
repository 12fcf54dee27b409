"""The whole loop on the tiny SDXL base, through the command line and HTTP (issue 19): `sdloop base tiny --family sdxl`
-> `sdloop data synth` -> `sdloop train` (a few steps at 64 px) -> `sdloop eval` -> `sdloop export` (the LoRA fused
into the UNet and both text encoders, parity against PyTorch) -> `sdloop models publish`/`promote` -> a real
`sdloop serve` on 127.0.0.1 -> txt2img and feedback over HTTP -> `sdloop retrain` promotes or rejects with reasons.

Beside the loop: stock optimum's ``ORTStableDiffusionXLPipeline`` loads the export as it is, and an export whose
manifest names the wrong family is refused in one line naming both families at publish and at load in the running
service (``last_error``), while the champion keeps serving.

One module fixture builds the workspace once (the CI budget: tiny sizes, 2-step checks, 4 training steps).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from serve_support import stop_server, wait_for
from test_serve_real import ROOT, _free_port, _get, _post

REQUEST = {"steps": 2}
TOKEN = "sdxl-admin-token"
PROMPTS = ["a red circle", "a blue square", "a large green star", "a small yellow circle"]
TRAIN = {"max_steps": 4, "validation_every": 2, "sample_every": 4, "sample_steps": 2, "sample_seeds": [0],
         "early_stopping_patience": 0, "train_text_encoder": True}   # LoRA on the UNet and both text encoders
CHECKS = ["--steps", "2", "--prompt", "a red circle", "--set", "seeds=[0]", "--set", "reps=1", "--set",
          "latency_images=1", "--quiet"]
# one thread: a tiny model gains nothing from two, and two OpenMP threads stall on a shared 2-core machine
EXPORT = [*CHECKS, "--threads", "1"]
SETTINGS = {
    "min_generations": 4, "min_feedback": 4, "min_new_feedback": 4, "current_hours": 1, "cooldown_hours": 1,
    "train_overrides": {"max_steps": 2, "validation_every": 2, "sample_every": 2, "sample_steps": 2,
                        "sample_seeds": [0], "early_stopping_patience": 0},
    "gate_images": 4, "gate_steps": 2, "kid_margin": 0.05, "latency_budget_s": 60.0, "min_raters": 1,
    "export_settings": {"steps": 2, "reps": 1, "prompts": ["a red circle"], "seeds": [0], "latency_images": 1,
                        "threads": 1},
}


def _cli(*argv: str) -> tuple[int, str, str]:
    """`sdloop ARGV` in this process, as a user types it: (exit code, stdout, stderr)."""
    import contextlib
    import io

    from sdloop_cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _ok(*argv: str) -> str:
    code, out, err = _cli(*argv)
    assert code == 0, f"sdloop {' '.join(argv)} -> {code}\n{out[-2000:]}\n{err[-2000:]}"
    return out


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A workspace whose champion is a short LoRA run on the tiny SDXL base, made through the command line."""
    from conftest import reset_bentoml_home
    from finetune.training.config import tiny_overrides

    root = tmp_path_factory.mktemp("sdxl-loop")
    home = root / "home"
    env = {"SDLOOP_HOME": str(home), "BENTOML_HOME": str(home / "bentoml"),
           "SDLOOP_STORE_URL": f"sqlite:///{home / 'monitor.db'}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    reset_bentoml_home()
    try:
        base, data, run, export = root / "base", root / "data", home / "runs" / "sdxl", root / "export"
        _ok("base", "tiny", str(base), "--family", "sdxl", "--weights", "random")
        _ok("data", "synth", str(data), "--n", "16")
        config = root / "train.yaml"
        config.write_text(yaml.safe_dump({**tiny_overrides(), **TRAIN, "base": str(base), "data": str(data),
                                          "output": str(run)}))
        _ok("train", "--config", str(config), "--quiet")
        _ok("eval", str(run), "--n", "4", "--steps", "2", "--bootstrap", "50", "--quiet")
        _ok("export", str(run), "--output", str(export), *EXPORT)
        tag = _ok("models", "publish", str(export)).split()[1]
        _ok("models", "promote", tag, "--reason", "the first SDXL champion")
        (home / "monitor.yaml").write_text(yaml.safe_dump(SETTINGS))
        yield {"home": home, "root": root, "base": base, "run": run, "export": export, "tag": tag}
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        reset_bentoml_home()


@pytest.fixture(scope="module")
def server(loop: dict[str, Any]) -> Iterator[str]:
    """A real `sdloop serve` (one worker) on a free local port; it loads new champions on POST /admin/reload only, so
    what it serves changes exactly when the test says."""
    port = _free_port()
    env = {**os.environ, "SDLOOP_HOME": str(loop["home"]), "BENTOML_HOME": str(loop["home"] / "bentoml"),
           "SDLOOP_STORE_URL": f"sqlite:///{loop['home'] / 'monitor.db'}", "SDLOOP_POLL_S": "3600",
           "SDLOOP_ADMIN_TOKEN": TOKEN, "BENTOML_DO_NOT_TRACK": "true"}
    log = loop["root"] / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sdloop_cli", "serve", "--port", str(port), "--workers", "1"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: proc.poll() is not None or _get(url + "/readyz")[0] == 200, timeout=300, every=0.3)
        assert proc.poll() is None, log.read_text()[-3000:]
        yield url
    finally:
        stop_server(proc)


def _forged(export: Path, root: Path, family: str) -> Path:
    """A copy of ``export`` under a new export id whose manifest says ``family``: hand-edited, or another tool's."""
    from sdloop.exportfolder import MARKER

    folder = root / f"forged-{family}-{uuid.uuid4().hex[:6]}"
    shutil.copytree(export, folder)
    export_id = uuid.uuid4().hex
    for name in ("manifest.json", MARKER):
        data = json.loads((folder / name).read_text())
        data["export_id"] = export_id
        if name == "manifest.json":
            data["family"] = family
        (folder / name).write_text(json.dumps(data))
    return folder


def _reload(url: str) -> tuple[int, dict]:
    code, _, body = _post(url + "/admin/reload", {}, {"Authorization": f"Bearer {TOKEN}"})
    return code, json.loads(body or b"{}")


def _info(url: str) -> dict:
    code, body = _get(url + "/info")
    assert code == 200
    return json.loads(body)


def test_the_export_is_an_sdxl_one_that_stock_optimum_loads(loop: dict[str, Any]) -> None:
    import numpy as np
    import torch
    from optimum.onnxruntime import ORTStableDiffusionXLPipeline

    export = loop["export"]
    m = json.loads((export / "manifest.json").read_text())
    assert m["family"] == "sdxl" and m["parity"]["passed"] and m["native_width"] == m["native_height"] == 64
    assert {"text_encoder", "text_encoder_2", "unet", "vae_decoder"} <= set(m["parts"])
    assert {"tokenizer_2/vocab.json", "text_encoder_2/model.onnx"} <= set(m["files"])
    assert m["limits"]["max_tokens"] == 77
    assert set(m["fusion"]["fused_layers"]) == {"unet", "text_encoder", "text_encoder_2"}, m["fusion"]
    assert m["parity"]["max_pixel_difference"] <= m["parity"]["tolerance"]["max_pixel_difference"]
    pipe = ORTStableDiffusionXLPipeline.from_pretrained(str(export))  # as is: no export flag, no options
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all() and float(image.max() - image.min()) > 0.01


def _has(provider: str) -> bool:
    import onnxruntime as ort

    return provider in ort.get_available_providers()


@pytest.mark.skipif(not _has("CUDAExecutionProvider"),
                    reason="needs an NVIDIA GPU with onnxruntime-gpu (none on this machine or in CI)")
def test_the_sdxl_run_exports_for_cuda_in_fp16_on_a_gpu(loop: dict[str, Any], tmp_path: Path) -> None:
    import onnx

    out = tmp_path / "cuda"
    _ok("export", str(loop["run"]), "--output", str(out), "--target", "cuda", *CHECKS)
    m = json.loads((out / "manifest.json").read_text())
    assert m["family"] == "sdxl" and m["precision"] == "fp16" and m["parity"]["passed"]
    assert m["runtime"]["providers"][0][0] == "CUDAExecutionProvider" and m["runtime"]["use_io_binding"]
    assert {"unet", "text_encoder", "text_encoder_2", "vae_decoder"} <= set(m["optimizations"]["cuda"])
    unet = onnx.load(str(out / "unet" / "model.onnx"), load_external_data=False)
    assert unet.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_a_manifest_naming_the_wrong_family_is_refused_at_publish(loop: dict[str, Any]) -> None:
    forged = _forged(loop["export"], loop["root"], "sd1")
    code, out, err = _cli("models", "publish", str(forged))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "says sd1" in err and "sdxl export" in err and "Traceback" not in err


@pytest.mark.parametrize("part", ["text_encoder_2", "tokenizer_2"])
def test_publish_requires_the_sdxl_components(loop: dict[str, Any], part: str) -> None:
    from sdloop.exportfolder import file_table

    lacking = _forged(loop["export"], loop["root"], "sdxl")
    shutil.rmtree(lacking / part)
    m = json.loads((lacking / "manifest.json").read_text())
    m["files"] = file_table(lacking)  # re-tabled, as a careful forger would: only the family's parts tell
    (lacking / "manifest.json").write_text(json.dumps(m))
    code, out, err = _cli("models", "publish", str(lacking))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"lists no {part}" in err and "an sdxl export needs it" in err


def test_an_sd1_export_relabelled_sdxl_is_refused_at_publish_and_load(
        loop: dict[str, Any], tiny_run: Path, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    from serve_support import shared_store

    from sdloop.exportfolder import ExportFolderError
    from sdloop.exportload import open_export

    sd1 = shared_store(tiny_run, tmp_path_factory).source  # the serving tests' SD 1.x export (built once a session)
    forged = _forged(sd1, tmp_path, "sdxl")
    code, out, err = _cli("models", "publish", str(forged))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "says sdxl" in err and "sd1 export" in err
    with pytest.raises(ExportFolderError, match="says sdxl but its files are an sd1 export"):
        open_export(forged)  # the service's loader: the same line, and nothing loads


def test_an_sd1_run_on_an_sdxl_base_is_one_line_at_export(loop: dict[str, Any], tiny_run: Path,
                                                          tmp_path: Path) -> None:
    run = tmp_path / "sd1-run"
    shutil.copytree(tiny_run, run)
    m = json.loads((run / "manifest.json").read_text())
    m.update(base_model=str(loop["base"]), base_model_relative=None)  # its base folder swapped for an SDXL one
    (run / "manifest.json").write_text(json.dumps(m))
    code, out, err = _cli("export", str(run), "--output", str(tmp_path / "export"), *EXPORT)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "sd1" in err and "sdxl" in err and "Traceback" not in err
    assert not (tmp_path / "export").exists()


def test_the_sdxl_loop_over_http(loop: dict[str, Any], server: str) -> None:
    from export import registry

    url, first = server, loop["tag"]
    info = _info(url)
    assert info["model_version"] == first and info["family"] == "sdxl" and info["last_error"] is None
    assert (info["native_width"], info["native_height"]) == (64, 64) and info["limits"]["max_tokens"] == 77
    assert info["budget"]["cost_model"]["samples"], "the memory budget was calibrated on the SDXL model"

    # clients generate at the native size and rate: two loved, the rest disliked
    for i in range(6):
        code, headers, body = _post(url + "/txt2img", {**REQUEST, "prompt": PROMPTS[i % 4], "seed": i})
        assert code == 200 and headers["x-model-version"] == first, body[:300]
        assert body[:8] == b"\x89PNG\r\n\x1a\n"
        rating = 5 if i < 2 else 1
        fb = {"generation_id": headers["x-generation-id"], "rating": rating, "client_id": f"client-{i}"}
        assert _post(url + "/feedback", {**fb, **({"thumbs": "down"} if rating == 1 else {})})[0] == 200
    code, _, body = _post(url + "/txt2img", {**REQUEST, "prompt": "red " * 90})
    assert code == 400 and json.loads(body)["status"] == "prompt_too_long"

    # a version whose manifest was changed to say sd1 after its promotion: refused in one line, the champion serves
    forged = _forged(loop["export"], loop["root"], "sdxl")
    bad = registry.publish(forged)[0]
    registry.promote(bad, "a copy")
    stored = registry.show(bad).path / "manifest.json"
    stored.chmod(0o644)
    stored.write_text(json.dumps({**json.loads(stored.read_text()), "family": "sd1"}))
    code, body = _reload(url)
    assert code == 500 and "says sd1" in body["error"] and "sdxl export" in body["error"], body
    info = _info(url)
    assert info["model_version"] == first and info["last_error"].startswith(f"{bad} was refused")
    assert "sd1" in info["last_error"] and "sdxl" in info["last_error"] and "\n" not in info["last_error"]
    assert _post(url + "/txt2img", {**REQUEST, "prompt": "a red circle"})[1]["x-model-version"] == first
    _ok("models", "rollback", "--reason", "its manifest was edited")
    assert _reload(url)[0] == 200 and _info(url)["last_error"] is None

    # the retraining learns from the feedback, then promotes or rejects with its reasons
    code, out, err = _cli("retrain", "--quiet")
    assert code == 0, out + err
    assert ("PROMOTED" in out or "REJECTED" in out) and "  - " in out, out
    champion = registry.read_state().get("champion")
    assert _reload(url)[0] == 200
    info = _info(url)
    assert info["model_version"] == champion and info["family"] == "sdxl"
    if "PROMOTED" in out:
        assert champion != first
        m = json.loads((registry.show(champion).path / "manifest.json").read_text())
        assert m["family"] == "sdxl" and m["source_run"]["name"].startswith("retrain-")
    code, headers, _ = _post(url + "/txt2img", {**REQUEST, "prompt": "a blue square"})
    assert code == 200 and headers["x-model-version"] == champion
