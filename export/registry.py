"""Model versions: every export published into the BentoML model store, and which one is the champion.

``publish`` saves an export folder as a new version of a BentoML model (default name ``sdloop``) in the workspace's
store (``sdloop.workspace.bentoml_home()``); its labels and metadata carry the export manifest (source run, metrics,
parity, precision), and the service loads it with ``bentoml.models.get(tag).path``.

The champion pointer lives beside the store in ``BENTOML_HOME/sdloop/NAME.champion.json``: the current champion, the
stack of earlier champions that ``rollback`` returns to, and the history of every change (when, which, why, by whom).
Every change takes an exclusive ``fcntl.flock`` on ``NAME.lock`` and rewrites the file atomically, so two promotions
at once are applied one after the other: one champion, and a history in which each entry's ``previous`` is the
entry before it. Stages: the champion; ``retired`` for a version that was champion once; ``candidate`` for the rest.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from export.errors import RegistryError
from sdloop.champion import MODEL_NAME, champion_path



def _store() -> Any:
    """The workspace's BentoML model store, named explicitly so every call uses it whatever was imported first."""
    from sdloop.workspace import use_bentoml_home

    home = use_bentoml_home()
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    from bentoml._internal.models import ModelStore

    (home / "models").mkdir(parents=True, exist_ok=True)
    return ModelStore(str(home / "models"))


def _state_dir() -> Path:
    path = champion_path(MODEL_NAME).parent
    path.mkdir(parents=True, exist_ok=True)
    return path


def _state_path(name: str) -> Path:
    """The champion pointer: the shared layer names the place (the service reads it without importing export)."""
    _state_dir()
    return champion_path(name)


