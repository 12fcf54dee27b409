"""Config values: every key is checked against its declared type before its range, and every problem with a value
or a config file is one line that names the key (with its section) or the file, exit code 2, never a traceback.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path

import pytest

from finetune.training.config import AugmentConfig, ConfigError, DataConfig, SearchSpace, TrainConfig, load_config_file
from sdloop.overrides import apply_overrides
from sdloop_cli.main import main

SECTIONS = {"data_config": (DataConfig, "data."), "augment": (AugmentConfig, "augment.")}


def _train(tmp_path: Path, *more: str) -> list[str]:
    # base and data need not exist: a config mistake is reported before anything is read or made
    return ["train", "--base", str(tmp_path / "base"), "--data", str(tmp_path / "data"), "--output",
            str(tmp_path / "run"), "--quiet", *more]


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("setting, words", [
    ("sample_prompts=hello", "sample_prompts='hello' has the wrong type: expected a list of strings"),
    ("max_steps=2.5", "max_steps=2.5 has the wrong type: expected an integer (int)"),
    ("max_steps=1e12", "max_steps=1000000000000.0 has the wrong type"),
    ("augment.flip_p=yes", "augment.flip_p='yes' has the wrong type: expected a number (float)"),
    ("augment.flip_p=[0.5]", "augment.flip_p=[0.5] has the wrong type"),
    ("target_modules=x", "target_modules='x' has the wrong type: expected a list of strings"),
    ("text_encoder_target_modules=[1, 2]", "text_encoder_target_modules=[1, 2] has the wrong type"),
    ("batch_size=2.0", "batch_size=2.0 has the wrong type"), ("rank=4.7", "rank=4.7 has the wrong type"),
    ("rank=true", "rank=True has the wrong type"), ("rank='8'", "write the number without quotes"),
    ("ema=1", "ema=1 has the wrong type: expected true or false (bool)"), ("use_cache=yes", "use_cache='yes'"),
    ("learning_rate=[0.001]", "learning_rate=[0.001] has the wrong type"), ("learning_rate=abc", "learning_rate="),
    ("alpha=inf", "alpha='inf' is invalid: expected a finite number"), ("alpha=.nan", "alpha=nan is invalid"),
    ("alpha=1e400", "alpha=inf is invalid: expected a finite number"),
    ("seed=9223372036854775808", "seed=9223372036854775808 is invalid"), ("seed=-1", "seed=-1 is invalid"),
    ("augment.seed=-3", "augment.seed=-3"), ("data.split_seed=99999999999999999999", "data.split_seed="),
    ("augment=3", "augment=3 has the wrong type"), ("data_config=[1]", "data_config=[1] has the wrong type"),
    ("augment={flip_p: yes}", "augment.flip_p='yes'"), ("data_config={bogus: 1}", "data.bogus"),
    ("sample_seeds=[0, a]", "sample_seeds=[0, 'a'] has the wrong type"), ("sample_seeds=[]", "sample_seeds=[]"),
    ("resolution=65536", "resolution=65536 is invalid"), ("resolution=12", "resolution=12 is invalid"),
    ("data.caption_extension=/x", "data.caption_extension='/x'"), ("data=a\x00b", "contains a NUL byte"),
    ("lr_scheduler=[cosine]", "lr_scheduler='[cosine]' is invalid"), ("gradient_accumulation=0.5", "gradient_acc"),
    ("augment.variants=1000", "augment.variants=1000 is invalid"), ("no_such_key=1", "unknown config key"),
])
def test_wrong_values_through_the_command_line_are_one_line(setting: str, words: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_train(tmp_path, "--set", setting)) == 2
    assert words in _one_line_error(capsys)
    assert not (tmp_path / "run").exists(), "refused before the run folder is made"


@pytest.mark.parametrize("flags, words", [
    (["--alpha", "inf"], "alpha=inf is invalid: expected a finite number"),
    (["--learning-rate", "nan"], "learning_rate=nan is invalid"),
    (["--seed", str(2**64)], "seed="), (["--resolution", "65536"], "resolution=65536"),
])
def test_wrong_values_through_flags_are_one_line(flags: list[str], words: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_train(tmp_path, *flags)) == 2
    assert words in _one_line_error(capsys)


def _wrong_value(tp: typing.Any) -> object:
    """A value no declared type would take from a user without a mistake."""
    if tp is str:
        return 5
    if tp in (int, float, bool) or typing.get_origin(tp) is list:
        return "x"
    return 3  # a section


@pytest.mark.parametrize("cls, prefix", [(TrainConfig, ""), (DataConfig, "data."), (AugmentConfig, "augment."),
                                         (SearchSpace, "search.")])
def test_every_key_of_every_config_is_type_checked(cls: type, prefix: str) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        with pytest.raises(ConfigError) as err:
            cls(**{f.name: _wrong_value(hints[f.name])})
        assert f"{prefix}{f.name}=" in str(err.value) and "has the wrong type" in str(err.value), f.name
    for name, (section, section_prefix) in SECTIONS.items():  # and through a section of a TrainConfig mapping
        for f in dataclasses.fields(section):
            with pytest.raises(ConfigError, match=f"^{section_prefix}{f.name}="):
                TrainConfig.from_dict({name: {f.name: _wrong_value(typing.get_type_hints(section)[f.name])}})


@pytest.mark.parametrize("values, words", [
    ({"learning_rate": [1e-4]}, "learning_rate=[0.0001] has the wrong type"),
    ({"rank": "8"}, "rank='8' has the wrong type"), ({"rank": 8.0}, "rank=8.0 has the wrong type"),
    ({"ema": "true"}, "ema='true' has the wrong type"), ({"mixed_precision": False}, 'quote it'),
    ({"augment": "x"}, "augment='x' has the wrong type"), ({"augment": {"bogus": 1}}, "augment.bogus"),
    ({"data_config": {"validation_split": "0.2"}}, "data.validation_split='0.2' has the wrong type"),
    ({1: 2}, "config key 1 is not a name"), ({"sample_seeds": [0, True]}, "sample_seeds"),
    ({"sample_seeds": [2**63]}, "sample_seeds"), ({"alpha": float("inf")}, "alpha=inf is invalid"),
])
def test_wrong_types_from_a_mapping_name_the_key(values: dict, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict(values)
    assert words in str(err.value)


def test_right_types_are_normalised_not_refused() -> None:
    cfg = TrainConfig.from_dict({"alpha": 16, "augment": {"flip_p": 1}, "target_modules": ("to_q", "to_v"),
                                 "data_config": None})
    assert cfg.alpha == 16.0 and isinstance(cfg.alpha, float), "an int where a float is declared is a float"
    assert isinstance(cfg.augment.flip_p, float) and cfg.target_modules == ["to_q", "to_v"]
    assert cfg.data_config == DataConfig()
    values = apply_overrides(TrainConfig, {}, ["mixed_precision=no", "learning_rate=1e-4",
                                               'sample_prompts=["a red circle"]', "data.caption_column=caption",
                                               "lr_scheduler='linear'", "augment.flip_p=0.5"])
    cfg = TrainConfig.from_dict(values)
    assert cfg.mixed_precision == "no" and cfg.learning_rate == 1e-4 and cfg.sample_prompts == ["a red circle"]
    assert cfg.data_config.caption_column == "caption" and cfg.lr_scheduler == "linear"


def test_yaml_files_read_numbers_and_words_as_people_write_them(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("learning_rate: 1e-4\nmixed_precision: no\nema: true\naugment:\n  # all defaults\n"
                    "sample_prompts: [a red circle]\n", encoding="utf-8")
    cfg = TrainConfig.from_yaml(path)
    assert cfg.learning_rate == 1e-4 and cfg.mixed_precision == "no" and cfg.ema is True
    assert cfg.augment == AugmentConfig() and cfg.sample_prompts == ["a red circle"]
    again = tmp_path / "again.yaml"
    again.write_text(cfg.to_yaml(), encoding="utf-8")
    assert TrainConfig.from_yaml(again) == cfg, "config.yaml round-trips"


def _bad_config_files(tmp_path: Path) -> list[tuple[Path, str]]:
    broken = tmp_path / "broken.yaml"
    broken.write_text("learning_rate: 0.1\n  rank: [4\n", encoding="utf-8")
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("sample_prompts: [caf\u00e9]\n".encode("latin-1"))
    a_list = tmp_path / "list.yaml"
    a_list.write_text("- rank: 4\n", encoding="utf-8")
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text("rank: !!python/object/apply:os.system [echo]\n", encoding="utf-8")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    return [(broken, "is not valid YAML"), (latin, "is not UTF-8 text (byte 0xe9"), (a_list, "mapping"),
            (tagged, "is not valid YAML"), (fifo, "fifo.yaml"), (tmp_path, "is a folder"),
            (tmp_path / "missing.yaml", "does not exist")]


def test_bad_config_files_are_one_line_through_the_command_line(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    for path, words in _bad_config_files(tmp_path):
        assert main(_train(tmp_path, "--config", str(path))) == 2, path
        err = _one_line_error(capsys)
        assert words in err and path.name in err, err
    assert not (tmp_path / "run").exists()


def test_load_config_file_is_the_one_reader(tmp_path: Path) -> None:
    for path, words in _bad_config_files(tmp_path):
        with pytest.raises(ConfigError, match=None) as err:
            load_config_file(path)
        assert words in str(err.value) and "\n" not in str(err.value)
        with pytest.raises(ConfigError):
            TrainConfig.from_yaml(path)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n", encoding="utf-8")
    assert load_config_file(empty) == {} and TrainConfig.from_yaml(empty) == TrainConfig()
