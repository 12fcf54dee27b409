"""Helpers for the serving tests: a workspace whose model store holds two published versions of the tiny run.

Built once per test module (an export takes about a minute on 2 cores). The second version is a copy of the first
export under a new export id, so promoting it changes the served version without a second export. Variants (another
runtime in the manifest, a tampered file) are copies too, published into a workspace of their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional


@dataclass
class Champion:
    home: Path
    bentoml_home: Path
    tags: tuple[str, str]
    source: Optional[Path] = None  # the first export folder, for variants

    def env(self) -> dict[str, str]:
        return {"SDLOOP_HOME": str(self.home), "BENTOML_HOME": str(self.bentoml_home),
                "SDLOOP_STORE_URL": f"sqlite:///{self.home / 'monitor.db'}"}


_BUILT: dict[str, Champion] = {}


def shared_store(tiny_run: Path, tmp_path_factory: Any) -> Champion:
    """One store per test session, shared by the serving test modules (an export is the slow part)."""
    key = str(tiny_run)
    if key not in _BUILT:
        _BUILT[key] = build_store(tiny_run, tmp_path_factory.mktemp("serve"))
    return _BUILT[key]


@contextlib.contextmanager
def workspace_env(home: Path, bentoml_home: Path) -> Iterator[None]:
    """SDLOOP_HOME and BENTOML_HOME set for the block, as they were after it."""
    from conftest import reset_bentoml_home  # BentoML caches its home per process: follow the switch both ways

    old = {k: os.environ.get(k) for k in ("SDLOOP_HOME", "BENTOML_HOME")}
    os.environ.update({"SDLOOP_HOME": str(home), "BENTOML_HOME": str(bentoml_home)})
    reset_bentoml_home()
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_bentoml_home()


def build_store(tiny_run: Path, root: Path) -> Champion:
    """Export the tiny run (2-step checks), publish it twice (two export ids); promote nothing."""
    from export import registry
    from export.build import ExportConfig, build_export
    from sdloop.exportfolder import MARKER

    home = root / "home"
    with workspace_env(home, home / "bentoml"):
        first = root / "export-a"
        build_export(tiny_run, first, ExportConfig(steps=2, reps=1, prompts=["a red circle"], seeds=[0]),
                     progress=False)
        second = root / "export-b"
        shutil.copytree(first, second)
        for name in ("manifest.json", MARKER):
            data = json.loads((second / name).read_text())
            data["export_id"] = data["export_id"][::-1]
            (second / name).write_text(json.dumps(data))
        tags = (registry.publish(first)[0], registry.publish(second)[0])
    return Champion(home, home / "bentoml", tags, first)


def fresh_workspace(champ: Champion, root: Path) -> Champion:
    """The same published versions in a new workspace under ``root`` whose pointer names no champion yet (a test
    that promotes, tampers or publishes there leaves the shared store alone)."""
    fresh = Champion(root / "home", root / "home" / "bentoml", champ.tags, champ.source)
    shutil.copytree(champ.bentoml_home / "models", fresh.bentoml_home / "models", symlinks=True)
    return fresh


def publish_variant(champ: Champion, into: Champion, root: Path, change: Callable[[dict], None]) -> str:
    """Publish into ``into``'s store a copy of the first export whose manifest ``change`` edited (a new export id):
    what an export made elsewhere, or by another sdloop, looks like. Returns its tag."""
    from export import registry
    from sdloop.exportfolder import MARKER

    folder = root / f"variant-{uuid.uuid4().hex[:8]}"
    shutil.copytree(champ.source, folder)
    export_id = uuid.uuid4().hex
    for name in ("manifest.json", MARKER):
        data = json.loads((folder / name).read_text())
        data["export_id"] = export_id
        if name == "manifest.json":
            change(data)
        (folder / name).write_text(json.dumps(data))
    with workspace_env(into.home, into.bentoml_home):
        return registry.publish(folder)[0]


def tamper(champ: Champion, tag: str, rel: str = "unet/model.onnx") -> Path:
    """Flip one byte in the middle of a published version's file (same size): what a bad disk or an attacker does."""
    from bento.runtime import model_dir

    with workspace_env(champ.home, champ.bentoml_home):
        path = model_dir(tag)[1] / rel
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    return path


def promote(champ: Champion, tag: str) -> None:
    """Promote through the registry, as `sdloop models promote` does."""
    from export import registry

    with workspace_env(champ.home, champ.bentoml_home):
        if registry.read_state().get("champion") != tag:
            registry.promote(tag, "test")


def wait_for(check: Callable[[], Any], timeout: float = 60.0, every: float = 0.1) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s")


def stop_server(proc: Any) -> None:
    """Stop a `sdloop serve` started by a test: SIGTERM by its PID (it exec'd into the BentoML server, which stops its
    workers), and its process group killed if it has not ended within a minute."""
    import signal
    import subprocess

    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
