"""One configuration protocol: train, export and monitor settings take ``--set KEY=VALUE`` through the one parser
(sdloop/overrides.py, YAML 1.2, typed against the field), so ``5e-1`` is a number on every command, and a value of
the wrong type is one line naming the field and exit 2, before any work starts. Tried as a user types them."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sdloop.configfile import ConfigError
from sdloop_cli.main import main

ROOT = Path(__file__).resolve().parent.parent


def _one_line(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err
    return err


# ---- the three commands, as a user types them ---------------------------------------------------------------------
@pytest.fixture()
def captured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    """Each stage's entry point replaced by one that keeps the config it was handed (the config is what is tested;
    training, exporting and checking are tested elsewhere)."""
    seen: dict[str, Any] = {}

    def fake_train(cfg: Any, **_: Any) -> Any:
        seen["train"] = cfg
        return SimpleNamespace(main_process=False)

    def fake_export(run_dir: Path, output: Any, cfg: Any, **_: Any) -> Any:
        seen["export"] = cfg
        return SimpleNamespace(summary="exported", export_dir=tmp_path / "export")

    def fake_check(cfg: Any, **_: Any) -> Any:
        seen["monitor"] = cfg
        return SimpleNamespace(decision=SimpleNamespace(retrain=False), lines=lambda: ["verdict: HEALTHY"])

    monkeypatch.setattr("finetune.training.train.train", fake_train)
    monkeypatch.setattr("export.build.build_export", fake_export)
    monkeypatch.setattr("monitor.check.run_check", fake_check)
    return seen


def _train(tmp_path: Path, *more: str) -> list[str]:
    return ["train", "--base", str(tmp_path / "base"), "--data", str(tmp_path / "data"), "--output",
            str(tmp_path / "run"), "--quiet", *more]


def test_export_reads_numbers_as_numbers_and_refuses_wrong_types(captured: dict, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run = str(tmp_path / "run")
    assert main(["export", run, "--quiet", "--set", "guidance_scale=5e-1", "--set", "tolerances.min_psnr=45",
                 "--set", "precision=null"]) == 0
    cfg = captured["export"]
    assert cfg.guidance_scale == 0.5 and isinstance(cfg.guidance_scale, float), "YAML 1.2: 5e-1 is a number"
    assert cfg.tolerances == {"min_psnr": 45} and cfg.precision == "fp32"
    capsys.readouterr()
    assert main(["export", run, "--set", "steps=2.5"]) == 2
    _one_line(capsys, "steps=2.5 has the wrong type", "an integer")
    assert main(["export", run, "--set", "prompts=hello"]) == 2
    _one_line(capsys, "prompts='hello' has the wrong type", "list of strings", "[item]")
    assert main(["export", run, "--set", "guidance_scale=high"]) == 2
    _one_line(capsys, "guidance_scale='high' has the wrong type")
    assert main(["export", run, "--set", "guidance_scale=5e2"]) == 2
    _one_line(capsys, "guidance_scale=500.0 is invalid", "[0, 50]")
    assert main(["export", run, "--set", "nope=1"]) == 2
    _one_line(capsys, "unknown config key nope", "known keys:", "guidance_scale")


def test_export_lists_its_settings(captured: dict, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--help-config"]) == 0
    out = capsys.readouterr().out
    for key in ("guidance_scale", "int8_max_kid", "tolerances", "latency_images"):
        assert key in out
    with pytest.raises(SystemExit) as exited:  # without --help-config, RUN_DIR is still required
        main(["export"])
    assert exited.value.code == 2 and "RUN_DIR" in capsys.readouterr().err


def test_monitor_reads_numbers_as_numbers_and_refuses_wrong_types(captured: dict, workspace: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    workspace.mkdir(parents=True, exist_ok=True)
    (workspace / "monitor.yaml").write_text("train_overrides:\n  max_steps: 20\n  rank: 4\n")
    assert main(["monitor", "check", "--set", "prompt_drift_threshold=5e-1", "--set", "image_drift_threshold=2e-1",
                 "--set", "train_overrides.learning_rate=5e-2", "--set", "train_overrides.augment.flip_p=0.5"]) == 0
    cfg = captured["monitor"]
    assert cfg.prompt_drift_threshold == 0.5 and isinstance(cfg.prompt_drift_threshold, float)
    assert cfg.image_drift_threshold == 0.2
    assert cfg.train_overrides == {"max_steps": 20, "rank": 4, "learning_rate": 0.05, "augment": {"flip_p": 0.5}}, \
        "a dotted key changes one key of the file's mapping and keeps the others"
    capsys.readouterr()
    assert main(["monitor", "check", "--set", "min_generations=2.5"]) == 2
    _one_line(capsys, "min_generations=2.5 has the wrong type")
    assert main(["monitor", "check", "--set", "gate_prompts=hello"]) == 2
    _one_line(capsys, "gate_prompts='hello' has the wrong type", "list of strings")
    assert main(["monitor", "check", "--set", "prompt_drift_threshold=-5e-1"]) == 2
    _one_line(capsys, "prompt_drift_threshold=-0.5 is invalid", "positive")
    assert main(["monitor", "check", "--set", "drift_treshold=0.5"]) == 2
    _one_line(capsys, "unknown config key drift_treshold", "known keys:", "prompt_drift_threshold")
    assert main(["monitor", "check", "--help-config"]) == 0
    assert "prompt_drift_threshold" in capsys.readouterr().out


def test_train_reads_numbers_as_numbers_and_refuses_wrong_types(captured: dict, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_train(tmp_path, "--set", "learning_rate=5e-2", "--set", "data.validation_split=2e-1")) == 0
    cfg = captured["train"]
    assert cfg.learning_rate == 0.05 and isinstance(cfg.learning_rate, float)
    assert cfg.data_config.validation_split == 0.2
    capsys.readouterr()
    assert main(_train(tmp_path, "--set", "max_steps=2.5")) == 2
    _one_line(capsys, "max_steps=2.5 has the wrong type")
    assert main(_train(tmp_path, "--set", "sample_prompts=hello")) == 2
    _one_line(capsys, "sample_prompts='hello' has the wrong type")


def test_every_command_goes_through_the_one_parser(captured: dict, workspace: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import sdloop.overrides as overrides

    calls: list[str] = []
    real = overrides.parse_value

    def spy(text: str, declared: Any = None) -> Any:
        calls.append(text)
        return real(text, declared)

    monkeypatch.setattr(overrides, "parse_value", spy)
    assert main(["export", str(tmp_path / "run"), "--quiet", "--set", "guidance_scale=1e-1"]) == 0
    assert main(["monitor", "check", "--set", "kid_margin=2e-2"]) == 0
    assert main(_train(tmp_path, "--set", "weight_decay=3e-2")) == 0
    assert calls == ["1e-1", "2e-2", "3e-2"]
    assert (captured["export"].guidance_scale, captured["monitor"].kid_margin, captured["train"].weight_decay) == (
        0.1, 0.02, 0.03)


# ---- the configs themselves ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, values, words", [
    ("export", {"steps": 2.5}, "steps=2.5 has the wrong type"),
    ("export", {"guidance_scale": "5e-1"}, "guidance_scale='5e-1' has the wrong type"),
    ("export", {"prompts": "hello"}, "prompts='hello' has the wrong type"),
    ("export", {"precision": 16}, "precision=16 has the wrong type: expected a string (str) or null"),
    ("export", {"tolerances": {"min_psnr": "high"}}, "tolerances="),
    ("monitor", {"kid_margin": "0.1"}, "kid_margin='0.1' has the wrong type"),
    ("monitor", {"drop_rating": 4.5}, "drop_rating=4.5 has the wrong type"),
])
def test_configs_check_types_before_ranges(name: str, values: dict, words: str) -> None:
    """A wrong type is one line naming the field, never a TypeError out of a range comparison."""
    from export.config import ExportConfig
    from monitor.config import MonitorConfig
    from sdloop.errors import UserError

    cls = {"export": ExportConfig, "monitor": MonitorConfig}[name]
    with pytest.raises(UserError) as err:
        cls.from_dict(values)
    assert words in str(err.value)


def test_parser_api_for_a_new_config() -> None:
    """What another config (the service's) gets from sdloop.overrides: parse, build, list."""
    from dataclasses import dataclass

    from sdloop.overrides import build_dataclass, check_types, config_help, help_field, parse_overrides, parse_value

    @dataclass
    class Example:
        deadline_s: float = help_field(30.0, "Seconds a request may take.")
        name: str = help_field("x", "A name.")
        extra: dict = help_field({}, "Free-form settings.")

        def __post_init__(self) -> None:
            check_types(self, "")

    values = parse_overrides(Example, ["deadline_s=5e-1", "name=no", "extra.a.b=1"])
    assert values == {"deadline_s": 0.5, "name": "no", "extra": {"a": {"b": 1}}}
    assert build_dataclass(Example, values, prefix="").deadline_s == 0.5
    assert parse_value("5e-1", float) == 0.5 and parse_value("no", str) == "no"
    assert "deadline_s" in config_help(Example) and "Seconds a request may take." in config_help(Example)
    for item, words in (("deadline_s", "is not KEY=VALUE"), ("name.x=1", "not a section or a mapping setting"),
                        ("dead=1", "known keys: deadline_s, extra, name")):
        with pytest.raises(ConfigError, match=words):
            parse_overrides(Example, [item])


# ---- one parser, in the source ------------------------------------------------------------------------------------
def _sources() -> list[Path]:
    skip = {"tests", ".git", "docs", "build", "dist"}
    return [p for p in ROOT.rglob("*.py") if not (set(p.relative_to(ROOT).parts) & skip)
            and not any(part.endswith(".egg-info") or part.startswith(".") for part in p.relative_to(ROOT).parts)]


def _calls(path: Path) -> list[ast.Call]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]


