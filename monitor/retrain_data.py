"""The retraining data: the champion's training data plus what users liked, minus what they did not.

A challenger must not forget what the champion learned, so every image of the champion run's split (train and
validation: the trainer splits the new folder again, without leakage) goes in with its caption. Generations that
raters liked join them, their prompt as caption (``monitor.retrain_select`` decides which: ratings at or above
``keep_rating`` or thumbs up, from at least ``min_raters`` distinct raters, no rater's votes counting on more than
``max_rater_share`` of them, best first and at most ``max_new_images``); one whose counted votes average at or below
``drop_rating`` or thumbs down stays out (and leaves the champion's data if an earlier retraining learned from it),
and so do middling and unrated ones. The result goes through the dataset stage's own check
(``finetune.data.check.scan_dataset``: broken files, empty captions, exact and near duplicates), and whatever the
check rejects is removed, so the folder holds exactly what will train.

With ``gate_dir``, a share of the kept generations (``gate_holdout_share``) goes there instead: the gate compares
champion and challenger on images neither trained on. The dataset check runs over both sets together, so no image
or near copy of one is on both sides.

The output is a Hugging Face imagefolder (``metadata.jsonl`` with ``file_name`` and ``text``, images under
``champion/`` and ``generated/``) with ``retrain_data.json`` (every file: where it came from, its rating and raters,
whether it went in, was held out for the gate or stayed out, and why; the counts, what was left out per reason, how
many raters contributed and the largest shares) and ``data_report.json`` beside it. Images are hard links where
the filesystem allows (no copy of a large dataset), copies otherwise; a source file is only ever read or linked, never
changed (not even its permissions). The folder is built under a hidden name beside ``out_dir`` and renamed into place, so a crash
leaves no half-built data, and ``out_dir`` must be new or empty: sdloop never writes into a folder of the user's.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import posixpath
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

from finetune.training.config import DataConfig, TrainConfig
from finetune.data.check import DataReport, DatasetError, format_summary, scan_dataset
from finetune.data.files import display, inside
from monitor.config import MonitorConfig
from monitor.retrain_select import select_generations
from monitor.store import Store
from sdloop.atomic import check_writable_dir, temp_dir_beside
from sdloop.errors import UserError
from sdloop.runfolder import RunFolder

RECORD_NAME = "retrain_data.json"
REPORT_NAME = "data_report.json"
RECORD_FORMAT = "sdloop-retrain-data"
DUPLICATE_REASONS = ("exact_duplicate", "near_duplicate")


class RetrainDataError(UserError):
    """The retraining data cannot be built (an unusable output folder, a champion run without data)."""


@dataclass
class RetrainData:
    """The built folder, its record, the counts, the dataset check's report, the gate's folder and the raters."""

    data_dir: Path
    record: Path
    counts: dict[str, int]
    report: DataReport
    files: list[dict[str, Any]] = field(default_factory=list)
    gate_dir: Optional[Path] = None
    raters: dict[str, Any] = field(default_factory=dict)

    @property
    def gate_images(self) -> int:
        """Images held out for the gate (in ``gate_dir``)."""
        return int(self.counts.get("held_out", 0))

    def summary(self) -> str:
        """Counts in one line, then the dataset check's summary (what ``sdloop retrain`` prints)."""
        c = self.counts
        out = ", ".join(f"{n} {LEFT_OUT_WORDS[k]}" for k, n in left_out(c).items() if n) or "nothing"
        head = (f"Retraining data {display(self.data_dir)}: {c['total']} image(s) = {c['champion']} from the "
                f"champion + {c['added']} rated generation(s) from {c.get('raters', 0)} rater(s); "
                f"{c.get('held_out', 0)} held out for the gate; left out: {out}")
        return head + "\n" + format_summary(self.report)


# why a file or a generation stayed out, in the words of the summary line
LEFT_OUT_WORDS = {"dropped_low": "rated low", "dropped_since": "of the champion's rated low since",
                  "middling": "middling", "too_few_raters": "with fewer than min_raters raters",
                  "rater_cap": "good only with votes over a rater's share", "unrated": "unrated",
                  "over_limit": "over max_new_images", "missing_image": "missing image(s)",
                  "duplicates": "duplicate(s)", "skipped_by_check": "refused by the dataset check",
                  "champion_missing": "of the champion's gone from its dataset"}


def left_out(counts: dict[str, int]) -> dict[str, int]:
    """What stayed out, per reason (every reason, zeros included, in a fixed order)."""
    return {k: int(counts.get(k, 0)) for k in LEFT_OUT_WORDS}


# -- the output folder ------------------------------------------------------------------------------------------------

