"""Preference datasets (issue 20): `sdloop data check` reads pairs, thumbs and Pick-a-Pic's layout, reports each bad
line with a reason like any other bad dataset, changes nothing in the folder, and splits by prompt; the trainer's
data phase takes only what each objective learns from."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from sdloop_cli.main import main

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "cyan"]


def folder_hash(root: Path) -> str:
    """Names, types, sizes and bytes of everything under root (symlinks as their targets' text)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            h.update(str(p.relative_to(root)).encode())
            if p.is_symlink():
                h.update(os.readlink(p).encode())
            elif p.is_file():
                h.update(p.read_bytes())
            else:
                h.update(b"special")
    return h.hexdigest()


def write_lines(path: Path, rows: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


@pytest.fixture(scope="module")
def pref_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 images; 6 usable lines over 4 prompts (3 pairs, 3 singles) and one bad line of each kind."""
    root = tmp_path_factory.mktemp("pref") / "prefs"
    (root / "img" / "deep").mkdir(parents=True)
    for c in COLOURS:
        Image.new("RGB", (64, 64), c).save(root / "img" / f"{c}.png")
    Image.new("RGB", (64, 64), "black").save(root / "img" / "deep" / "black.png")
    (root / "img" / "broken.png").write_bytes(b"\x89PNG not really")
    outside = tmp_path_factory.mktemp("outside") / "secret.png"
    Image.new("RGB", (64, 64), "pink").save(outside)
    (root / "img" / "link.png").symlink_to(outside)
    write_lines(root / "preferences.jsonl", [
        {"prompt": "a red square", "chosen": "img/red.png", "rejected": "img/blue.png", "rater": "ann"},
        {"prompt": "a red square", "chosen": "img/red.png", "rejected": "img/deep/black.png", "rater": "bob",
         "weight": 0.5},
        {"prompt": "a blue square", "chosen": "img/blue.png", "rejected": "img/green.png", "rater": "ann"},
        {"prompt": "a green square", "image": "img/green.png", "label": "desirable", "rater": "cy"},
        {"prompt": "a green square", "image": "img/yellow.png", "label": "undesirable", "rater": "ann"},
        {"prompt": "a purple square", "image": "img/purple.png", "label": "Desirable"},
        {"prompt": "x", "chosen": "img/red.png"},                                     # 7 one_sided_pair
        {"prompt": "x", "chosen": "img/red.png", "rejected": "img/red.png"},          # 8 same_image
        {"prompt": "x", "image": "img/red.png", "label": "meh"},                      # 9 unknown_label
        {"prompt": "  ", "image": "img/red.png", "label": "desirable"},               # 10 empty_prompt
        {"prompt": "x", "image": "img/missing.png", "label": "desirable"},            # 11 missing_image
        {"prompt": "x", "image": "img/broken.png", "label": "desirable"},             # 12 bad_image
        {"prompt": "x", "image": "../outside.png", "label": "desirable"},             # 13 outside_dataset
        {"prompt": "x", "image": "img/link.png", "label": "desirable"},               # 14 symlink out
        "{not json",                                                                  # 15 bad_json
        {"prompt": "x", "image": "img/red.png", "label": "desirable", "weight": -1},  # 16 bad_weight
        {"prompt": "a red square", "chosen": "img/red.png", "rejected": "img/blue.png", "rater": "ann"},  # 17 dup
        ["a list"],                                                                   # 18 bad_json
    ])
    return root


def check(tmp_path: Path, data: Path, capsys: pytest.CaptureFixture, *extra: str) -> tuple[int, dict, str]:
    out = tmp_path / "report.json"
    rc = main(["data", "check", str(data), "--json", str(out), "--quiet", *extra])
    text = capsys.readouterr()
    return rc, (json.loads(out.read_text()) if out.is_file() else {}), text.out + text.err


def test_check_reports_every_bad_line_and_changes_nothing(pref_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture, workspace: Path) -> None:
    before = folder_hash(pref_dir)
    rc, report, text = check(tmp_path, pref_dir, capsys)
    assert rc == 0, text
    assert folder_hash(pref_dir) == before
    reasons = {s["path"]: s["reason"] for s in report["skipped"]}
    expected = {7: "one_sided_pair", 8: "same_image", 9: "unknown_label", 10: "empty_prompt", 11: "missing_image",
                12: "bad_image", 13: "outside_dataset", 14: "outside_dataset", 15: "bad_json", 16: "bad_weight",
                17: "duplicate_preference", 18: "bad_json"}
    for line, reason in expected.items():
        assert reasons[f"preferences.jsonl line {line}"] == reason, (line, reasons)
    assert reasons["img/broken.png"] == "not_an_image" and "img/link.png" not in reasons  # never opened
    pref = report["stats"]["preference"]
    assert (pref["lines"], pref["records"], pref["pairs"], pref["singles"]) == (18, 6, 3, 3)
    assert (pref["desirable"], pref["undesirable"], pref["prompts"]) == (2, 1, 4)
    assert pref["raters"] == 4 and pref["largest_rater"] == "ann" and pref["largest_rater_share"] == 0.5
    assert len(report["preferences"]) == 6 and report["preferences"][1]["weight"] == 0.5
    # the liked images with their prompts: what sft trains on
    assert sorted((i["path"], i["caption"]) for i in report["items"]) == [
        ("img/blue.png", "a blue square"), ("img/green.png", "a green square"),
        ("img/purple.png", "a purple square"), ("img/red.png", "a red square")]
    split = report["stats"]["split"]
    assert split["by"] == "prompt" and split["train"] + split["validation"] == 6 and split["validation"] >= 1
    assert "pairs       3" in text and "one_sided_pair" in text and "by prompt" in text


def test_nothing_usable_exits_1_and_a_missing_folder_2(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                      workspace: Path) -> None:
    root = tmp_path / "bad"
    root.mkdir()
    write_lines(root / "preferences.jsonl", [{"prompt": "x", "chosen": "a.png", "rejected": "b.png"}, "nope"])
    rc, report, text = check(tmp_path, root, capsys)
    assert rc == 1 and "no usable preferences" in text
    assert {s["reason"] for s in report["skipped"]} == {"missing_image", "bad_json"}
    rc, _, text = check(tmp_path, tmp_path / "absent", capsys)
    assert rc == 2 and text.count("\n") == 1


def test_pick_a_pic_layout_skips_ties(tmp_path: Path, capsys: pytest.CaptureFixture, workspace: Path) -> None:
    root = tmp_path / "pick"
    root.mkdir()
    for c in COLOURS[:4]:
        Image.new("RGB", (64, 64), c).save(root / f"{c}.jpg")
    write_lines(root / "metadata.jsonl", [
        {"caption": "a red cat", "jpg_0": "red.jpg", "jpg_1": "blue.jpg", "label_0": 1, "user_id": 7},
        {"caption": "a green cat", "jpg_0": "green.jpg", "jpg_1": "yellow.jpg", "label_0": 0},
        {"caption": "a tie", "jpg_0": "red.jpg", "jpg_1": "green.jpg", "label_0": 0.5},
        {"caption": "odd", "jpg_0": "red.jpg", "jpg_1": "green.jpg", "label_0": 2},
        {"caption": "half", "image_0": "red.jpg", "label_0": 1},
    ])
    rc, report, text = check(tmp_path, root, capsys)
    assert rc == 0, text
    assert report["stats"]["preference"]["layout"] == "pick-a-pic"
    pairs = {(p["prompt"], p["chosen"], p["rejected"], p["rater"]) for p in report["preferences"]}
    assert pairs == {("a red cat", "red.jpg", "blue.jpg", "7"), ("a green cat", "yellow.jpg", "green.jpg", "")}
    assert [s["reason"] for s in report["skipped"]] == ["tie", "unknown_label", "one_sided_pair"]


def test_fifo_image_is_reported_not_read(tmp_path: Path, capsys: pytest.CaptureFixture, workspace: Path) -> None:
    root = tmp_path / "fifo"
    root.mkdir()
    Image.new("RGB", (64, 64), "red").save(root / "a.png")
    os.mkfifo(root / "b.png")
    write_lines(root / "preferences.jsonl", [{"prompt": "p", "chosen": "a.png", "rejected": "b.png"},
                                             {"prompt": "q", "image": "a.png", "label": "desirable"}])
    rc, report, text = check(tmp_path, root, capsys)
    assert rc == 0, text
    assert ("b.png", "not_a_file") in {(s["path"], s["reason"]) for s in report["skipped"]}
    assert ("preferences.jsonl line 1", "bad_image") in {(s["path"], s["reason"]) for s in report["skipped"]}


def test_split_keeps_a_prompt_on_one_side_and_warns_about_one_rater() -> None:
    from finetune.data.preference import PreferenceRecord, preference_stats, split_preferences
    from finetune.training.config import DataConfig

    recs = [PreferenceRecord("pair", f"prompt {i % 13}", chosen=f"c{i}.png", rejected=f"r{i}.png",
                             rater="loud" if i % 4 else "quiet") for i in range(60)]
    cfg = DataConfig(validation_split=0.2, split_seed=3)
    train, val = split_preferences(recs, cfg)
    assert val and not {r.prompt for r in train} & {r.prompt for r in val}
    assert len(train) + len(val) == 60 and len(val) <= 12
    assert split_preferences(list(reversed(recs)), cfg)[1] == [r for r in reversed(recs) if r in val]
    assert preference_stats(recs)["largest_rater_share"] == 0.75


def test_trainer_data_phase_per_objective(pref_dir: Path, tmp_path: Path, synth_data: Path) -> None:
    """sft takes the liked images; dpo the pairs; kto the thumbs and each pair's two sides; dpo on a plain
    dataset is one line saying what it needs."""
    from finetune.training.config import TrainConfig
    from finetune.training.setup import SetupError, check_data
    from sdloop.runfolder import RunFolder

    def data(objective: str, path: Path = pref_dir) -> object:
        cfg = TrainConfig(data=str(path), output=str(tmp_path / objective), objective=objective, resolution=64,
                          data_config={"validation_split": 0.25})
        return check_data(cfg, RunFolder(cfg.output), False, False, None, warn=False)

    sft = data("sft")
    liked = {("img/red.png", "a red square"), ("img/blue.png", "a blue square"), ("img/green.png", "a green square"),
             ("img/purple.png", "a purple square")}
    assert {(i.path, i.caption) for i in sft.train_items + sft.val_items} <= liked and sft.preference is None
    dpo = data("dpo")
    assert {r.kind for r in dpo.preference.train + dpo.preference.val} == {"pair"}
    assert len(dpo.preference.train) + len(dpo.preference.val) == 3
    kto = data("kto")
    units = kto.preference.train + kto.preference.val
    assert len(units) == 3 + 2 * 3 and {r.kind for r in units} == {"single"}
    assert sum(not r.desirable for r in units) == 1 + 3
    with pytest.raises(SetupError, match="plain captioned dataset") as e:
        data("dpo", synth_data)
    assert "\n" not in str(e.value)
