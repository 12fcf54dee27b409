"""Resumable checkpoints, written atomically, as safetensors and JSON only (no pickles).

A checkpoint is a folder ``checkpoints/step_000120/`` holding the trainable weights, the EMA copy, the optimizer
state flattened to tensors, and ``state.json`` (step, data position, early-stopping state, LR-scheduler state). It is
built in a hidden temp folder and renamed into place, so a run killed at any moment (SIGKILL included) leaves only
complete checkpoints behind; the newest complete one is where ``--resume`` continues.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from sdloop.atomic import DamagedFileError, atomic_dir, load_safetensors, save_safetensors

STATE_FILE = "state.json"


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=float))


def save_checkpoint(ckpt_root: Path, step: int, weights: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, lr_scheduler: Any, state: dict[str, Any],
                    ema: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """Write ``ckpt_root/step_NNNNNN`` atomically and return it."""
    final = ckpt_root / f"step_{step:06d}"
    with atomic_dir(final, prefix=f".tmp-step_{step:06d}-") as tmp:  # an older one of the same step is replaced
        save_safetensors(tmp / "weights.safetensors", weights, fsync=False)  # atomic_dir fsyncs every file
        if ema is not None:
            save_safetensors(tmp / "ema.safetensors", ema, fsync=False)
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        save_safetensors(tmp / "optimizer.safetensors", opt_tensors, fsync=False)
        _write_json(tmp / "optimizer.json", opt_meta)
        _write_json(tmp / "lr_scheduler.json", lr_scheduler.state_dict())
        _write_json(tmp / STATE_FILE, {**state, "step": step})
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp folders of a killed write are ignored)."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.glob("step_*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def clean_partial(ckpt_root: Path) -> None:
    """Remove temp folders a killed run left behind (never complete checkpoints)."""
    if ckpt_root.is_dir():
        for p in ckpt_root.glob(".tmp-step_*"):
            shutil.rmtree(p, ignore_errors=True)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DamagedFileError(f"{path} is damaged ({type(e).__name__})") from None


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Every file of a checkpoint, read and checked before anything is restored (DamagedFileError if one fails)."""
    return {
        "weights": load_safetensors(path / "weights.safetensors")[0],
        "ema": load_safetensors(path / "ema.safetensors")[0] if (path / "ema.safetensors").exists() else None,
        "optimizer": _unflatten_optimizer(load_safetensors(path / "optimizer.safetensors")[0],
                                          _read_json(path / "optimizer.json")),
        "lr_scheduler": _read_json(path / "lr_scheduler.json"),
        "state": _read_json(path / STATE_FILE),
    }


def restore_latest(ckpt_root: Path, optimizer: torch.optim.Optimizer, lr_scheduler: Any,
                   log: Callable[[str], None]) -> Optional[dict[str, Any]]:
    """Restore optimizer and schedule from the newest intact checkpoint; return its weights, EMA and state.

    A checkpoint damaged after it was written (a truncated file, a disk error) is skipped with a message and the
    previous one is used; None when there is no checkpoint at all.
    """
    ckpts = list_checkpoints(ckpt_root)
    for path in reversed(ckpts):
        try:
            found = read_checkpoint(path)
            optimizer.load_state_dict(found["optimizer"])
            lr_scheduler.load_state_dict(found["lr_scheduler"])
        except (DamagedFileError, KeyError, ValueError, RuntimeError) as e:
            log(f"checkpoint {path.name} is damaged ({str(e).splitlines()[0][:200]}); trying the one before it")
            continue
        found["path"] = path
        return found
    if ckpts:
        raise DamagedFileError(f"every checkpoint in {ckpt_root} is damaged; start the run again with a new "
                               "--output.")
    return None


def prune_checkpoints(ckpt_root: Path, keep_last: int, protect_step: Optional[int]) -> None:
    """Keep the newest ``keep_last`` checkpoints and the one of ``protect_step`` (the best); delete the rest."""
    ckpts = list_checkpoints(ckpt_root)
    keep = set(ckpts[-keep_last:])
    for p in ckpts:
        if p not in keep and int(p.name.split("_")[1]) != protect_step:
            shutil.rmtree(p, ignore_errors=True)
