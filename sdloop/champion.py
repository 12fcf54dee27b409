"""The champion pointer and its history, read and written here only, in one format.

``BENTOML_HOME/sdloop/NAME.champion.json`` holds ``{"name", "champion": tag or None, "stack": [earlier champions...,
champion], "history": [events]}``; every event is ``{"when", "action", "tag", "previous", "reason", "user", "pid"}``.
The registry changes it inside ``locked(name)``: an exclusive ``fcntl.flock`` on ``NAME.lock``, the state read after
the lock is taken, and an atomic rewrite, so two changes at once are applied one after the other and each sees the
one before it. The service only reads it (``current_champion_tag``), so serving never imports the export package;
the file's mtime tells a polling worker cheaply whether anything changed.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from sdloop.errors import UserError

if TYPE_CHECKING:
    from datetime import datetime

MODEL_NAME = "sdloop"


class ChampionStateError(UserError):
    """The champion pointer file is damaged: one line saying how to recover."""


def champion_path(name: str = MODEL_NAME) -> Path:
    """Where the champion pointer of model ``name`` lives."""
    from sdloop.workspace import bentoml_home

    return bentoml_home() / "sdloop" / f"{name}.champion.json"


def pointer_mtime(name: str = MODEL_NAME) -> Optional[int]:
    """The pointer file's mtime in ns (None when there is none): a change means re-read it."""
    try:
        return champion_path(name).stat().st_mtime_ns
    except OSError:
        return None


def current_champion_tag(name: str = MODEL_NAME) -> Optional[str]:
    """The champion's full tag (``name:version``), or None when nothing was promoted or the file is unreadable
    (a reader must keep serving what it has rather than fail on a damaged pointer)."""
    try:
        state = json.loads(champion_path(name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    tag = state.get("champion") if isinstance(state, dict) else None
    return tag if isinstance(tag, str) and tag else None


def champion_since(name: str = MODEL_NAME) -> Optional[tuple[str, "datetime"]]:
    """(champion tag, when it became champion: its last promotion or rollback to it, UTC), or None.

    The monitor freezes its reference window at that moment.
    """
    from datetime import datetime, timezone

    try:
        state = json.loads(champion_path(name).read_text(encoding="utf-8"))
        tag = state["champion"]
        when = [e["when"] for e in state["history"] if e.get("tag") == tag and e.get("action") in ("promote",
                                                                                                     "rollback")]
        if not tag or not when:
            return None
        return tag, datetime.strptime(when[-1], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_state(name: str = MODEL_NAME) -> dict[str, Any]:
    """The champion state (an empty one before the first promotion); ChampionStateError when the file is damaged.

    Writers need this strict reading (a damaged pointer must not be overwritten as if empty); readers that must keep
    serving use ``current_champion_tag``.
    """
    path = champion_path(name)
    if not path.is_file():
        return {"name": name, "champion": None, "stack": [], "history": []}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        ok = (isinstance(state, dict) and isinstance(state.get("stack"), list)
              and isinstance(state.get("history"), list) and all(isinstance(e, dict) for e in state["history"])
              and (state.get("champion") is None or isinstance(state.get("champion"), str)))
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise ChampionStateError(f"{path} is damaged; restore it from a backup, or delete it to start with no "
                                 "champion (the versions in the store are not affected).")
    return state


@contextlib.contextmanager
def locked(name: str = MODEL_NAME) -> Iterator[dict[str, Any]]:
    """Hold the model's lock; yield its state read under the lock; write it back atomically if the block changed it.

    Everything a promotion, rollback or prune decides must be read inside this block, or a change made meanwhile by
    another process is lost or contradicted.
    """
    from sdloop.atomic import write_json_atomic

    with lock(name):
        state = read_state(name)
        before = json.dumps(state, sort_keys=True)
        yield state
        if json.dumps(state, sort_keys=True) != before:
            write_json_atomic(champion_path(name), state)


@contextlib.contextmanager
def lock(name: str = MODEL_NAME) -> Iterator[None]:
    """The model's exclusive lock alone (``BENTOML_HOME/sdloop/NAME.lock``): held by every change of the pointer and
    while a new version enters the store, so a prune never sees a version half registered."""
    import fcntl

    path = champion_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f"{name}.lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def event(action: str, tag: str, previous: Optional[str], reason: str) -> dict[str, Any]:
    """One history entry: when (UTC), what, from which champion, why, by whom (user and process)."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers
        user = str(os.getuid())
    return {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "action": action, "tag": tag,
            "previous": previous, "reason": reason, "user": user, "pid": os.getpid()}


def set_champion(state: dict[str, Any], action: str, tag: str, reason: str,
                 stack: Optional[list[str]] = None) -> dict[str, Any]:
    """Inside ``locked``: make ``tag`` the champion (pushed on the stack, or ``stack`` as given for a rollback) and
    append the history entry, which is returned."""
    entry = event(action, tag, state.get("champion"), reason)
    if stack is None:
        state["stack"].append(tag)
    else:
        state["stack"] = list(stack)
    state["champion"] = tag
    state["history"].append(entry)
    return entry
