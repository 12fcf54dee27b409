"""The trainer's set-up phases, each a function: open the run folder, set up the data, set up the model.

Each phase checks what it can before anything is written, so a bad base, a bad value or an unwritable cache fails
in seconds with one line, and leaves nothing that makes the folder look like a run in progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from sdloop import workspace
from sdloop.atomic import check_writable_dir
from sdloop.runfolder import RunFolder, portable_location

from finetune.training.config import TrainConfig


class SetupError(Exception):
    """Raised by a phase with a user-facing message (the trainer re-raises it as a TrainingError)."""


Event = Callable[[str, float, float, Any], None]


@contextlib.contextmanager
def timed(event: Optional[Event], kind: str) -> Any:
    """Report (kind, start, end, None) to a benchmark's event hook around a block; nothing without a hook."""
    start = time.time()
    yield
    if event is not None:
        event(kind, start, time.time(), None)


@dataclass
class Context:
    """Where the run executes: the accelerator, its device, this process's rank and the process count."""

    accelerator: Any
    device: torch.device
    rank: int
    world: int
    main: bool


def start_accelerator(cfg: TrainConfig) -> Context:
    from accelerate import Accelerator

    # cpu=True on a machine without CUDA lets `torchrun`/`accelerate launch` run data-parallel on CPU (gloo)
    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available(),
                      gradient_accumulation_steps=cfg.gradient_accumulation)
    if cfg.mixed_precision != "no" and acc.device.type == "cpu":
        raise SetupError(f"mixed_precision={cfg.mixed_precision} needs a GPU; use mixed_precision=no on CPU.")
    return Context(acc, acc.device, acc.process_index, acc.num_processes, acc.is_main_process)


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """The config with local base, data and output as absolute paths, so config.yaml works from any directory."""
    base, _ = portable_location(cfg.base, Path(cfg.output or "."))
    data = str(Path(cfg.data).expanduser().resolve()) if cfg.data else cfg.data
    output = str(Path(cfg.output).expanduser().resolve()) if cfg.output else cfg.output
    return dataclasses.replace(cfg, base=base if cfg.base else cfg.base, data=data, output=output)


# -- phase 1: the run folder ------------------------------------------------------------------------------------------

