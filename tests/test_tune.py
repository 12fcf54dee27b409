"""A two-trial search: a normal best run folder, a resumable sqlite study, a summary table and a plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.config import SearchSpace, TrainConfig, tiny_overrides
from finetune.tune import TuneError, tune


def test_two_trial_tune_then_resume_the_study(tiny_base: Path, synth_data: Path, tmp_path: Path,
                                              workspace: Path) -> None:
    import optuna

    base = TrainConfig.from_dict({**tiny_overrides(), "base": str(tiny_base), "data": str(synth_data),
                                  "output": "unused", "max_steps": 6, "validation_every": 3, "sample_steps": 1,
                                  "sample_seeds": [0]})
    space = SearchSpace(learning_rate=(1e-3, 1e-2), rank=[2, 4], lora_dropout=(0.0, 0.2), weight_decay=(1e-4, 1e-2),
                        batch_size=[2, 4])
    out = tmp_path / "tune"
    summary = tune(base, out, n_trials=2, space=space, progress=False)
    study = optuna.load_study(study_name="sdloop", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.trials) == 2
    assert summary.best_value == pytest.approx(study.best_value)
    for t in study.trials:
        assert 1e-3 <= t.params["learning_rate"] <= 1e-2 and t.params["rank"] in (2, 4)
    best = summary.best_run_dir
    assert (best / "lora" / "pytorch_lora_weights.safetensors").is_file() and (best / "manifest.json").is_file()
    manifest = json.loads((best / "manifest.json").read_text())
    assert manifest["best_val_loss"] == pytest.approx(summary.best_value)
    assert TrainConfig.from_yaml(best / "config.yaml").rank == summary.best_params["rank"]
    assert (out / "trials.png").stat().st_size > 0 and (out / "trials.csv").read_text().count("\n") == 3
    assert "val loss" in summary.table and len(summary.table.splitlines()) == 4
    again = tune(base, out, n_trials=1, space=space, progress=False)  # the study continues
    assert len(optuna.load_study(study_name="sdloop", storage=f"sqlite:///{out / 'study.db'}").trials) == 3
    assert again.best_value <= summary.best_value


def test_tune_needs_a_validation_split(tiny_base: Path, synth_data: Path, tmp_path: Path) -> None:
    base = TrainConfig.from_dict({"base": str(tiny_base), "data": str(synth_data), "output": "x",
                                  "data_config": {"validation_split": 0.0}})
    with pytest.raises(TuneError, match="validation_split"):
        tune(base, tmp_path / "t", n_trials=1)
