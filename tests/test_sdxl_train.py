"""SDXL through training (issue 19, part 3), through the front door: a short LoRA run on the tiny SDXL base (UNet and
both text encoders, EMA, validation), its files read by stock diffusers, the caches' pooled embeddings and size/crop
time ids, a resume, evaluation, and wrong-family combinations as one line each."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

from sdloop_cli.main import main

STEPS = 6


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One workspace for the module (its caches are shared by the run and the cache tests)."""
    path = tmp_path_factory.mktemp("sdxl-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SDLOOP_HOME", str(path))
        for key in ("BENTOML_HOME", "SDLOOP_STORE_URL", "SDLOOP_IMAGE_DIR"):
            mp.delenv(key, raising=False)
        yield path


@pytest.fixture(scope="module")
def sdxl_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune.pretraining.base import write_tiny_base

    return write_tiny_base(tmp_path_factory.mktemp("sdxl-base") / "tiny-sdxl", seed=0, family="sdxl")


def _train_argv(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--base", str(base), "--data", str(data), "--output", str(out), "--max-steps", str(STEPS),
            "--resolution", "64", "--batch-size", "4", "--validation-every", "3", "--learning-rate", "3e-2",
            "--set", "train_text_encoder=true", "--set", "text_encoder_lr=3e-2", "--set", "ema=true",
            "--set", "ema_decay=0.5", "--set", "sample_steps=1", "--set", "sample_seeds=[0]",
            "--set", "augment.crop_p=0.5", "--set", "augment.variants=2", *extra]


