"""The trainer on the tiny base: loss goes down, fixed-noise validation, early stopping, NaN guard, resume, files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdloop.runfolder import RunFolder
import torch

from finetune.training.config import ConfigError, TrainConfig, tiny_overrides
from finetune.training.step import diffusion_loss
from finetune.training.train import TrainingError, train


def _cfg(base: Path, data: Path, out: Path, **kw) -> TrainConfig:
    values = {**tiny_overrides(), "base": str(base), "data": str(data), "output": str(out), "sample_steps": 2,
              "sample_seeds": [0]}
    values.update(kw)
    return TrainConfig.from_dict(values)


def _val_rows(run_dir: Path) -> list[dict]:
    return [r for r in RunFolder(run_dir).read_metrics() if "val_loss" in r]


@pytest.fixture(scope="module")
def run(tiny_base: Path, synth_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """One short standard run shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("runs") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SDLOOP_HOME", str(tmp_path_factory.mktemp("home")))
        return train(_cfg(tiny_base, synth_data, out, max_steps=30, learning_rate=1e-2, early_stopping_patience=0,
                          sample_every=10),
                     progress=False)


def test_loss_goes_down_and_run_folder_is_complete(run) -> None:
    rows = _val_rows(run.run_dir)
    assert rows[0]["step"] == 0, "the base model's validation loss is the curve's first point"
    assert run.best_val_loss < 0.8 * rows[0]["val_loss"], rows
    for name in ("config.yaml", "data_report.json", "metrics.jsonl", "manifest.json", "loss_curve.png",
                 "lora/pytorch_lora_weights.safetensors", "lora/lora_kohya.safetensors"):
        assert (run.run_dir / name).is_file(), name
    assert sorted(p.name for p in (run.run_dir / "samples").glob("*.png")) == \
        ["step_000010.png", "step_000020.png", "step_000030.png"]
    manifest = RunFolder(run.run_dir).manifest().to_dict()
    assert manifest["best_step"] == run.best_step
    assert manifest["items"]["validation"] >= 1 and manifest["items"]["train"] > manifest["items"]["validation"]
    assert manifest["packages"]["diffusers"] and manifest["dataset_fingerprint"]
    cfg = TrainConfig.from_yaml(run.run_dir / "config.yaml")
    assert cfg.max_steps == 30 and cfg.learning_rate == 1e-2
    # train rows carry step + train_loss + lr, validation rows step + val_loss
    train_rows = [r for r in RunFolder(run.run_dir).read_metrics() if "train_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 31))
    assert list((run.run_dir / "logs").iterdir()), "TensorBoard event files"


def test_best_checkpoint_is_the_result(run) -> None:
    from finetune.training.lora import read_safetensors

    rows = _val_rows(run.run_dir)
    best = min((r for r in rows if r["step"] > 0), key=lambda r: r["val_loss"])
    assert run.best_step == best["step"]
    best_file, meta = read_safetensors(run.run_dir / "checkpoints" / "best_lora.safetensors")
    assert int(meta["step"]) == run.best_step
    lora, _ = read_safetensors(run.run_dir / "lora" / "pytorch_lora_weights.safetensors")
    assert best_file.keys() == lora.keys()
    assert all(torch.equal(best_file[k], lora[k]) for k in lora)


def test_validation_loss_is_identical_when_evaluated_twice_and_batch_independent(tiny_base, synth_data,
                                                                                   workspace) -> None:
    from sdloop.pipelines import base_info, load_components
    from finetune.data.check import scan_dataset, split_items
    from finetune.training.feed import TrainingFeed
    from finetune.training.validate import validation_loss_sum

    cfg = _cfg(tiny_base, synth_data, workspace / "unused")
    report = scan_dataset(synth_data, cfg.data_config, progress=False)
    train_items, _ = split_items(report.items, cfg.data_config)
    items = train_items[:6]
    comps = load_components(str(tiny_base))
    info = base_info(str(tiny_base))
    results = []
    for bs in (4, 4, 1):
        c = _cfg(tiny_base, synth_data, workspace / "unused", batch_size=bs)
        feed = TrainingFeed(items, synth_data, c, comps, info.fingerprint, workspace / "cache", "cpu", train=False,
                            progress=False)
        feed.prepare()
        total, count = validation_loss_sum(comps["unet"], comps["noise_scheduler"], feed, items, "epsilon",
                                           c.validation_timesteps, c.seed, torch.device("cpu"))
        results.append(total / count)
        assert count == len(items) * c.validation_timesteps
    assert results[0] == results[1]
    assert results[2] == pytest.approx(results[0], rel=1e-5)


def test_early_stopping_stops_a_rising_validation_loss_and_keeps_the_best(tiny_base, synth_data, workspace,
                                                                          tmp_path) -> None:
    # lr 1.0 with a constant schedule and no clipping: the validation loss falls, then climbs
    cfg = _cfg(tiny_base, synth_data, tmp_path / "run", learning_rate=1.0, lr_scheduler="constant",
               max_grad_norm=0.0, max_steps=60, validation_every=3, early_stopping_patience=3,
               target_modules=["to_q", "to_k", "to_v", "to_out.0"], rank=8, alpha=8.0, augment={"bucket_step": 8})
    result = train(cfg, progress=False)
    rows = [r for r in _val_rows(result.run_dir) if r["step"] > 0]
    assert result.stopped.startswith("early stopping")
    assert result.final_step < 60
    best = min(rows, key=lambda r: r["val_loss"])
    assert result.best_step == best["step"] < result.final_step
    assert rows[-1]["val_loss"] > best["val_loss"], "stopped because the loss rose"
    assert [r["step"] for r in rows if r["step"] > best["step"]] == \
        [best["step"] + 3 * k for k in (1, 2, 3)], "stopped after exactly `patience` evaluations"
    manifest = RunFolder(result.run_dir).manifest().to_dict()
    assert manifest["best_step"] == best["step"] and manifest["stopped"].startswith("early stopping")


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tiny_base, synth_data, workspace,
                                                                           tmp_path, monkeypatch) -> None:
    from diffusers import UNet2DConditionModel

    original = UNet2DConditionModel.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):  # fault injection: the UNet's output turns NaN while training at step 13
        out = original(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] >= 13:
                out.sample = out.sample * float("nan")
        return out

    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)
    cfg = _cfg(tiny_base, synth_data, tmp_path / "run", max_steps=30, validation_every=5)
    with pytest.raises(TrainingError) as err:
        train(cfg, progress=False)
    msg = str(err.value)
    assert "nan" in msg.lower() and "step 13" in msg and "learning-rate" in msg and "step_000010" in msg
    assert (tmp_path / "run" / "checkpoints" / "step_000010" / "state.json").is_file()


