"""The dataset check: find every image and caption, skip what cannot train, de-duplicate, report, and split.

Training on a broken file crashes hours in; training on duplicates over-weights them and leaks them into the
validation split, making the validation loss lie. So every image is decoded once here, up front, and each problem is
reported per file with a reason code instead of a traceback. The user's files are only ever opened for reading, and
only regular files inside the dataset are read (``finetune.data.files``). The report is written outside the dataset,
and only ever replaces an earlier report (``choose_report_path``).

Two layouts are read (and may be mixed): Hugging Face imagefolder (``metadata.jsonl`` lines with ``file_name`` and a
caption column, in the root or any subfolder) and kohya style (``image.png`` + ``image.txt``). Metadata wins when an
image has both. The parts live in ``data_files`` (walking, safe reading, captions), ``data_images`` (decoding) and
``split`` (the train/validation split); their public names are importable from here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
import stat
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from tqdm import tqdm

from finetune.training.config import DataConfig
from finetune.data.files import (IMAGE_EXTENSIONS, METADATA_NAME, REASONS, Bad, DatasetError, Item, Skipped,
                                 caption_of, display, inside, is_text, read_metadata, read_regular, walk)
from finetune.data.images import Checked, check_image, load_image
from finetune.data.stats import compute_stats
from finetune.data.preference import (DOMINANT_RATER_SHARE, PREFERENCE_REASONS, PreferenceRecord, PreferenceScan,
                                      explain_empty_preference_validation, find_preference_file, records_to_dicts,
                                      scan_preferences, sft_items, split_preferences)
from finetune.data.split import explain_empty_validation, hamming, phash_array, split_items
from sdloop.atomic import write_bytes_atomic

__all__ = ["IMAGE_EXTENSIONS", "METADATA_NAME", "REASONS", "REPORT_FORMAT", "CheckResult", "DataReport",
           "DatasetError", "Item", "Skipped", "check_dataset", "choose_report_path", "dataset_fingerprint",
           "explain_empty_validation", "format_summary", "hamming", "load_image", "phash_array", "scan_dataset",
           "split_items", "write_report"]

REPORT_FORMAT = "sdloop-data-report"   # top-level "format" of every report: only such a file is ever replaced
REPORT_VERSION = 1
MAX_REPORT_BYTES = 4 << 30


@dataclass
class DataReport:
    """What the check found; saved beside each run so a run records exactly which data it saw."""

    root: str
    items: list[Item]
    skipped: list[Skipped]
    duplicates: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    fingerprint: str = ""
    preferences: list[dict] = field(default_factory=list)  # a preference dataset's usable lines (else empty)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data, marked with REPORT_FORMAT so later runs know the file is ours."""
        return {"format": REPORT_FORMAT, "version": REPORT_VERSION, **dataclasses.asdict(self)}

    def save(self, path: str | Path) -> None:
        """Write the report as UTF-8 JSON, atomically (a crash never leaves half a file)."""
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False)
        write_bytes_atomic(Path(path), text.encode("utf-8", "replace"))  # every string was checked: a last guard

    @classmethod
    def load(cls, path: str | Path) -> "DataReport":
        """Read a saved report (one without a "format" key is from before the marker and is read too)."""
        p = Path(path)
        try:
            d = json.loads(read_regular(p, MAX_REPORT_BYTES, str(p)).decode("utf-8"))
            if not isinstance(d, dict) or d.get("format", REPORT_FORMAT) != REPORT_FORMAT:
                raise ValueError("not an sdloop data report")
            return cls(root=d["root"], items=[Item(**i) for i in d["items"]],
                       skipped=[Skipped(**s) for s in d["skipped"]], duplicates=d.get("duplicates", []),
                       stats=d.get("stats", {}), config=d.get("config", {}), fingerprint=d.get("fingerprint", ""),
                       preferences=d.get("preferences", []))
        except (OSError, ValueError, KeyError, TypeError, Bad) as e:
            raise DatasetError(f"cannot read the data report {display(p)}: {e}; re-run the dataset check.") \
                from None


# -- where the report goes -------------------------------------------------------------------------------------------

def is_report(path: str | Path) -> bool:
    """True when ``path`` is a JSON file carrying REPORT_FORMAT: a file this stage wrote and may replace."""
    try:
        d = json.loads(read_regular(path, MAX_REPORT_BYTES).decode("utf-8"))
    except (OSError, ValueError, Bad):
        return False
    return isinstance(d, dict) and d.get("format") == REPORT_FORMAT


