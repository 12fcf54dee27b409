"""Copying an export into the model store: the file copier that ``export.registry.publish`` hands BentoML.

Why a module of its own: the copy is the part of publishing that must hold against a folder changed underneath it
(a file swapped for a link after the check, a file rewritten while it is copied), so it opens nothing through a link,
hashes exactly the bytes it writes and compares them with the manifest; ``registry.py`` keeps the decisions.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any, Callable

from sdloop.exportfolder import MANIFEST, MARKER, ExportFolderError, ExportManifest


def clean_metadata(value: Any) -> Any:
    """A JSON value BentoML's metadata accepts (it refuses None)."""
    if isinstance(value, dict):
        return {str(k): clean_metadata(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [clean_metadata(v) for v in value if v is not None]
    return value


def copy_file(src: Path, dst: Path, rel: str, entry: dict[str, Any]) -> None:
    """Copy one regular file without following a link, hashing what is copied: a file swapped after the check (a
    link to a private file included) cannot reach the store, as its bytes would not match the manifest."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise ExportFolderError(f"{rel} cannot be read without following a link ({e.strerror or e}); an export "
                                "holds regular files only.") from None
    h = hashlib.sha256()
    size = 0
    with os.fdopen(fd, "rb") as fin:
        if not stat.S_ISREG(os.fstat(fin.fileno()).st_mode):
            raise ExportFolderError(f"{rel} is not a regular file; an export holds regular files only.")
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(dst, "wb") as fout:
            for chunk in iter(lambda: fin.read(1 << 20), b""):
                h.update(chunk)
                size += len(chunk)
                fout.write(chunk)
    if size != entry["bytes"] or h.hexdigest() != entry["sha256"]:
        raise ExportFolderError(f"{rel} changed while it was published (it no longer matches the manifest); "
                                "nothing was published.")


def filler(src: Path, manifest: ExportManifest, manifest_bytes: bytes, marker_bytes: bytes,
            then: Callable[[], None]) -> Callable[[Path], None]:
    """Fill BentoML's new version folder; ``then`` runs last (it takes the lock before BentoML moves the version into
    the store, so the long copy above runs without it)."""
    def fill(dst: Path) -> None:
        for rel, entry in sorted(manifest.files.items()):
            copy_file(src / rel, dst / rel, rel, entry)
        (dst / MANIFEST).write_bytes(manifest_bytes)
        (dst / MARKER).write_bytes(marker_bytes)
        then()
    return fill


def read_nofollow(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        return f.read()