def open_run_folder(cfg: TrainConfig, resume: bool, main: bool) -> RunFolder:
    """The run folder, checked: new, empty, or a run sdloop made (and, when it has progress, only with --resume).

    sdloop never writes into a folder that holds files it did not make: a folder with ``metrics.jsonl`` or
    ``lora/`` of the user's own would otherwise be overwritten.
    """
    run = RunFolder(cfg.output)
    out = run.path
    if out.exists() and not out.is_dir():
        raise SetupError(f"{out} is a file; --output takes a folder.")
    non_empty = out.is_dir() and any(out.iterdir())
    if non_empty and not run.is_ours():
        raise SetupError(f"{out} holds files sdloop did not make; choose a new or empty --output folder.")
    if resume:
        if not run.config.is_file():
            raise SetupError(f"{out} holds no run to resume; start it without --resume.")
        old = TrainConfig.from_yaml(run.config).to_dict()
        new = cfg.to_dict()
        free = ("max_steps", "epochs", "early_stopping_patience", "output", "gradient_checkpointing",
                "keep_checkpoints", "sample_every", "num_workers", "base", "data")  # no effect on the maths
        changed = [k for k in old if k not in free and old[k] != new.get(k)]
        if changed:
            raise SetupError(f"cannot resume {out} with a different config ({', '.join(changed)} changed); "
                             "resume with the run's own config.yaml, or start a new --output.")
        if old.get("base") and new.get("base") and old["base"] != new["base"]:
            check_resume_base(out, str(old["base"]), str(new["base"]))
    elif non_empty and run.has_progress():
        raise SetupError(f"{out} already holds a run. Pass --resume to continue it, or choose another --output.")
    if main:
        check_writable_dir(out, "the run folder")
        if not run.marker.is_file():
            import finetune

            run.write_marker({"sdloop_version": finetune.__version__,
                              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return run


def check_resume_base(out: Path, old: str, new: str) -> None:
    """A --resume with another --base: refuse one of another model family before anything loads (one line naming
    both). An old base that is gone cannot be read; the checkpoint's recorded family is checked later anyway."""
    from sdloop.families import check_same_layout, family_of
    from sdloop.pipelines import BaseModelError

    try:
        before = family_of(old)
    except BaseModelError:
        return
    check_same_layout(before, family_of(new), f"cannot resume {out} on the base {new} (the run's family vs the "
                      "base's)", "resume with the run's own base, or start a new --output.")


# -- phase 2: the data --------------------------------------------------------------------------------------------

@dataclass
class Data:
    """The checked dataset, its split, and the feeds over the caches."""

    report: Any
    train_items: list
    val_items: list
    fingerprint: str
    train_feed: Any = None
    val_feed: Any = None
    preference: Any = None    # a dpo/kto run's records (finetune.training.preference_run.PreferenceSplit)


UPSCALE_WARN_FACTOR = 2.0  # a training resolution more than this many times the images' typical side is warned about


def upscale_warning(items: list, resolution: int) -> Optional[str]:
    """One line when ``resolution`` is more than twice the dataset's median image side (None otherwise).

    An image's side is sqrt(width x height), the side of the square of its area, as the buckets are sized by area.
    Training small images at a large resolution upscales each one: the compute grows with the square of the factor
    and the model learns the blur. ``sdloop train`` and ``sdloop tune`` print it once, before any step.
    """
    from finetune.training.config import MIN_RESOLUTION

    sides = [math.sqrt(i.width * i.height) for i in items if getattr(i, "width", 0) and getattr(i, "height", 0)]
    if not sides:
        return None
    median = statistics.median(sides)
    factor = resolution / median
    if factor <= UPSCALE_WARN_FACTOR:
        return None
    suggested = max(MIN_RESOLUTION, int(math.ceil(round(median) / 8) * 8))
    return (f"warning: the images are {round(median)} px (median side) and --resolution is {resolution}: each is "
            f"upscaled {factor:.3g}x, which costs {factor * factor:.3g}x the compute and learns blur; "
            f"pass --resolution {suggested}")


def warn_upscale(items: list, resolution: int) -> None:
    """Print ``upscale_warning`` to stderr when there is one."""
    line = upscale_warning(items, resolution)
    if line:
        print(line, file=sys.stderr, flush=True)


def check_data(cfg: TrainConfig, run: RunFolder, resume: bool, progress: bool, event: Optional[Event],
               warn: bool = True) -> Data:
    """Check and split the dataset; on --resume, refuse a dataset that changed since the run started.

    ``warn`` prints the one-line upscale warning (``upscale_warning``); the search prints it once for all trials."""
    from finetune.data.check import DataReport, DatasetError, explain_empty_validation, scan_dataset, split_items
    from finetune.data.preference import find_preference_file

    if cfg.objective != "sft" or find_preference_file(cfg.data):  # preferences: read, checked and split by prompt
        from finetune.training.preference_run import preference_data

        return preference_data(cfg, run, resume, progress, event, warn)
    with timed(event, "scan_dataset"):
        try:
            report = scan_dataset(cfg.data, cfg.data_config, progress=progress)
        except DatasetError as e:
            raise SetupError(str(e)) from None
    if not report.items:
        raise SetupError(f"no usable images in {cfg.data}; run `sdloop data check {cfg.data}` to see why.")
    if resume and run.data_report.is_file():
        try:
            before = DataReport.load(run.data_report).fingerprint
        except DatasetError:  # a damaged record cannot vouch for the data; the checkpoints still can resume
            before = ""
        if before and before != report.fingerprint:
            raise SetupError(
                f"the dataset {cfg.data} changed since {run.path} started (fingerprint {before[:12]} -> "
                f"{report.fingerprint[:12]}); resuming would compare validation losses across different "
                "validation sets. Restore the data, or train a new run with another --output.")
    train_items, val_items = split_items(report.items, cfg.data_config)
    if not val_items and cfg.data_config.validation_split > 0:
        raise SetupError(explain_empty_validation(report.items, cfg.data_config))
    if warn:
        warn_upscale(report.items, cfg.resolution)
    return Data(report, train_items, val_items, report.fingerprint)


def build_feeds(cfg: TrainConfig, data: Data, components: dict, fingerprint: str, ctx: Context, progress: bool,
                event: Optional[Event]) -> None:
    """The training and validation feeds over the latent and text caches (built once, by the main process first)."""
    from finetune.training.feed import TrainingFeed

    cache_root = workspace.cache_dir()
    data.train_feed = TrainingFeed(data.train_items, Path(cfg.data), cfg, components, fingerprint, cache_root,
                                   ctx.device, train=data.preference is None, progress=progress)
    data.val_feed = TrainingFeed(data.val_items, Path(cfg.data), cfg, components, fingerprint, cache_root,
                                 ctx.device, train=False, progress=progress)
    with ctx.accelerator.main_process_first(), timed(event, "cache_build"):
        data.train_feed.prepare()
        data.val_feed.prepare()
    if data.preference is not None:  # dpo/kto: batches of records (pairs, thumbs) over the un-augmented images
        from finetune.training.preference_run import wrap_feeds

        wrap_feeds(cfg, data)
