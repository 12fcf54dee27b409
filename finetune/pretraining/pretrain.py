"""Pretraining the tiny SD-1.x base on synthetic shapes, so that it draws what its captions say.

``pretrain(cfg, out)`` runs three phases into ``out``: the VAE (MSE plus a tiny KL term), the latents (the whole
dataset encoded once; their spread sets the VAE's ``scaling_factor``), then the UNet (epsilon prediction on the cached
latents and frozen text embeddings, 10% empty captions so classifier-free guidance works, no flips because captions
say left and right). The result is an ordinary diffusers folder with ``sdloop_base.json`` (command, seed, data,
steps, time, caption-following scores) beside it; ``out/pretrain/`` keeps the loss curves, the sample grid and the
metrics.

Reproducible and resumable: each step's batch, noise and timesteps are a pure function of (seed, phase, step), the
learning rate a function of the step, and checkpoints (safetensors + JSON, written atomically) hold the weights,
the EMA copy and the optimizer; a run killed at any moment continues from its last checkpoint with ``resume=True``
and ends with the same weights as an uninterrupted run. A time budget (``minutes``) is turned into step counts
after a few timed steps and recorded, so the recorded command repeats the run exactly.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from finetune.pretraining.checkpoints import EMA, _checkpoints, latest_checkpoint, save_checkpoint
from sdloop.atomic import write_json_atomic
from sdloop.errors import UserError

WORK = "pretrain"
PHASES = ("vae", "unet")


class PretrainError(UserError):
    """The pretraining cannot start or continue; the message says what to do."""


@dataclass
class PretrainConfig:
    """Everything that decides the result of ``sdloop base pretrain`` (recorded in ``pretrain/config.json``)."""

    seed: int = field(default=0, metadata={"help": "seed of the data, the initial weights and every draw"})
    images: int = field(default=4096, metadata={"help": "synthetic training images (finetune.data.synth, 64 px)"})
    minutes: float = field(default=25.0, metadata={"help": "time budget of both phases (ignored for a phase "
                                                           "whose steps are given)"})
    vae_share: float = field(default=0.3, metadata={"help": "share of the time budget spent on the VAE"})
    vae_steps: int = field(default=0, metadata={"help": "VAE steps (0 = from the time budget)"})
    unet_steps: int = field(default=0, metadata={"help": "UNet steps (0 = from the time budget)"})
    vae_downsamplings: int = field(default=3, metadata={"help": "3: 8x8 latents at 64 px (SD's factor 8); 2: "
                                                               "16x16, sharper corners but 4-5x slower UNet steps"})
    vae_batch: int = field(default=16, metadata={"help": "VAE batch size"})
    vae_lr: float = field(default=1e-3, metadata={"help": "VAE learning rate (Adam)"})
    vae_kl: float = field(default=1e-6, metadata={"help": "weight of the VAE's KL term"})
    unet_batch: int = field(default=32, metadata={"help": "UNet batch size"})
    unet_lr: float = field(default=1e-3, metadata={"help": "UNet learning rate (AdamW)"})
    cond_dropout: float = field(default=0.1, metadata={"help": "share of empty captions (for guidance)"})
    noise_offset: float = field(default=0.1, metadata={"help": "std of a per-(image, channel) constant added to the "
                                                                "UNet's training noise (see train_unet)"})
    train_text_encoder: bool = field(default=False, metadata={"help": "train the text encoder with the UNet"})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay of the weights that are shipped"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (1: on a shared machine a second thread "
                                                        "that waits for a busy core made steps several times slower)"})
    checkpoint_seconds: float = field(default=120.0, metadata={"help": "seconds between checkpoints"})
    eval_prompts: int = field(default=64, metadata={"help": "fixed captions the finished base is scored on"})

    def __post_init__(self) -> None:
        checks = [("images", self.images >= 16, "at least 16"), ("minutes", self.minutes > 0, "positive"),
                  ("vae_share", 0 < self.vae_share < 1, "between 0 and 1"),
                  ("vae_steps", self.vae_steps >= 0, ">= 0"), ("unet_steps", self.unet_steps >= 0, ">= 0"),
                  ("vae_downsamplings", self.vae_downsamplings in (2, 3), "2 or 3"),
                  ("cond_dropout", 0 <= self.cond_dropout < 1, "in [0, 1)"),
                  ("noise_offset", 0 <= self.noise_offset <= 1, "in [0, 1]"),
                  ("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1)"), ("threads", self.threads >= 1, ">= 1"),
                  ("eval_prompts", self.eval_prompts >= 1, ">= 1")]
        for name, ok, what in checks:
            if not ok:
                raise PretrainError(f"{name}={getattr(self, name)} is invalid: use {what}.")



WARMUP_STEPS = 100


def lr_factor(step: int) -> float:
    """A linear warm-up over WARMUP_STEPS, then constant: a function of the step alone, so a run stopped by a time
    budget is the same as a run of that many steps; the shipped weights are an EMA, which does what a decay would."""
    return min(1.0, (step + 1) / WARMUP_STEPS)


# ---- the folder: config, state, metrics ---------------------------------------------------------------------------
class WorkDir:
    """``out/pretrain/``: the resolved config, per-phase progress, the metrics and the checkpoints."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.resuming = False  # a --resume of a run with progress: the first phase that runs says where it starts
        self.root = self.out / WORK
        self.config_path = self.root / "config.json"
        self.progress_path = self.root / "progress.json"
        self.metrics_path = self.root / "metrics.jsonl"
        self.latents_path = self.root / "latents.safetensors"

    def ckpt_root(self, phase: str) -> Path:
        return self.root / "checkpoints" / phase

    def read_progress(self) -> dict[str, Any]:
        return json.loads(self.progress_path.read_text()) if self.progress_path.is_file() else {}

    def update_progress(self, **values: Any) -> dict[str, Any]:
        progress = {**self.read_progress(), **values}
        write_json_atomic(self.progress_path, progress)
        return progress

    def metrics(self) -> list[dict[str, Any]]:
        from finetune.training.visuals import read_metrics

        return read_metrics(self.metrics_path)

    def truncate_metrics(self, phase: str, step: int) -> None:
        """Drop rows a killed run wrote after its last checkpoint, so a resumed curve has no doubled steps."""
        rows = [r for r in self.metrics() if not (r.get("phase") == phase and r["step"] >= step)]
        from sdloop.atomic import write_text_atomic

        write_text_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    def log(self, row: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")


RESUMABLE = ("vae_steps", "unet_steps", "minutes")  # where a run stops, not what it computes: a resume may change them


def _plan(cfg: PretrainConfig) -> str:
    """The step totals a run will train, as a user reads them: 'VAE 400 steps, UNet 2000 steps'."""
    return ", ".join(f"{name} {steps} steps" if steps else f"{name} within the {cfg.minutes:g}-minute budget"
                     for name, steps in (("VAE", cfg.vae_steps), ("UNet", cfg.unet_steps)))


def _write_config(work: WorkDir, cfg: PretrainConfig, command: list[str]) -> None:
    write_json_atomic(work.config_path, {"config": asdict(cfg), "command": command, "started": time.time()})


def _recorded(work: WorkDir) -> PretrainConfig:
    try:
        return PretrainConfig(**json.loads(work.config_path.read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError):
        raise PretrainError(f"{work.config_path} is damaged, so the pretraining cannot be resumed; start one in a "
                            "new folder.") from None


def _resumed(work: WorkDir, recorded: PretrainConfig, given: dict[str, Any]) -> PretrainConfig:
    """The recorded config of a run with something to resume, with the step totals (and time budget) the user
    changed explicitly for a phase that has not finished; every other change is named as ignored, because the
    weights so far were computed with the recorded settings."""
    progress = work.read_progress()
    finished = {"vae_steps": "vae" in progress, "unet_steps": "unet" in progress, "minutes": "unet" in progress}
    changed = {k: v for k, v in given.items() if v != getattr(recorded, k)}
    applied = {k: v for k, v in changed.items() if k in RESUMABLE and not finished[k]}
    ignored = [f"{k}={changed[k]}" for k in sorted(set(changed) - set(applied))]
    if ignored:
        print(f"note: --resume continues with the settings recorded in {work.config_path}; ignoring "
              f"{', '.join(ignored)} (a finished phase, or a setting the weights so far were not made with)",
              file=sys.stderr)
    for key in ("vae_steps", "unet_steps"):
        done = _checkpoints(work.ckpt_root(key.split("_")[0]))
        reached = int(done[-1].name.split("_")[1]) if done else 0
        if key in applied and 0 < applied[key] < reached:
            raise PretrainError(f"--{key.replace('_', '-')} {applied[key]} is below the {reached} steps the "
                                f"checkpoint in {work.root} has reached; give at least {reached}.")
    if not applied:
        return recorded
    cfg = PretrainConfig(**{**asdict(recorded), **applied})
    record = json.loads(work.config_path.read_text())
    write_json_atomic(work.config_path, {**record, "config": asdict(cfg)})
    print(f"resuming with {', '.join(f'{k}={v}' for k, v in applied.items())}: {_plan(cfg)}", file=sys.stderr)
    return cfg


def prepare_out(out: Path, cfg: Optional[PretrainConfig], resume: bool, command: list[str],
                given: Optional[dict[str, Any]] = None) -> PretrainConfig:
    """Create ``out`` for a new run (refusing a folder that holds anything) or read the config of one to resume.

    ``given`` are the settings the user typed (on a resume: the rest come from the record). A resume with nothing
    to resume (killed before its first checkpoint, or no pretraining here at all) says so in one line and starts
    over, with the step totals the user asked for: silently starting over had looked like a resume that lost its
    progress. ``cfg`` is the config of a new run (ignored on a resume that finds a run recorded).
    """
    from sdloop.atomic import check_writable_dir

    work = WorkDir(out)
    given = dict(given or {})
    if resume and work.config_path.is_file():
        recorded = _recorded(work)
        if work.read_progress() or _checkpoints(work.ckpt_root(PHASES[0])):
            return _resumed(work, recorded, given)
        cfg = PretrainConfig(**{**asdict(recorded), **given})
        print(f"no checkpoint in {work.root} to resume: starting over ({_plan(cfg)})", file=sys.stderr)
        work.metrics_path.unlink(missing_ok=True)
        _write_config(work, cfg, command)
        return cfg
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if resume:
            raise PretrainError(f"{out} holds no pretraining to resume (no {WORK}/config.json) and is not empty; "
                                "choose a new folder (nothing was changed).")
        hint = " or pass --resume to continue it" if work.config_path.is_file() else ""
        raise PretrainError(f"{out} already exists and is not empty; choose a new folder{hint} (nothing was "
                            "changed).")
    cfg = cfg or PretrainConfig(**given)
    if resume:
        print(f"no pretraining in {out} to resume: starting over ({_plan(cfg)})", file=sys.stderr)
    check_writable_dir(out, "output folder")
    _write_config(work, cfg, command)
    return cfg


def _record_steps(work: WorkDir, phase: str, steps: int) -> None:
    """Write a phase's step count (decided from the time budget) into the config, so a resume and a rerun agree."""
    recorded = json.loads(work.config_path.read_text())
    recorded["config"][f"{phase}_steps"] = steps
    write_json_atomic(work.config_path, recorded)


# ---- the loop shared by both phases -------------------------------------------------------------------------------
def _say_resume(phase: str, cfg: PretrainConfig, root: Path, found: bool, start: int, elapsed: float, total: int,
                budget_s: float) -> None:
    """One line where a resumed run continues: from the phase's checkpoint, or (stopped before its first one) from
    step 0 of the same total, saying why. The total is the recorded one: a resume never changes it silently."""
    name = {"vae": "VAE", "unet": "UNet"}[phase]
    of = (f"of {total} steps" if total else f"within the {budget_s / 60:.1f}-minute budget, {elapsed / 60:.1f} min "
          "spent")
    if found:
        print(f"resuming the {name} phase from its checkpoint at step {start} {of}", file=sys.stderr)
    else:
        print(f"no {name} checkpoint in {root} yet (the run stopped before its first; one is written every "
              f"{cfg.checkpoint_seconds:g} s): the {name} phase starts over at step 0 {of}", file=sys.stderr)


def run_phase(phase: str, cfg: PretrainConfig, work: WorkDir, params: list[Any], lr: float,
              step_fn: Callable[[int], float], weights_fn: Callable[[], dict[str, Any]],
              load_fn: Callable[[dict[str, Any], Optional[dict[str, Any]]], None], progress: bool,
              budget_s: float, ema: Optional["EMA"] = None, stop_after: Optional[int] = None) -> dict[str, Any]:
    """Train one phase to its step count (or, when none is set, until ``budget_s`` seconds are spent, counting
    the time before a resume); checkpoint on a timer; return {steps, seconds, final_loss, finished}.

    ``step_fn(step)`` makes one step's forward and backward and returns the loss; the optimizer and the learning
    rate (a function of the step alone, so a run stopped by its time budget equals a run of that many steps) are
    handled here. ``stop_after`` ends the phase early after that step, with a checkpoint, as a kill would (tests).
    """
    import torch
    from tqdm.auto import tqdm

    optim_cls = torch.optim.Adam if phase == "vae" else torch.optim.AdamW
    optimizer = optim_cls(params, lr=lr, **({} if phase == "vae" else {"weight_decay": 1e-2}))
    total = getattr(cfg, f"{phase}_steps")
    root = work.ckpt_root(phase)
    start, elapsed = 0, 0.0
    found = latest_checkpoint(root)
    if found is not None:
        optimizer.load_state_dict(found["optimizer"])
        load_fn(found["weights"], found["ema"])
        start, elapsed = found["state"]["step"], found["state"]["elapsed"]
    if work.metrics_path.is_file():  # rows a killed run logged after its last checkpoint (or before its first)
        work.truncate_metrics(phase, start)
    if work.resuming:
        _say_resume(phase, cfg, root, found is not None, start, elapsed, total, budget_s)
        work.resuming = False
    bar = tqdm(total=total or None, initial=start, desc=f"pretrain {phase}", unit="step", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    t0, last_ckpt, loss, losses = time.time(), time.time(), float("nan"), []
    step = start

    def spent() -> float:
        return elapsed + time.time() - t0

    def checkpoint() -> None:
        save_checkpoint(root, step, weights_fn(), optimizer, {"phase": phase, "elapsed": spent()},
                        ema.state() if ema is not None else None)

    while (step < total) if total else (spent() < budget_s):
        for g in optimizer.param_groups:
            g["lr"] = lr * lr_factor(step)
        optimizer.zero_grad(set_to_none=True)
        loss = step_fn(step)
        if not math.isfinite(loss):
            raise PretrainError(f"the {phase} loss became {loss} at step {step}; lower the learning rate.")
        optimizer.step()
        if ema is not None:
            ema.update(step)
        step += 1
        losses.append(loss)
        if step % 20 == 0 or step == total:
            work.log({"phase": phase, "step": step, "loss": sum(losses) / len(losses),
                      "lr": optimizer.param_groups[0]["lr"], "seconds": round(spent(), 2)})
            losses = []
            if not total and step > start:  # the ETA of a time budget: steps at the recent rate
                bar.total = step + int(max(0.0, budget_s - spent()) * (step - start) / (time.time() - t0))
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if time.time() - last_ckpt > cfg.checkpoint_seconds or step == total or step == stop_after:
            checkpoint()
            last_ckpt = time.time()
        if stop_after is not None and step >= stop_after:
            break
    if losses:  # the last partial window (a phase ended by its time budget)
        work.log({"phase": phase, "step": step, "loss": sum(losses) / len(losses),
                  "lr": optimizer.param_groups[0]["lr"], "seconds": round(spent(), 2)})
    finished = step >= total if total else spent() >= budget_s
    if finished and not total:  # the budget became a step count: record it, so a rerun repeats this run
        checkpoint()
        _record_steps(work, phase, step)
        setattr(cfg, f"{phase}_steps", step)
    bar.close()
    return {"steps": step, "seconds": round(spent(), 1), "final_loss": loss, "finished": finished}


def pretrain(out: str | Path, cfg: Optional[PretrainConfig] = None, resume: bool = False, progress: bool = True,
             command: Optional[list[str]] = None, stop_after: Optional[tuple[str, int]] = None,
             given: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Pretrain the tiny base into ``out`` (or continue it with ``resume``); return the record it writes.

    ``given``: on a resume, the settings the user typed (see ``prepare_out``: explicit step totals apply, a resume
    with no checkpoint starts over with them). ``stop_after=(phase, step)`` stops after that step with a
    checkpoint, as a kill would (tests use it).
    """
    import torch

    from finetune.pretraining import phases as ph

    out = Path(out).expanduser().resolve()
    work = WorkDir(out)
    command = command or ["sdloop", "base", "pretrain", str(out)]
    # a resume with progress says where each phase continues; one with none has said it starts over (prepare_out)
    work.resuming = bool(resume and work.config_path.is_file()
                         and (work.read_progress() or _checkpoints(work.ckpt_root(PHASES[0]))))
    cfg = prepare_out(out, cfg, resume, command, given)
    if resume and (out / "sdloop_base.json").is_file() and "unet" in work.read_progress():
        return json.loads((out / "sdloop_base.json").read_text())
    torch.set_num_threads(cfg.threads)
    t_start = time.time()
    data = ph.load_data(cfg, progress)
    progress_state = work.read_progress()
    budget = cfg.minutes * 60
    if "vae" not in progress_state:
        stop = stop_after[1] if stop_after and stop_after[0] == "vae" else None
        result = ph.train_vae(cfg, work, data, progress, budget * cfg.vae_share, stop_after=stop)
        if not result["finished"]:
            return {"stopped": result}
        progress_state = work.update_progress(vae=result)
    if "latents" not in progress_state:
        progress_state = work.update_progress(latents=ph.encode_latents(cfg, work, data, progress))
    stop = stop_after[1] if stop_after and stop_after[0] == "unet" else None
    if "unet" not in progress_state:
        used = progress_state["vae"]["seconds"] + progress_state["latents"]["seconds"]
        result = ph.train_unet(cfg, work, data, progress, max(60.0, budget - used), stop_after=stop)
        if not result["finished"]:
            return {"stopped": result}
        progress_state = work.update_progress(unet=result)
    record = ph.export(cfg, work, data, progress_state, time.time() - t_start, progress)
    work.latents_path.unlink(missing_ok=True)  # the final checkpoint of each phase stays: a run can be extended
    return record