def test_min_snr_weighting() -> None:
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    pred, target = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)
    t = torch.tensor([10, 900])
    plain = diffusion_loss(pred, target, t, sched, "epsilon", 0.0)
    weighted = diffusion_loss(pred, target, t, sched, "epsilon", 5.0)
    snr = sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t])
    expected = (torch.clamp(snr, max=5.0) / snr).mean()
    assert plain.item() == pytest.approx(1.0)
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-5)
    assert weighted.item() < plain.item(), "the low-noise timestep (high SNR) is down-weighted"
    v_weighted = diffusion_loss(pred, target, t, sched, "v_prediction", 5.0)
    assert v_weighted.item() == pytest.approx((torch.clamp(snr, max=5.0) / (snr + 1)).mean().item(), rel=1e-5)


@pytest.mark.parametrize("values, field", [
    ({"learning_rate": 0}, "learning_rate"), ({"rank": 0}, "rank"), ({"lora_dropout": 1.5}, "lora_dropout"),
    ({"mixed_precision": "fp8"}, "mixed_precision"), ({"resolution": 100}, "resolution"),
    ({"augment": {"flip_p": 2}}, "augment.flip_p"), ({"data_config": {"validation_split": 1.0}},
                                                    "data.validation_split"),
    ({"lr_scheduler": "step"}, "lr_scheduler"), ({"bogus_key": 1}, "bogus_key"),
])
def test_config_errors_name_the_field(values, field) -> None:
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict(values)
    assert field in str(err.value)


def test_existing_run_is_not_overwritten_without_resume(run) -> None:
    cfg = TrainConfig.from_yaml(run.run_dir / "config.yaml")
    with pytest.raises(TrainingError, match="--resume"):
        train(cfg, progress=False)


def _train_cmd(base: Path, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "sdloop_cli", "train", "--quiet", "--base", str(base), "--data", str(data),
            "--output", str(out), "--max-steps", "24", "--validation-every", "4", "--resolution", "64",
            "--batch-size", "4", "--rank", "4", "--alpha", "4", "--learning-rate", "5e-3",
            "--early-stopping-patience", "0", "--set", "sample_steps=1", "--set", "sample_seeds=[0]",
            "--set", "augment.bucket_step=8", "--set", "augment.variants=2", "--set", "augment.flip_p=0.5",
            "--set", "augment.caption_dropout_p=0.2", "--set", "lora_dropout=0.1", "--set", "ema=true",
            "--set", "gradient_accumulation=2"]


