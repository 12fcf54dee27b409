"""Finding and reading the dataset's files safely: only regular files, only inside the dataset, never blocking.

A dataset folder is the user's, and may hold anything: FIFOs (reading one blocks forever), device nodes, symlinks to
files elsewhere on the machine (whose text would end up in captions and reports), file names that are not UTF-8 (which
JSON cannot hold), and metadata lines naming paths with NUL bytes. Every file the dataset stage reads goes through
``read_inside``: the path must resolve inside the dataset, must be a regular file, and must be of a sane size;
anything else is reported per file with a reason code (``Bad``), never a hang and never a traceback.
"""

from __future__ import annotations

import json
import os
import posixpath
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from sdloop.errors import UserError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
METADATA_NAME = "metadata.jsonl"
MAX_CAPTION_BYTES = 1 << 20      # a caption file holds one caption; the text encoder reads 77 tokens of it
MAX_METADATA_BYTES = 1 << 30     # about ten million metadata lines
REASONS = {
    "empty_file": "the file is empty (0 bytes)",
    "not_an_image": "the file has an image extension but is not an image",
    "unreadable": "the file cannot be read",
    "not_a_file": "not a regular file (a FIFO, device, socket or folder): only regular files are read",
    "bad_name": "the file name is not valid UTF-8: rename the file",
    "truncated": "the image data is truncated or corrupt",
    "decompression_bomb": "the image has too many pixels (decompression-bomb guard, data.max_pixels)",
    "too_small": "the shorter side is below data.min_side",
    "extreme_aspect": "the long/short side ratio is above data.max_aspect_ratio",
    "missing_caption": "no caption (no metadata.jsonl entry and no caption file)",
    "empty_caption": "the caption is empty or only whitespace",
    "bad_caption": "the caption cannot be used (not UTF-8 text, or too large)",
    "outside_dataset": "the path points outside the dataset folder",
    "bad_metadata": "a metadata.jsonl line cannot be used",
    "exact_duplicate": "identical to another image (same bytes or same pixels)",
    "near_duplicate": "nearly identical to another image (perceptual hash)",
}


class DatasetError(UserError):
    """The dataset cannot be read at all; the message says what to do."""


@dataclass
class Item:
    """One usable training item."""

    path: str          # posix path relative to the dataset root
    caption: str
    width: int         # after EXIF orientation
    height: int
    sha256: str        # of the file's bytes: caches key on it
    phash: str         # 16 hex chars, imagehash.phash of the oriented RGB image
    mode: str          # original PIL mode, e.g. "RGBA"
    converted: Optional[str] = None  # e.g. "RGBA->RGB", "exif-rotated", or None


@dataclass
class Skipped:
    """One file (or metadata line) that cannot train, with a reason code from REASONS."""

    path: str
    reason: str
    detail: str


class Bad(Exception):
    """A file cannot train; carries the reason code (a key of REASONS) and a detail saying what to do."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# -- names -------------------------------------------------------------------------------------------------------------

def is_text(s: str) -> bool:
    """True when ``s`` is valid Unicode without NUL: no undecodable file-name bytes, no lone surrogate escapes."""
    if "\0" in s:
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def display(s: str | os.PathLike) -> str:
    """A path as printable, JSON-safe text: undecodable bytes become ``\\xNN``, control characters are escaped."""
    text = os.fspath(s)
    if isinstance(text, str):
        try:
            text = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a lone surrogate that no file-name byte made
            text = text.encode("utf-8", "backslashreplace")
    text = text.decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def inside(real_root: str, path: str | os.PathLike) -> bool:
    """True when ``path`` (symlinks resolved) lies inside the dataset root."""
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


# -- reading -----------------------------------------------------------------------------------------------------------

def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def read_regular(path: str | Path, limit: int, what: str = "the file",
                 too_big: Optional[Callable[[int], Bad]] = None) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; Bad("not_a_file") for a FIFO, device or folder.

    The type is checked before opening (opening some devices has effects) and again on the open descriptor (the path
    may have been swapped meanwhile); O_NONBLOCK makes even a FIFO swapped in between open at once instead of hanging.
    ``too_big(size)`` words the refusal of a file above ``limit``. Other OSErrors (missing, permission denied)
    propagate for the caller to word.
    """
    def big(size: int) -> Bad:
        return too_big(size) if too_big else Bad("unreadable", f"{what} is {size} bytes or more, above the {limit} "
                                                                 "this stage reads.")

    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise Bad("not_a_file", f"{what} is {_kind(st.st_mode)}; only regular files are read: replace it with one.")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Bad("not_a_file", f"{what} is {_kind(st.st_mode)}; only regular files are read.")
        if st.st_size > limit:
            raise big(st.st_size)
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 24, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:  # the file grew while being read
            raise big(size)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_inside(root: Path, real_root: str, rel: str, limit: int, what: str = "the file",
                too_big: Optional[Callable[[int], Bad]] = None) -> bytes:
    """``read_regular`` of ``root/rel``, refusing (Bad) a path or symlink that resolves outside the dataset."""
    path = root / rel
    if not inside(real_root, path):
        raise Bad("outside_dataset", f"{what} is a symlink resolving outside the dataset folder; copy the file in.")
    try:
        return read_regular(path, limit, what, too_big)
    except FileNotFoundError:
        raise Bad("unreadable", f"{what} does not exist (a broken symlink?); fix the name or add the file.") from None
    except OSError as e:
        raise Bad("unreadable", f"cannot read {what}: {e.strerror or e}; check that it is readable.") from None


