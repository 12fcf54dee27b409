"""What made an artifact: the sdloop commit and the versions of the libraries that decide its numbers.

Run manifests, export manifests and model-store metadata all carry these, so a number in any of them can be traced
to the code and the library versions that produced it.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Iterable, Optional

CORE_PACKAGES = ("sdloop", "torch", "diffusers", "transformers", "peft", "accelerate", "safetensors")


def git_commit() -> Optional[str]:
    """The commit of the sdloop checkout that ran, or None outside a git checkout (an installed wheel)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001 - no git, not a checkout
        return None


def package_versions(names: Iterable[str] = CORE_PACKAGES) -> dict[str, str]:
    """Python's version and each installed package's (missing ones are left out)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB blocks (model files are too large to read whole)."""
    import hashlib

    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
