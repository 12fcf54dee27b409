"""The retraining data from a real finished run (``tiny_run`` on ``synth_data``) and a real sqlite store of
generations with real PNGs and ratings: what goes in, what stays out and why, and that no source file is touched."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest

from finetune.training.config import TrainConfig
from finetune.data.check import scan_dataset, split_items
from finetune.data.synth import draw_samples
from monitor.config import MonitorConfig
from monitor.retrain_data import REPORT_NAME, RetrainDataError, build_retrain_data
from monitor.store import Store
from sdloop.errors import UserError
from sdloop.runfolder import RunFolder

NOW = dt.datetime.now(dt.timezone.utc)
# one rater per generation counts and no share cap: what the ratings alone decide (the rater rules have their tests)
CFG = MonitorConfig.from_dict({"keep_rating": 4, "drop_rating": 2, "max_new_images": 100, "min_raters": 1,
                               "max_rater_share": 1.0})


def _png(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _tree_state(*roots: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mode of every file under the roots: what 'unchanged' means."""
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.is_file():
                out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), stat.S_IMODE(p.stat().st_mode))
    return out


@pytest.fixture(scope="module")
def world(tiny_run: Path, synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A store of 12 generations: well rated, thumbs up, low, conflicting, middling, unrated, comment only, image
    missing, no image stored, a byte copy of a training image, and an old well-rated one."""
    root = tmp_path_factory.mktemp("retrain-world")
    images = root / "generations"
    images.mkdir()
    store = Store(f"sqlite:///{root / 'store.db'}")
    samples = iter(draw_samples(12, seed=7, size=64))
    training_image = sorted(synth_data.glob("*.png"))[3]
    ids: dict[str, str] = {}

    def gen(name: str, votes: list[dict], image: str = "new", age_h: float = 1.0) -> None:
        img, _ = next(samples)
        path: Any = images / f"{name}.png"
        if image == "new":
            path.write_bytes(_png(img))
        elif image == "copy":
            path.write_bytes(training_image.read_bytes())
        elif image == "deleted":
            pass  # logged with a path, file gone
        else:
            path = None
        created = NOW - dt.timedelta(hours=age_h)
        gid = store.log_generation(prompt=f"a prompt for {name}", negative_prompt="", params={"steps": 8},
                                   model_version="sdloop:champion", latency_s=0.4, descriptors={},
                                   image_path=str(path) if path else None, created=created)
        for i, v in enumerate(votes):
            store.add_feedback(gid, f"client-{i}", created=created, **v)
        ids[name] = gid

    gen("high", [{"rating": 5}, {"rating": 5}])
    gen("good", [{"rating": 4}, {"rating": 5}])
    gen("thumbs_up", [{"thumbs": 1}])
    gen("low", [{"rating": 1}])
    gen("conflict", [{"rating": 5}, {"thumbs": -1}])
    gen("middling", [{"rating": 3}, {"rating": 4}])
    gen("unrated", [])
    gen("comment_only", [{"comment": "hm"}])
    gen("missing", [{"rating": 5}], image="deleted")
    gen("no_image", [{"rating": 4}], image="none")
    gen("duplicate", [{"rating": 5}], image="copy")
    gen("old", [{"rating": 5}], age_h=24 * 10)
    os.chmod(images / "high.png", 0o444)  # a read-only source must stay read-only
    return {"store": store, "ids": ids, "images": images, "run": tiny_run, "data": synth_data,
            "training_image": training_image}


@pytest.fixture(scope="module")
def built(world: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The data built once with all generations, with the source state before and after."""
    before = _tree_state(world["data"], world["run"], world["images"])
    result = build_retrain_data(world["run"], world["store"], CFG, tmp_path_factory.mktemp("out") / "retrain")
    return {"result": result, "before": before, "after": _tree_state(world["data"], world["run"], world["images"])}


def _by_generation(result: Any, ids: dict[str, str]) -> dict[str, dict]:
    names = {gid: name for name, gid in ids.items()}
    return {names[f["generation_id"]]: f for f in result.files if f["source"] == "generation"}


def test_what_goes_in_and_why(world: dict[str, Any], built: dict[str, Any]) -> None:
    result = built["result"]
    split = RunFolder(world["run"]).read_split()
    n_champion = len(split["train"]) + len(split["validation"])
    c = result.counts
    assert c["champion"] == n_champion == 24 and c["champion_missing"] == 0
    assert c["added"] == 4  # high, good, thumbs_up, old (the duplicate is removed by the check)
    assert (c["rated"], c["dropped_low"], c["middling"], c["unrated"], c["missing_image"]) == (10, 2, 1, 2, 2)
    assert c["duplicates"] == 1 and c["skipped_by_check"] == 0 and c["over_limit"] == 0
    assert c["total"] == len(result.report.items) == n_champion + 4

    files = _by_generation(result, world["ids"])
    for name in ("high", "good", "thumbs_up", "old"):
        assert files[name]["decision"] == "in" and files[name]["caption"] == f"a prompt for {name}", files[name]
    assert "mean rating 5.00 of 2 rater(s)" in files["high"]["reason"]
    assert files["good"]["rating"] == pytest.approx(4.5)
    assert "thumbs up" in files["thumbs_up"]["reason"]
    for name in ("low", "conflict", "middling", "missing", "no_image", "duplicate"):
        assert files[name]["decision"] == "out", files[name]
    assert "at or below drop_rating 2" in files["low"]["reason"]
    assert "thumbs down" in files["conflict"]["reason"]
    assert "between drop_rating 2 and keep_rating 4" in files["middling"]["reason"]
    assert "missing" in files["missing"]["reason"] and "(none stored)" in files["no_image"]["reason"]
    assert "removed by the dataset check: exact_duplicate" in files["duplicate"]["reason"]
    assert not any(name in files for name in ("unrated", "comment_only"))  # counted, not listed

    # the folder holds exactly what trains, as the dataset stage reads it: metadata lines, files, captions
    out = result.data_dir
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert sorted(m["file_name"] for m in meta) == sorted(it.path for it in result.report.items)
    assert {m["text"] for m in meta} >= {f"a prompt for {n}" for n in ("high", "good", "thumbs_up", "old")}
    assert not (out / f"generated/{world['ids']['duplicate']}.png").exists()
    images = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert images == sorted(m["file_name"] for m in meta)
    rescan = scan_dataset(out, TrainConfig.from_yaml(RunFolder(world["run"]).config).data_config, progress=False)
    assert rescan.fingerprint == result.report.fingerprint and not rescan.skipped
    train, val = split_items(rescan.items, TrainConfig.from_yaml(RunFolder(world["run"]).config).data_config)
    assert val and not {i.path for i in train} & {i.path for i in val}

    record = json.loads(result.record.read_text())
    assert record["counts"] == c and record["fingerprint"] == result.report.fingerprint
    assert record["champion_run"] == str(Path(world["run"]).absolute())
    assert len([f for f in record["files"] if f["source"] == "champion"]) == 24
    assert json.loads((out / REPORT_NAME).read_text())["root"] == str(out)
    assert "24 from the champion + 4 rated" in result.summary()


def test_sources_untouched_and_images_linked(world: dict[str, Any], built: dict[str, Any]) -> None:
    assert built["before"] == built["after"]  # bytes and permission bits of every source file
    result = built["result"]
    assert result.counts["linked"] + result.counts["copied"] == result.counts["total"] + result.counts["duplicates"]
    one = result.data_dir / "champion" / "img_0000.png"
    if result.counts["linked"]:
        assert os.path.samefile(one, world["data"] / "img_0000.png")
    assert one.read_bytes() == (world["data"] / "img_0000.png").read_bytes()
    assert not [p.name for p in result.data_dir.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_limit_since_and_an_empty_out_dir(world: dict[str, Any], tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    """max_new_images keeps the best first; ``since`` leaves older generations out; an empty folder is used."""
    out = tmp_path / "empty"
    out.mkdir()
    cfg = MonitorConfig.from_dict({"max_new_images": 1, "min_raters": 1, "max_rater_share": 1.0})
    result = build_retrain_data(world["run"], world["store"], cfg, out, since=NOW - dt.timedelta(days=2),
                                progress=True)
    files = _by_generation(result, world["ids"])
    assert result.counts["added"] == 1 and files["high"]["decision"] == "in"  # 5 from two clients: the best
    assert "old" not in files  # created before `since`
    assert result.counts["over_limit"] == 3  # good, thumbs_up, duplicate
    assert "max_new_images=1" in files["good"]["reason"]
    assert result.counts["missing_image"] == 2  # a missing image takes no place of the limit
    assert "collecting retraining data" in capsys.readouterr().err


def test_refusals_are_one_line_and_write_nothing(world: dict[str, Any], tmp_path: Path) -> None:
    full = tmp_path / "mine"
    full.mkdir()
    (full / "notes.txt").write_text("the user's")
    with pytest.raises(RetrainDataError, match="not empty") as e:
        build_retrain_data(world["run"], world["store"], CFG, full)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)
    assert [p.name for p in full.iterdir()] == ["notes.txt"] and (full / "notes.txt").read_text() == "the user's"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(RetrainDataError, match="is a file"):
        build_retrain_data(world["run"], world["store"], CFG, a_file)
    with pytest.raises(RetrainDataError, match="is inside"):
        build_retrain_data(world["run"], world["store"], CFG, world["data"] / "retrain")
    assert not (world["data"] / "retrain").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_champion_image_gone_is_counted(world: dict[str, Any], tmp_path: Path) -> None:
    """The champion's dataset lost a file since it trained: counted and named, the rest still built."""
    data = shutil.copytree(world["data"], tmp_path / "data")
    run = shutil.copytree(world["run"], tmp_path / "run")
    manifest = json.loads((run / "manifest.json").read_text())
    manifest.update(dataset=str(data), dataset_relative=None)
    (run / "manifest.json").write_text(json.dumps(manifest))
    (data / "img_0005.png").unlink()
    result = build_retrain_data(run, world["store"], CFG, tmp_path / "out")
    assert result.counts["champion_missing"] == 1 and result.counts["champion"] == 23
    gone = [f for f in result.files if f["source"] == "champion" and f["decision"] == "out"]
    assert len(gone) == 1 and gone[0]["source_path"].endswith("img_0005.png") and "gone" in gone[0]["reason"]


def test_a_link_to_an_empty_folder_is_built_through(world: dict[str, Any], tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    result = build_retrain_data(world["run"], world["store"], CFG, tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and (target / "metadata.jsonl").is_file()
    assert result.data_dir == target and result.counts["total"] == 28
