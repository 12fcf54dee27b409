"""Hostile input to the dataset stage, made for real: FIFOs, symlinks leading out, non-UTF-8 names, NUL bytes,
unwritable places and the user's own files. Through ``sdloop_cli.main.main`` as a user types the commands: a mistake is
one line on stderr and exit code 2, never a traceback, never a hang, and nothing of the user's changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pytest
from PIL import Image

from finetune.training.config import DataConfig
from finetune.data.check import DataReport, DatasetError, Item, explain_empty_validation, load_image, scan_dataset, \
    split_items
from finetune.data.files import MAX_CAPTION_BYTES
from sdloop_cli.main import main

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def pattern(seed: int, size: int = 96) -> Image.Image:
    small = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small, "RGB").resize((size, size), Image.Resampling.BILINEAR)


def dataset(root: Path, n: int = 3, first_seed: int = 0) -> Path:
    """``n`` distinct images with same-stem captions."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pattern(first_seed + i).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"picture number {i}")
    return root


def digest(root: Path) -> dict[str, str]:
    """Every entry's kind and content hash (links by target, FIFOs by kind): nothing may change."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            key = os.fsdecode(os.path.relpath(p, os.fsencode(root)))
            if os.path.islink(p):
                out[key] = "link->" + os.fsdecode(os.readlink(p))
            elif os.path.isdir(p):
                out[key] = "dir"
            elif os.path.isfile(p):
                with open(p, "rb") as fh:
                    out[key] = hashlib.sha256(fh.read()).hexdigest()
            else:
                out[key] = "special"
    return out


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    assert err.startswith("error: ") and err.strip().count("\n") == 0, err
    for needle in needles:
        assert needle in err, err


def report_json(path: Path) -> dict:
    """The report must be strict UTF-8 JSON without lone-surrogate escapes (other tools reject those)."""
    text = path.read_bytes().decode("utf-8")
    assert not re.search(r"\\ud[89a-f][0-9a-f]{2}", text, re.I)
    return json.loads(text)


@pytest.fixture()
def unwritable(tmp_path: Path) -> Iterator[Path]:
    """A real folder that refuses new files: chmod 0555 for a normal user; root ignores permission bits, so /proc."""
    if IS_ROOT:
        yield Path("/proc")
        return
    d = tmp_path / "readonly"
    d.mkdir()
    d.chmod(0o555)
    yield d
    d.chmod(0o755)


# -- --json: never inside the dataset, never over a file that is not a report ------------------------------------------

@pytest.mark.parametrize("target", ["metadata", "new_inside", "user_file", "link_into_dataset", "special"])
def test_json_never_replaces_user_files(tmp_path: Path, capsys: pytest.CaptureFixture, target: str) -> None:
    data = dataset(tmp_path / "data")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "img0.png", "text": "my caption"}) + "\n")
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "own notes"}')
    (tmp_path / "link.json").symlink_to(data / "metadata.jsonl")
    paths = {"metadata": data / "metadata.jsonl", "new_inside": data / "report.json", "user_file": mine,
             "link_into_dataset": tmp_path / "link.json", "special": Path(os.devnull)}
    before, before_mine = digest(tmp_path), mine.read_bytes()

    rc, out, err = run(capsys, "data", "check", str(data), "--json", str(paths[target]), "--quiet")

    assert_one_line(rc, err, "--json")
    assert digest(tmp_path) == before and mine.read_bytes() == before_mine
    assert out == ""  # refused before the scan


def test_json_replaces_only_its_own_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = dataset(tmp_path / "data")
    out = tmp_path / "reports" / "r.json"
    assert run(capsys, "data", "check", str(data), "--json", str(out), "--quiet")[0] == 0
    first = report_json(out)
    assert first["format"] == "sdloop-data-report" and first["version"] == 1
    (data / "img0.txt").write_text("a new caption")
    assert run(capsys, "data", "check", str(data), "--json", str(out), "--quiet")[0] == 0  # our report: replaced
    assert report_json(out)["fingerprint"] != first["fingerprint"]
    assert DataReport.load(out).fingerprint == report_json(out)["fingerprint"]
    empty = tmp_path / "mktemp.json"
    empty.write_bytes(b"")  # `--json "$(mktemp)"`: nothing to lose
    assert run(capsys, "data", "check", str(data), "--json", str(empty), "--quiet")[0] == 0
    assert report_json(empty)["format"] == "sdloop-data-report"
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.json"]  # no temporary file left


def test_json_folder_empty_and_unwritable(tmp_path: Path, capsys: pytest.CaptureFixture, unwritable: Path) -> None:
    data = dataset(tmp_path / "data")
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    cases = [(str(tmp_path), "is a folder"), ("", "--json is empty"),
             (str(blocker / "sub" / "r.json"), "is a file, not a folder"),
             (str(unwritable / "sdloop-test" / "r.json"), "refuses new files")]
    for value, needle in cases:
        rc, out, err = run(capsys, "data", "check", str(data), "--json", value, "--quiet")
        assert_one_line(rc, err, needle)
        assert out == ""
    assert blocker.read_text() == "mine"


def test_default_report_never_lands_inside_the_dataset(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    data = dataset(tmp_path / "data")
    monkeypatch.setenv("SDLOOP_HOME", str(data / "sdloop-home"))
    before = digest(data)
    rc, _, err = run(capsys, "data", "check", str(data), "--quiet")
    assert_one_line(rc, err, "inside the dataset folder", "SDLOOP_HOME")
    assert digest(data) == before


def test_empty_caption_column_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture, workspace: Path) -> None:
    data = dataset(tmp_path / "data")
    for value in ("", "   "):
        rc, _, err = run(capsys, "data", "check", str(data), "--caption-column", value, "--quiet")
        assert_one_line(rc, err, "--caption-column")
    assert not (workspace / "reports").exists()


# -- only regular files are read -----------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_fifos_are_skipped_never_read(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = dataset(tmp_path / "data", n=4)
    os.mkfifo(data / "metadata.jsonl")
    os.mkfifo(data / "sub.jsonl.png")  # an "image" that is a FIFO
    (data / "img1.txt").unlink()
    os.mkfifo(data / "img1.txt")  # a caption that is a FIFO
    report = tmp_path / "r.json"

    rc, out, err = run(capsys, "data", "check", str(data), "--json", str(report), "--quiet")

    assert rc == 0 and "Traceback" not in err
    got = {s["path"]: (s["reason"], s["detail"]) for s in report_json(report)["skipped"]}
    assert got["metadata.jsonl"][0] == "not_a_file" and "FIFO" in got["metadata.jsonl"][1]
    assert got["sub.jsonl.png"][0] == "not_a_file"
    assert got["img1.png"][0] == "not_a_file" and "img1.txt" in got["img1.png"][1]
    assert {it["path"] for it in report_json(report)["items"]} == {"img0.png", "img2.png", "img3.png"}
    assert "not_a_file" in out
    for name in ("metadata.jsonl", "sub.jsonl.png", "img1.txt"):
        assert not (data / name).is_file() and (data / name).exists()  # still FIFOs, untouched


@pytest.mark.timeout(60)
def test_fifo_report_and_image_loaders_do_not_hang(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "report.json")
    with pytest.raises(DatasetError, match="FIFO"):
        DataReport.load(tmp_path / "report.json")
    os.mkfifo(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="FIFO"):
        load_image(tmp_path, "a.png")


def test_symlinks_leading_outside_are_never_read(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-CAPTION-TEXT")
    outside_meta = tmp_path / "outside" / "metadata.jsonl"
    outside_meta.parent.mkdir()
    outside_meta.write_text(json.dumps({"file_name": "a.png", "text": "SECRET-METADATA-TEXT"}) + "\n")
    data = dataset(tmp_path / "data", n=3)
    (data / "img1.txt").unlink()
    (data / "img1.txt").symlink_to(secret)
    (data / "sub").mkdir()
    pattern(10).save(data / "sub" / "a.png")
    (data / "sub" / "metadata.jsonl").symlink_to(outside_meta)
    (data / "img2.txt").unlink()
    (data / "img2.txt").symlink_to(data / "img0.txt")  # a link inside the dataset is fine
    report = tmp_path / "r.json"

    rc, out, err = run(capsys, "data", "check", str(data), "--json", str(report), "--quiet")

    assert rc == 0 and "Traceback" not in err
    text = report.read_text()
    assert "SECRET" not in text and "SECRET" not in out
    got = {s["path"]: s["reason"] for s in report_json(report)["skipped"]}
    assert got["img1.png"] == "outside_dataset" and got["sub/metadata.jsonl"] == "outside_dataset"
    assert got["sub/a.png"] == "missing_caption"
    captions = {it["path"]: it["caption"] for it in report_json(report)["items"]}
    assert captions == {"img0.png": "picture number 0", "img2.png": "picture number 0"}


def test_big_caption_file_is_not_read_whole(tmp_path: Path) -> None:
    data = dataset(tmp_path / "data", n=2)
    with open(data / "img1.txt", "wb") as fh:
        fh.truncate(MAX_CAPTION_BYTES + 1)  # sparse: the size is refused before any byte is read
    got = {s.path: (s.reason, s.detail) for s in scan_dataset(data, progress=False).skipped}
    assert got["img1.png"][0] == "bad_caption" and str(MAX_CAPTION_BYTES) in got["img1.png"][1]


@pytest.mark.skipif(IS_ROOT, reason="root lists any folder whatever its permission bits")
def test_unlistable_subfolder_is_reported(tmp_path: Path) -> None:
    data = dataset(tmp_path / "data", n=2)
    locked = data / "locked"
    locked.mkdir()
    pattern(9).save(locked / "x.png")
    locked.chmod(0)
    try:
        got = {s.path: s.reason for s in scan_dataset(data, progress=False).skipped}
    finally:
        locked.chmod(0o755)
    assert got == {"locked": "unreadable"}


# -- names that JSON cannot hold -------------------------------------------------------------------------------------

def test_non_utf8_names_and_nul_file_names(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = dataset(tmp_path / "data", n=2)
    raw = os.fsencode(data)
    pattern(20).save(os.path.join(raw, b"caf\xe9.png"), format="PNG")
    with open(os.path.join(raw, b"caf\xe9.txt"), "wb") as fh:
        fh.write(b"a latin-1 named image")
    os.mkdir(os.path.join(raw, b"dir\xff"))
    pattern(21).save(os.path.join(raw, b"dir\xff", b"in.png"), format="PNG")
    with open(os.path.join(raw, b"latin1.txt"), "wb") as fh:
        fh.write(b"caf\xe9 au lait")  # a caption that is not UTF-8
    pattern(22).save(data / "latin1.png")
    pattern(23).save(data / "meta.png")
    lines = [json.dumps({"file_name": "img\u0000.png", "text": "nul"}),
             json.dumps({"file_name": "\udce9.png", "text": "surrogate name"}),
             json.dumps({"file_name": "meta.png", "text": "bad \ud800 caption"})]
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    before = digest(tmp_path / "data")
    report = tmp_path / "r.json"

    rc, out, err = run(capsys, "data", "check", str(data), "--json", str(report), "--quiet")

    assert rc == 0 and "Traceback" not in err
    assert digest(tmp_path / "data") == before
    d = report_json(report)
    got = {s["path"]: s["reason"] for s in d["skipped"]}
    assert got["caf\\xe9.png"] == "bad_name" and got["dir\\xff/in.png"] == "bad_name"
    assert got["latin1.png"] == "bad_caption" and got["meta.png"] == "bad_caption"
    assert got["metadata.jsonl line 1"] == "bad_metadata" and got["metadata.jsonl line 2"] == "bad_metadata"
    assert {it["path"] for it in d["items"]} == {"img0.png", "img1.png"}
    assert "caf\\xe9.png" in out and "\udce9" not in out


# -- the decompression-bomb message quotes data.max_pixels --------------------------------------------------------

def test_bomb_messages_quote_max_pixels_not_pils_limit(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pattern(1, 150).save(tmp_path / "a.png")   # 22500 pixels: PIL's own error (above 2 x its limit) fires first
    pattern(2, 120).save(tmp_path / "b.png")   # 14400 pixels: between the limit and twice it
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b.txt").write_text("b")
    with open(tmp_path / "c.png", "wb") as fh:
        fh.truncate((16 << 20) + 10_000 * 8 + 1)  # larger than any 10000-pixel image can be: refused unread
    (tmp_path / "c.txt").write_text("c")
    report = scan_dataset(tmp_path, DataConfig(max_pixels=10_000), progress=False)
    details = {s.path: s.detail for s in report.skipped if s.reason == "decompression_bomb"}
    assert set(details) == {"a.png", "b.png", "c.png"}
    for detail in details.values():
        assert "data.max_pixels=10000" in detail and "20000" not in detail
    assert "22500" in details["a.png"] and "14400" in details["b.png"]
    with pytest.raises(DatasetError, match=r"data.max_pixels=10000") as e:
        load_image(tmp_path, "a.png", max_pixels=10_000)
    assert "20000" not in str(e.value)


# -- advice that fits: an empty validation split ---------------------------------------------------------------------

def fake(hashes: list[int]) -> list[Item]:
    return [Item(f"i{k}.png", "c", 64, 64, hashlib.sha256(str(k).encode()).hexdigest(), f"{h:016x}", "RGB")
            for k, h in enumerate(hashes)]


def number_after(text: str, key: str) -> Optional[float]:
    found = re.search(re.escape(key) + r" to (?:at least )?([0-9.]+)", text)
    return float(found.group(1)) if found else None


def test_empty_validation_advice_fits_the_cause() -> None:
    one = fake([0x1234])
    why = explain_empty_validation(one, DataConfig())
    assert "add images" in why and "validation_split to" not in why
    chain = [0]
    for k in range(9):  # each 5 bits from the previous: one look-alike group at split_guard_distance=10
        chain.append(chain[-1] ^ (0b11111 << (5 * k)))
    group = fake(chain)
    cfg = DataConfig()
    assert split_items(group, cfg)[1] == []
    why = explain_empty_validation(group, cfg)
    assert "one group" in why and "data.validation_split to" not in why
    guard = number_after(why, "data.split_guard_distance")
    assert guard is not None and split_items(group, DataConfig(split_guard_distance=int(guard)))[1]
    two = fake([(1 << 40) ^ (1 << i) for i in range(5)] + [(0xFFFF << 8) ^ (1 << (50 + i)) for i in range(5)])
    why = explain_empty_validation(two, cfg)
    share = number_after(why, "data.validation_split")
    assert share is not None and split_items(two, DataConfig(validation_split=share))[1]
    apart = [0, 0xFFFF_FFFF, 0xFFFF_FFFF << 32, 0xFFFF_0000_FFFF_0000]  # 32 bits or more from each other
    rounding, cfg0 = fake(apart), DataConfig(min_validation_items=0)  # 4 x 0.1 rounds to 0 validation images
    why = explain_empty_validation(rounding, cfg0)
    share = number_after(why, "data.validation_split")
    assert share and split_items(rounding, DataConfig(min_validation_items=0, validation_split=share))[1]
    why = explain_empty_validation(fake([1, 1 << 20, 1 << 40, 1 << 60]), cfg0)  # rounds to 0, and one group
    assert "one group" in why and "validation_split to" not in why and "add images" in why
    assert explain_empty_validation(fake(apart[:3]), cfg) == ""
    assert explain_empty_validation(one, DataConfig(validation_split=0.0)) == ""


def test_data_check_warns_when_validation_would_be_empty(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    single = dataset(tmp_path / "single", n=1)
    rc, out, _ = run(capsys, "data", "check", str(single), "--json", str(tmp_path / "s.json"), "--quiet")
    assert rc == 0 and "0 validation" in out
    warning = next(line for line in out.splitlines() if "validation split is empty" in line)
    assert "add images" in warning and "validation_split to" not in warning
    pair = tmp_path / "pair"
    pair.mkdir()
    img = pattern(100)
    img.save(pair / "x.png")
    img.crop((3, 3, 96, 96)).resize((96, 96)).save(pair / "x_shifted.png")  # pHash distance 4-8: one group
    for name in ("x", "x_shifted"):
        (pair / f"{name}.txt").write_text(f"photo {name}")
    rc, out, _ = run(capsys, "data", "check", str(pair), "--json", str(tmp_path / "p.json"), "--quiet",
                     "--set", "near_duplicate_distance=0")
    assert rc == 0 and "2 train / 0 validation" in out
    assert "one group" in out and "split_guard_distance to" in out
    assert any("validation split is empty" in w for w in report_json(tmp_path / "p.json")["stats"]["warnings"])


# -- data synth ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value,needle", [("--size", "100000", "from 16 to 2048"), ("--size", "0", "16"),
                                               ("--n", "0", "from 1 to 100000"), ("--n", "-3", "from 1"),
                                               ("--n", "10000000", "100000")])
def test_synth_refuses_numbers_beyond_reason(tmp_path: Path, capsys: pytest.CaptureFixture, flag: str, value: str,
                                             needle: str) -> None:
    rc, _, err = run(capsys, "data", "synth", str(tmp_path / "s"), flag, value)
    assert_one_line(rc, err, needle)
    assert not (tmp_path / "s").exists()


def test_synth_refuses_files_and_unwritable_places(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   unwritable: Path) -> None:
    user_file = tmp_path / "mine.txt"
    user_file.write_text("mine")
    for target, needle in [(user_file, "is a file"), (user_file / "sub", "is a file, not a folder"),
                           (unwritable / "sdloop-synth", "cannot write to")]:
        rc, _, err = run(capsys, "data", "synth", str(target), "--n", "2")
        assert_one_line(rc, err, needle)
    assert user_file.read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir() if p.name != "readonly"] == ["mine.txt"]
