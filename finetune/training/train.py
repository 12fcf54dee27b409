"""The LoRA trainer. ``train(cfg)`` reads top to bottom, one phase per function: open the run folder, check the
data, set up the model, resume, then a loop of training steps, validations, samples and checkpoints, then the
result files.

Determinism: the data order is a function of (seed, epoch), each step's noise, timesteps and dropout draws are a
function of (seed, step, process), so a run resumed from a checkpoint replays exactly what the uninterrupted run
would have done, with no random state to restore.
"""

from __future__ import annotations

import dataclasses
import enum
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from sdloop.atomic import save_safetensors
from sdloop.errors import UserError
from sdloop.runfolder import RunFolder

from finetune.training.checkpoint import clean_partial, list_checkpoints, prune_checkpoints, restore_latest, save_checkpoint
from finetune.training.config import TrainConfig
from finetune.training.model import Model, setup_model
from finetune.training.preference_run import validation_extras
from finetune.training.results import append_metrics, truncate_metrics, write_results, write_start_files
from finetune.training.setup import (Context, Data, Event, SetupError, absolute_paths, check_data, open_run_folder, start_accelerator,
                    timed)
from finetune.training.step import NonFiniteLoss, maybe_ema, micro_batches, train_step
from finetune.training.validate import validation_loss_sum, write_sample_grid


class TrainingError(UserError):
    """Training cannot go on (bad input, NaN loss, out of memory); the message says what to change."""


class DivergedError(TrainingError):
    """The loss became NaN or infinite; the message names the step, the last good checkpoint and the likely cause."""


class StopReason(str, enum.Enum):
    """Why a run stopped (stored in checkpoints and the manifest)."""

    NONE = ""
    MAX_STEPS = "max_steps"
    EARLY_STOPPING = "early_stopping"
    PRUNED = "pruned"                      # the caller's on_validation asked to stop (the search's pruner)


@dataclass
class RunResult:
    """What a finished run produced: the run folder, its best step and validation loss, why it stopped."""

    run_dir: Path
    best_step: Optional[int]
    best_val_loss: Optional[float]
    final_step: int
    stopped: str
    samples_dir: Path
    stop_reason: StopReason = StopReason.MAX_STEPS
    main_process: bool = True


@dataclass
class TrainHooks:
    """Observation points for benchmarks and callers; none of them changes what the trainer does.

    ``event(kind, start, end, value)`` is called after the timed phases: scan_dataset, load_components,
    cache_build, eval (value: the validation loss), sample, checkpoint, save_best.
    ``on_validation(step, val_loss) -> bool`` after each validation; True stops the run (StopReason.PRUNED).
    """

    event: Optional[Event] = None
    on_validation: Optional[Callable[[int, float], bool]] = None
    warn_upscale: bool = True  # the one-line upscale warning; the search prints it once before its trials


@dataclass
class TrainState:
    """What a checkpoint stores besides tensors: the data position and the early-stopping state."""

    epoch: int = 0
    pos: int = 0
    best_val: Optional[float] = None
    best_step: Optional[int] = None
    bad_evals: int = 0
    elapsed: float = 0.0
    stopped: str = ""
    stop_reason: str = ""
    family: str = ""           # the model family the run trains (checked on --resume; empty in older checkpoints)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainState":
        names = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in d.items() if k in names})
        if not state.stop_reason and state.stopped:  # checkpoints from before the enum
            state.stop_reason = (StopReason.EARLY_STOPPING if state.stopped.startswith("early") else
                                 StopReason.MAX_STEPS).value
        return state


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True,
          on_validation: Optional[Callable[[int, float], bool]] = None,
          hooks: Optional[TrainHooks] = None) -> RunResult:
    """Train a LoRA on ``cfg.data`` over ``cfg.base`` into ``cfg.output``; return the run's result.

    ``on_validation(step, val_loss)`` is called after each validation; returning True stops the run (the
    hyperparameter search prunes trials this way). Running out of GPU memory becomes a TrainingError that names
    the settings to lower; the checkpoints written so far stay.
    """
    hooks = hooks or TrainHooks()
    if on_validation is not None:
        hooks = dataclasses.replace(hooks, on_validation=on_validation)
    try:
        return _train(cfg, resume, progress, hooks)
    except torch.OutOfMemoryError:
        raise TrainingError(oom_hint(cfg)) from None
    except SetupError as e:
        raise TrainingError(str(e)) from None


