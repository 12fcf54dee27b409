"""The synthetic dataset: deterministic, varied enough to survive de-duplication, readable in both layouts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from finetune.data.check import DatasetError, scan_dataset
from finetune.data.synth import make_synthetic_dataset


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = _digest(make_synthetic_dataset(tmp_path / "a", n=6, seed=3))
    b = _digest(make_synthetic_dataset(tmp_path / "b", n=6, seed=3))
    c = _digest(make_synthetic_dataset(tmp_path / "c", n=6, seed=4))
    assert a == b
    assert a != c


def test_imagefolder_layout_and_captions(tmp_path: Path) -> None:
    out = make_synthetic_dataset(tmp_path / "d", n=5, seed=0, size=48)
    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 5
    for entry in lines:
        with Image.open(out / entry["file_name"]) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (48, 48)
        assert "background" in entry["text"] and entry["text"].startswith(("a small", "a large"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind


def test_txt_layout(tmp_path: Path) -> None:
    out = make_synthetic_dataset(tmp_path / "d", n=4, seed=0, caption_format="txt")
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 4 and not (out / "metadata.jsonl").exists()
    assert all(p.with_suffix(".txt").read_text().strip() for p in pngs)


def test_refuses_non_empty_dir_and_bad_arguments(tmp_path: Path) -> None:
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not empty"):
        make_synthetic_dataset(out, n=2)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(DatasetError):
        make_synthetic_dataset(tmp_path / "x", n=0)
    with pytest.raises(DatasetError):
        make_synthetic_dataset(tmp_path / "x", n=2, size=8)
    with pytest.raises(DatasetError):
        make_synthetic_dataset(tmp_path / "x", n=2, caption_format="csv")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert make_synthetic_dataset(empty, n=1) == empty  # an existing empty folder is fine


@pytest.mark.parametrize("kwargs", [{"n": 2.5}, {"n": True}, {"n": 100_001}, {"n": -1}, {"size": 2049},
                                    {"size": 15}, {"size": 64.0}])
def test_counts_must_be_integers_in_range(tmp_path: Path, kwargs: dict) -> None:
    args = {"n": 2, "size": 32, **kwargs}
    name = next(iter(kwargs))
    with pytest.raises(DatasetError, match=rf"^{name}=.* use an integer from \d+ to \d+"):
        make_synthetic_dataset(tmp_path / "x", **args)
    assert not (tmp_path / "x").exists()


def test_symlink_to_an_empty_folder_is_filled_through_the_link(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    assert make_synthetic_dataset(link, n=2, size=32) == link
    assert link.is_symlink() and len(list(real.glob("*.png"))) == 2


@pytest.mark.parametrize("caption_format", ["imagefolder", "txt"])
def test_scan_reads_both_formats(tmp_path: Path, caption_format: str) -> None:
    out = make_synthetic_dataset(tmp_path / "d", n=6, seed=1, caption_format=caption_format)
    report = scan_dataset(out, progress=False)
    assert len(report.items) == 6 and not report.skipped
    assert all("background" in it.caption for it in report.items)


def test_session_dataset_survives_dedup(synth_data: Path) -> None:
    report = scan_dataset(synth_data, progress=False)
    assert len(report.items) >= 20, report.duplicates
