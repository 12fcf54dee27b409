"""The command line: help everywhere, clear errors with exit codes, the base command and data check (the demo runs
as the README's first command, in tests/test_readme_commands.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


from sdloop_cli.main import main

SUBCOMMANDS = [[], ["base"], ["base", "tiny"], ["base", "pretrain"], ["data"], ["data", "check"], ["data", "synth"],
               ["train"], ["tune"], ["eval"], ["review"], ["export"], ["models"], ["models", "list"], ["serve"],
               ["demo"]]


@pytest.mark.parametrize("words", SUBCOMMANDS)
def test_help_on_every_subcommand(words, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*words, "--help"])
    assert exit_.value.code == 0
    assert "usage: sdloop" in capsys.readouterr().out


def test_base_tiny_loads_in_stock_diffusers_and_generates(tmp_path: Path, capsys) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "tiny"
    assert main(["base", "tiny", str(out), "--seed", "3"]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.scheduler.config.steps_offset == 1
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    from sdloop.pipelines import base_info, load_pipeline

    assert type(load_pipeline(str(out))).__name__ == "StableDiffusionPipeline"
    info = base_info(str(out))
    assert info.prediction_type == "epsilon" and info.fingerprint == base_info(str(out)).fingerprint
    other = tmp_path / "other"
    main(["base", "tiny", str(other), "--seed", "4"])
    assert base_info(str(other)).fingerprint != info.fingerprint, "re-drawn weights change the fingerprint"
    assert main(["base", "tiny", str(out)]) == 2, "a non-empty folder is not overwritten"
    assert "--overwrite" in capsys.readouterr().err


def test_base_loader_errors_say_what_to_do(tmp_path: Path) -> None:
    from sdloop.pipelines import BaseModelError, resolve_base

    (tmp_path / "not_a_pipeline").mkdir()
    with pytest.raises(BaseModelError, match="model_index.json is missing"):
        resolve_base(str(tmp_path / "not_a_pipeline"))
    with pytest.raises(BaseModelError, match="does not exist"):
        resolve_base(str(tmp_path / "missing" / "deeper"))
    with pytest.raises(BaseModelError, match="cannot fetch the base model"):  # HF_HUB_OFFLINE=1 in tests
        resolve_base("someone/some-model")


def test_data_check_writes_report_and_exit_codes(synth_data: Path, tmp_path: Path, workspace: Path, capsys) -> None:
    report = tmp_path / "r.json"
    assert main(["data", "check", str(synth_data), "--json", str(report), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "usable" in out.lower() and str(report) in out and "train /" in out
    data = json.loads(report.read_text())
    assert len(data["items"]) >= 20
    assert main(["data", "check", str(synth_data), "--quiet"]) == 0  # default report goes to the workspace
    assert (workspace / "reports" / "synth-data_report.json").is_file()

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"")
    (bad / "b.jpg").write_text("not an image")
    assert main(["data", "check", str(bad), "--json", str(tmp_path / "bad.json"), "--quiet"]) == 1
    assert "no usable images" in capsys.readouterr().err
    assert main(["data", "check", str(tmp_path / "nope"), "--quiet"]) == 2
    assert "error:" in capsys.readouterr().err


def test_data_synth_command(tmp_path: Path) -> None:
    assert main(["data", "synth", str(tmp_path / "s"), "--n", "5", "--caption-format", "txt"]) == 0
    assert len(list((tmp_path / "s").rglob("*.txt"))) == 5
    assert main(["data", "synth", str(tmp_path / "s"), "--n", "5"]) == 2, "refuses a non-empty folder"


def test_train_user_errors_are_one_line(tiny_base: Path, synth_data: Path, tmp_path: Path, capsys) -> None:
    args = ["train", "--base", str(tiny_base), "--data", str(synth_data), "--output", str(tmp_path / "r"), "--quiet"]
    assert main([*args, "--learning-rate", "-1"]) == 2
    err = capsys.readouterr().err
    assert "learning_rate=-1.0 is invalid" in err and "Traceback" not in err
    assert main([*args, "--set", "augment.flip_p=3"]) == 2
    assert "augment.flip_p" in capsys.readouterr().err
    assert main([*args, "--set", "no_such_key=1"]) == 2
    assert "unknown config key" in capsys.readouterr().err
    assert main([*args, "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--base", str(tmp_path / "nobase"), "--data", str(synth_data), "--output",
                 str(tmp_path / "r2"), "--quiet"]) == 2
    assert "sdloop base tiny" in capsys.readouterr().err
    assert main(["train", "--data", str(synth_data)]) == 2
    err = capsys.readouterr().err
    assert "--base" in err and "--config" in err and len(err.strip().splitlines()) == 1


def test_help_config_lists_every_key(capsys) -> None:
    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    for key in ("learning_rate", "lora_dropout", "weight_decay", "snr_gamma", "augment.flip_p",
                "data_config.validation_split", "early_stopping_patience"):
        assert key in out


def test_config_file_and_flags_precedence(tmp_path: Path) -> None:
    import argparse

    from sdloop_cli.main import build_train_config

    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text("learning_rate: 0.0002\nrank: 8\naugment:\n  flip_p: 0.25\n")
    ns = argparse.Namespace(config=str(cfg_file), base="b", data="d", output="o", rank=32, set=["augment.hue=0.05"],
                            validation_split=0.2, **{f: None for f in ("max_steps", "epochs", "batch_size",
                            "resolution", "learning_rate", "alpha", "seed", "early_stopping_patience",
                            "validation_every", "mixed_precision")})
    cfg = build_train_config(ns)
    assert cfg.learning_rate == 0.0002 and cfg.rank == 32 and cfg.augment.flip_p == 0.25
    assert cfg.augment.hue == 0.05 and cfg.data_config.validation_split == 0.2