# -- walking -----------------------------------------------------------------------------------------------------------

def walk(root: Path, skipped: list[Skipped]) -> tuple[list[str], list[str], set[str]]:
    """Image paths, metadata files and other files (posix, relative to root); hidden entries are ignored.

    A folder that cannot be listed is reported in ``skipped`` rather than silently missing from the counts.
    Symlinked folders are not descended (a link may lead anywhere); metadata may still name files through them.
    """
    images, metadata, others = [], [], set()

    def onerror(e: OSError) -> None:
        rel = os.path.relpath(e.filename, root) if e.filename else "."
        skipped.append(Skipped(display(Path(rel).as_posix()), "unreadable",
                               f"cannot list the folder: {e.strerror or e}; check its permissions."))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if name == METADATA_NAME:
                metadata.append(rel)
            elif os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                images.append(rel)
            else:
                others.add(rel)
    return images, metadata, others


# -- captions ----------------------------------------------------------------------------------------------------------

def read_metadata(root: Path, real_root: str, rel_meta: str, column: str,
                  captions: dict[str, tuple[Any, str]], skipped: list[Skipped]) -> None:
    """Add ``{image path: (caption, where)}`` from one metadata.jsonl; report bad lines instead of failing."""
    base = posixpath.dirname(rel_meta)
    try:
        text = read_inside(root, real_root, rel_meta, MAX_METADATA_BYTES, rel_meta).decode("utf-8-sig")
    except Bad as e:
        reason = e.reason if e.reason in ("outside_dataset", "not_a_file") else "bad_metadata"
        skipped.append(Skipped(rel_meta, reason, f"{e.detail} Its captions are not used."))
        return
    except UnicodeDecodeError as e:
        skipped.append(Skipped(rel_meta, "bad_metadata", f"cannot read it (not UTF-8: {e.reason} at byte {e.start});"
                               " save it as UTF-8 JSON lines."))
        return
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{rel_meta} line {no}"
        try:
            entry = json.loads(line)
        except ValueError as e:
            skipped.append(Skipped(where, "bad_metadata", f"not valid JSON ({e}); fix or delete the line."))
            continue
        name = entry.get("file_name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name:
            skipped.append(Skipped(where, "bad_metadata", "has no \"file_name\"; each line needs "
                                   "{\"file_name\": ..., \"" + column + "\": ...}."))
            continue
        if not is_text(name):
            skipped.append(Skipped(where, "bad_metadata", f"its file_name \"{display(name)}\" holds a NUL byte or an "
                                   "invalid Unicode escape, which no file name can hold; fix the line."))
            continue
        joined = posixpath.normpath(posixpath.join(base, name))
        if posixpath.isabs(name) or os.path.isabs(name) or joined.startswith("../") or joined == ".." or \
                not inside(real_root, root / joined):
            skipped.append(Skipped(display(name), "outside_dataset", f"{where} names a file outside the dataset "
                                   "folder; move the file into the folder and name it relative to metadata.jsonl."))
            continue
        if joined in captions:
            skipped.append(Skipped(where, "bad_metadata", f"a second entry for {display(joined)}; the first one "
                                   f"({captions[joined][1]}) is used: delete one of them."))
            continue
        captions[joined] = (entry.get(column), where)


def read_caption_file(root: Path, real_root: str, rel_txt: str) -> str:
    """The text of a same-stem caption file; Bad naming the caption file when it cannot be used."""
    what = f"its caption file {display(rel_txt)}"
    try:
        data = read_inside(root, real_root, rel_txt, MAX_CAPTION_BYTES, what)
    except Bad as e:
        raise Bad("bad_caption" if e.reason == "unreadable" else e.reason, e.detail) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise Bad("bad_caption", f"{what} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8.") \
            from None


def caption_of(rel: str, meta: Optional[tuple[Any, str]], caption_file: Optional[str], root: Path,
               real_root: str, column: str, extension: str) -> str:
    """The caption of an image: its metadata entry wins, else its caption file is read; Bad when there is none."""
    if meta is not None:
        value, where = meta
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            value = value[0]  # imagefolder allows several captions per image; train on the first
        if not isinstance(value, str):
            raise Bad("missing_caption", f"{where} has no text in column \"{column}\" "
                      f"(set data.caption_column if your captions use another column).")
        text = value.replace("\0", " ")
        if not is_text(text):
            raise Bad("bad_caption", f"{where}: the caption holds an invalid Unicode escape (a lone surrogate); "
                      "fix the text.")
    elif caption_file is not None:
        text = read_caption_file(root, real_root, caption_file)
    else:
        stem = posixpath.splitext(rel)[0]
        raise Bad("missing_caption", f"add {stem}{extension} or a metadata.jsonl entry.")
    text = " ".join(text.split())
    if not text:
        raise Bad("empty_caption", "write a caption describing the image.")
    return text