def _check_out_dir(out_dir: Path, sources: list[Path]) -> Path:
    """``out_dir`` if it is new or empty and outside every source folder; one-line RetrainDataError otherwise."""
    out = Path(out_dir).expanduser().absolute()
    if out.is_symlink():  # build where the link points, and keep the link
        out = Path(os.path.realpath(out))
    if out.exists() and not out.is_dir():
        raise RetrainDataError(f"{display(out)} is a file; pass a new folder for the retraining data (nothing was "
                               "written).")
    if out.is_dir() and any(out.iterdir()):
        raise RetrainDataError(f"{display(out)} already exists and is not empty; pass a new or empty folder for the "
                               "retraining data (nothing was written).")
    for src in sources:
        if inside(os.path.realpath(src), out):
            raise RetrainDataError(f"{display(out)} is inside {display(src)}, whose files the retraining data is "
                                   "made of; pass a folder outside it (nothing was written).")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    check_writable_dir(parent, "the folder of the retraining data")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _place(src: Path, dst: Path) -> str:
    """Hard-link ``src`` at ``dst`` (a copy where links cannot be made); return "linked" or "copied"."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
        return "linked"
    except OSError:  # another filesystem, or one without hard links
        shutil.copyfile(src, dst)  # a new file: the umask's mode, not the source's
        return "copied"


# -- the champion's data ----------------------------------------------------------------------------------------------

def _champion_items(run: RunFolder, dataset: Path, data_cfg: DataConfig) -> list[tuple[str, str, str]]:
    """(dataset-relative path, caption, sha256 when it trained) of every image in the champion's split."""
    split = run.read_split()
    paths = list(dict.fromkeys(split["train"] + split["validation"]))
    try:
        report = DataReport.load(run.data_report)
    except DatasetError:  # no record of what it saw: read the captions from the dataset as it is now
        report = scan_dataset(dataset, data_cfg, progress=False)
    known = {it.path: it for it in report.items}
    out = []
    for p in paths:
        item = known.get(p)
        out.append((p, item.caption if item else "", item.sha256 if item else ""))
    return out


# -- building ---------------------------------------------------------------------------------------------------------

def _entry(**values: Any) -> dict[str, Any]:
    base = {"file": None, "source": None, "source_path": None, "generation_id": None, "caption": None,
            "rating": None, "thumbs": None, "decision": "out", "reason": ""}
    return {**base, **values}


def _plan(run: RunFolder, dataset: Path, data_cfg: DataConfig, store: Store, cfg: MonitorConfig,
          since: Optional[dt.datetime], hold_out: bool) -> tuple[list[dict[str, Any]], dict[str, int], dict[str, Any]]:
    """Every candidate file with its decision before the dataset check, the counts so far, and the raters."""
    counts = {"champion_missing": 0, "dropped_since": 0}
    files: list[dict[str, Any]] = []
    real_root = os.path.realpath(dataset)
    chosen = select_generations(store, cfg, since, hold_out)
    # a generation an earlier retraining learned from, rated low since: it leaves the champion's data too
    disliked = chosen.disliked
    for rel, caption, sha in _champion_items(run, dataset, data_cfg):
        src = dataset / rel
        e = _entry(source="champion", source_path=str(src), caption=caption, sha256_trained=sha)
        parts = rel.split("/")
        gid = posixpath.splitext(parts[-1])[0] if "generated" in parts[:-1] else None
        if posixpath.isabs(rel) or not inside(real_root, src) or not src.is_file():
            counts["champion_missing"] += 1
            e["reason"] = "in the champion's split, but the file is gone from its dataset"
        elif gid in disliked:
            counts["dropped_since"] += 1
            e.update(generation_id=gid, reason=f"a generation the champion learned from, rated low since: "
                                               f"{disliked[gid]}")
        else:
            e.update(file=posixpath.join("champion", rel), decision="in", reason="the champion's training data")
        files.append(e)
    files += [_entry(**e) for e in chosen.entries]
    counts.update(chosen.counts)
    return files, counts, chosen.raters


def _fsync_tree(root: Path) -> None:
    for f in root.rglob("*"):
        if f.is_file() and not f.is_symlink():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _write_metadata(folder: Path, files: list[dict[str, Any]], decisions: tuple[str, ...] = ("in",)) -> None:
    lines = [json.dumps({"file_name": f["file"], "text": f["caption"]}, ensure_ascii=False)
             for f in files if f["decision"] in decisions]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")