def test_resume_after_sigkill_equals_an_uninterrupted_run(tiny_base, synth_data, tmp_path) -> None:
    from finetune.training.lora import read_safetensors

    env = {**os.environ, "SDLOOP_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_train_cmd(tiny_base, synth_data, full), env=env, check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(_train_cmd(tiny_base, synth_data, killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "checkpoints" / "step_000008" / "state.json").exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # mid-run, possibly mid-write of the next checkpoint
    proc.wait()
    assert (killed / "checkpoints" / "step_000008").is_dir()
    assert not (killed / "manifest.json").exists(), "killed before the end"
    resumed = subprocess.run([sys.executable, "-m", "sdloop_cli", "train", "--quiet", "--output", str(killed),
                              "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout + resumed.stderr
    a, _ = read_safetensors(full / "lora" / "pytorch_lora_weights.safetensors")
    b, _ = read_safetensors(killed / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    ma = RunFolder(full).manifest().to_dict()
    mb = RunFolder(killed).manifest().to_dict()
    assert (ma["best_step"], ma["final_step"]) == (mb["best_step"], mb["final_step"])
    assert ma["best_val_loss"] == pytest.approx(mb["best_val_loss"], rel=1e-6)
    assert not list((killed / "checkpoints").glob(".tmp-*")), "partial checkpoint folders are cleaned"


def test_v_prediction_base_trains_on_the_velocity(run, tiny_base: Path, synth_data: Path, workspace,
                                                 tmp_path) -> None:
    import shutil

    from diffusers import DDPMScheduler

    from finetune.training.validate import training_target

    base = tmp_path / "vbase"
    shutil.copytree(tiny_base, base)
    sched = base / "scheduler" / "scheduler_config.json"
    sched.write_text(sched.read_text().replace('"epsilon"', '"v_prediction"'))
    result = train(_cfg(base, synth_data, tmp_path / "run", max_steps=4, validation_every=2), progress=False)
    manifest = RunFolder(result.run_dir).manifest().to_dict()
    assert manifest["prediction_type"] == "v_prediction"
    # same weights, same fixed noise, same items at step 0: only the target differs, so the losses must too
    v0 = _val_rows(result.run_dir)[0]["val_loss"]
    eps0 = _val_rows(run.run_dir)[0]["val_loss"]
    assert v0 != pytest.approx(eps0, rel=1e-3)
    noise_sched = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    latents, noise, t = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.tensor([500])
    expected = noise_sched.alphas_cumprod[500].sqrt() * noise - (1 - noise_sched.alphas_cumprod[500]).sqrt() * latents
    torch.testing.assert_close(training_target(noise_sched, "v_prediction", latents, noise, t), expected)


def test_gpu_out_of_memory_names_the_settings_to_lower(tiny_base: Path, synth_data: Path, workspace, tmp_path,
                                                       monkeypatch, capsys) -> None:
    from diffusers import UNet2DConditionModel

    from sdloop_cli.main import main

    def forward(self, *args, **kwargs):  # what a too-large batch does on a GPU (none here)
        if self.training:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **kwargs)

    original = UNet2DConditionModel.forward
    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)
    code = main(["train", "--quiet", "--base", str(tiny_base), "--data", str(synth_data), "--output",
                 str(tmp_path / "run"), "--batch-size", "4", "--resolution", "64", "--set", "augment.bucket_step=8"])
    err = capsys.readouterr().err
    assert code == 2
    assert "out of GPU memory" in err and "--batch-size 2" in err and "gradient_checkpointing=true" in err
    assert "Traceback" not in err


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_data_parallel_run_agrees_with_one_process(run, tiny_base: Path, synth_data: Path, tmp_path) -> None:
    """Two CPU processes (torchrun, gloo): the same fixed-noise validation loss as one process, and one
    early-stopping decision taken by both (a disagreement would hang the collective and time out)."""
    out = tmp_path / "ddp"
    env = {**os.environ, "SDLOOP_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "sdloop_cli", "train", "--quiet", "--base", str(tiny_base), "--data", str(synth_data),
           "--output", str(out), "--max-steps", "12", "--validation-every", "2", "--resolution", "64",
           "--batch-size", "2", "--early-stopping-patience", "1", "--set", "early_stopping_min_delta=10",
           "--set", "augment.bucket_step=8", "--set", "sample_steps=1", "--set", "sample_seeds=[0]"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run folder:") == 1, "one report, from the main process"
    manifest = RunFolder(out).manifest().to_dict()
    assert manifest["world_size"] == 2
    assert manifest["final_step"] == 4 and manifest["best_step"] == 2, "stopped after patience 1, on both ranks"
    single = _val_rows(run.run_dir)[0]
    parallel = _val_rows(out)[0]
    assert single["step"] == parallel["step"] == 0
    assert parallel["val_loss"] == pytest.approx(single["val_loss"], rel=1e-6)
