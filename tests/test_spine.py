"""The shared contract: run folders read from anywhere, atomic writes that honour the umask, the run-folder guard,
resume safety (changed data, damaged checkpoints), the config file alone, and one-line errors through main()."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from finetune.training.config import TrainConfig, tiny_overrides
from finetune.training.train import StopReason, TrainingError, train
from sdloop.atomic import save_safetensors, write_text_atomic
from sdloop_cli.main import main
from sdloop.runfolder import Manifest, RunFolder, RunFolderError

ROOT = Path(__file__).resolve().parents[1]


def _tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _args(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--quiet", "--base", str(base), "--data", str(data), "--output", str(out), "--max-steps", "4",
            "--validation-every", "2", "--resolution", "64", "--batch-size", "4", "--rank", "4", "--alpha", "4",
            "--set", "augment.bucket_step=8", "--set", "sample_steps=1", "--set", "sample_seeds=[0]",
            "--set", "sample_every=4", *extra]


def _imports(path: Path) -> list[str]:
    out: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        out += [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
    return out


def test_only_the_cli_imports_the_stages() -> None:
    """The layers: sdloop/ (shared) imports no stage; no stage and no shared module imports the command line."""
    stages = {"finetune", "export", "bento", "monitor"}
    for path in (ROOT / "sdloop").glob("*.py"):
        names = _imports(path)
        assert not any(n.split(".")[0] in stages | {"sdloop_cli"} for n in names), f"{path.name} imports {names}"
    for pkg in stages:
        for path in (ROOT / pkg).rglob("*.py"):
            assert not any(n.split(".")[0] == "sdloop_cli" for n in _imports(path)), f"{path} imports the CLI"


def test_run_folder_resolves_from_another_directory_and_after_a_move(tiny_run: Path, tiny_base: Path,
                                                                     synth_data: Path, tmp_path: Path,
                                                                     workspace: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    run = RunFolder(tiny_run)
    m = run.manifest()
    assert Path(m.base_model).is_absolute() and Path(m.dataset).is_absolute()
    assert m.schema_version == 2 and m.stop_reason == StopReason.MAX_STEPS.value
    assert run.base_model() == m.base_model and run.read_split()["validation"]
    # a workspace moved as a whole: base, data and run keep their places relative to each other
    ws = tmp_path / "ws"
    shutil.copytree(tiny_base, ws / "models" / "tiny")
    shutil.copytree(synth_data, ws / "data")
    monkeypatch.chdir(ws)
    assert main(_args(Path("models/tiny"), Path("data"), Path("runs/r"))) == 0  # relative paths, as users type
    os.rename(ws, tmp_path / "ws-moved")
    monkeypatch.chdir(tmp_path.parent)
    moved = RunFolder(tmp_path / "ws-moved" / "runs" / "r")
    assert Path(moved.base_model()).resolve() == (tmp_path / "ws-moved" / "models" / "tiny").resolve()
    assert moved.dataset().resolve() == (tmp_path / "ws-moved" / "data").resolve()
    pipe = moved.load_pipeline()
    assert any("lora_A" in n for n, _ in pipe.unet.named_parameters())


def test_manifest_schema_errors_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(RunFolderError, match="newer"):
        Manifest.from_dict({"schema_version": 99})
    with pytest.raises(RunFolderError, match="lacks"):
        Manifest.from_dict({"schema_version": 2, "base_model": "x"})
    run = tmp_path / "r"
    run.mkdir()
    with pytest.raises(RunFolderError, match="sdloop train"):
        RunFolder(tmp_path / "nothing").require_finished()
    with pytest.raises(RunFolderError, match="not an sdloop run"):
        RunFolder(run).require_finished()


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_written_files_honour_the_umask(tmp_path: Path, umask: int, file_mode: int, dir_mode: int) -> None:
    from sdloop.atomic import atomic_dir

    old = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
        save_safetensors(tmp_path / "t.safetensors", {"w": torch.zeros(2)})
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "t.safetensors").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "d").stat().st_mode & 0o777 == dir_mode


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "w.safetensors"
    save_safetensors(target, {"w": torch.ones(3)})
    before = target.read_bytes()
    with pytest.raises(Exception):
        save_safetensors(target, {"w": torch.zeros(3)}, metadata={"bad": 1})  # type: ignore[dict-item]
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_train_refuses_a_folder_of_user_files_and_touches_nothing(tiny_base, synth_data, tmp_path, workspace,
                                                                  capsys) -> None:
    out = tmp_path / "mine"
    (out / "lora").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"my": "numbers"}\n')
    (out / "split.json").write_text("my split")
    (out / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"my weights")
    before = _tree_hash(out)
    assert main(_args(tiny_base, synth_data, out)) == 2
    err = capsys.readouterr().err
    assert "did not make" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert _tree_hash(out) == before


def test_a_failed_start_leaves_a_folder_that_a_rerun_can_use(tiny_base, synth_data, tmp_path, workspace,
                                                              capsys) -> None:
    out = tmp_path / "run"
    assert main(_args(tmp_path / "no-base", synth_data, out)) == 2
    assert "sdloop base tiny" in capsys.readouterr().err
    assert not (out / "config.yaml").exists()
    assert main(_args(tiny_base, synth_data, out, "--set", "target_modules=[no_such_module]")) == 2
    err = capsys.readouterr().err
    assert "target_modules" in err and "Traceback" not in err
    assert main(_args(tiny_base, synth_data, out, "--resolution", "16")) == 2
    assert "resolution=16 does not fit this base" in capsys.readouterr().err
    assert main(_args(tiny_base, synth_data, out)) == 0, "the same folder works once the mistake is fixed"
    assert RunFolder(out).is_finished()


def test_config_file_alone_and_resume_from_another_directory(tiny_base, synth_data, tmp_path, workspace,
                                                             monkeypatch, capsys) -> None:
    values = {**tiny_overrides(), "base": str(tiny_base), "data": str(synth_data), "output": str(tmp_path / "r"),
              "max_steps": 4, "validation_every": 2, "sample_steps": 1, "sample_seeds": [0]}
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(TrainConfig.from_dict(values).to_yaml())
    assert main(["train", "--config", str(cfg_file), "--quiet"]) == 0
    assert "run folder:" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path.parent)
    assert main(["train", "--output", str(tmp_path / "r"), "--resume", "--quiet", "--max-steps", "6"]) == 0
    assert RunFolder(tmp_path / "r").manifest().final_step == 6


def test_resume_refuses_a_changed_dataset(tiny_base, synth_data, tmp_path, workspace, capsys) -> None:
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    out = tmp_path / "run"
    assert main(_args(tiny_base, data, out)) == 0
    split_before = (out / "split.json").read_bytes()
    first = sorted(p for p in data.iterdir() if p.suffix == ".png")[0]
    first.write_bytes((sorted(p for p in data.iterdir() if p.suffix == ".png")[1]).read_bytes()[:-1] + b"\0")
    assert main(["train", "--output", str(out), "--resume", "--quiet", "--max-steps", "6"]) == 2
    err = capsys.readouterr().err
    assert "changed since" in err and "->" in err
    assert (out / "split.json").read_bytes() == split_before


def test_resume_falls_back_past_a_damaged_checkpoint(tiny_base, synth_data, tmp_path, workspace, capsys) -> None:
    full, cut = tmp_path / "full", tmp_path / "cut"
    constant = ("--set", "lr_scheduler=constant")  # max_steps may change on resume; a cosine would stretch
    assert main(_args(tiny_base, synth_data, full, "--max-steps", "6", *constant)) == 0
    assert main(_args(tiny_base, synth_data, cut, *constant)) == 0  # the same run stopped at step 4
    weights = cut / "checkpoints" / "step_000004" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["train", "--output", str(cut), "--resume", "--max-steps", "6"]) == 0
    captured = capsys.readouterr()
    said = captured.out + captured.err
    assert "step_000004 is damaged" in said and "from step 2" in said
    from sdloop.atomic import load_safetensors

    a, _ = load_safetensors(RunFolder(full).diffusers_lora)
    b, _ = load_safetensors(RunFolder(cut).diffusers_lora)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_train_into_a_file_or_unwritable_place_is_one_line(tiny_base, synth_data, tmp_path, workspace,
                                                           capsys) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("user data")
    for out in (a_file, a_file / "under"):
        assert main(_args(tiny_base, synth_data, out)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and "Traceback" not in err
    assert a_file.read_text() == "user data"


def test_group_without_an_action_exits_2(capsys) -> None:
    for words in (["data"], ["base"], []):
        assert main(words) == 2
        assert "usage: sdloop" in capsys.readouterr().err


def test_train_result_names_its_stop_reason(tiny_run: Path) -> None:
    with pytest.raises(TrainingError, match="--resume"):
        train(TrainConfig.from_yaml(RunFolder(tiny_run).config), progress=False)


def test_benchmarks_compile() -> None:
    """CI runs pytest only: a benchmark that no longer compiles would go unnoticed until someone needs its figures."""
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        compile(path.read_text(encoding="utf-8"), str(path), "exec")