def _train(cfg: TrainConfig, resume: bool, progress: bool, hooks: TrainHooks) -> RunResult:
    t_start = time.time()
    if not cfg.base or not cfg.data or not cfg.output:
        raise TrainingError("base, data and output are required (--base DIR --data DIR --output RUN_DIR, or the "
                            "same keys in --config FILE).")
    cfg = absolute_paths(cfg)
    ctx = start_accelerator(cfg)
    run = open_run_folder(cfg, resume, ctx.main) if ctx.main else RunFolder(cfg.output)
    ctx.accelerator.wait_for_everyone()
    data = check_data(cfg, run, resume, progress and ctx.main, hooks.event, warn=hooks.warn_upscale and ctx.main)
    m = setup_model(cfg, ctx, data, progress and ctx.main, hooks.event)
    state, step = restore(run, m, ctx, resume)
    state.family = m.family.name
    if ctx.main and step == 0:
        write_start_files(run, cfg, data)
        run.metrics.unlink(missing_ok=True)
    t_loop = time.time()
    state, step = loop(cfg, run, ctx, data, m, state, step, progress, hooks, t_loop)
    ctx.accelerator.wait_for_everyone()
    if ctx.main:
        write_results(run, cfg, data, m, state, step, wall=state.elapsed + time.time() - t_loop,
                      startup=t_loop - t_start)
    ctx.accelerator.wait_for_everyone()
    has_val = bool(data.val_items)
    return RunResult(run_dir=run.path, best_step=state.best_step if has_val else step, best_val_loss=state.best_val,
                     final_step=step, stopped=state.stopped, samples_dir=run.samples_dir,
                     stop_reason=StopReason(state.stop_reason), main_process=ctx.main)


def restore(run: RunFolder, m: Model, ctx: Context, resume: bool) -> tuple[TrainState, int]:
    """The state to start from: step 0, or the newest intact checkpoint on --resume."""
    if not resume:
        return TrainState(), 0
    clean_partial(run.checkpoints_dir)
    check_resume_family(run, m)
    found = restore_latest(run.checkpoints_dir, m.optimizer, m.lr_scheduler, ctx.accelerator.print)
    if found is None:
        ctx.accelerator.print(f"no checkpoint in {run.checkpoints_dir}; starting {run.path} from step 0")
        return TrainState(), 0
    m.load_weights(found["weights"])
    if m.ema is not None and found["ema"] is not None:
        m.ema.load(found["ema"])
    state = TrainState.from_dict(found["state"])
    step = int(found["state"]["step"])
    if ctx.main:
        truncate_metrics(run, step)
    ctx.accelerator.print(f"resuming {run.path} from step {step} ({found['path'].name})")
    return state, step


def check_resume_family(run: RunFolder, m: Model) -> None:
    """Refuse, in one line naming both families, to resume a run on a base of another family (the base is a path
    --resume may change: an SDXL run resumed with --base on an SD 1.x folder). The newest checkpoint's state names
    the family; one written before families existed is an SD 1.x/2.x run's."""
    import json

    from sdloop.families import check_same_layout, family_by_name

    from finetune.training.checkpoint import STATE_FILE

    ckpts = list_checkpoints(run.checkpoints_dir)
    try:
        recorded = json.loads((ckpts[-1] / STATE_FILE).read_text()).get("family") or "sd1" if ckpts else ""
    except (OSError, ValueError, AttributeError):
        return  # a damaged checkpoint: restore_latest falls back past it and says so
    if recorded:
        check_same_layout(family_by_name(recorded), m.family, f"cannot resume {run.path} on the base {m.cfg.base} "
                          "(the run's family vs the base's)", "resume with the run's own base, or start a new "
                          "--output.")