def _dataset_root(data_dir: str | Path) -> Path:
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise DatasetError(f"{display(root)} does not exist; pass the folder of images.")
    if not root.is_dir():
        raise DatasetError(f"{display(root)} is not a folder; pass the folder of images (not a single file).")
    return root


def choose_report_path(data_dir: str | Path, requested: Optional[str], default: Path) -> Path:
    """Where the check may write its report (``requested``, else ``default``); one-line DatasetError otherwise.

    Never inside the dataset folder (symlinks resolved), never a folder, never over a file that is not one of our
    reports (an empty file holds nothing and may be replaced), and only where the nearest existing folder is one.
    Called before the scan, so a mistake costs nothing. Returns the resolved path to write.
    """
    flag = "--json" if requested is not None else "the default report path"
    if requested is not None and not requested.strip():
        raise DatasetError("--json is empty; name the report file, e.g. --json report.json.")
    path = Path(requested).expanduser() if requested is not None else Path(default)
    shown, root = display(path), _dataset_root(data_dir)
    real = Path(os.path.realpath(path))
    if inside(os.path.realpath(root), real):
        hint = "pass --json with a path outside it" if requested is not None else \
            "pass --json with a path outside it, or set SDLOOP_HOME to a folder outside it"
        raise DatasetError(f"{flag} {shown} is inside the dataset folder {display(root)}; the check never writes "
                           f"there: {hint}.")
    if path.is_dir():
        raise DatasetError(f"{flag} {shown} is a folder; name a file in it, e.g. {display(path / 'report.json')}.")
    try:
        st = os.stat(real)
    except (FileNotFoundError, NotADirectoryError):  # a missing folder on the way is dealt with below
        st = None
    except OSError as e:
        raise DatasetError(f"cannot use {flag} {shown}: {e.strerror or e}; choose another path.") from None
    if st is not None:
        if not stat.S_ISREG(st.st_mode):
            raise DatasetError(f"{flag} {shown} exists and is not a regular file; choose another path.")
        if st.st_size and not is_report(real):
            raise DatasetError(f"{flag} {shown} exists and is not an sdloop data report; the check only replaces "
                               "its own reports: choose another path (nothing was written).")
    parent = real.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise DatasetError(f"cannot write {flag} {shown}: {display(parent)} is a file, not a folder; choose "
                           "another path.")
    try:  # a real probe: permission bits say nothing to root, nor about read-only mounts and /proc
        fd, probe = tempfile.mkstemp(prefix=".sdloop-write-test-", dir=parent)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise DatasetError(f"cannot write {flag} {shown}: {display(parent)} refuses new files ({e.strerror or e}); "
                           "choose a folder you can write to.") from None
    return real


def write_report(report: DataReport, path: Path) -> None:
    """Save the report at a path from ``choose_report_path``; an OS failure (full disk, read-only) is one line."""
    try:
        report.save(path)
    except OSError as e:
        raise DatasetError(f"cannot write the report {display(path)}: {e.strerror or e}; choose a folder you can "
                           "write to (--json PATH).") from None


# -- duplicates ------------------------------------------------------------------------------------------------------

def _preference(c: Checked) -> tuple:
    """Sort key of the copy to keep: more pixels, then the shorter, then the alphabetically first path."""
    return (-c.item.width * c.item.height, len(c.item.path), c.item.path)


def _dedupe(checked: list[Checked], near: int) -> tuple[list[Item], list[Skipped], list[dict]]:
    """Drop exact duplicates (bytes or pixels), then near duplicates (pHash); keep the preferred copy of each."""
    checked = sorted(checked, key=_preference)
    skipped, dups, kept = [], [], []
    seen: dict[str, str] = {}
    for c in checked:
        first = seen.get("b" + c.item.sha256) or seen.get("p" + c.pixel_sha)
        if first is not None:
            how = "the same bytes" if seen.get("b" + c.item.sha256) else "the same pixels"
            skipped.append(Skipped(c.item.path, "exact_duplicate", f"{how} as {first}"))
            dups.append({"kept": first, "dropped": c.item.path, "kind": "exact", "distance": 0})
            continue
        seen["b" + c.item.sha256] = seen["p" + c.pixel_sha] = c.item.path
        kept.append(c.item)
    hashes = phash_array(kept)
    alive = np.ones(len(kept), dtype=bool)
    for i, item in enumerate(kept):
        if not alive[i]:
            continue
        d = hamming(hashes[i + 1:], hashes[i])
        for j in np.nonzero((d <= near) & alive[i + 1:])[0]:
            other = kept[i + 1 + int(j)]
            alive[i + 1 + int(j)] = False
            skipped.append(Skipped(other.path, "near_duplicate", f"pHash distance {int(d[j])} from {item.path}"))
            dups.append({"kept": item.path, "dropped": other.path, "kind": "near", "distance": int(d[j])})
    return [it for it, a in zip(kept, alive) if a], skipped, dups


