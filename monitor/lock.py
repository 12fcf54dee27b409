"""Process locks of the loop: one retraining at a time, one scheduler per workspace.

An exclusive ``fcntl.flock`` on a file in the workspace, taken without waiting: a second retraining (a manual
``sdloop retrain`` while the scheduler's runs) is refused at once with the holder's pid and start time, rather than
queued behind a job that may take hours. The kernel drops the lock when its process dies, so a retraining killed
mid-way never leaves a stale lock behind: the next one starts clean. The file itself is never deleted (deleting a
locked file lets a second process lock a new inode of the same name).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from sdloop.errors import UserError


class Busy(UserError):
    """Someone holds the lock: the message names who and since when."""


def _holder(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def _database_lock(url: Optional[str], what: str) -> Iterator[None]:
    """On PostgreSQL, also a session advisory lock named after ``what``: processes on other hosts that share the
    database (and so the retraining log) are excluded too. Nothing to do on sqlite: one host."""
    from monitor.store import advisory_lock

    def busy(host: str) -> Busy:
        return Busy(f"another {what} is running on a host that shares this database ({host}); run one per database, "
                    "or wait for it to finish.")

    with advisory_lock(url or "", f"sdloop:{what}", busy):
        yield


@contextlib.contextmanager
def hold(path: Path, what: str, info: Optional[dict[str, Any]] = None,
         db_url: Optional[str] = None) -> Iterator[dict[str, Any]]:
    """Hold the lock at ``path`` for the block, or raise Busy within a second. The file records who holds it. With a
    PostgreSQL ``db_url``, the database's advisory lock of the same name is held too (several hosts, one database)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise UserError(f"cannot open the {what} lock {path} ({e.strerror}); run as the user who owns the workspace "
                        "or make its monitor/ folder writable.") from None
    try:
        for attempt in range(10):  # a `status` probe holds it for an instant: only a real holder keeps it a second
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt < 9:
                    time.sleep(0.1)
        else:
            h = _holder(path)
            since = h.get("since", "an unknown time")
            shows = "sdloop scheduler status" if what == "scheduler" else "sdloop retrain history"
            raise Busy(f"another {what} is running (pid {h.get('pid', '?')}, since {since}); wait for it to finish "
                       f"(`{shows}` shows it) or stop that process.") from None
        me = {"pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(info or {})}
        try:
            with _database_lock(db_url, what):
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(me).encode(), 0)
                yield me
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def holder(path: Path) -> Optional[dict[str, Any]]:
    """Who holds the lock at ``path`` now (pid, since), or None when nobody does."""
    if not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: a probe never blocks another probe
        except BlockingIOError:
            return _holder(path) or {"pid": None}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def retrain_lock_path() -> Path:
    from sdloop.workspace import monitor_dir

    return monitor_dir() / "retrain.lock"


def scheduler_lock_path() -> Path:
    from sdloop.workspace import monitor_dir

    return monitor_dir() / "scheduler.lock"
