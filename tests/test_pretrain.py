"""The drawing base: the shipped weights load in stock diffusers and draw what captions say; `sdloop base tiny`
writes it and never replaces a folder it did not make; the pretraining resumes to the same weights; the demo's
data is rebuilt when asked for other data (its LoRA teaching a colour is checked by the README's `sdloop demo`)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

import torch

from finetune.pretraining.base import drawing_asset
from finetune.demo import one_thread
from finetune.pretraining.pretrain import PretrainConfig, pretrain
from finetune.evaluation.shapecheck import caption_scores, chance_levels, eval_captions, pipeline_images
from sdloop_cli.main import main


def _tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- the shipped base -----------------------------------------------------------------------------------------------
def test_shipped_asset_is_small_safetensors_and_json() -> None:
    files = [p for p in drawing_asset().rglob("*") if p.is_file()]
    suffixes = {p.suffix for p in files}
    assert suffixes <= {".safetensors", ".json", ".txt"}, f"no pickles or other formats: {suffixes}"
    assert sum(p.stat().st_size for p in files) < 10 * 2**20
    record = json.loads((drawing_asset() / "sdloop_base.json").read_text())
    assert record["kind"] == "tiny-sd1-drawing" and record["seed"] == 0 and "repeat_command" in record


def test_shipped_base_draws_in_stock_diffusers(drawing_base: Path) -> None:
    """The colour named in the caption, read from the pixels, is far above chance (1 in 7) on fixed prompts."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(drawing_base, local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.config.scaling_factor != 0.18215, "the scaling factor was measured on the trained latents"
    captions = eval_captions(24, 4242)
    with one_thread():
        images = pipeline_images(pipe, captions, list(range(len(captions))))
    scores = caption_scores(zip(images, captions))
    chance = chance_levels()  # measured: colour 0.79 (chance 0.14), size 0.92 (chance 0.5)
    assert scores.shares["colour"] >= 3 * chance["colour"], scores.line()
    assert scores.shares["size"] >= 0.8, scores.line()


# ---- sdloop base tiny -----------------------------------------------------------------------------------------------
def test_base_tiny_writes_drawing_by_default_and_random_on_request(tmp_path: Path, capsys) -> None:
    assert main(["base", "tiny", str(tmp_path / "d")]) == 0
    assert _tree_digest(tmp_path / "d") == _tree_digest(drawing_asset())
    assert main(["base", "tiny", str(tmp_path / "r"), "--weights", "random", "--seed", "3"]) == 0
    assert json.loads((tmp_path / "r" / "sdloop_base.json").read_text()) == {"kind": "tiny-sd1", "seed": 3}
    capsys.readouterr()
    assert main(["base", "tiny", str(tmp_path / "x"), "--weights", "drawing", "--seed", "3"]) == 2
    assert "--weights random" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["base", "tiny", str(tmp_path / "s"), "--seed", "4"]) == 0, "a seed alone asks for random weights"
    assert json.loads((tmp_path / "s" / "sdloop_base.json").read_text()) == {"kind": "tiny-sd1", "seed": 4}
    assert main(["base", "tiny", str(tmp_path / "d"), "--overwrite", "--weights", "random"]) == 0, \
        "a base sdloop wrote may be replaced"
    assert json.loads((tmp_path / "d" / "sdloop_base.json").read_text())["kind"] == "tiny-sd1"


def test_overwrite_never_touches_a_users_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    user = tmp_path / "mine"
    (user / "photos").mkdir(parents=True)
    (user / "notes.txt").write_text("keep me")
    (user / "photos" / "a.png").write_bytes(b"\x89PNG not really")
    (user / "model_index.json").write_text("{}")  # even a folder that looks like a pipeline
    before = _tree_digest(user)
    for weights in ("drawing", "random"):
        assert main(["base", "tiny", str(user), "--overwrite", "--weights", weights]) == 2
    monkeypatch.chdir(user)
    assert main(["base", "tiny", ".", "--overwrite"]) == 2, "`.` is the user's folder: never emptied"
    err = capsys.readouterr().err
    assert err.count("error: ") == 3 and "sdloop_base.json" in err
    assert _tree_digest(user) == before
    ours = tmp_path / "ours"
    assert main(["base", "tiny", str(ours)]) == 0
    monkeypatch.chdir(ours)
    assert main(["base", "tiny", ".", "--overwrite"]) == 2, "not the folder the command runs in"
    assert _tree_digest(ours) == _tree_digest(drawing_asset())