def validate(m: Model, data: Data, cfg: TrainConfig, hooks: TrainHooks) -> float:
    """The fixed-noise validation loss over every process's shard (the same number on every process)."""
    start = time.time()
    if data.preference is not None:  # dpo/kto: the objective on the validation split (preference_run)
        from finetune.training.preference_run import validate_preference

        val = validate_preference(m, data, cfg)
        if hooks.event is not None:
            hooks.event("eval", start, time.time(), val)
        return val
    mine = data.val_feed.epoch_batches(0)[m.rank::m.world]
    with maybe_ema(m.ema):
        total, count = validation_loss_sum(m.raw_unet, m.noise_scheduler, data.val_feed, data.val_items,
                                           m.prediction_type, cfg.validation_timesteps, cfg.seed, m.device,
                                           list(m.trained_text_encoders().values()) or None, m.autocast,
                                           batches=mine)
    sums = m.accelerator.reduce(torch.tensor([total, float(count)], device=m.device, dtype=torch.float64), "sum")
    val = float(sums[0] / sums[1])
    if hooks.event is not None:
        hooks.event("eval", start, time.time(), val)
    return val


def decide(state: TrainState, val: float, step: int, cfg: TrainConfig, hooks: TrainHooks) -> bool:
    """Update the best step and the patience with a validation loss; return whether it improved.

    Sets ``state.stop_reason`` when early stopping triggers or the caller asks to stop.
    """
    improved = state.best_val is None or val < state.best_val - cfg.early_stopping_min_delta
    if improved:
        state.best_val, state.best_step, state.bad_evals = val, step, 0
    else:
        state.bad_evals += 1
    if cfg.early_stopping_patience and state.bad_evals >= cfg.early_stopping_patience:
        state.stop_reason = StopReason.EARLY_STOPPING.value
        state.stopped = (f"early stopping: no validation improvement in {state.bad_evals} evaluations "
                         f"(best {state.best_val:.5f} at step {state.best_step})")
    if hooks.on_validation is not None and hooks.on_validation(step, val) and not state.stop_reason:
        state.stop_reason = StopReason.PRUNED.value
        state.stopped = f"stopped by the caller (pruned) at step {step}"
    return improved


def _nan_error(cfg: TrainConfig, run: RunFolder, value: float, step: int) -> DivergedError:
    last = list_checkpoints(run.checkpoints_dir)
    where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
    if cfg.alpha / cfg.rank > 64:
        cause = f"the LoRA scale alpha/rank = {cfg.alpha / cfg.rank:g} is very large; lower --alpha"
    else:
        cause = (f"the learning rate ({cfg.learning_rate}) is too high, or {cfg.mixed_precision} precision "
                 "overflowed; lower --learning-rate, keep max_grad_norm > 0, or use bf16 / mixed_precision=no")
    return DivergedError(f"the loss became {value} at step {step + 1}; {where}. Likely cause: {cause}.")


