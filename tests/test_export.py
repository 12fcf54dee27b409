"""sdloop export: the fused LoRA equals the unfused one, the ONNX export loads in stock optimum and matches PyTorch,
large graphs use external data, parity failures are reported, int8 passes its KID check, unavailable targets say
what is missing, the manifest is the export contract (every file hashed, native size, limits, runtime), --output
never replaces what is not ours to replace, a killed export's leftovers go at the next export, and the command line
works as a user types it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export import onnx as ox
from export.build import ExportConfig, build_export
from export.errors import ExportError, ParityError, TargetUnavailableError
from export.fuse import FUSE_TOLERANCE, fuse_and_check, generate, lora_layers
from sdloop.exportfolder import MARKER, SCHEMA, ExportFolder
from sdloop.runfolder import RunFolder
from sdloop_cli.main import main

CASES = [("a red circle on a blue background", 0), ("a green square", 1)]
QUICK = {"prompts": [p for p, _ in CASES], "seeds": [0], "steps": 3, "threads": 1, "reps": 1, "latency_images": 1}
NO_GPU = "needs an NVIDIA GPU with onnxruntime-gpu (none on this machine or in CI); run when a GPU is lent"


def _has(provider: str) -> bool:
    return provider in ort.get_available_providers()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: the models are tiny, and two spinning threads slow down badly when the 2 cores are shared."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def te_run(tiny_base: Path, synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run that trains the text encoder too (and the UNet's convolutions, as the tiny recipe does)."""
    from finetune.training.config import TrainConfig, tiny_overrides
    from finetune.training.train import train

    out = tmp_path_factory.mktemp("runs") / "te"
    values = {**tiny_overrides(), "base": str(tiny_base), "data": str(synth_data), "output": str(out),
              "max_steps": 3, "validation_every": 3, "learning_rate": 2e-2, "train_text_encoder": True,
              "text_encoder_lr": 2e-2, "sample_steps": 1, "sample_seeds": [0], "early_stopping_patience": 0}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SDLOOP_HOME", str(tmp_path_factory.mktemp("home")))
        train(TrainConfig.from_dict(values), progress=False)
    return out


