"""The search: normal best run folders, a study that continues with its own space, pruned and killed trials, two
studies side by side in one folder, and every malformed --space or folder refused in one line before any trial.

One small study is built once per module (2 trials, 4 steps); tests that add to a study work on a copy of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest

from sdloop.runfolder import RunFolder

from finetune.training.config import SearchSpace, TrainConfig, tiny_overrides
from finetune.training.tune import TuneError, parse_space, tune
from sdloop_cli.main import main

SPACE = SearchSpace(learning_rate=[1e-3, 1e-2], rank=[2, 4], lora_dropout=[0.0, 0.2], weight_decay=[1e-4, 1e-2],
                    batch_size=[2, 4])
SPACE_JSON = json.dumps(SPACE.to_dict())
SMALL = {"max_steps": 4, "validation_every": 2, "validation_timesteps": 2, "sample_steps": 1, "sample_seeds": [0],
         "sample_every": 4}


def _base(tiny_base: Path, synth_data: Path, **extra) -> TrainConfig:
    return TrainConfig.from_dict({**tiny_overrides(), "base": str(tiny_base), "data": str(synth_data),
                                  "output": "unused", **SMALL, **extra})


def _cli(tiny_base: Path, synth_data: Path, out: Path, *more: str) -> list[str]:
    """`sdloop tune` with the same settings as ``_base`` (the tiny recipe and SMALL), as a user would type it."""
    flat = {f"{k}.{kk}" if isinstance(v, dict) else k: vv
            for k, v in {**tiny_overrides(), **SMALL}.items() for kk, vv in (v.items() if isinstance(v, dict)
                                                                            else [(None, v)])}
    sets = [a for k, v in flat.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    return ["tune", "--base", str(tiny_base), "--data", str(synth_data), "--output", str(out), "--quiet", *sets,
            *more]


def _study(out: Path, name: str = "sdloop"):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


def _tree_hash(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "tune.lock"}


def _state(path: Path) -> Optional[object]:
    """What a path holds (file bytes, a folder's hashes, or None), to compare before and after."""
    return _tree_hash(path) if path.is_dir() else path.read_bytes() if path.exists() else None


@pytest.fixture(scope="module")
def study_dir(tiny_base: Path, synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A finished two-trial study 'sdloop' (read-only: copy it to change it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SDLOOP_HOME", str(tmp_path_factory.mktemp("home")))
        out = tmp_path_factory.mktemp("tune") / "tune"
        tune(_base(tiny_base, synth_data), out, n_trials=2, space=SPACE, progress=False)
    yield out


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "tune"
    shutil.copytree(src, dst)
    return dst


def test_a_study_gives_a_normal_best_run_folder_and_reports(study_dir: Path) -> None:
    study = _study(study_dir)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    folder = study_dir / "trials" / "sdloop"
    assert sorted(p.name for p in folder.glob("trial_*")) == ["trial_000", "trial_001"]
    best = study.best_trial
    run = folder / f"trial_{best.number:03d}"
    manifest = RunFolder(run).manifest().to_dict()
    assert manifest["best_val_loss"] == pytest.approx(best.value)
    cfg = TrainConfig.from_yaml(run / "config.yaml")
    assert cfg.rank == best.params["rank"] and cfg.learning_rate == pytest.approx(best.params["learning_rate"])
    assert cfg.alpha / cfg.rank == pytest.approx(tiny_overrides()["alpha"] / tiny_overrides()["rank"])
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["best_trial"] == best.number and Path(summary["best_run_dir"]) == run
    assert (folder / "trials.csv").read_text().count("\n") == 3 and (folder / "trials.png").stat().st_size > 0
    assert json.loads((folder / "search_space.json").read_text()) == SPACE.to_dict()


def test_continuing_a_study_keeps_its_space_and_picks_the_best_of_all(study_dir: Path, tmp_path: Path,
                                                                      workspace: Path) -> None:
    out = _copy(study_dir, tmp_path)
    before = _tree_hash(out / "trials" / "sdloop" / "trial_000")
    summary = tune(_base(*_fixture_paths(out)), out, n_trials=1, space=None, progress=False)  # no space given
    study = _study(out)
    assert len(study.trials) == 3
    new = study.trials[2]
    assert 1e-3 <= new.params["learning_rate"] <= 1e-2 and new.params["rank"] in (2, 4), \
        "a continued study searches its own space, not the default one"
    assert new.user_attrs["run_dir"] == "trials/sdloop/trial_002"
    values = {t.number: t.value for t in study.trials}
    assert summary.best_trial == min(values, key=values.get), "the best is taken over every trial of the study"
    assert summary.best_value == pytest.approx(min(values.values()))
    assert _tree_hash(out / "trials" / "sdloop" / "trial_000") == before, "earlier trials are not touched"
    assert len(summary.table.splitlines()) == 2 + 3


def _fixture_paths(out: Path) -> tuple[Path, Path]:
    """The base and data folders a study recorded (the copies keep pointing at the session fixtures)."""
    setup = _study(out).user_attrs["sdloop_train_config"]
    return Path(setup["base"]), Path(setup["data"])


def test_two_studies_in_one_output_keep_each_others_folders(study_dir: Path, tmp_path: Path,
                                                            workspace: Path) -> None:
    out = _copy(study_dir, tmp_path)
    first = _tree_hash(out / "trials" / "sdloop")
    tune(_base(*_fixture_paths(out)), out, n_trials=1, space=SPACE, progress=False, study_name="second")
    assert _tree_hash(out / "trials" / "sdloop") == first, "another study's trials and reports are untouched"
    for t in _study(out).trials:  # the first study's records still point at intact run folders
        assert (out / t.user_attrs["run_dir"] / "manifest.json").is_file()
    second = _study(out, "second")
    assert second.trials[0].user_attrs["run_dir"] == "trials/second/trial_000"
    assert (out / "trials" / "second" / "trial_000" / "manifest.json").is_file()


def test_a_pruned_trial_stops_early_and_is_recorded_as_pruned(tiny_base: Path, synth_data: Path, tmp_path: Path,
                                                              workspace: Path) -> None:
    import optuna

    out = tmp_path / "tune"
    with pytest.raises(TuneError, match="no trial of study 'sdloop' completed"):
        tune(_base(tiny_base, synth_data), out, n_trials=1, space=SPACE, progress=False,
             pruner=optuna.pruners.ThresholdPruner(upper=0.0))  # every loss > 0: pruned at the first report
    (trial,) = _study(out).trials
    assert trial.state.name == "PRUNED" and list(trial.intermediate_values) == [2]
    manifest = RunFolder(out / "trials" / "sdloop" / "trial_000").manifest().to_dict()
    assert manifest["final_step"] == 2, "the trainer stopped at the pruned validation, not at max_steps (4)"
    rows = (out / "trials" / "sdloop" / "trials.csv").read_text().splitlines()
    assert len(rows) == 2 and ",PRUNED," in rows[1]


def test_a_killed_trial_is_marked_failed_and_resumed_in_its_folder(tiny_base: Path, synth_data: Path,
                                                                  tmp_path: Path, workspace: Path) -> None:
    out = tmp_path / "tune"
    env = {**os.environ, "SDLOOP_HOME": str(workspace), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "sdloop_cli", *_cli(tiny_base, synth_data, out, "--trials", "1", "--space",
                                                       SPACE_JSON)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "trials" / "sdloop" / "trial_000" / "checkpoints" / "step_000002" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not ckpt.is_file():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.is_file(), "the trial was killed after its first checkpoint"
    assert _study(out).trials[0].state.name == "RUNNING", "a killed process leaves its trial RUNNING"
    run = out / "trials" / "sdloop" / "trial_000"
    before = [line for line in (run / "metrics.jsonl").read_text().splitlines()[:-1]  # the last may be partial
              if json.loads(line)["step"] <= 2]
    assert before, "rows up to the checkpoint were written"

    tune(_base(tiny_base, synth_data), out, n_trials=1, space=SPACE, progress=False)
    killed, retry = _study(out).trials
    assert killed.state.name == "FAIL" and retry.state.name == "COMPLETE"
    assert retry.params == killed.params and retry.user_attrs["retry_of"] == 0
    assert retry.user_attrs["run_dir"] == killed.user_attrs["run_dir"] == "trials/sdloop/trial_000"
    after = (run / "metrics.jsonl").read_text().splitlines()
    assert after[:len(before)] == before, "resumed from the step-2 checkpoint: rows up to it kept as written"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "train_loss" in json.loads(line) and "lr" in json.loads(line)]
    assert steps == [1, 2, 3, 4], "resumed from the checkpoint: no step lost or repeated"
    assert RunFolder(run).manifest().to_dict()["final_step"] == 4
    assert not (out / "trials" / "sdloop" / "trial_001").exists()


def test_a_changed_space_or_setting_on_an_existing_study_is_refused(study_dir: Path, tmp_path: Path,
                                                                    workspace: Path, capsys) -> None:
    out = _copy(study_dir, tmp_path)
    base, data = _fixture_paths(out)
    before = _tree_hash(out)
    other = {**SPACE.to_dict(), "rank": [8, 16]}
    assert main(_cli(base, data, out, "--trials", "1", "--space", json.dumps(other))) == 2
    err = capsys.readouterr().err
    assert "searched another space" in err and "rank [2, 4] -> [8, 16]" in err and "--study-name" in err
    assert main(_cli(base, data, out, "--trials", "1", "--set", "max_steps=8")) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "max_steps 4 -> 8" in err and "Traceback" not in err
    assert _tree_hash(out) == before, "a refused run changes nothing"
    # the way out the message names: a new study in the same folder
    assert main(_cli(base, data, out, "--trials", "0", "--space", json.dumps(other), "--study-name", "wider")) == 2
    assert "no trial of study 'wider' completed" in capsys.readouterr().err


@pytest.mark.parametrize("space, words", [
    ("{rank: [4]}", "not valid JSON"), ("{'rank': [4]}", "not valid JSON"), ("[4, 8]", "JSON object"),
    ('{"ranks": [4]}', "unknown --space key(s) ranks"), ('{"rank": [4.7]}', "search.rank=[4.7] has the wrong type"),
    ('{"rank": 4}', "list of integers"), ('{"rank": [true]}', "wrong type"), ('{"rank": []}', "1 to 64"),
    ('{"rank": [0]}', "rank=0 is invalid"), ('{"batch_size": [2048]}', "batch_size=2048 is invalid"),
    ('{"learning_rate": [1e-4, 5]}', "learning_rate=5.0 is invalid"), ('{"learning_rate": [1e-3]}', "[low, high]"),
    ('{"learning_rate": [1e-2, 1e-3]}', "low <= high"), ('{"learning_rate": "1e-3"}', "list of numbers"),
    ('{"lora_dropout": [0, NaN]}', "finite"), ('{"weight_decay": [0, 0.1]}', "log scale"),
    ('{"lora_dropout": [0, 1]}', "lora_dropout=1.0 is invalid"), pytest.param("[" * 100_000, "JSON", id="deep"),
])
def test_malformed_space_is_one_line_before_anything_is_written(space: str, words: str, tiny_base: Path,
                                                                synth_data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "tune"
    assert main(_cli(tiny_base, synth_data, out, "--trials", "1", "--space", space)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert words in err
    assert not out.exists(), "refused before the tune folder is made"


def test_parse_space_keeps_defaults_for_missing_keys() -> None:
    space = parse_space('{"rank": [4, 8], "learning_rate": [1e-4, 1e-3]}')
    assert space.rank == [4, 8] and space.learning_rate == [1e-4, 1e-3]
    assert space.batch_size == SearchSpace().batch_size


def test_bad_tune_folders_are_one_line_and_untouched(tiny_base: Path, synth_data: Path, tmp_path: Path,
                                                     capsys) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    users = tmp_path / "users"
    users.mkdir()
    (users / "summary.json").write_text("{}")
    (users / "thesis.tex").write_text("mine")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "study.db").write_bytes(b"this is not sqlite" * 100)
    cases = [(a_file, [], "is a file"), (users, [], "did not make"),
             (tmp_path / "t", ["--study-name", "../up"], "--study-name"),
             (tmp_path / "t", ["--study-name", "trial_001"], "--study-name"),
             (tmp_path / "t", ["--trials", "-1"], "--trials=-1"),
             (broken, [], "not a readable optuna study database")]
    for out, more, words in cases:
        before = _state(out)
        assert main(_cli(tiny_base, synth_data, out, "--space", SPACE_JSON, *more)) == 2, words
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1 and "Traceback" not in err, err
        assert _state(out) == before


def test_a_second_tune_on_the_same_folder_is_refused(tiny_base: Path, synth_data: Path, tmp_path: Path,
                                                     capsys) -> None:
    import fcntl

    out = tmp_path / "tune"
    out.mkdir()
    with open(out / "tune.lock", "a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running `sdloop tune` holds it
        assert main(_cli(tiny_base, synth_data, out, "--space", SPACE_JSON)) == 2
    assert "another `sdloop tune`" in capsys.readouterr().err
    assert not (out / "study.db").exists()


def test_tune_needs_a_validation_split(tiny_base: Path, synth_data: Path, tmp_path: Path) -> None:
    base = TrainConfig.from_dict({"base": str(tiny_base), "data": str(synth_data), "output": "x",
                                  "data_config": {"validation_split": 0.0}})
    with pytest.raises(TuneError, match="validation_split"):
        tune(base, tmp_path / "t", n_trials=1)
    assert not (tmp_path / "t").exists()