def loop(cfg: TrainConfig, run: RunFolder, ctx: Context, data: Data, m: Model, state: TrainState, step: int,
         progress: bool, hooks: TrainHooks, t_loop: float) -> tuple[TrainState, int]:
    """Train until max steps, early stopping or the caller's stop; validate, sample and checkpoint on the way."""
    from tqdm.auto import tqdm

    tb = _tensorboard(run) if ctx.main else None
    prompts = list(cfg.sample_prompts) or [it.caption for it in (data.val_items or data.train_items)[:2]]
    validation_every = cfg.validation_every
    checkpoint_every = cfg.checkpoint_every or validation_every
    sample_every = cfg.sample_every or validation_every

    def log(row: dict[str, Any]) -> None:
        if ctx.main:
            append_metrics(run, {**row, "epoch": state.epoch, "wall": round(time.time() - t_loop + state.elapsed, 3)})

    def checkpoint() -> None:
        if ctx.main:
            with timed(hooks.event, "checkpoint"):
                save_checkpoint(run.checkpoints_dir, step, m.weights_now(), m.optimizer, m.lr_scheduler,
                                {**dataclasses.asdict(state), "elapsed": state.elapsed + time.time() - t_loop},
                                m.ema.state() if m.ema is not None else None)
                prune_checkpoints(run.checkpoints_dir, cfg.keep_checkpoints, state.best_step)
        ctx.accelerator.wait_for_everyone()

    if step == 0 and data.val_items:  # the base model's level: the curve starts where training starts
        v0 = validate(m, data, cfg, hooks)
        log({"step": 0, "val_loss": v0, **validation_extras(data)})
        if tb:
            tb.add_scalar("loss/val", v0, 0)
    # a run that stopped early stays stopped; one that reached max_steps continues if max_steps was raised
    if state.stop_reason == StopReason.MAX_STEPS.value and step < m.total_steps:
        state.stop_reason, state.stopped = "", ""
    stream = micro_batches(data.train_feed, state.epoch, state.pos, ctx.rank, ctx.world)
    bar = tqdm(total=m.total_steps, initial=step, desc="train", disable=not (progress and ctx.main),
               dynamic_ncols=True, file=sys.stderr)
    losses: list[float] = []
    m.unet.train()
    if cfg.train_text_encoder:
        for te in m.text_encoders:
            te.train()
    while step < m.total_steps and not state.stop_reason:
        try:
            loss = train_step(m, stream, step, cfg, state)
        except NonFiniteLoss as e:
            raise _nan_error(cfg, run, e.value, step) from None
        step += 1
        losses.append(loss)
        lr = m.lr_scheduler.get_last_lr()[0]
        log({"step": step, "train_loss": loss, "lr": lr})
        if tb:
            tb.add_scalar("loss/train", loss, step)
            tb.add_scalar("lr", lr, step)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", epoch=state.epoch,
                        best=f"{state.best_val:.4f}" if state.best_val is not None else "-")
        last = step >= m.total_steps
        if data.val_items and (step % validation_every == 0 or last):
            val = validate(m, data, cfg, hooks)
            train_mean = sum(losses) / len(losses)
            losses = []
            if decide(state, val, step, cfg, hooks) and ctx.main:
                with timed(hooks.event, "save_best"):
                    save_safetensors(run.best_lora_checkpoint, m.result_weights(), {"step": str(step)})
            log({"step": step, "val_loss": val, "train_loss_mean": train_mean, "train_val_gap": val - train_mean,
                 "best_val_loss": state.best_val, "best_step": state.best_step, **validation_extras(data)})
            if tb:
                tb.add_scalar("loss/val", val, step)
        if last and not state.stop_reason:
            state.stop_reason, state.stopped = StopReason.MAX_STEPS.value, "max steps reached"
        if ctx.main and (step % sample_every == 0 or last or state.stop_reason):
            with timed(hooks.event, "sample"), maybe_ema(m.ema), m.autocast:
                write_sample_grid(run.samples_dir / f"step_{step:06d}.png", m.components, m.raw_unet, m.raw_te,
                                  prompts, list(cfg.sample_seeds), cfg.sample_steps, (cfg.resolution,) * 2,
                                  m.device, title=f"{run.path.name} step_{step:06d}")
        if step % checkpoint_every == 0 or last or state.stop_reason:
            checkpoint()
    bar.close()
    if not state.stop_reason:  # resumed a run that had already finished
        state.stop_reason, state.stopped = StopReason.MAX_STEPS.value, state.stopped or "max steps reached"
    if tb:
        tb.close()
    state.elapsed += time.time() - t_loop
    return state, step


def _tensorboard(run: RunFolder) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(run.logs_dir))
    except ImportError:  # tensorboard is a dependency; a broken install only loses the TB logs
        return None


def oom_hint(cfg: TrainConfig) -> str:
    """What to lower when a GPU runs out of memory, most effective first."""
    hints = []
    if cfg.batch_size > 1:
        hints.append(f"--batch-size {max(1, cfg.batch_size // 2)} "
                     f"(with gradient_accumulation={cfg.gradient_accumulation * 2})")
    if not cfg.gradient_checkpointing:
        hints.append("gradient_checkpointing=true")
    if cfg.mixed_precision == "no":
        hints.append("mixed_precision=bf16 (or fp16)")
    if not cfg.use_8bit_adam:
        hints.append("use_8bit_adam=true")
    hints.append(f"--resolution {max(256, cfg.resolution - 128)}")
    return "out of GPU memory; try " + ", ".join(hints) + "."
