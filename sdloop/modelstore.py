"""The BentoML model store, through BentoML's public API only (``bentoml.models.get/list/create/delete``).

Every stage that touches the store (the registry that publishes, lists and prunes versions; the service that loads the
champion) goes through this module, so no sdloop code imports BentoML's private modules, whose layout changes between
BentoML releases.

Why the extra care:
- BentoML reads ``BENTOML_HOME`` once per process and keeps it: ``use_bentoml_home()`` runs before bentoml is
  imported, and a version this process creates is checked to have landed in the workspace's store.
- A stored version is read-only (files 0444, folders 0555, minus the umask): published versions are immutable, so an
  accidental write fails instead of silently changing what the champion serves. ``delete`` gives the owner write
  permission back first, as BentoML's delete is a plain ``rmtree``.
- One damaged entry (a ``model.yaml`` that is garbage) makes ``bentoml.models.list`` raise for the whole model;
  ``list_versions`` then reads the versions one by one and reports the damaged one instead of failing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from sdloop.errors import UserError, one_line


class StoreError(UserError):
    """A version that is not in the store, a tag that names none or several, or a store entry BentoML cannot read."""


@dataclass
class StoredVersion:
    """One version as the store holds it; ``problem`` says why BentoML cannot read it (then labels are empty)."""

    tag: str
    path: Path
    created: Optional[datetime]
    labels: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    problem: Optional[str] = None


def _bentoml() -> Any:
    """bentoml, imported after the workspace's BENTOML_HOME is set (BentoML reads it once per process)."""
    from sdloop.workspace import use_bentoml_home

    use_bentoml_home()
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    import bentoml

    return bentoml


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """BentoML logs a damaged entry's parse error (several lines) before raising it; sdloop reports it in one line."""
    logger = logging.getLogger("bentoml")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def workspace_models_dir() -> Path:
    """Where the workspace's versions live: ``bentoml_home()/models`` (``export --output`` refuses it)."""
    from sdloop.workspace import bentoml_home

    return bentoml_home() / "models"


def _stored(model: Any) -> StoredVersion:
    created = model.creation_time
    if created is not None and created.tzinfo is None:
        created = created.replace(tzinfo=timezone.utc)
    return StoredVersion(str(model.tag), Path(model.path), created, dict(model.info.labels),
                         dict(model.info.metadata))


def _get(tag: str) -> Any:
    bentoml = _bentoml()
    from bentoml.exceptions import NotFound

    try:
        with _quiet():
            return bentoml.models.get(tag)
    except NotFound:
        raise StoreError(f"no version {tag!r} in the model store; `sdloop models list` shows them.") from None
    except Exception as e:  # noqa: BLE001 - a bad tag, or BentoML reading a damaged entry (yaml, OSError, ...)
        raise StoreError(f"{tag!r} does not name one readable version ({one_line(e)}); `sdloop models list` shows "
                         "the versions and which are damaged.") from None


def version_path(tag: str) -> tuple[str, Path]:
    """(full tag ``name:version``, folder) of a stored version; StoreError (one line) when there is none."""
    model = _get(tag)
    return str(model.tag), Path(model.path)


def get_version(tag: str) -> StoredVersion:
    """A stored version with its labels and metadata; StoreError when it is missing or unreadable."""
    return _stored(_get(tag))


def list_versions(name: str) -> list[StoredVersion]:
    """Every version of model ``name`` in the workspace's store (unsorted); damaged entries carry ``problem``."""
    bentoml = _bentoml()
    from bentoml.exceptions import NotFound

    try:
        with _quiet():
            return [_stored(m) for m in bentoml.models.list(name)]
    except NotFound:
        return []
    except Exception:  # noqa: BLE001 - one unreadable entry fails BentoML's whole listing: read them one by one
        pass
    folder = workspace_models_dir() / name
    out = []
    for d in sorted(folder.iterdir()) if folder.is_dir() else []:
        if d.is_symlink() or not d.is_dir():
            continue
        tag = f"{name}:{d.name}"
        try:
            with _quiet():
                out.append(_stored(bentoml.models.get(tag)))
        except Exception as e:  # noqa: BLE001 - a garbage model.yaml: listed as damaged, never a traceback
            try:
                when: Optional[datetime] = datetime.fromtimestamp(d.lstat().st_mtime, timezone.utc)
            except OSError:
                continue  # deleted meanwhile
            out.append(StoredVersion(tag, d, when, problem=f"BentoML cannot read this version ({one_line(e)})"))
    return out


def create(name: str, labels: dict[str, str], metadata: dict[str, Any], fill: Callable[[Path], None]) -> tuple[str,
                                                                                                               Path]:
    """Save a new version of ``name``: ``fill(folder)`` writes its files; return (full tag, stored folder).

    The stored folder is made read-only. An exception in ``fill`` stores nothing.
    """
    bentoml = _bentoml()
    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        fill(Path(model.path))
    tag, path = version_path(str(model.tag))
    expected = workspace_models_dir().resolve()
    if not path.resolve().is_relative_to(expected):
        delete(tag, path)
        raise RuntimeError(f"BentoML stored {tag} under {path}, not in the workspace's store {expected}: BentoML "
                           "reads BENTOML_HOME once per process, so set it (sdloop.workspace.use_bentoml_home) before "
                           "the first store access")
    make_read_only(path)
    return tag, path


def delete(tag: str, path: Optional[Path] = None) -> bool:
    """Delete a version (``path``: its folder, for an entry BentoML cannot read); return whether it was there."""
    bentoml = _bentoml()
    from bentoml.exceptions import BentoMLException, NotFound

    if path is None:
        try:
            tag, path = version_path(tag)
        except StoreError:
            return False
    make_writable(path)
    try:
        bentoml.models.delete(tag)
    except NotFound:
        return False
    except BentoMLException:
        # BentoML removes the folder, then re-reads the other versions to point "latest" at the newest; a damaged
        # neighbour fails that second part only
        if path.exists():
            raise
    return True


def make_read_only(path: Path) -> None:
    """Files 0444 and folders 0555, minus the umask (never following a link): a published version is immutable."""
    from sdloop.atomic import current_umask

    mask = current_umask()
    for dirpath, dirnames, filenames in os.walk(path, topdown=False, followlinks=False):
        for n in filenames:
            p = os.path.join(dirpath, n)
            if stat.S_ISREG(os.lstat(p).st_mode):
                os.chmod(p, 0o444 & ~mask)
        for n in dirnames:
            p = os.path.join(dirpath, n)
            if stat.S_ISDIR(os.lstat(p).st_mode):
                os.chmod(p, 0o555 & ~mask)
    os.chmod(path, 0o555 & ~mask)


def make_writable(path: Path) -> None:
    """Give the owner write permission on every folder of a version again, so it can be deleted."""
    if not path.is_dir() or path.is_symlink():
        return
    for dirpath, dirnames, _ in os.walk(path, followlinks=False):
        os.chmod(dirpath, stat.S_IMODE(os.lstat(dirpath).st_mode) | stat.S_IRWXU)
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
