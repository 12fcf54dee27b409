"""Read-only access to the champion pointer: which model version the service should serve.

The export stage's registry owns the pointer (``BENTOML_HOME/sdloop/NAME.champion.json``, rewritten atomically under
a lock on every promotion or rollback); the service only reads it, through this module, so serving never imports the
export package. Its mtime tells a polling worker cheaply whether anything changed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from datetime import datetime

MODEL_NAME = "sdloop"


def champion_path(name: str = MODEL_NAME) -> Path:
    """Where the champion pointer of model ``name`` lives (export/registry.py writes it here)."""
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

    The monitor freezes its reference window at that moment; the registry writes the history, this only reads it.
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
