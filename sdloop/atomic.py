"""Atomic writes and the one safetensors reader/writer every stage uses.

A file or folder is built under a hidden temporary name beside its target and renamed into place, so a process killed
at any moment (SIGKILL included) leaves either the previous version or the complete new one, never half of one.
Temporary files get the permissions an ordinary ``open()`` would give (0666 and 0777 minus the umask), not
``mkstemp``'s 0600: a model or a report written by sdloop must be readable by a teammate or by a container's
non-root user.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

from sdloop.errors import UserError


def current_umask() -> int:
    """The process umask (read by setting and restoring it: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _unwritable(path: Path, e: OSError) -> UserError:
    return UserError(f"cannot write {path}: {e.strerror or e}; choose a folder you can write to, "
                     "or fix its permissions.")


@contextlib.contextmanager
def atomic_path(path: Path, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; after the block, rename it onto ``path`` (or remove it)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~current_umask())
    except OSError as e:
        raise _unwritable(path, e) from None
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # again: some writers (safetensors) recreate the file as 0600
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, data: Any, indent: int = 2) -> None:
    """Write ``data`` as JSON to ``path`` atomically (non-JSON values through ``str``)."""
    write_text_atomic(path, json.dumps(data, indent=indent, default=str) + "\n")


def temp_dir_beside(path: Path, prefix: str = "") -> Path:
    """A new empty folder beside ``path`` (same file system, so it can be renamed into place), with the permissions
    the umask gives (``mkdtemp`` makes it 0700)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


@contextlib.contextmanager
def atomic_dir(path: Path, prefix: str = "", replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; after the block, it takes ``path``'s place (or is removed).

    With ``replace`` an existing ``path`` is removed first: callers decide beforehand whether that is allowed
    (see ``owned_by_sdloop``).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir_beside(path, prefix)
    except OSError as e:
        raise _unwritable(path, e) from None
    try:
        yield tmp
        mask = current_umask()
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, 0o666 & ~mask)  # writers that use private temp files (safetensors) get the umask too
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if path.exists() and replace:
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_writable_dir(path: Path, what: str) -> Path:
    """Create ``path`` (and parents) if needed and check that files can be made in it; UserError otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file; pass a folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".sdloop-write-test-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to {what} {path}: {e.strerror or e}; choose a folder you can write to.") \
            from None
    return path


# -- safetensors: one reader, one writer ------------------------------------------------------------------------------

def save_safetensors(path: Path, tensors: dict[str, Any], metadata: Optional[dict[str, str]] = None,
                     fsync: bool = True) -> int:
    """Write tensors (contiguous, on CPU) to a safetensors file atomically; return its size in bytes."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_path(path, fsync=fsync) as tmp:
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        except OSError as e:
            raise _unwritable(path, e) from None
    return path.stat().st_size


class DamagedFileError(UserError):
    """A file sdloop wrote earlier is missing, truncated or not what it should be."""


def load_safetensors(path: Path, names: Optional[list[str]] = None
                     ) -> tuple[dict[str, Any], dict[str, str]]:
    """Read (tensors, metadata) of a safetensors file; ``names`` limits the tensors read.

    A missing, truncated or foreign file raises DamagedFileError naming it (safetensors checks the header against
    the file size, so truncation is caught here rather than as garbage weights later).
    """
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            wanted = keys if names is None else [n for n in names if n in keys]
            missing = [] if names is None else [n for n in names if n not in keys]
            if missing:
                raise DamagedFileError(f"{path} lacks tensor(s) {missing[:3]}; it is damaged or from another "
                                       "model: delete it and re-create it.")
            return {k: f.get_tensor(k) for k in wanted}, dict(f.metadata() or {})
    except DamagedFileError:
        raise
    except FileNotFoundError:
        raise DamagedFileError(f"{path} does not exist.") from None
    except Exception as e:  # noqa: BLE001 - truncated, not safetensors, unreadable
        raise DamagedFileError(f"{path} cannot be read as safetensors ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}); it is damaged: delete it and "
                               "re-create it.") from None


def safetensors_shapes(path: Path) -> Optional[dict[str, tuple[int, ...]]]:
    """The tensor names and shapes of a safetensors file from its header alone (no tensor is read), or None when the
    file is missing, truncated or not safetensors (safetensors checks the header against the file size)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:  # noqa: BLE001 - any unreadable file is "not a valid file" to the caller
        return None
