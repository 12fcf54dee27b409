"""The retraining data: the champion's training data plus what users liked, minus what they did not.

A challenger must not forget what the champion learned, so every image of the champion run's split (train and
validation: the trainer splits the new folder again, without leakage) goes in with its caption. Generations that
users rated at or above ``keep_rating`` (mean over clients) or voted thumbs up join them, their prompt as caption, best
first and at most ``max_new_images``; a generation anyone rated at or below ``drop_rating`` or voted thumbs down
stays out (a conflicting vote keeps it out: the data must not teach what someone disliked), and so do middling and
unrated ones. The result goes through the dataset stage's own check (``finetune.data.check.scan_dataset``: broken files,
empty captions, exact and near duplicates), and whatever the check rejects is removed, so the folder holds exactly
what will train.

The output is a Hugging Face imagefolder (``metadata.jsonl`` with ``file_name`` and ``text``, images under
``champion/`` and ``generated/``) with ``retrain_data.json`` (every file: where it came from, its rating, whether it
went in and why; the counts) and ``data_report.json`` beside it. Images are hard links where the filesystem allows
(no copy of a large dataset), copies otherwise; a source file is only ever read or linked, never changed (not even
its permissions). The folder is built under a hidden name beside ``out_dir`` and renamed into place, so a crash
leaves no half-built data, and ``out_dir`` must be new or empty: sdloop never writes into a folder of the user's.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import posixpath
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

from finetune.training.config import DataConfig, TrainConfig
from finetune.data.check import DataReport, DatasetError, format_summary, scan_dataset
from finetune.data.files import display, inside
from monitor.config import MonitorConfig
from monitor.store import Store
from sdloop.atomic import check_writable_dir, current_umask
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
    """The built folder, its record, the counts and the dataset check's report."""

    data_dir: Path
    record: Path
    counts: dict[str, int]
    report: DataReport
    files: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        """Counts in one line, then the dataset check's summary (what ``sdloop retrain`` prints)."""
        c = self.counts
        head = (f"Retraining data {display(self.data_dir)}: {c['total']} image(s) = {c['champion']} from the "
                f"champion + {c['added']} rated generation(s); left out: {c['dropped_low']} rated low, "
                f"{c['middling']} middling, {c['unrated']} unrated, {c['over_limit']} over the limit, "
                f"{c['missing_image']} missing image(s), {c['duplicates']} duplicate(s)")
        return head + "\n" + format_summary(self.report)


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


# -- the rated generations ------------------------------------------------------------------------------------------

def _rated_generations(store: Store, since: Optional[dt.datetime]) -> tuple[list[dict[str, Any]], int]:
    """(generations with a rating or a thumb: mean rating, mean thumbs, votes; number without any) since ``since``."""
    return store.rated_generations(since)


def _judge(row: dict[str, Any], cfg: MonitorConfig) -> tuple[str, str]:
    """("keep" | "dropped_low" | "middling", the reason with its numbers) for one rated generation."""
    rating, thumbs = row["rating"], row["thumbs"]
    said = []
    if rating is not None:
        said.append(f"mean rating {rating:.2f} of {row['ratings']} client(s)")
    if thumbs is not None:
        said.append(f"thumbs {thumbs:+.2f} (mean of {row['thumbs_n']})")
    votes = ", ".join(said)
    if rating is not None and rating <= cfg.drop_rating:
        return "dropped_low", f"{votes}: at or below drop_rating {cfg.drop_rating}"
    if thumbs is not None and thumbs < 0:
        return "dropped_low", f"{votes}: thumbs down"
    if rating is not None and rating >= cfg.keep_rating:
        return "keep", f"{votes}: at or above keep_rating {cfg.keep_rating}"
    if thumbs is not None and thumbs > 0 and rating is None:
        return "keep", f"{votes}: thumbs up"
    return "middling", f"{votes}: between drop_rating {cfg.drop_rating} and keep_rating {cfg.keep_rating}"


def _best_first(row: dict[str, Any]) -> tuple:
    created = row["created"].timestamp() if row["created"] else 0.0
    return (-(row["rating"] or 0.0), -(row["thumbs"] or 0.0), -(row["ratings"] + row["thumbs_n"]), -created, row["id"])


def _image_of(row: dict[str, Any]) -> Optional[Path]:
    """The stored image of a generation (a relative path is under the workspace's generations folder)."""
    from sdloop.workspace import generations_dir

    if not row["image_path"]:
        return None
    path = Path(row["image_path"]).expanduser()
    if not path.is_absolute():
        path = generations_dir() / path
    return path if path.is_file() else None


# -- building ---------------------------------------------------------------------------------------------------------

def _entry(**values: Any) -> dict[str, Any]:
    base = {"file": None, "source": None, "source_path": None, "generation_id": None, "caption": None,
            "rating": None, "thumbs": None, "decision": "out", "reason": ""}
    return {**base, **values}