@pytest.fixture(scope="module")
def fp32_export(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run exported once for the module, with external data forced on the UNet (3.4 MB > 1 MB)."""
    out = tmp_path_factory.mktemp("exports") / "fp32"
    build_export(tiny_run, out, ExportConfig(**QUICK, external_data_mb=1.0), progress=False)
    return out


@pytest.fixture(scope="module")
def fused_reference(tiny_run: Path) -> list[np.ndarray]:
    """The fused PyTorch pipeline's images for CASES (the parity reference)."""
    pipe = RunFolder(tiny_run).load_pipeline(lora=True)
    _, images, _ = fuse_and_check(pipe, CASES, 3, 64, 7.5)
    return images


def test_fusion_equals_unfused_lora_and_leaves_no_lora_layer(te_run: Path, tiny_base: Path) -> None:
    run = RunFolder(te_run)
    pipe = run.load_pipeline(lora=True)
    before = lora_layers(pipe)
    assert any(n.startswith("text_encoder.") for n in before), "the text encoder's LoRA is loaded"
    assert any(".conv1" in n or ".conv2" in n for n in before), "the UNet's convolution LoRA is loaded"
    assert any(".attn1.to_q" in n for n in before) and any(".ff.net" in n for n in before)
    report, fused, _ = fuse_and_check(pipe, CASES[:1], 3, 64, 7.5)
    assert lora_layers(pipe) == [], "no LoRA layer or parameter is left anywhere"
    assert set(report.fused_layers) == {"unet", "text_encoder"}
    assert report.max_difference <= FUSE_TOLERANCE and report.images_compared == 1
    base = run.load_pipeline(lora=False)
    plain, _ = generate(base, CASES[:1], 3, 64, 7.5)
    assert np.abs(plain[0] - fused[0]).max() > 10 * FUSE_TOLERANCE, "the fused weights are not the base's"


def test_export_loads_in_stock_optimum_and_matches_pytorch(fp32_export: Path, fused_reference, tiny_run) -> None:
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    pipe = ORTStableDiffusionPipeline.from_pretrained(str(fp32_export))   # as is: no export flag, no options
    images, _ = generate(pipe, CASES, 3, 64, 7.5)
    figures = ox.compare_images(fused_reference, images)
    assert figures["max_pixel_difference"] < 1.0 and figures["psnr"] > 50
    m = json.loads((fp32_export / "manifest.json").read_text())
    assert m["source_run"]["path"] == str(Path(tiny_run).resolve()) and m["source_run"]["manifest"]["best_step"]
    assert m["target"] == "cpu" and m["precision"] == "fp32" and m["parity"]["passed"]
    assert m["parity"]["max_pixel_difference"] <= m["parity"]["tolerance"]["max_pixel_difference"]
    assert m["latency"]["pytorch_s"] > 0 and m["latency"]["export_s"] > 0 and m["latency"]["threads"] == 1
    assert {"onnxruntime", "optimum", "torch", "diffusers"} <= set(m["packages"])
    assert m["base_fingerprint"] and m["dataset_fingerprint"] and "git_commit" in m
    assert set(m["parts"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    assert set(m["optimizations"]["graph"]) == set(m["parts"]) and m["runtime"]["intra_op_num_threads"] == 1
    assert (fp32_export / MARKER).is_file()


def test_manifest_is_the_export_contract(fp32_export: Path) -> None:
    folder = ExportFolder(fp32_export)
    manifest = folder.verify(cache=False)            # every file's size and SHA-256 as written
    marker = folder.marker()
    assert marker["finished"] is True and marker["export_id"] == manifest.export_id
    assert manifest.schema_version == SCHEMA == 2 and manifest.native_width == manifest.native_height == 64
    assert manifest.limits["side_multiple"] == 8 * 2 ** 1, "the tiny UNet halves its latent once"
    assert manifest.limits["max_side"] == 256 and manifest.limits["max_tokens"] == 77
    assert {"unet/model.onnx", "unet/model.onnx_data", "tokenizer/vocab.json", "model_index.json"} <= set(
        manifest.files)
    assert MARKER not in manifest.files and "manifest.json" not in manifest.files
    assert manifest.runtime["allow_spinning"] is False and manifest.runtime["providers"][0][0] == "CPUExecutionProvider"
    assert manifest.source_run["name"] == "tiny-run" and manifest.parity["passed"] and manifest.latency["export_s"]


def test_output_rules(fp32_export: Path, tiny_run: Path, tmp_path: Path, workspace: Path, capsys) -> None:
    from export.output import prepare_output

    other = tmp_path / "other-run-export"
    shutil.copytree(fp32_export, other)
    m = json.loads((other / "manifest.json").read_text())
    m["source_run"]["path"] = str(tmp_path / "another-run")
    (other / "manifest.json").write_text(json.dumps(m))
    assert main(["export", str(tiny_run), "--output", str(other), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds a finished export of run" in err and "\n" not in err
    assert prepare_output(fp32_export, tiny_run) == fp32_export.resolve(), "the same run may replace its export"
    unfinished = tmp_path / "unfinished"
    shutil.copytree(fp32_export, unfinished)
    (unfinished / MARKER).write_text(json.dumps({"kind": "sdloop-export", "export_id": "x", "finished": False}))
    assert prepare_output(unfinished, tmp_path / "any-run") == unfinished.resolve()


def test_large_graphs_use_external_data_and_pass_the_checker(fp32_export: Path) -> None:
    unet = fp32_export / "unet" / "model.onnx"
    data = fp32_export / "unet" / "model.onnx_data"
    assert data.is_file() and data.stat().st_size > 3_000_000 and unet.stat().st_size < 1_000_000
    head = onnx.load(str(unet), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in head.graph.initializer)
    assert not (fp32_export / "text_encoder" / "model.onnx_data").exists(), "small graphs stay single files"
    for path in ox.graph_paths(fp32_export).values():
        onnx.checker.check_model(str(path))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(data.stat().st_mode) == 0o666 & ~umask, "the exporter's 0600 data file honours the umask"
    # moving the graph without its data breaks it, and the checker says so by path
    broken = fp32_export.parent / "no-data"
    shutil.copytree(fp32_export, broken)
    (broken / "unet" / "model.onnx_data").unlink()
    with pytest.raises(ExportError, match="fails onnx.checker"):
        ox.check_graphs(broken)


def test_corrupted_graph_fails_parity_saying_by_how_much(fp32_export: Path, fused_reference,
                                                         tmp_path: Path) -> None:
    from onnx import numpy_helper

    from sdloop.exportload import open_export

    bad = tmp_path / "bad"
    shutil.copytree(fp32_export, bad)
    path = bad / "unet" / "model.onnx"
    model = onnx.load(str(path))
    init = next(t for t in model.graph.initializer if "conv_in" in t.name and t.name.endswith("weight"))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 3.0, init.name))
    onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx_data")
    images, _ = generate(open_export(bad, verify=False).pipe, CASES, 3, 64, 7.5)   # as its manifest says
    figures = ox.compare_images(fused_reference, images)
    with pytest.raises(ParityError, match=r"largest pixel difference .* \(over by .*PSNR .* \(short by") as e:
        ox.check_parity(figures, "fp32")
    assert e.value.exit_code == 1 and "\n" not in str(e.value)


def test_parity_failure_leaves_no_export_and_exits_1(tiny_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "never"
    code = main(["export", str(tiny_run), "--output", str(out), "--steps", "2", "--threads", "1", "--quiet",
                 "--prompt", "a circle", "--set", "reps=1", "--set", "tolerances={min_psnr: 101}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and err.startswith("error: the fp32 export does not match") and "short by" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "nothing left"


def test_int8_export_and_its_quality_check(tiny_run: Path, tmp_path: Path) -> None:
    from export.quality import kid

    out = tmp_path / "int8"
    cfg = ExportConfig(**{**QUICK, "prompts": ["a red circle"]}, precision="int8", keep="all", int8_images=4)
    result = build_export(tiny_run, out, cfg, progress=False)
    ops = {n.op_type for n in onnx.load(str(out / "unet" / "model.onnx")).graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} & ops, "the UNet's MatMuls are int8"
    te_ops = {n.op_type for n in onnx.load(str(out / "text_encoder" / "model.onnx")).graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} & te_ops
    m = result.manifest
    assert m["precision"] == "int8" and m["optimizations"]["int8"]["unet"]["kept"]
    assert m["parity"]["kid_images"] == 4 and m["parity"]["kid"] <= m["parity"]["tolerance"]["max_kid"]
    assert "KID" in result.summary and "int8 unet" in result.summary
    # the check can fail: images against noise are far apart
    rng = np.random.default_rng(0)
    noise = [rng.random((64, 64, 3), dtype=np.float32) for _ in range(4)]
    flat = [np.full((64, 64, 3), 0.5, dtype=np.float32) for _ in range(4)]
    value, spread = kid(flat, noise)
    assert value > cfg.int8_max_kid and spread >= 0
    with pytest.raises(ParityError, match="KID .* > 0.05"):
        ox.check_parity({**m["parity"], "kid": value}, "int8", max_kid=cfg.int8_max_kid)


@pytest.mark.parametrize("target", ["cuda", "tensorrt"])
def test_unavailable_target_names_what_is_missing(tiny_run: Path, tmp_path: Path, target: str, capsys) -> None:
    provider = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}[target]
    if _has(provider):
        pytest.skip(f"{provider} is installed here; the GPU tests below cover it")
    with pytest.raises(TargetUnavailableError, match=provider):
        build_export(tiny_run, tmp_path / "x", ExportConfig(target=target), progress=False)
    code = main(["export", str(tiny_run), "--output", str(tmp_path / "y"), "--target", target, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and provider in err and "sdloop[gpu]" in err
    assert not (tmp_path / "y").exists()


@pytest.mark.skipif(not _has("CUDAExecutionProvider"), reason=NO_GPU)
def test_cuda_fp16_export_on_a_gpu(tiny_run: Path, tmp_path: Path) -> None:
    result = build_export(tiny_run, tmp_path / "cuda", ExportConfig(**QUICK, target="cuda"), progress=False)
    m = result.manifest
    assert m["precision"] == "fp16" and m["runtime"]["use_io_binding"] and m["parity"]["passed"]
    unet = onnx.load(str(tmp_path / "cuda" / "unet" / "model.onnx"), load_external_data=False)
    assert unet.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


@pytest.mark.skipif(not _has("TensorrtExecutionProvider"), reason=NO_GPU + " and TensorRT")
def test_tensorrt_export_with_engine_cache_on_a_gpu(tiny_run: Path, tmp_path: Path) -> None:
    result = build_export(tiny_run, tmp_path / "trt", ExportConfig(**QUICK, target="tensorrt"), progress=False)
    assert result.manifest["parity"]["passed"]
    assert any((tmp_path / "trt" / "trt_cache").iterdir()), "engines are cached inside the export"


def test_cli_export_default_output_reexport_and_user_mistakes(tiny_run: Path, workspace: Path, tmp_path: Path,
                                                             capsys) -> None:
    args = ["--steps", "2", "--threads", "1", "--quiet", "--prompt", "a circle", "--set", "reps=1"]
    assert main(["export", str(tiny_run), *args]) == 0
    out = capsys.readouterr().out
    default = workspace / "exports" / f"{Path(tiny_run).name}-cpu-fp32"
    assert (default / "unet" / "model.onnx").is_file() and str(default) in out and "PSNR" in out
    first_id = json.loads((default / "manifest.json").read_text())["export_id"]
    assert main(["export", str(tiny_run), *args]) == 0, "an sdloop export folder may be replaced"
    assert json.loads((default / "manifest.json").read_text())["export_id"] != first_id
    capsys.readouterr()

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    mistakes = [
        (["export", str(tiny_run), "--output", str(foreign)], "not made by sdloop export"),
        (["export", str(tiny_run), "--precision", "fp16"], "--precision fp16 does not suit --target cpu"),
        (["export", str(tmp_path / "nope")], "does not exist"),
        (["export", str(tiny_run), "--set", "steps=0"], "steps=0 is invalid"),
        (["export", str(tiny_run), "--set", "no_such=1"], "unknown config key no_such"),
        (["export", str(tiny_run), "--set", "steps"], "is not KEY=VALUE"),
    ]
    for argv, message in mistakes:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert (foreign / "notes.txt").read_text() == "keep me" and sorted(p.name for p in foreign.iterdir()) == [
        "notes.txt"]


def test_leftovers_of_a_killed_export_are_removed_by_the_next(tiny_run: Path, tmp_path: Path) -> None:
    """kill -9 mid-way, then export again as a user would (a new process: a leftover must be older than it)."""
    import fcntl

    out = tmp_path / "exp"
    argv = [sys.executable, "-m", "sdloop_cli", "export", str(tiny_run), "--output", str(out), "--steps", "2",
            "--threads", "1", "--quiet", "--prompt", "a circle", "--set", "reps=1", "--set", "latency_images=1"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 300
        while not [d for d in tmp_path.glob(".exp.tmp-*") if ExportFolder(d).marker()]:
            assert proc.poll() is None and time.monotonic() < end, "the export never started building"
            time.sleep(0.2)
        time.sleep(1.0)          # mid-way: the marker says unfinished, the ONNX export is being written
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    [left] = list(tmp_path.glob(".exp.tmp-*"))
    assert ExportFolder(left).marker()["finished"] is False and not out.exists()
    # what the next export must leave: a folder that is not ours, and one a live export holds
    foreign = tmp_path / ".exp.tmp-notours"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    live = tmp_path / ".exp.tmp-live"
    live.mkdir()
    (live / MARKER).write_text(json.dumps({"kind": "sdloop-export", "export_id": "y", "finished": False,
                                           "started": 0}))
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    finally:
        os.close(fd)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"removed 1 leftover folder(s) of killed exports: {left}" in again.stdout
    assert sorted(p.name for p in tmp_path.glob(".exp.tmp-*")) == [".exp.tmp-live", ".exp.tmp-notours"]
    assert ExportFolder(out).verify(cache=False) and (foreign / "keep.txt").read_text() == "mine"