# -- the check -------------------------------------------------------------------------------------------------------

def dataset_fingerprint(items: list[Item]) -> str:
    """A hash of what training sees (paths, bytes, captions), independent of order; runs and caches record it."""
    rows = sorted((it.path, it.sha256, it.caption) for it in items)
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode("utf-8", "surrogatepass")).hexdigest()


def scan_dataset(root: str | Path, cfg: DataConfig | None = None, progress: bool = True) -> DataReport:
    """Check a dataset folder and return the report; nothing usable is reported, not raised (the CLI decides)."""
    cfg = cfg or DataConfig()
    root = _dataset_root(root)
    pref = find_preference_file(root)
    if pref is not None:  # pairs / thumbs: their own reader; the items are the liked images (what sft trains on)
        return preference_report(scan_preferences(root, pref, cfg, progress=progress), root, cfg)
    real_root = os.path.realpath(root)
    skipped: list[Skipped] = []
    images, metadata, other_files = walk(root, skipped)
    meta: dict[str, tuple[Any, str]] = {}
    for rel_meta in metadata:
        read_metadata(root, real_root, rel_meta, cfg.caption_column, meta, skipped)
    candidates = sorted(set(images) | set(meta))
    checked: list[Checked] = []
    for rel in tqdm(candidates, desc="checking images", unit="img", disable=not progress, file=sys.stderr):
        try:
            if not is_text(rel):
                raise Bad("bad_name", "the name is not valid UTF-8 (shown with \\x escapes); rename the file.")
            try:
                found = check_image(root, real_root, rel, cfg)  # the image first: it matters more than its caption
            except Bad as e:
                if rel in meta and e.reason == "unreadable" and not os.path.lexists(root / rel):
                    raise Bad("unreadable", f"{meta[rel][1]} names a file that does not exist; fix the name or "
                              "add it.") from None
                raise
            rel_txt = posixpath.splitext(rel)[0] + cfg.caption_extension
            found.item.caption = caption_of(rel, meta.get(rel), rel_txt if rel_txt in other_files else None,
                                            root, real_root, cfg.caption_column, cfg.caption_extension)
            checked.append(found)
        except Bad as e:
            skipped.append(Skipped(rel if is_text(rel) else display(rel), e.reason, e.detail))
    items, dup_skipped, duplicates = _dedupe(checked, cfg.near_duplicate_distance)
    skipped += dup_skipped
    items.sort(key=lambda it: it.path)
    used = {posixpath.splitext(p)[0] + cfg.caption_extension for p in candidates}
    orphans = sum(1 for c in other_files if c.endswith(cfg.caption_extension) and c not in used)
    return DataReport(root=display(root), items=items, skipped=skipped, duplicates=duplicates,
                      stats=compute_stats(len(candidates), items, skipped, REASONS, orphans),
                      config=dataclasses.asdict(cfg), fingerprint=dataset_fingerprint(items))


def preference_report(scan: PreferenceScan, root: Path, cfg: DataConfig) -> DataReport:
    """A preference dataset's report: its lines' problems, the liked images as items, the preference counts."""
    items = sft_items(scan.records, scan.images)
    stats = compute_stats(scan.stats["images_named"], items, scan.skipped, {**REASONS, **PREFERENCE_REASONS})
    stats["preference"] = {"file": scan.file, "layout": scan.layout, "lines": scan.lines, **scan.stats}
    if not scan.records:
        stats["warnings"] = ["No usable preferences: fix the lines listed as skipped before training."]
    elif scan.stats["raters"] > 1 and scan.stats["largest_rater_share"] > DOMINANT_RATER_SHARE:
        stats["warnings"].append(f"One rater ({scan.stats['largest_rater']}) gave "
                                 f"{scan.stats['largest_rater_share']:.0%} of the preferences: the model would "
                                 "learn one person's taste; cap or down-weight their lines.")
    return DataReport(root=display(root), items=items, skipped=scan.skipped, stats=stats,
                      config=dataclasses.asdict(cfg), fingerprint=scan.fingerprint,
                      preferences=records_to_dicts(scan.records))