def _plan(run: RunFolder, dataset: Path, data_cfg: DataConfig, store: Store, cfg: MonitorConfig,
          since: Optional[dt.datetime]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Every candidate file with its decision before the dataset check, and the counts so far."""
    counts = dict.fromkeys(("champion_missing", "rated", "dropped_low", "middling", "unrated", "over_limit",
                            "missing_image"), 0)
    files: list[dict[str, Any]] = []
    real_root = os.path.realpath(dataset)
    rows, counts["unrated"] = _rated_generations(store, since)
    # a generation an earlier retraining learned from, rated low since: it leaves the champion's data too
    disliked = {r["id"]: why for r in rows for verdict, why in [_judge(r, cfg)] if verdict == "dropped_low"}
    counts["dropped_since"] = 0
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
    counts["rated"] = len(rows)
    added = 0
    for row in sorted(rows, key=_best_first):
        verdict, why = _judge(row, cfg)
        e = _entry(source="generation", generation_id=row["id"], source_path=row["image_path"],
                   caption=row["prompt"], rating=row["rating"], thumbs=row["thumbs"], reason=why)
        if verdict != "keep":
            counts[verdict] += 1
        elif (image := _image_of(row)) is None:
            counts["missing_image"] += 1
            e["reason"] = f"{why}, but its image {row['image_path'] or '(none stored)'} is missing"
        elif added >= cfg.max_new_images:
            counts["over_limit"] += 1
            e["reason"] = f"{why}, but max_new_images={cfg.max_new_images} better ones are in already"
        else:
            added += 1
            e.update(file=f"generated/{row['id']}{image.suffix.lower() or '.png'}", source_path=str(image),
                     decision="in")
        files.append(e)
    return files, counts


def _fsync_tree(root: Path) -> None:
    for f in root.rglob("*"):
        if f.is_file() and not f.is_symlink():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _write_metadata(folder: Path, files: list[dict[str, Any]]) -> None:
    lines = [json.dumps({"file_name": f["file"], "text": f["caption"]}, ensure_ascii=False)
             for f in files if f["decision"] == "in"]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")


def build_retrain_data(champion_run: Path, store: Store, cfg: MonitorConfig, out_dir: Path,
                       since: Optional[dt.datetime] = None, progress: bool = False) -> RetrainData:
    """Build the retraining imagefolder at ``out_dir`` (new or empty) from the champion run and the rated
    generations created since ``since`` (default: all); see the module docstring."""
    run = RunFolder(champion_run).require_finished()
    dataset = run.dataset()
    data_cfg = TrainConfig.from_yaml(run.config).data_config
    out = _check_out_dir(Path(out_dir), [dataset, run.path])
    files, counts = _plan(run, dataset, data_cfg, store, cfg, since)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        placed = {"linked": 0, "copied": 0}
        chosen = [f for f in files if f["decision"] == "in"]
        for f in tqdm(chosen, desc="collecting retraining data", unit="img", disable=not progress, file=sys.stderr):
            placed[_place(Path(f["source_path"]), tmp / f["file"])] += 1
        _write_metadata(tmp, files)
        report = scan_dataset(tmp, data_cfg, progress=progress)
        by_file = {f["file"]: f for f in chosen}
        counts["duplicates"] = counts["skipped_by_check"] = 0
        for s in report.skipped:  # what the check rejects leaves the folder: it holds exactly what trains
            f = by_file.get(s.path)
            if f is None:
                continue
            (tmp / s.path).unlink(missing_ok=True)
            f.update(decision="out", reason=f"{f['reason']}; removed by the dataset check: {s.reason}: {s.detail}")
            counts["duplicates" if s.reason in DUPLICATE_REASONS else "skipped_by_check"] += 1
        trained = {it.path: it for it in report.items}
        for f in chosen:
            item = trained.get(f["file"])
            if item is not None and f.get("sha256_trained") and item.sha256 != f["sha256_trained"]:
                f["reason"] += " (the file changed since the champion trained on it)"
        _write_metadata(tmp, files)
        report.root = display(out)
        counts.update(champion=sum(1 for f in files if f["source"] == "champion" and f["decision"] == "in"),
                      added=sum(1 for f in files if f["source"] == "generation" and f["decision"] == "in"),
                      total=len(report.items), **placed)
        record = {"format": RECORD_FORMAT, "version": 1,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "champion_run": str(run.path.absolute()), "dataset": str(dataset),
                  "since": since.isoformat() if since else None,
                  "settings": {"keep_rating": cfg.keep_rating, "drop_rating": cfg.drop_rating,
                               "max_new_images": cfg.max_new_images},
                  "counts": counts, "fingerprint": report.fingerprint,
                  "files": [{k: v for k, v in f.items() if k != "sha256_trained"} for f in files]}
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2, ensure_ascii=False, default=str) + "\n",
                                       encoding="utf-8")
        report.save(tmp / REPORT_NAME)
        _fsync_tree(tmp)
        try:
            os.replace(tmp, out)  # onto a missing or empty folder only (checked above; rename refuses a full one)
        except OSError as e:
            raise RetrainDataError(f"cannot put the retraining data at {display(out)}: {e.strerror or e}; pass a "
                                   "new folder (nothing was written).") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return RetrainData(out, out / RECORD_NAME, counts, report, record["files"])
