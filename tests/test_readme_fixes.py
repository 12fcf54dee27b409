"""Issue 18, the parts that are README commands: a training resolution far above the images' side is warned about
(once, by `sdloop train` and `sdloop tune`), the README's tune commands pass the data's resolution, and its
`sdloop base tiny` commands write distinct folders (a second write into one says what to do in one line).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from sdloop_cli.main import main

README = Path(__file__).resolve().parents[1] / "README.md"
FAST = ["--quiet", "--max-steps", "1", "--batch-size", "2", "--rank", "2", "--alpha", "2", "--set", "sample_steps=1",
        "--set", "sample_seeds=[0]", "--set", "validation_timesteps=1", "--set", "augment.variants=1"]


@pytest.fixture(scope="module")
def small_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 captioned 16 px images (trained with --set data.min_side=16): at 64 px each is upscaled 4x."""
    from finetune.data.synth import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("data16") / "synth16", n=12, seed=0, size=16)


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if "upscaled" in line]


def test_the_warning_names_both_sizes_the_cost_and_the_flag() -> None:
    from finetune.training.setup import upscale_warning

    class Img:
        def __init__(self, w: int, h: int) -> None:
            self.width, self.height = w, h

    line = upscale_warning([Img(64, 64)] * 3 + [Img(512, 512)], 512)
    assert line == ("warning: the images are 64 px (median side) and --resolution is 512: each is upscaled 8x, "
                    "which costs 64x the compute and learns blur; pass --resolution 64")
    assert upscale_warning([Img(64, 64)], 128) is None, "2x is not warned about"
    assert upscale_warning([Img(64, 64)], 64) is None and upscale_warning([], 512) is None


def test_train_warns_once_when_it_upscales_small_images(tiny_base: Path, small_images: Path, workspace: Path,
                                                        tmp_path: Path, capsys) -> None:
    assert main(["train", "--base", str(tiny_base), "--data", str(small_images), "--output", str(tmp_path / "run"),
                 "--resolution", "64", "--validation-split", "0", "--set", "data.min_side=16", *FAST]) == 0
    lines = _warnings(capsys.readouterr().err)
    assert lines == ["warning: the images are 16 px (median side) and --resolution is 64: each is upscaled 4x, "
                     "which costs 16x the compute and learns blur; pass --resolution 16"]


@pytest.mark.parametrize("resolution, warned", [(64, False), (128, False), (256, True)])
def test_train_warns_only_above_twice_the_images_side(resolution: int, warned: bool, tiny_base: Path,
                                                      synth_data: Path, workspace: Path, tmp_path: Path, capsys,
                                                      monkeypatch) -> None:
    import finetune.training.train as train_mod

    def stop(*a, **k):  # the warning comes from the data phase; the model phase is not needed to see it
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "setup_model", stop)
    main(["train", "--base", str(tiny_base), "--data", str(synth_data), "--output", str(tmp_path / "run"),
          "--resolution", str(resolution), *FAST])  # stops after the data phase
    lines = _warnings(capsys.readouterr().err)
    assert lines == ([f"warning: the images are 64 px (median side) and --resolution is {resolution}: each is "
                      "upscaled 4x, which costs 16x the compute and learns blur; pass --resolution 64"]
                     if warned else [])


def test_tune_warns_once_for_all_its_trials(tiny_base: Path, small_images: Path, workspace: Path, tmp_path: Path,
                                            capsys) -> None:
    space = '{"learning_rate": [1e-3, 1e-2], "rank": [2], "batch_size": [2]}'
    assert main(["tune", "--base", str(tiny_base), "--data", str(small_images), "--output", str(tmp_path / "tune"),
                 "--trials", "2", "--resolution", "64", "--validation-split", "0.25", "--validation-every", "1",
                 "--set", "data.min_side=16", "--space", space, *FAST]) == 0
    lines = _warnings(capsys.readouterr().err)
    assert len(lines) == 1 and "pass --resolution 16" in lines[0], lines


def _commands(prefix: str) -> list[list[str]]:
    """The README's shell commands that start with ``prefix`` (continuation lines joined, comments dropped)."""
    text = README.read_text().replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in text.splitlines()
            if line.strip().startswith(prefix)]


def test_readme_trains_the_synthetic_data_at_its_own_resolution() -> None:
    size = {c[3]: int(c[c.index("--size") + 1]) if "--size" in c else 64 for c in _commands("sdloop data synth ")}
    checked = 0
    for cmd in _commands("sdloop tune ") + _commands("sdloop train "):
        if "--data" not in cmd or cmd[cmd.index("--data") + 1] not in size:
            continue
        data = cmd[cmd.index("--data") + 1]
        assert "--resolution" in cmd, f"{shlex.join(cmd)} trains {data}'s {size[data]} px images at 512 px"
        assert int(cmd[cmd.index("--resolution") + 1]) <= 2 * size[data], shlex.join(cmd)
        checked += 1
    assert checked >= 3, "the README's train and tune commands on ./synth"


def test_readme_base_commands_write_distinct_folders() -> None:
    outs = [c[3] for c in _commands("sdloop base tiny ") + _commands("sdloop base pretrain ")]
    assert outs and len(outs) == len(set(outs)), outs


def test_base_tiny_into_a_folder_it_made_says_what_to_do(tmp_path: Path, capsys) -> None:
    out = tmp_path / "tiny-sd"
    assert main(["base", "tiny", str(out), "--weights", "random", "--seed", "0"]) == 0
    capsys.readouterr()
    assert main(["base", "tiny", str(out), "--weights", "random", "--seed", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0] and str(out) in err[0], err