@dataclass
class CheckResult:
    """What ``sdloop data check`` shows: the report, where it was written, and the split it implies."""

    report: DataReport
    report_path: Path
    train: list[Any]        # items, or preference records for a preference dataset
    validation: list[Any]


def check_dataset(data_dir: str | Path, cfg: DataConfig, requested: Optional[str], default: Path,
                  progress: bool = True) -> CheckResult:
    """``sdloop data check``: choose the report path (before the slow part), scan, split, warn, write the report.

    The report also records the split's sizes, and a warning when the split would leave validation empty (the
    trainer refuses such a dataset; ``explain_empty_validation`` says what to change).
    """
    out = choose_report_path(data_dir, requested, default)
    report = scan_dataset(data_dir, cfg, progress=progress)
    if "preference" in report.stats:  # split by prompt, counted in preferences (lines), not images
        records = [PreferenceRecord(**r) for r in report.preferences]
        train, val = split_preferences(records, cfg)
        report.stats["split"] = {"seed": cfg.split_seed, "by": "prompt", "train": len(train),
                                 "validation": len(val)}
        why = explain_empty_preference_validation(records, cfg) if records and not val else ""
    else:
        train, val = split_items(report.items, cfg) if report.items else ([], [])
        report.stats["split"] = {"seed": cfg.split_seed, "train": len(train), "validation": len(val)}
        why = explain_empty_validation(report.items, cfg) if report.items and not val else ""
    if why:
        report.stats.setdefault("warnings", []).append(why[0].upper() + why[1:])
    write_report(report, out)
    return CheckResult(report, out, train, val)


# -- the summary -----------------------------------------------------------------------------------------------------

def _table(title: str, rows: dict[str, Any]) -> list[str]:
    width = max((len(k) for k in rows), default=0)
    return [title] + [f"  {k:<{width}}  {v}" for k, v in rows.items()]


def format_summary(report: DataReport, max_listed: int = 10) -> str:
    """A readable multi-line summary for the terminal: counts, skipped files and why, shapes, captions, warnings."""
    st = report.stats
    counts = st.get("counts", {})
    lines = [f"Dataset {display(report.root)}",
             f"  found {counts.get('found', 0)} image(s), usable {len(report.items)}, skipped {len(report.skipped)}"
             f", fingerprint {report.fingerprint[:12]}"]
    by_reason = counts.get("skipped_by_reason", {})
    if by_reason:
        reasons = {**REASONS, **PREFERENCE_REASONS}
        lines += _table("Skipped by reason", {f"{k} ({v})": reasons.get(k, k) for k, v in by_reason.items()})
        for s in report.skipped[:max_listed]:
            lines.append(f"    {display(s.path)}: {s.reason}: {display(s.detail)}")
        if len(report.skipped) > max_listed:
            lines.append(f"    ... and {len(report.skipped) - max_listed} more (see the saved report)")
    pref = st.get("preference")
    if pref:
        lines += _table(f"Preferences ({pref['file']}, {pref['layout']} layout)", {
            "lines read": pref["lines"], "usable": pref["records"],
            "pairs": pref["pairs"], "singles": f"{pref['singles']} ({pref['desirable']} desirable, "
                                               f"{pref['undesirable']} undesirable)",
            "prompts": pref["prompts"],
            "raters": f"{pref['raters']}, the largest {pref['largest_rater']} with "
                      f"{pref['largest_rater_share']:.0%} of the lines"})
    converted = sum(1 for it in report.items if it.converted)
    if converted:
        lines.append(f"  converted on load: {converted} image(s) (mode or EXIF orientation)")
    if report.items:
        lines += _table("Shorter side (px)", {k: v for k, v in st.get("shorter_side_histogram", {}).items() if v})
        lines += _table("Aspect ratio (w/h)", {k: v for k, v in st.get("aspect_ratio_histogram", {}).items() if v})
        cap = st.get("captions", {})
        words, conc = cap.get("words", {}), cap.get("concentration", {})
        lines += _table("Captions", {
            "words min/mean/max": f"{words.get('min')}/{words.get('mean')}/{words.get('max')}",
            "vocabulary": cap.get("vocabulary_size"),
            "top terms": ", ".join(f"{t['term']} ({t['share']:.0%})" for t in cap.get("top_terms", [])[:8]),
            "top term share": f"{conc.get('top_term_share', 0):.0%}",
            "top-5 coverage": f"{conc.get('top5_coverage', 0):.0%}",
            "normalised entropy": conc.get("normalised_entropy"),
        })
    for w in st.get("warnings", []):
        lines.append(f"WARNING: {w}")
    return "\n".join(lines)