def test_base_tiny_on_a_file_or_an_unwritable_parent_is_one_line(tmp_path: Path, capsys) -> None:
    a_file = tmp_path / "file.bin"
    a_file.write_bytes(b"data")
    assert main(["base", "tiny", str(a_file)]) == 2
    assert main(["base", "tiny", str(a_file / "sub")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err) and "is a file" in err[0]
    assert a_file.read_bytes() == b"data"
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders: the permission case needs an ordinary user")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["base", "tiny", str(locked / "base")]) == 2
        assert capsys.readouterr().err.startswith("error: cannot write")
    finally:
        locked.chmod(0o700)


# ---- sdloop base pretrain -------------------------------------------------------------------------------------------
TINY = dict(images=24, vae_steps=4, unet_steps=4, vae_batch=4, unet_batch=4, eval_prompts=4, threads=1,
            checkpoint_seconds=0.0)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for part in ("unet", "vae"):
        for k, v in load_file(str(folder / part / "diffusion_pytorch_model.safetensors")).items():
            out[f"{part}.{k}"] = v
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pretrain") / "a"
    pretrain(out, PretrainConfig(**TINY), progress=False)
    return out


def test_pretraining_writes_a_stock_pipeline_with_its_record(uninterrupted: Path) -> None:
    from diffusers import StableDiffusionPipeline

    record = json.loads((uninterrupted / "sdloop_base.json").read_text())
    assert record["kind"] == "tiny-sd1-drawing" and record["phases"]["unet"]["steps"] == 4
    assert record["data"]["images"] == 24 and record["seed"] == 0 and record["command"][:3] == ["sdloop", "base",
                                                                                                 "pretrain"]
    for png in ("samples.png", "loss_curves.png"):
        assert (uninterrupted / "pretrain" / png).stat().st_size > 1000
    assert not (uninterrupted / "pretrain" / "latents.safetensors").exists(), "the latent cache goes at the end"
    ckpt_files = {p.suffix for p in (uninterrupted / "pretrain" / "checkpoints").rglob("*") if p.is_file()}
    assert ckpt_files == {".safetensors", ".json"}, "checkpoints (kept, so a run can be extended) hold no pickles"
    assert not [p for p in uninterrupted.rglob("*") if p.suffix in (".bin", ".pt", ".pkl", ".ckpt")]
    pipe = StableDiffusionPipeline.from_pretrained(uninterrupted, local_files_only=True)
    assert pipe.vae.config.scaling_factor == pytest.approx(record["phases"]["latents"]["scaling_factor"])


def test_stopped_and_resumed_pretraining_ends_with_the_same_weights(uninterrupted: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    assert "stopped" in pretrain(out, PretrainConfig(**TINY), progress=False, stop_after=("vae", 2))
    assert "stopped" in pretrain(out, resume=True, progress=False, stop_after=("unet", 3))
    # a kill while a checkpoint was written, and a newest checkpoint damaged later: resume from the one before
    ckpts = sorted((out / "pretrain" / "checkpoints" / "unet").glob("step_*"))
    assert [p.name for p in ckpts] == ["step_0000002", "step_0000003"]
    (ckpts[-1] / "weights.safetensors").write_bytes(b"truncated")
    (ckpts[0].parent / ".tmp-step_0000004-x").mkdir()
    record = pretrain(out, resume=True, progress=False)
    assert record["phases"]["unet"]["steps"] == 4
    a, b = _weights(uninterrupted), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed != uninterrupted"
    steps = [(r["phase"], r["step"]) for r in map(json.loads, (out / "pretrain" / "metrics.jsonl").open())]
    assert len(steps) == len(set(steps)), "no step logged twice after resuming"


def test_pretrain_front_door_refuses_what_it_must(tmp_path: Path, capsys) -> None:
    user = tmp_path / "mine"
    user.mkdir()
    (user / "keep.txt").write_text("mine")
    assert main(["base", "pretrain", str(user), "--quiet"]) == 2
    assert main(["base", "pretrain", str(user), "--resume", "--quiet"]) == 2, "nothing of ours to resume there"
    assert main(["base", "pretrain", str(tmp_path / "bad"), "--images", "3", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert (user / "keep.txt").read_text() == "mine" and sorted(os.listdir(user)) == ["keep.txt"]
    assert main(["base", "pretrain", str(tmp_path / "nothing"), "--resume", "--images", "3", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "images=3" in err[0] and not (tmp_path / "nothing").exists()


def test_resume_after_an_early_interrupt_says_it_starts_over_with_the_asked_steps(
        uninterrupted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Ctrl-C before the first checkpoint, then --resume: one line says there is nothing to resume, the run starts
    over with the step totals typed (not silently, not with the recorded ones), and ends as an uninterrupted run;
    a later --resume of a run with checkpoints keeps its recorded totals unless new ones are typed."""
    import finetune.pretraining.pretrain as pt

    out = tmp_path / "c"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(pt, "save_checkpoint", interrupted)  # killed during the first steps, before any checkpoint
        with pytest.raises(KeyboardInterrupt):
            pretrain(out, PretrainConfig(**{**TINY, "unet_steps": 2}), progress=False)
    assert not list((out / "pretrain").rglob("step_*"))
    capsys.readouterr()
    assert main(["base", "pretrain", str(out), "--resume", "--unet-steps", "4", "--quiet"]) == 0
    captured = capsys.readouterr()
    said = [line for line in captured.err.splitlines() if "resume" in line or "error" in line or "note" in line]
    assert said == [f"no checkpoint in {out / 'pretrain'} to resume: starting over (VAE 4 steps, UNet 4 steps)"]
    assert "(VAE 4 steps, UNet 4 steps)" in captured.out
    record = json.loads((out / "sdloop_base.json").read_text())
    assert record["phases"]["vae"]["steps"] == 4 and record["phases"]["unet"]["steps"] == 4
    a, b = _weights(uninterrupted), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a), "a start over is the run the user asked for"

    # a run with checkpoints: the recorded totals stay unless typed; a setting the weights were made with cannot
    # change mid-run, and the note names it
    assert "stopped" in pretrain(tmp_path / "d", PretrainConfig(**TINY), progress=False, stop_after=("vae", 2))
    capsys.readouterr()
    assert "stopped" in pretrain(tmp_path / "d", resume=True, progress=False, stop_after=("vae", 3),
                                 given={"images": 99, "vae_steps": 4})
    err = capsys.readouterr().err
    assert "starting over" not in err and "ignoring images=99" in err and "vae_steps" not in err
    config = tmp_path / "d" / "pretrain" / "config.json"
    assert json.loads(config.read_text())["config"]["unet_steps"] == 4, "the recorded total stays"
    assert pt.prepare_out(tmp_path / "d", None, True, ["sdloop"], {"unet_steps": 6}).unet_steps == 6
    assert json.loads(config.read_text())["config"]["unet_steps"] == 6, "a typed total replaces it, for good"
    assert "resuming with unet_steps=6" in capsys.readouterr().err
    with pytest.raises(pt.PretrainError, match="below the 3 steps"):
        pretrain(tmp_path / "d", resume=True, progress=False, given={"vae_steps": 2})


# ---- the demo -------------------------------------------------------------------------------------------------------
def test_demo_data_is_rebuilt_when_asked_for_other_data_and_never_takes_a_users_folder(workspace: Path) -> None:
    from finetune.demo import DATA_RECORD, DemoError, demo_data

    with pytest.raises(DemoError, match="at least 8"):
        demo_data(1, "pink")
    assert not (workspace / "datasets").exists(), "a refused --n writes nothing"
    data, said = demo_data(8, "pink")
    assert said.startswith("drew") and len(list(data.glob("*.png"))) == 8
    assert demo_data(8, "pink")[1].startswith("reusing")
    data, said = demo_data(10, "pink")
    assert said.startswith("drew") and len(list(data.glob("*.png"))) == 10
    assert json.loads((data / DATA_RECORD).read_text())["n"] == 10
    (data / DATA_RECORD).unlink()  # now it looks like a folder the user put there
    before = _tree_digest(data)
    with pytest.raises(DemoError, match="not made by the demo"):
        demo_data(12, "pink")
    assert _tree_digest(data) == before
