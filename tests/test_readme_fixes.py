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


# ---- the evaluation leads with what decides it -----------------------------------------------------------------------

def _est(v: float, lo: float, hi: float) -> dict:
    return {"value": v, "low": lo, "high": hi}


def _row(label: str, better: str, a: tuple, b: tuple, winner, decisive: bool) -> dict:
    from finetune.evaluation.stats import BETTER_TEXT

    text = ("equal" if winner is None else f"{winner} better; difference outside its 95% interval" if decisive
            else f"{winner} better, but within noise (the difference's 95% interval includes 0)")
    return {"label": label, "computed": True, "better": better, "better_text": BETTER_TEXT[better], "note": "",
            "n": {"generated": 8, "reference": 8, "judged": 8}, "values": {"base": _est(*a), "finetuned": _est(*b)},
            "difference": {"value": b[0] - a[0], "low": -0.1, "high": 0.1},
            "verdict": {"better": winner, "decisive": decisive, "overlap": True, "text": text}}


def _demo_like(with_checker: bool) -> dict:
    """The demo's numbers: KID 0.175 (base) vs 0.186 (fine-tune) within noise; colour following 0 -> 0.5, decisive."""
    data = {"kind": "eval", "run": "/x/run", "headline": "kid",
            "models": {"base": {"title": "base"}, "finetuned": {"title": "fine-tuned"}},
            "metrics": {"kid": _row("KID", "lower", (0.175, 0.12, 0.23), (0.186, 0.13, 0.24), "base", False)},
            "extra": []}
    if with_checker:
        data["extra"].append({"key": "caption_following", "title": "Caption following (synthetic shapes)",
                              "note": "", "better": "higher", "level_label": "chance", "rows": {
                                  "colour": _row("colour", "higher", (0.0, 0.0, 0.0), (0.5, 0.25, 0.75),
                                                 "finetuned", True),
                                  "shape": _row("shape", "higher", (0.5, 0.2, 0.8), (0.625, 0.3, 0.9),
                                                "finetuned", False)}})
    return data


def test_caption_following_decides_when_the_base_has_the_checker_and_kid_says_within_noise() -> None:
    from finetune.evaluation.report_html import headline
    from finetune.evaluation.stats import decision

    d = decision(_demo_like(True))
    assert d["by"] == "caption_following" and d["better"] == "finetuned"
    assert d["lines"][0].startswith("Caption following decides") and "fine-tuned is better" in d["lines"][0]
    assert "colour 0 -> 0.5" in d["lines"][0] and "shape within noise" in d["lines"][0]
    assert d["lines"][1].startswith("KID") and "base scores better (0.175 vs 0.186), but within noise" in d["lines"][1]
    page = headline(_demo_like(True))
    assert page.index("Caption following decides") < page.index("within noise")

    k = decision(_demo_like(False))
    assert k["by"] == "kid" and k["lines"] == [
        "KID (lower is better): base scores better (0.175 vs 0.186), but within noise (the difference's 95% "
        "interval includes 0)."]


def test_the_command_line_table_holds_the_report_blocks(tmp_path: Path) -> None:
    from finetune.evaluation.evaluate import Evaluation

    data = _demo_like(True)
    lines = Evaluation(data, tmp_path / "eval.json", tmp_path / "report.html", 0, 0).lines()
    assert lines[0].startswith("Caption following decides")
    text = "\n".join(lines)
    assert "Caption following (synthetic shapes) (decides)" in text
    colour = next(line for line in lines if line.startswith("colour "))
    assert "0 [0, 0]" in colour and "0.5 [0.25, 0.75]" in colour and "outside its 95% interval" in colour


def test_sdloop_eval_prints_the_decision_and_the_caption_following_table(tiny_run: Path, workspace: Path,
                                                                         tmp_path: Path, capsys) -> None:
    import shutil

    import torch

    class Small(torch.nn.Module):  # a fast stand-in for Inception (as in test_evaluate)
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.c = torch.nn.Conv2d(3, 8, 5, stride=4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.c(x)).mean((2, 3))

    feats = tmp_path / "small.pt"
    torch.jit.save(torch.jit.script(Small().eval()), str(feats))
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert main(["eval", str(run), "--n", "4", "--steps", "2", "--features", str(feats), "--bootstrap", "50",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    import json

    data = json.loads((run / "eval" / "eval.json").read_text())
    assert data["decision"]["by"] == "caption_following", "the tiny run's prompts are synthetic-shape captions"
    assert out.splitlines()[0] == data["decision"]["lines"][0]
    assert "Caption following" in out and all(f"\n{col} " in out for col in data["extra"][0]["rows"])
    page = (run / "eval" / "report.html").read_text()
    assert page.index("Caption following decides") < page.index("<h2>Metrics</h2>")


# ---- threads: the commands run on the free cores --------------------------------------------------------------------
@pytest.mark.parametrize("cores,load,threads", [(2, 0.0, 2), (2, 0.6, 1), (2, 1.0, 1), (2, 3.5, 1), (8, 2.2, 6),
                                                (1, 0.0, 1), (4, 0.4, 4)])
def test_commands_take_the_cores_the_load_leaves(cores: int, load: float, threads: int) -> None:
    from sdloop.threads import free_cores

    assert free_cores(cores, load) == threads


def test_sdloop_cpu_threads_sets_them_and_a_bad_value_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import torch

    from sdloop.threads import choose_threads

    monkeypatch.setenv("SDLOOP_CPU_THREADS", "3")
    assert choose_threads() == 3 and choose_threads(1) == 1
    before = torch.get_num_threads()
    monkeypatch.setenv("SDLOOP_CPU_THREADS", "two")
    assert main(["eval", "no-such-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: SDLOOP_CPU_THREADS='two'") and err.count("\n") == 1
    assert torch.get_num_threads() == before