def test_only_sdloop_overrides_parses_key_value() -> None:
    """No second ``--set`` parser: splitting text at "=" happens in sdloop/overrides.py only, and the command line
    and the config modules never read a value with PyYAML's YAML 1.1 ``safe_load`` (``5e-2`` would be a string)."""
    splitters, yaml11 = [], []
    config_modules = {"sdloop_cli", "sdloop"}
    config_files = {"finetune/training/config.py", "export/config.py", "monitor/config.py"}
    for path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        for call in _calls(path):
            name = call.func.attr  # type: ignore[attr-defined]
            first = call.args[0] if call.args else None
            if name in ("partition", "split", "rsplit", "rpartition") and isinstance(first, ast.Constant) \
                    and first.value == "=":
                splitters.append(f"{rel}:{call.lineno}")
            if name in ("safe_load", "load") and isinstance(call.func.value, ast.Name) \
                    and call.func.value.id == "yaml" and (rel.split("/")[0] in config_modules or rel in config_files):
                yaml11.append(f"{rel}:{call.lineno}")
    assert splitters and all(s.startswith("sdloop/overrides.py:") for s in splitters), splitters
    assert all(s.startswith("sdloop/configfile.py:") for s in yaml11), \
        f"read config values with sdloop.configfile.yaml_load (YAML 1.2), not PyYAML directly: {yaml11}"
    assert not (ROOT / "finetune" / "training" / "overrides.py").exists(), "one --set parser, in sdloop/overrides.py"
