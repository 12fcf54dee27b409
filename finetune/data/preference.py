"""Preference datasets: pairs (Diffusion-DPO) and single thumbs (Diffusion-KTO), read, checked and split.

A preference dataset is a folder of images (any nested paths) with one ``preferences.jsonl`` at its root, one JSON
object per line, either

- a pair: ``{"prompt": str, "chosen": "rel/path.png", "rejected": "rel/path.png", "rater": str?, "weight": float?}``
- a single: ``{"prompt": str, "image": "rel/path.png", "label": "desirable" | "undesirable", "rater": str?,
  "weight": float?}``

Pick-a-Pic's layout (Kirstain et al. 2023) is read too, from ``preferences.jsonl`` or a root ``metadata.jsonl`` whose
lines carry ``caption``, ``jpg_0``/``jpg_1`` (or ``image_0``/``image_1``) and ``label_0`` in {1, 0, 0.5}; ties
(0.5) are skipped with a reason, as Diffusion-DPO does (Wallace et al. 2023, Section 5: "we exclude ties").

Every image goes through the plain dataset check's rules (``finetune.data.images.check_image``: only regular files
inside the folder, fully decoded, size rules), each once however many lines name it. Each bad line is reported with a
reason code and the line number; nothing in the folder is written. The split keeps all lines of a prompt on one side,
so the validation preference loss measures generalisation to new prompts, not to a second vote on a seen one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import stat
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

from finetune.data.files import Bad, Item, Skipped, display, inside, is_text, read_inside
from finetune.data.images import check_image
from finetune.training.config import DataConfig

__all__ = ["PREFERENCES_NAME", "PREFERENCE_REASONS", "PreferenceRecord", "PreferenceScan", "find_preference_file",
           "preference_stats", "read_preference_file", "scan_preferences", "sft_items", "split_preferences"]

PREFERENCES_NAME = "preferences.jsonl"
PICKAPIC_NAME = "metadata.jsonl"
MAX_PREFERENCE_BYTES = 1 << 30
DOMINANT_RATER_SHARE = 0.5   # above this share of the lines one rater steers the set: warned about
PREFERENCE_REASONS = {
    "bad_json": "a preferences line is not a JSON object",
    "bad_preference": "a line is neither a pair (chosen/rejected) nor a single (image/label), or a field has the "
                      "wrong type",
    "empty_prompt": "the prompt (caption) is missing or empty",
    "one_sided_pair": "a pair names only one of its two images",
    "same_image": "chosen and rejected are the same image",
    "unknown_label": "the label is not desirable/undesirable (or Pick-a-Pic's label_0 not 1, 0 or 0.5)",
    "tie": "a Pick-a-Pic tie (label_0 = 0.5): no preference to learn, skipped as Diffusion-DPO does",
    "bad_weight": "the weight is not a positive finite number",
    "missing_image": "the line names an image that does not exist",
    "bad_image": "the line names an image the check refused (its own row says why)",
    "duplicate_preference": "the same preference (prompt, images, label, rater) appears twice; the first is used",
}
LABELS = {"desirable": True, "undesirable": False}


@dataclass
class PreferenceRecord:
    """One usable preference: a pair (``kind="pair"``: chosen over rejected) or a single (``kind="single"``)."""

    kind: str                 # "pair" or "single"
    prompt: str
    chosen: str = ""          # pair: the preferred image (posix path relative to the dataset root)
    rejected: str = ""        # pair: the other one
    image: str = ""           # single: the image
    desirable: bool = True    # single: its label
    rater: str = ""
    weight: float = 1.0
    where: str = ""           # "preferences.jsonl line 3"

    def paths(self) -> list[str]:
        """The images this record uses: (chosen, rejected) for a pair, (image,) for a single."""
        return [self.chosen, self.rejected] if self.kind == "pair" else [self.image]

    def liked(self) -> Optional[str]:
        """The image fine-tuning on liked images (``sft``) trains on: chosen, or a desirable single; else None."""
        return self.chosen if self.kind == "pair" else (self.image if self.desirable else None)


@dataclass
class PreferenceScan:
    """What the preference check found: usable records, the images they use (checked once), and the bad lines."""

    file: str                                   # the preferences file, relative to the root
    layout: str                                 # "sdloop" or "pick-a-pic"
    records: list[PreferenceRecord]
    images: dict[str, Item]                     # path -> checked image (caption empty: the prompt is per record)
    skipped: list[Skipped]
    lines: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""


# -- finding the file --------------------------------------------------------------------------------------------

def _first_object(path: Path) -> Optional[dict]:
    """The first parseable JSON object of a JSON-lines file (reads at most 1 MiB), or None."""
    try:  # non-blocking and regular files only: a FIFO swapped in never hangs the check
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        head = os.read(fd, 1 << 20).decode("utf-8-sig", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)
    for line in head.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def find_preference_file(root: str | Path) -> Optional[str]:
    """The preferences file of a dataset folder (relative name), or None when it is a plain captioned dataset.

    ``preferences.jsonl`` at the root makes a preference dataset whatever it holds (its bad lines are then reported);
    a root ``metadata.jsonl`` does only when its first line has Pick-a-Pic's ``label_0`` and image columns. Only
    regular files inside the folder count (a symlink out, a FIFO are never opened here).
    """
    root = Path(root)
    real_root = os.path.realpath(root)
    for name in (PREFERENCES_NAME, PICKAPIC_NAME):
        path = root / name
        if not os.path.isfile(path) or not inside(real_root, path):
            continue
        if name == PREFERENCES_NAME:
            return name
        first = _first_object(path)
        if first is not None and "label_0" in first and any(k in first for k in ("jpg_0", "image_0")):
            return name
    return None


# -- reading lines -----------------------------------------------------------------------------------------------

def _text(entry: dict, *keys: str) -> Any:
    for k in keys:
        if k in entry:
            return entry[k]
    return None


def _image_name(value: Any, where: str, base: str, root: Path, real_root: str) -> str:
    """A named image as a posix path inside the root; Bad for a wrong type, NUL bytes or a path leading out."""
    if not isinstance(value, str) or not value.strip():
        raise Bad("bad_preference", f"{where}: an image name must be a non-empty string, got {value!r}.")
    if not is_text(value):
        raise Bad("bad_preference", f"{where}: the image name {display(value)!r} holds a NUL byte or an invalid "
                  "Unicode escape; fix the line.")
    joined = posixpath.normpath(posixpath.join(base, value))
    if posixpath.isabs(value) or os.path.isabs(value) or joined == ".." or joined.startswith("../") or \
            not inside(real_root, root / joined):
        raise Bad("outside_dataset", f"{where} names {display(value)}, outside the dataset folder; copy the image "
                  "in and name it relative to the folder.")
    return joined


def _parse(entry: Any, where: str, base: str, root: Path, real_root: str) -> PreferenceRecord:
    """One line as a record (paths not yet checked on disk); Bad with the reason when the line cannot be used."""
    if not isinstance(entry, dict):
        raise Bad("bad_json", f"{where} is not a JSON object; each line is one {{...}}.")
    prompt = _text(entry, "prompt", "caption")
    if prompt is None or (isinstance(prompt, str) and not " ".join(prompt.split())):
        raise Bad("empty_prompt", f"{where} has no prompt; add \"prompt\": \"...\" (Pick-a-Pic: \"caption\").")
    if not isinstance(prompt, str) or not is_text(prompt):
        raise Bad("bad_preference", f"{where}: the prompt must be text, got {type(prompt).__name__}.")
    prompt = " ".join(prompt.replace("\0", " ").split())
    rater = entry.get("rater", entry.get("user_id", ""))
    rater = "" if rater is None else str(rater)
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise Bad("bad_weight", f"{where}: weight={weight!r}; give a positive number (default 1).")
    common = dict(prompt=prompt, rater=rater, weight=float(weight), where=where)
    pick = [k for k in ("jpg_0", "jpg_1", "image_0", "image_1") if k in entry]
    if "label_0" in entry or pick:  # Pick-a-Pic
        a, b = _text(entry, "jpg_0", "image_0"), _text(entry, "jpg_1", "image_1")
        if a in (None, "") or b in (None, ""):
            raise Bad("one_sided_pair", f"{where} names only one image (jpg_0/jpg_1); a pair needs both.")
        label = entry.get("label_0")
        if isinstance(label, bool) or label not in (0, 1, 0.5):
            raise Bad("unknown_label", f"{where}: label_0={label!r}; Pick-a-Pic's label_0 is 1 (jpg_0 preferred), "
                      "0 (jpg_1 preferred) or 0.5 (a tie).")
        if label == 0.5:
            raise Bad("tie", f"{where} is a tie (label_0 = 0.5): nothing to learn, skipped.")
        a, b = (_image_name(x, where, base, root, real_root) for x in (a, b))
        chosen, rejected = (a, b) if label == 1 else (b, a)
        return PreferenceRecord(kind="pair", chosen=chosen, rejected=rejected, **common)
    if "chosen" in entry or "rejected" in entry:
        if entry.get("chosen") in (None, "") or entry.get("rejected") in (None, ""):
            side = "rejected" if entry.get("chosen") not in (None, "") else "chosen"
            raise Bad("one_sided_pair", f"{where} has no \"{side}\" image; a pair needs both chosen and rejected.")
        chosen = _image_name(entry["chosen"], where, base, root, real_root)
        rejected = _image_name(entry["rejected"], where, base, root, real_root)
        return PreferenceRecord(kind="pair", chosen=chosen, rejected=rejected, **common)
    if "image" in entry or "label" in entry:
        label = entry.get("label")
        if not isinstance(label, str) or label.strip().lower() not in LABELS:
            raise Bad("unknown_label", f"{where}: label={label!r}; a single's label is \"desirable\" or "
                      "\"undesirable\".")
        if entry.get("image") in (None, ""):
            raise Bad("bad_preference", f"{where} has a label but no \"image\".")
        image = _image_name(entry["image"], where, base, root, real_root)
        return PreferenceRecord(kind="single", image=image, desirable=LABELS[label.strip().lower()], **common)
    raise Bad("bad_preference", f"{where} is neither a pair ({{\"prompt\", \"chosen\", \"rejected\"}}) nor a single "
              "({\"prompt\", \"image\", \"label\"}).")


def read_preference_file(root: str | Path, name: str) -> tuple[list[PreferenceRecord], list[Skipped], int]:
    """The parsed records of one preferences file, the bad lines (as Skipped rows) and the number of lines.

    Image paths are checked for form and place only; ``scan_preferences`` checks the images themselves. The file
    itself is read through ``read_inside`` (regular file, inside the folder, at most 1 GiB).
    """
    root = Path(root)
    real_root = os.path.realpath(root)
    skipped: list[Skipped] = []
    try:
        text = read_inside(root, real_root, name, MAX_PREFERENCE_BYTES, name).decode("utf-8-sig")
    except Bad as e:
        return [], [Skipped(name, e.reason if e.reason in ("outside_dataset", "not_a_file") else "bad_json",
                            e.detail)], 0
    except UnicodeDecodeError as e:
        return [], [Skipped(name, "bad_json", f"not UTF-8 ({e.reason} at byte {e.start}); save it as UTF-8 JSON "
                            "lines.")], 0
    records: list[PreferenceRecord] = []
    seen: dict[tuple, str] = {}
    base = posixpath.dirname(name)
    lines = 0
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        lines += 1
        where = f"{name} line {no}"
        try:
            try:
                entry = json.loads(line)
            except ValueError as e:
                raise Bad("bad_json", f"{where} is not valid JSON ({e}); fix or delete the line.") from None
            rec = _parse(entry, where, base, root, real_root)
        except Bad as e:  # the row names the line already: the detail need not repeat it
            detail = e.detail[len(where):].lstrip(": ") if e.detail.startswith(where) else e.detail
            skipped.append(Skipped(where, e.reason, detail))
            continue
        if rec.kind == "pair" and rec.chosen == rec.rejected:
            skipped.append(Skipped(where, "same_image", f"chosen and rejected are both {rec.chosen}."))
            continue
        key = (rec.kind, rec.prompt, rec.chosen, rec.rejected, rec.image, rec.desirable, rec.rater)
        if key in seen:
            skipped.append(Skipped(where, "duplicate_preference", f"the same as {seen[key]}; delete one of them."))
            continue
        seen[key] = where
        records.append(rec)
    return records, skipped, lines


# -- the check ---------------------------------------------------------------------------------------------------

def preference_stats(records: list[PreferenceRecord]) -> dict[str, Any]:
    """Counts of pairs, singles, labels, prompts and raters, and the share of the most active rater."""
    raters = Counter(r.rater or "(unnamed)" for r in records)
    top = raters.most_common(1)[0] if raters else ("", 0)
    return {
        "records": len(records),
        "pairs": sum(r.kind == "pair" for r in records),
        "singles": sum(r.kind == "single" for r in records),
        "desirable": sum(r.kind == "single" and r.desirable for r in records),
        "undesirable": sum(r.kind == "single" and not r.desirable for r in records),
        "prompts": len({r.prompt for r in records}),
        "raters": len(raters),
        "rater_counts": dict(raters.most_common(20)),
        "largest_rater": top[0],
        "largest_rater_share": round(top[1] / len(records), 4) if records else 0.0,
    }


def _fingerprint(records: list[PreferenceRecord], images: dict[str, Item]) -> str:
    rows = sorted((r.kind, r.prompt, *[images[p].sha256 for p in r.paths()], r.desirable, r.rater, r.weight)
                  for r in records)
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode("utf-8", "surrogatepass")).hexdigest()


def scan_preferences(root: str | Path, name: str, cfg: Optional[DataConfig] = None,
                     progress: bool = True) -> PreferenceScan:
    """Read and check a preference dataset: every line, every image it names (each image decoded once)."""
    cfg = cfg or DataConfig()
    root = Path(root)
    real_root = os.path.realpath(root)
    records, skipped, lines = read_preference_file(root, name)
    images: dict[str, Item] = {}
    refused: dict[str, Bad] = {}
    needed = sorted({p for r in records for p in r.paths()})
    for rel in tqdm(needed, desc="checking images", unit="img", disable=not progress, file=sys.stderr):
        try:
            images[rel] = check_image(root, real_root, rel, cfg).item
        except Bad as e:
            if e.reason == "unreadable" and not os.path.lexists(root / rel):
                e = Bad("missing_image", f"{display(rel)} does not exist; add it or fix the name.")
            else:
                skipped.append(Skipped(display(rel), e.reason, e.detail))
            refused[rel] = e
    usable: list[PreferenceRecord] = []
    for r in records:
        bad = [p for p in r.paths() if p in refused]
        if bad:
            e = refused[bad[0]]
            reason = "missing_image" if e.reason == "missing_image" else "bad_image"
            skipped.append(Skipped(r.where, reason, f"{display(bad[0])}: {e.detail}" if reason == "missing_image"
                                   else f"{display(bad[0])} cannot be used ({e.reason})."))
            continue
        if r.kind == "pair" and images[r.chosen].sha256 == images[r.rejected].sha256:
            skipped.append(Skipped(r.where, "same_image", f"{r.chosen} and {r.rejected} have the same bytes."))
            continue
        usable.append(r)
    used = {p for r in usable for p in r.paths()}
    images = {p: it for p, it in images.items() if p in used}
    first = _first_object(root / name) or {}
    layout = "pick-a-pic" if name == PICKAPIC_NAME or "label_0" in first else "sdloop"
    stats = {**preference_stats(usable), "images_named": len(needed), "images_usable": len(images)}
    return PreferenceScan(file=name, layout=layout, records=usable, images=images, skipped=skipped, lines=lines,
                          stats=stats, fingerprint=_fingerprint(usable, images))


def sft_items(records: list[PreferenceRecord], images: dict[str, Item]) -> list[Item]:
    """The liked images (chosen, desirable) as captioned items: what ``sft`` trains on from a preference set."""
    out: dict[tuple[str, str], Item] = {}
    for r in records:
        path = r.liked()
        if path is not None:
            out.setdefault((path, r.prompt), replace(images[path], caption=r.prompt))
    return sorted(out.values(), key=lambda it: (it.path, it.caption))


def record_items(records: list[PreferenceRecord], images: dict[str, Item]) -> tuple[list[Item], list[list[int]]]:
    """Every (image, prompt) the records use as captioned items, and for each record the indices of its images."""
    index: dict[tuple[str, str], int] = {}
    items: list[Item] = []
    refs: list[list[int]] = []
    for r in records:
        row = []
        for p in r.paths():
            key = (p, r.prompt)
            if key not in index:
                index[key] = len(items)
                items.append(replace(images[p], caption=r.prompt))
            row.append(index[key])
        refs.append(row)
    return items, refs


# -- the split ---------------------------------------------------------------------------------------------------

def split_preferences(records: list[PreferenceRecord], cfg: DataConfig
                      ) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
    """Deterministic (train, validation) split by prompt: all lines of one prompt stay on one side.

    Validation aims at round(n * validation_split) records, at least min_validation_items, never all; prompts are
    taken in the order of a seeded hash, and a prompt whose lines do not fit is passed over (validation ends up
    slightly smaller rather than splitting a prompt).
    """
    by_prompt: dict[str, list[PreferenceRecord]] = {}
    for r in records:
        by_prompt.setdefault(r.prompt, []).append(r)
    n = len(records)
    if cfg.validation_split <= 0 or len(by_prompt) < 2:
        return list(records), []
    target = min(max(round(n * cfg.validation_split), cfg.min_validation_items), n - 1)
    order = sorted(by_prompt, key=lambda p: hashlib.sha256(f"{cfg.split_seed}:{p}".encode("utf-8",
                                                                                             "surrogatepass")).hexdigest())
    val_prompts: set[str] = set()
    count = 0
    for p in order:
        if count + len(by_prompt[p]) <= target:
            val_prompts.add(p)
            count += len(by_prompt[p])
        if count == target:
            break
    return [r for r in records if r.prompt not in val_prompts], [r for r in records if r.prompt in val_prompts]


def explain_empty_preference_validation(records: list[PreferenceRecord], cfg: DataConfig) -> str:
    """Why the by-prompt split leaves validation empty, and what helps (one line); "" when it does not."""
    if cfg.validation_split <= 0 or not records or split_preferences(records, cfg)[1]:
        return ""
    off = "or set data.validation_split=0 to train without validation (no early stopping)"
    prompts = {r.prompt for r in records}
    if len(prompts) < 2:
        return (f"the validation split is empty: all {len(records)} preferences share one prompt, and a prompt's "
                f"preferences stay on one side; add preferences for other prompts, {off}.")
    smallest = min(sum(r.prompt == p for r in records) for p in prompts)
    return (f"the validation split is empty: the smallest prompt has {smallest} preferences, more than the "
            f"validation share of {len(records)} x data.validation_split={cfg.validation_split}; raise "
            f"data.validation_split, {off}.")


def records_to_dicts(records: list[PreferenceRecord]) -> list[dict[str, Any]]:
    """The records as JSON-ready rows for the data report."""
    return [asdict(r) for r in records]
