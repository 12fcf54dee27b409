"""Where ``sdloop export`` may write, how the folder is built, and the leftovers of exports that were killed.

Rules for ``--output`` (each refusal is one line, exit 2):
- never inside the model store (``BENTOML_HOME/models``, symlinks followed) nor a folder that holds it: a published
  version is immutable, and writing there would replace what the champion serves behind the registry's back;
- a new or empty folder, or an unfinished export of ours (marker ``finished: false``), may be written;
- a finished export of ours may be replaced only by an export of the same run (what re-running ``sdloop export RUN``
  with the default output does); an export of another run is kept: choose a new folder or delete it yourself;
- anything else (a folder sdloop did not make) is refused.

The export is built under a hidden temporary folder beside the output (``.NAME.tmp-XXXX``, see
``sdloop.atomic.atomic_dir``) whose marker is written first (``finished: false``, with the pid and start time) and
last (``finished: true``), and renamed into place at the end. While building, the process holds an exclusive
``flock`` on that folder; the kernel drops it when the process dies (SIGKILL included). The next export to the same
output removes such leftovers: only folders with our marker, started before the current process, whose lock it can
take, so a concurrent export's folder is never touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from export.errors import ExportError
from sdloop.atomic import atomic_dir, check_writable_dir, write_json_atomic
from sdloop.exportfolder import MANIFEST, MARKER, ExportFolder


def _store_dir() -> Path:
    from sdloop.modelstore import workspace_models_dir

    return workspace_models_dir().resolve()


def _source_run(folder: Path) -> Optional[str]:
    """The resolved run path a finished export was made from, or None when its manifest does not say."""
    try:
        path = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["source_run"]["path"]
        return str(Path(path).resolve()) if isinstance(path, str) and path else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prepare_output(output: Path, source_run: Optional[Path] = None) -> Path:
    """Check ``--output`` against the rules above; return it resolved (symlinks followed)."""
    output = Path(output).expanduser().resolve()
    store = _store_dir()
    if output == store or output.is_relative_to(store):
        raise ExportError(f"--output {output} is inside the model store ({store}); published versions are never "
                          "written in place: export to another folder, then `sdloop models publish` it.")
    if store.is_relative_to(output):
        raise ExportError(f"--output {output} holds the model store ({store}); export to a folder of its own.")
    if output.exists() and not output.is_dir():
        raise ExportError(f"--output {output} is a file; pass a folder.")
    if output.is_dir() and any(output.iterdir()):
        marker = ExportFolder(output).marker()
        if marker is None:
            raise ExportError(f"--output {output} is not empty and was not made by sdloop export (no {MARKER}); "
                              "choose a new or empty folder.")
        if marker.get("finished", True) is not False:
            held = _source_run(output)
            mine = str(Path(source_run).resolve()) if source_run else None
            if held is None or held != mine:
                raise ExportError(f"--output {output} holds a finished export of "
                                  f"{'run ' + held if held else 'an unknown run'}; only an export of the same run "
                                  "replaces it: choose a new folder, or delete it first.")
    check_writable_dir(output.parent, "the export's parent folder")
    return output


def _process_started() -> float:
    """When this process started (epoch seconds): a leftover must be older than that."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - no psutil or no /proc: only the lock decides then
        return time.time()


def write_marker(folder: Path, export_id: str, finished: bool) -> None:
    """The marker: sdloop's, which export, whether it is done, and who builds it (pid, start time)."""
    write_json_atomic(folder / MARKER, {"kind": "sdloop-export", "export_id": export_id, "finished": finished,
                                        "pid": os.getpid(), "started": _started.get(export_id, time.time())})


_started: dict[str, float] = {}


def _try_lock(path: Path) -> Optional[int]:
    """An fd holding an exclusive lock on folder ``path``, or None when a live process holds it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def clean_leftovers(output: Path) -> list[Path]:
    """Remove the temporary folders that killed exports to ``output`` left beside it; return what was removed."""
    output = Path(output)
    if not output.parent.is_dir():
        return []
    started = _process_started()
    removed = []
    for d in sorted(output.parent.glob(f".{output.name}.tmp-*")):
        if d.is_symlink() or not d.is_dir():
            continue
        marker = ExportFolder(d).marker()
        if marker is None:
            continue  # not ours
        when = marker.get("started")
        if not isinstance(when, (int, float)) or isinstance(when, bool) or when >= started:
            continue  # made by this process or after it started: maybe a live export
        fd = _try_lock(d)
        if fd is None:
            continue  # a live export holds it
        try:
            shutil.rmtree(d, ignore_errors=True)
            if not d.exists():
                removed.append(d)
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def building(output: Path, export_id: str) -> Iterator[Path]:
    """Yield the temporary folder an export is built in (marker ``finished: false`` already written, the folder
    locked); after the block, it takes ``output``'s place. The caller writes the manifest and then
    ``write_marker(tmp, export_id, finished=True)`` last."""
    _started[export_id] = time.time()
    fd: Optional[int] = None
    try:
        with atomic_dir(output) as tmp:
            fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(fd, fcntl.LOCK_EX)
            write_marker(tmp, export_id, finished=False)
            yield tmp
    finally:
        _started.pop(export_id, None)
        if fd is not None:
            os.close(fd)


def describe(removed: list[Any]) -> str:
    """One line for the summary about the leftovers removed (empty when none)."""
    if not removed:
        return ""
    return f"  removed {len(removed)} leftover folder(s) of killed exports: {', '.join(str(p) for p in removed)}"
