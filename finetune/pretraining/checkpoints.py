"""The pretraining's checkpoints and weight average: safetensors + JSON, one folder per step, built aside and renamed
into place, so a run killed at any moment resumes from the newest intact one (a damaged newest one falls back to the
one before it)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, Optional


def save_checkpoint(root: Path, step: int, weights: dict[str, Any], optimizer: Any, state: dict[str, Any],
                    ema: Optional[dict[str, Any]] = None, keep: int = 2) -> Path:
    """Write ``root/step_NNNNNNN`` atomically (weights, EMA, the optimizer flattened to tensors, the state), then
    keep only the newest ``keep`` (a damaged newest one still leaves one to resume from)."""
    from sdloop.atomic import atomic_dir, save_safetensors

    opt = optimizer.state_dict()
    tensors = {f"{i}.{k}": v for i, per in opt["state"].items() for k, v in per.items() if hasattr(v, "shape")}
    scalars = {f"{i}.{k}": v for i, per in opt["state"].items() for k, v in per.items() if not hasattr(v, "shape")}
    final = root / f"step_{step:07d}"
    with atomic_dir(final, prefix=f".tmp-step_{step:07d}-") as tmp:
        save_safetensors(tmp / "weights.safetensors", weights, fsync=False)  # atomic_dir fsyncs every file
        if ema is not None:
            save_safetensors(tmp / "ema.safetensors", ema, fsync=False)
        save_safetensors(tmp / "optimizer.safetensors", tensors, fsync=False)
        (tmp / "optimizer.json").write_text(json.dumps({"param_groups": opt["param_groups"], "scalars": scalars}))
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}))
    for old in _checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _checkpoints(root: Path) -> list[Path]:
    found = [p for p in root.glob("step_*") if (p / "state.json").is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(root: Path) -> Optional[dict[str, Any]]:
    """The newest readable checkpoint under ``root`` as {weights, ema, optimizer, state}; None if there is none.
    Temp folders of a killed write are removed; a damaged checkpoint is skipped for the one before it."""
    from sdloop.atomic import DamagedFileError, load_safetensors

    for tmp in root.glob(".tmp-step_*") if root.is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)
    for path in reversed(_checkpoints(root)):
        try:
            meta = json.loads((path / "optimizer.json").read_text())
            state: dict[int, dict[str, Any]] = {}
            for key, value in [*load_safetensors(path / "optimizer.safetensors")[0].items(),
                               *meta["scalars"].items()]:
                i, name = key.split(".", 1)
                state.setdefault(int(i), {})[name] = value
            ema = path / "ema.safetensors"
            return {"weights": load_safetensors(path / "weights.safetensors")[0],
                    "ema": load_safetensors(ema)[0] if ema.is_file() else None,
                    "optimizer": {"state": state, "param_groups": meta["param_groups"]},
                    "state": json.loads((path / "state.json").read_text())}
        except (DamagedFileError, OSError, ValueError, KeyError):
            print(f"checkpoint {path} is damaged; using the one before it", file=sys.stderr)
    return None


class EMA:
    """An exponential moving average of parameters (with the usual warm-up of the decay)."""

    def __init__(self, named: dict[str, Any], decay: float) -> None:
        self.named = named
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in named.items()}

    def update(self, step: int) -> None:
        import torch

        d = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, p in self.named.items():
                self.shadow[k].mul_(d).add_(p.detach(), alpha=1 - d)

    def state(self) -> dict[str, Any]:
        return self.shadow

    def load(self, shadow: dict[str, Any]) -> None:
        for k in self.shadow:
            self.shadow[k].copy_(shadow[k])