@contextlib.contextmanager
def _locked(name: str) -> Iterator[dict[str, Any]]:
    """Hold the model's lock; yield its champion state; write it back atomically if the block changed it."""
    import fcntl

    from sdloop.atomic import write_json_atomic

    with open(_state_dir() / f"{name}.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            state = read_state(name)
            before = json.dumps(state, sort_keys=True)
            yield state
            if json.dumps(state, sort_keys=True) != before:
                write_json_atomic(_state_path(name), state)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def check_name(name: str) -> str:
    """A model name BentoML accepts: lowercase letters, digits, '-', '_', '.', at most 63 characters."""
    import re

    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?", name):
        raise RegistryError(f"--name {name!r} is not a valid model name: lowercase letters, digits, '-', '_' or '.', "
                            "starting and ending with a letter or digit, at most 63 characters.")
    return name


def read_state(name: str = MODEL_NAME) -> dict[str, Any]:
    """The champion state: {"champion": tag or None, "stack": [earlier champions..., champion], "history": [...]}."""
    path = _state_path(check_name(name))
    if not path.is_file():
        return {"name": name, "champion": None, "stack": [], "history": []}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        assert isinstance(state, dict) and isinstance(state["stack"], list) and isinstance(state["history"], list)
        return state
    except (OSError, ValueError, KeyError, AssertionError):
        raise RegistryError(f"{path} is damaged; restore it from a backup, or delete it to start with no champion "
                            "(the versions in the store are not affected).") from None


@dataclass
class Version:
    """One published export: its tag, stage, when it was published, its labels, metadata and folder."""

    tag: str
    stage: str
    created: str
    labels: dict[str, str]
    metadata: dict[str, Any]
    path: Path

    def key_metrics(self) -> str:
        md, parts = self.metadata, []
        parity = md.get("parity", {})
        if "kid" in parity:
            parts.append(f"KID {parity['kid']:.4f}")
        if "psnr" in parity:
            parts.append(f"PSNR {parity['psnr']:.1f} dB")
        lat = md.get("latency", {})
        if lat.get("export_s"):
            parts.append(f"{lat['export_s']:.3f} s/img ({lat.get('speedup') or 0:.2f}x)")
        if md.get("best_val_loss") is not None:
            parts.append(f"val loss {md['best_val_loss']:.4f}")
        for k, v in ((md.get("evaluation") or {}).get("metrics") or {}).items():
            if isinstance(v, (int, float)):
                parts.append(f"{k} {v:.4g}")
        return ", ".join(parts)


def _full_tag(tag: str, name: str) -> str:
    return tag if ":" in tag else f"{name}:{tag}"


def _stage(tag: str, state: dict[str, Any]) -> str:
    if tag == state.get("champion"):
        return "champion"
    if any(e.get("tag") == tag for e in state["history"]):
        return "retired"
    return "candidate"


def _version(model: Any, state: dict[str, Any]) -> Version:
    tag = str(model.tag)
    return Version(tag, _stage(tag, state), model.creation_time.strftime("%Y-%m-%d %H:%M:%S"),
                   dict(model.info.labels), dict(model.info.metadata), Path(model.path))


def _get(tag: str, name: str) -> Any:
    from bentoml.exceptions import BentoMLException, NotFound

    try:
        return _store().get(_full_tag(tag, name))
    except NotFound:
        raise RegistryError(f"no version {tag!r} of model {name!r} in the store; `sdloop models list` shows them.") \
            from None
    except (BentoMLException, ValueError) as e:
        raise RegistryError(f"{tag!r} does not name one version ({str(e).splitlines()[0]}); pass the full tag "
                            "from `sdloop models list`.") from None


def _clean(value: Any) -> Any:
    """A JSON value BentoML's metadata accepts (it refuses None)."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_clean(v) for v in value if v is not None]
    return value


def list_versions(name: str = MODEL_NAME) -> list[Version]:
    """Every version of the model, newest first, with its stage."""
    from bentoml.exceptions import NotFound

    state = read_state(name)
    try:
        models = _store().list(name)
    except NotFound:
        return []
    return [_version(m, state) for m in sorted(models, key=lambda m: m.creation_time, reverse=True)]


def show(tag: str, name: str = MODEL_NAME) -> Version:
    return _version(_get(tag, name), read_state(name))


def champion(name: str = MODEL_NAME) -> Optional[Version]:
    """The champion version (what the service serves), or None before the first promotion."""
    tag = read_state(name).get("champion")
    return show(tag, name) if tag else None


def history(name: str = MODEL_NAME) -> list[dict[str, Any]]:
    return list(read_state(name)["history"])


def publish(export_dir: Path, name: str = MODEL_NAME) -> tuple[str, bool]:
    """Save an export folder as a new version; return (tag, created). An export already published is not copied
    again: its existing tag comes back with created=False."""
    import bentoml

    from export.build import MARKER, is_export
    from export.onnx import fix_permissions, graph_paths

    export_dir = Path(export_dir).expanduser().resolve()
    if not is_export(export_dir):
        raise RegistryError(f"{export_dir} is not an sdloop export (no {MARKER}); make one with "
                            "`sdloop export RUN_DIR --output DIR`.")
    try:
        manifest = json.loads((export_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise RegistryError(f"{export_dir}/manifest.json is missing or damaged; export the run again.") from None
    if not manifest.get("parity", {}).get("passed") or "unet" not in graph_paths(export_dir):
        raise RegistryError(f"{export_dir} is incomplete (no passed parity check or no unet graph); export again.")
    for v in list_versions(name):
        if v.labels.get("export_id") == manifest["export_id"]:
            return v.tag, False
    run = manifest.get("source_run", {})
    labels = {"kind": "sdloop-export", "export_id": manifest["export_id"], "source_run": str(run.get("name", "")),
              "target": manifest["target"], "precision": manifest["precision"]}
    metadata = _clean({k: v for k, v in manifest.items() if k != "source_run"})
    metadata["source_run"] = _clean({"name": run.get("name"), "path": run.get("path")})
    metadata["export_dir"] = str(export_dir)
    _store()  # BENTOML_HOME before bentoml reads it
    with bentoml.models.create(name, labels=labels, metadata=metadata, _model_store=_store()) as model:
        shutil.copytree(export_dir, model.path, dirs_exist_ok=True)
    stored = _get(str(model.tag), name)
    fix_permissions(Path(stored.path))  # BentoML's temp folder is 0700: the service may run as another user
    return str(model.tag), True


def _event(action: str, tag: str, previous: Optional[str], reason: str) -> dict[str, Any]:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers
        user = str(os.getuid())
    return {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "action": action, "tag": tag,
            "previous": previous, "reason": reason, "user": user, "pid": os.getpid()}


def promote(tag: str, reason: str = "", name: str = MODEL_NAME) -> dict[str, Any]:
    """Make ``tag`` the champion; the old one becomes the rollback target. Returns the history entry."""
    full = str(_get(tag, name).tag)
    with _locked(name) as state:
        if state.get("champion") == full:
            raise RegistryError(f"{full} is already the champion.")
        event = _event("promote", full, state.get("champion"), reason or "promoted")
        state["stack"].append(full)
        state["champion"] = full
        state["history"].append(event)
    return event


def rollback(reason: str = "", name: str = MODEL_NAME) -> dict[str, Any]:
    """Make the previous champion (that is still in the store) the champion again. Returns the history entry."""
    store = _store()
    with _locked(name) as state:
        current = state.get("champion")
        if current is None:
            raise RegistryError(f"model {name!r} has no champion to roll back; promote one with "
                                "`sdloop models promote TAG`.")
        stack = list(state["stack"][:-1])
        while stack and not store.list(stack[-1]):  # skip earlier champions that were deleted
            stack.pop()
        if not stack:
            raise RegistryError(f"{current} has no earlier champion left in the store to roll back to.")
        event = _event("rollback", stack[-1], current, reason or "rolled back")
        state["stack"], state["champion"] = stack, stack[-1]
        state["history"].append(event)
    return event


def protected(state: dict[str, Any]) -> set[str]:
    """Never pruned: the champion, the version a rollback would return to, and the champion before the last change
    (after a rollback, the version rolled back from: it may be promoted again once fixed)."""
    last = state["history"][-1].get("previous") if state["history"] else None
    return {t for t in (state.get("champion"), *(state["stack"][-2:-1]), last) if t}


def prune(keep: int, name: str = MODEL_NAME) -> list[str]:
    """Delete all but the ``keep`` newest versions, never the champion or the previous one; return what went."""
    if not isinstance(keep, int) or keep < 0:
        raise RegistryError(f"--keep must be an integer >= 0, got {keep!r}.")
    store = _store()
    with _locked(name) as state:
        safe = protected(state)
        versions = list_versions(name)
        doomed = [v.tag for v in versions[keep:] if v.tag not in safe]
        for tag in doomed:
            store.delete(tag)
    return doomed