def build_retrain_data(champion_run: Path, store: Store, cfg: MonitorConfig, out_dir: Path,
                       since: Optional[dt.datetime] = None, progress: bool = False,
                       gate_dir: Optional[Path] = None) -> RetrainData:
    """Build the retraining imagefolder at ``out_dir`` (new or empty) from the champion run and the rated
    generations created since ``since`` (default: all); with ``gate_dir`` (new or empty), the held-out share of the
    kept generations goes there instead of into the training data: the gate's reference. See the module docstring."""
    run = RunFolder(champion_run).require_finished()
    dataset = run.dataset()
    data_cfg = TrainConfig.from_yaml(run.config).data_config
    out = _check_out_dir(Path(out_dir), [dataset, run.path])
    gate = _check_out_dir(Path(gate_dir), [dataset, run.path, out]) if gate_dir is not None else None
    files, counts, raters = _plan(run, dataset, data_cfg, store, cfg, since, hold_out=gate is not None)
    tmp = temp_dir_beside(out)
    gate_tmp = temp_dir_beside(gate) if gate else None
    try:
        placed = {"linked": 0, "copied": 0}
        chosen = [f for f in files if f["decision"] in ("in", "gate")]
        for f in tqdm(chosen, desc="collecting retraining data", unit="img", disable=not progress, file=sys.stderr):
            placed[_place(Path(f["source_path"]), tmp / f["file"])] += 1
        # one check over the training data and the gate's images together, so no image (or a near copy of one)
        # is on both sides
        _write_metadata(tmp, files, ("in", "gate"))
        report = scan_dataset(tmp, data_cfg, progress=progress)
        by_file = {f["file"]: f for f in chosen}
        counts["duplicates"] = counts["skipped_by_check"] = 0
        for s in report.skipped:  # what the check rejects leaves the folder: it holds exactly what trains
            f = by_file.get(s.path)
            if f is None:
                continue
            (tmp / s.path).unlink(missing_ok=True)
            if f["decision"] == "gate":
                counts["held_out"] -= 1
            f.update(decision="out", reason=f"{f['reason']}; removed by the dataset check: {s.reason}: {s.detail}")
            counts["duplicates" if s.reason in DUPLICATE_REASONS else "skipped_by_check"] += 1
        if gate_tmp is not None:
            for f in chosen:
                if f["decision"] == "gate":
                    name = posixpath.basename(f["file"])
                    os.replace(tmp / f["file"], gate_tmp / name)
                    f["file"] = name
            shutil.rmtree(tmp / "gate", ignore_errors=True)
            _write_metadata(tmp, files)
            if counts["held_out"]:
                report = scan_dataset(tmp, data_cfg, progress=progress)  # the report of what trains, alone
        trained = {it.path: it for it in report.items}
        for f in chosen:
            item = trained.get(f["file"]) if f["decision"] == "in" else None
            if item is not None and f.get("sha256_trained") and item.sha256 != f["sha256_trained"]:
                f["reason"] += " (the file changed since the champion trained on it)"
        _write_metadata(tmp, files)
        report.root = display(out)
        counts.update(champion=sum(1 for f in files if f["source"] == "champion" and f["decision"] == "in"),
                      added=sum(1 for f in files if f["source"] == "generation" and f["decision"] == "in"),
                      total=len(report.items), raters=raters["contributed"], **placed)
        record = {"format": RECORD_FORMAT, "version": 2,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "champion_run": str(run.path.absolute()), "dataset": str(dataset),
                  "since": since.isoformat() if since else None,
                  "settings": {k: getattr(cfg, k) for k in ("keep_rating", "drop_rating", "max_new_images",
                                                            "min_raters", "max_rater_share", "gate_holdout_share")},
                  "counts": counts, "left_out": left_out(counts), "raters": raters,
                  "gate_dir": str(gate) if gate else None, "fingerprint": report.fingerprint,
                  "files": [{k: v for k, v in f.items() if k != "sha256_trained"} for f in files]}
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2, ensure_ascii=False, default=str) + "\n",
                                       encoding="utf-8")
        report.save(tmp / REPORT_NAME)
        _fsync_tree(tmp)
        try:
            if gate is not None and gate_tmp is not None:
                _fsync_tree(gate_tmp)
                os.replace(gate_tmp, gate)
            os.replace(tmp, out)  # onto a missing or empty folder only (checked above; rename refuses a full one)
        except OSError as e:
            raise RetrainDataError(f"cannot put the retraining data at {display(out)}: {e.strerror or e}; pass a "
                                   "new folder (nothing was written).") from None
    finally:
        for folder in (tmp, gate_tmp):
            if folder is not None and folder.exists():
                shutil.rmtree(folder, ignore_errors=True)
    return RetrainData(out, out / RECORD_NAME, counts, report, record["files"], gate, raters)