@pytest.fixture(scope="module")
def sdxl_run(home: Path, sdxl_base: Path, synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sdxl-run") / "run"
    assert main(_train_argv(sdxl_base, synth_data, out, "--quiet")) == 0
    return out


def _image(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return np.asarray(pipe("a red circle", num_inference_steps=3, height=64, width=64, output_type="np",
                           generator=torch.Generator().manual_seed(0)).images[0])


def test_sdxl_run_writes_both_lora_files_with_the_family(sdxl_run: Path) -> None:
    from sdloop.atomic import load_safetensors
    from sdloop.runfolder import RunFolder

    m = RunFolder(sdxl_run).manifest()
    assert (m.family, m.pipeline_class, m.final_step) == ("sdxl", "StableDiffusionXLPipeline", STEPS)
    rows = RunFolder(sdxl_run).read_metrics()
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 3, 6]
    diffusers, _ = load_safetensors(sdxl_run / "lora" / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in diffusers} == {"unet", "text_encoder", "text_encoder_2"}
    kohya, meta = load_safetensors(sdxl_run / "lora" / "lora_kohya.safetensors")
    assert {k.split("_")[0] + "_" + k.split("_")[1] for k in kohya} == {"lora_unet", "lora_te1", "lora_te2"}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert list((sdxl_run / "samples").glob("step_*.png"))


def test_stock_sdxl_pipeline_loads_both_files_and_they_change_the_output(sdxl_run: Path, sdxl_base: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    from sdloop.runfolder import RunFolder

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_base, local_files_only=True)
    before = _image(pipe)
    pipe.load_lora_weights(sdxl_run / "lora", weight_name="pytorch_lora_weights.safetensors")
    after = _image(pipe)
    assert np.abs(after - before).max() > 1e-3, "the LoRA changes the image"
    kohya = StableDiffusionXLPipeline.from_pretrained(sdxl_base, local_files_only=True)
    kohya.load_lora_weights(sdxl_run / "lora", weight_name="lora_kohya.safetensors")
    assert np.abs(_image(kohya) - after).max() < 1e-4, "the kohya file holds the same adapter"
    ours = RunFolder(sdxl_run).load_pipeline()
    assert type(ours).__name__ == "StableDiffusionXLPipeline"
    assert np.abs(_image(ours) - after).max() < 1e-4


def test_caches_hold_pooled_embeddings_and_the_real_size_and_crop(home: Path, sdxl_base: Path,
                                                                  synth_data: Path) -> None:
    from finetune.data.check import scan_dataset
    from finetune.training.cache import latent_path, text_path
    from finetune.training.config import DataConfig, TrainConfig
    from finetune.training.feed import TrainingFeed
    from sdloop.atomic import load_safetensors
    from sdloop.pipelines import base_info, load_components

    comps = load_components(str(sdxl_base))
    items = scan_dataset(synth_data, DataConfig(), progress=False).items[:4]
    cfg = TrainConfig(resolution=64, batch_size=2, augment={"crop_p": 1.0, "crop_scale_min": 0.3, "variants": 2})
    fp = base_info(str(sdxl_base)).fingerprint
    cache = home / "cache-test"
    feed = TrainingFeed(items, synth_data, cfg, comps, fp, cache, train=True, progress=False)
    feed.prepare()
    latents = sorted((cache / "latents").glob("*.safetensors"))
    assert len(latents) == len(items)
    tensors, _ = load_safetensors(latents[0])
    assert set(tensors) == {"v0", "v1", "v0.time_ids", "v1.time_ids"}
    v0, v1 = tensors["v0.time_ids"], tensors["v1.time_ids"]
    assert v0.tolist()[:2] == v1.tolist()[:2] and v0.tolist()[4:] == [64.0, 64.0], "original and target size"
    assert v0.tolist()[2:4] != v1.tolist()[2:4], "another random crop, another crop corner"
    text_files = list((cache / "text").glob("*.safetensors"))
    hidden, _ = load_safetensors(text_files[0])
    assert hidden["hidden"].shape == (77, 64) and hidden["pooled"].shape == (32,)
    batch = feed.load_batch([0, 1], 0)
    assert batch["pooled_text_embeds"].shape == (2, 32) and batch["time_ids"].shape == (2, 6)
    live = TrainingFeed(items, synth_data, TrainConfig(**{**cfg.to_dict(), "use_cache": False}), comps, fp, cache,
                        train=True, progress=False).load_batch([0, 1], 0)
    for key in ("latents", "encoder_hidden_states", "pooled_text_embeds", "time_ids"):
        assert torch.allclose(batch[key], live[key], atol=1e-5), key
    val = TrainingFeed(items, synth_data, cfg, comps, fp, cache, train=False, progress=False).load_batch([0], 0)
    w, h = items[0].width, items[0].height
    side = min(w, h) * 64 / min(w, h)  # the centre crop of a square bucket from the image scaled to cover it
    assert val["time_ids"][0].tolist() == [h, w, round((h * 64 / min(w, h) - side) / 2),
                                           round((w * 64 / min(w, h) - side) / 2), 64, 64]
    assert latent_path(cache, "x").parent.name == "latents" and text_path(cache, "x").parent.name == "text"


def test_resume_after_a_kill_ends_with_the_uninterrupted_weights(sdxl_run: Path, tmp_path: Path) -> None:
    """A kill between the step-3 and the step-6 checkpoints leaves step_000003 as the newest complete one (writes
    are atomic); resuming from it replays steps 4-6 (UNet, both encoders, EMA, optimizer) to the same LoRA."""
    from sdloop.atomic import load_safetensors
    from sdloop.runfolder import RunFolder

    run = tmp_path / "killed"
    shutil.copytree(sdxl_run, run)
    shutil.rmtree(run / "checkpoints" / f"step_{STEPS:06d}")
    for name in ("manifest.json", "lora/pytorch_lora_weights.safetensors", "lora/lora_kohya.safetensors"):
        (run / name).unlink()
    assert main(["train", "--output", str(run), "--resume", "--quiet"]) == 0
    m = RunFolder(run).manifest()
    assert m.final_step == STEPS and m.family == "sdxl"
    resumed = load_safetensors(run / "lora" / "pytorch_lora_weights.safetensors")[0]
    original = load_safetensors(sdxl_run / "lora" / "pytorch_lora_weights.safetensors")[0]
    assert resumed.keys() == original.keys()
    assert all(torch.equal(resumed[k], original[k]) for k in original)
    steps = [r["step"] for r in RunFolder(run).read_metrics() if "lr" in r]
    assert steps == list(range(1, STEPS + 1)), "the resumed steps follow the recorded ones"


def test_sdloop_eval_runs_on_an_sdxl_run(sdxl_run: Path, tmp_path: Path) -> None:
    from finetune.evaluation.evaluate import evaluate_run

    from tests.test_evaluate import SmallFeatures

    features = tmp_path / "small.pt"
    torch.jit.save(torch.jit.script(SmallFeatures().eval()), str(features))
    run = tmp_path / "run"
    shutil.copytree(sdxl_run, run)
    assert main(["eval", str(run), "--n", "2", "--steps", "2", "--features", str(features), "--bootstrap", "50",
                 "--quiet"]) == 0
    data = json.loads((run / "eval" / "eval.json").read_text())
    assert data and (run / "eval" / "report.html").is_file()
    assert evaluate_run is not None


def test_wrong_family_combinations_are_one_line(sdxl_run: Path, tiny_base: Path, synth_data: Path,
                                                tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from sdloop.families import FamilyMismatchError
    from sdloop.runfolder import RunFolder

    def one_line() -> str:
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert "sd1" in err[0] and "sdxl" in err[0], err[0]
        return err[0]

    # an SDXL run resumed on an SD 1.x base
    run = tmp_path / "resume-on-sd1"
    shutil.copytree(sdxl_run, run)
    assert main(["train", "--output", str(run), "--resume", "--base", str(tiny_base), "--max-steps", "8",
                 "--quiet"]) == 2
    assert "cannot resume" in one_line()
    # an SDXL LoRA as the start of an SD 1.x run
    out = tmp_path / "init-on-sd1"
    assert main(["train", "--base", str(tiny_base), "--data", str(synth_data), "--output", str(out),
                 "--max-steps", "2", "--resolution", "64", "--set", f"init_lora={sdxl_run}", "--quiet"]) == 2
    assert "init_lora" in one_line()
    assert not (out / "config.yaml").exists(), "a failed start leaves nothing that looks like a run"
    # a run whose base was swapped for another family's
    moved = tmp_path / "moved"
    shutil.copytree(sdxl_run, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest.update(base_model=str(tiny_base), base_model_relative=None)
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FamilyMismatchError) as e:
        RunFolder(moved).load_pipeline()
    assert "\n" not in str(e.value) and "sd1" in str(e.value) and "sdxl" in str(e.value)
    # manifests from before families read as sd1 / sd2 / sdxl
    for cls, pred, family in (("StableDiffusionPipeline", "epsilon", "sd1"),
                              ("StableDiffusionPipeline", "v_prediction", "sd2"),
                              ("StableDiffusionXLPipeline", "epsilon", "sdxl")):
        old = {k: v for k, v in manifest.items() if k != "family"}
        old.update(pipeline_class=cls, prediction_type=pred)
        (moved / "manifest.json").write_text(json.dumps(old))
        assert RunFolder(moved).manifest().family == family


def test_crop_geometry_of_buckets_random_crops_and_flips() -> None:
    """What SDXL's time ids are made of: the source (height, width) and the crop corner in the source scaled to
    cover the bucket, mirrored by a flip (pure augmentation, no model)."""
    import random

    from PIL import Image

    from finetune.data.augment import augment_image_geometry
    from finetune.training.config import AugmentConfig

    img = Image.new("RGB", (200, 100))
    out, g = augment_image_geometry(img, (64, 64), AugmentConfig(), random.Random(0), augment=False)
    assert out.size == (64, 64) and g.original_size == (100, 200) and g.crop_top_left == (0, 32)
    _, g = augment_image_geometry(img, (128, 64), AugmentConfig(), random.Random(0), augment=False)
    assert g.crop_top_left == (0, 0), "a bucket of the image's aspect takes all of it"
    corners = []
    for flip in (0.0, 1.0):  # the same draws: the same crop box, then mirrored or not
        cfg = AugmentConfig(crop_p=1.0, crop_scale_min=1.0, flip_p=flip)
        corners.append(augment_image_geometry(img, (64, 64), cfg, random.Random(5))[1].crop_top_left)
    (top, left), (ftop, fleft) = corners
    assert top == ftop == 0 and 0 < left < 64 and abs(left + fleft - 64) <= 1, corners
