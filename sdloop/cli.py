"""``sdloop``: the command line that wires the stages. It parses, calls the stage, and turns the stage's own
errors into one clear line and an exit code; the work itself lives in the stage packages.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from sdloop.errors import UserError, one_line

# Flags of `sdloop train` that map straight onto TrainConfig fields.
TRAIN_FLAGS: list[tuple[str, str, type, str]] = [
    ("--max-steps", "max_steps", int, "optimizer steps (0 = derive from --epochs)"),
    ("--epochs", "epochs", int, "passes over the training split"),
    ("--batch-size", "batch_size", int, "images per micro-step"),
    ("--resolution", "resolution", int, "training resolution in pixels"),
    ("--learning-rate", "learning_rate", float, "peak learning rate"),
    ("--rank", "rank", int, "LoRA rank"),
    ("--alpha", "alpha", float, "LoRA alpha"),
    ("--seed", "seed", int, "random seed"),
    ("--early-stopping-patience", "early_stopping_patience", int, "validations without improvement before stopping"),
    ("--validation-every", "validation_every", int, "steps between validations"),
    ("--mixed-precision", "mixed_precision", str, "no, fp16 or bf16"),
]


def _env_defaults() -> None:
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _home() -> Path:
    from finetune.config import workspace_home

    return workspace_home()


# ---- base --------------------------------------------------------------------------------------------------------
def cmd_base_tiny(args: argparse.Namespace) -> int:
    from finetune.base import write_tiny_base

    out = write_tiny_base(args.out_dir, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote the tiny SD-1.x base (seed {args.seed}) to {out}")
    print(f"load it with StableDiffusionPipeline.from_pretrained({str(out)!r}) or pass --base {out}")
    return 0


# ---- data --------------------------------------------------------------------------------------------------------
def _data_config(args: argparse.Namespace) -> Any:
    from finetune.config import DataConfig, TrainConfig, apply_overrides, build_dataclass

    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values = TrainConfig.from_yaml(args.config).data_config.__dict__.copy()
    values = apply_overrides({"data_config": values}, [f"data.{s}" for s in (args.set or [])])["data_config"]
    if getattr(args, "caption_column", None):
        values["caption_column"] = args.caption_column
    return build_dataclass(DataConfig, values, prefix="data.")


def cmd_data_check(args: argparse.Namespace) -> int:
    from finetune.data import format_summary, scan_dataset, split_items

    cfg = _data_config(args)
    report = scan_dataset(args.data_dir, cfg, progress=not args.quiet)
    default = _home() / "reports" / f"{Path(args.data_dir).resolve().name}-data_report.json"
    out = Path(args.json) if args.json else default
    out.parent.mkdir(parents=True, exist_ok=True)
    report.save(out)
    print(format_summary(report))
    if report.items:
        train, val = split_items(report.items, cfg)
        print(f"split (seed {cfg.split_seed}): {len(train)} train / {len(val)} validation")
    print(f"report: {out}")
    if not report.items:
        print(f"error: no usable images left in {args.data_dir}; the report lists why each file was skipped.",
              file=sys.stderr)
        return 1
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from finetune.synth import make_synthetic_dataset

    out = make_synthetic_dataset(args.out_dir, n=args.n, seed=args.seed, size=args.size,
                                 caption_format=args.caption_format)
    print(f"wrote {args.n} synthetic captioned images to {out}")
    return 0


# ---- train -------------------------------------------------------------------------------------------------------
def build_train_config(args: argparse.Namespace, base_values: Optional[dict[str, Any]] = None) -> Any:
    """Config precedence: defaults < --config file < explicit flags < --set key=value."""
    import yaml

    from finetune.config import TrainConfig, apply_overrides

    values: dict[str, Any] = dict(base_values or {})
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            from finetune.config import ConfigError

            raise ConfigError(f"config file {path} does not exist.")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            from finetune.config import ConfigError

            raise ConfigError(f"config file {path} must hold a mapping of keys to values.")
        values = _merge(values, loaded)
    for key in ("base", "data", "output"):
        if getattr(args, key, None):
            values[key] = str(getattr(args, key))
    for _flag, field, _typ, _help in TRAIN_FLAGS:
        v = getattr(args, field, None)
        if v is not None:
            values[field] = v
    if getattr(args, "validation_split", None) is not None:
        values.setdefault("data_config", {})
        values["data_config"] = {**values["data_config"], "validation_split": args.validation_split}
    values = apply_overrides(values, args.set or [])
    return TrainConfig.from_dict(values)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _print_result(result: Any) -> None:
    if not result.main_process:  # data-parallel runs: one report, from the main process
        return
    print(f"run folder:   {result.run_dir}")
    best = f"{result.best_val_loss:.5f}" if result.best_val_loss is not None else "n/a"
    print(f"best step:    {result.best_step} (validation loss {best}); trained {result.final_step} steps; "
          f"{result.stopped}")
    print(f"LoRA:         {result.run_dir / 'lora' / 'pytorch_lora_weights.safetensors'} (diffusers), "
          f"lora_kohya.safetensors (kohya/A1111/ComfyUI)")
    print(f"samples:      {result.samples_dir}/")
    print(f"loss curve:   {result.run_dir / 'loss_curve.png'}")


def cmd_train(args: argparse.Namespace) -> int:
    from finetune.config import TrainConfig, field_help

    if args.help_config:
        for name, default, text in field_help(TrainConfig):
            print(f"{name:36s} {json.dumps(default, default=str):>28s}  {text}")
        return 0
    if args.resume and args.output and (Path(args.output) / "config.yaml").is_file() and not args.config:
        args.config = str(Path(args.output) / "config.yaml")
    cfg = build_train_config(args)
    from finetune.train import train

    _print_result(train(cfg, resume=args.resume, progress=not args.quiet))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from finetune.config import SearchSpace
    from finetune.tune import tune

    cfg = build_train_config(args)
    space = SearchSpace(**(json.loads(args.space) if args.space else {}))
    summary = tune(cfg, Path(args.output), n_trials=args.trials, space=space, progress=not args.quiet,
                   study_name=args.study_name)
    print(summary.table)
    print(f"best trial:   #{summary.best_trial} validation loss {summary.best_value:.5f}")
    print(f"best run:     {summary.best_run_dir}")
    print(f"study:        {summary.storage}  plot: {summary.plot}  table: {summary.csv}")
    return 0


# ---- demo --------------------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    """The whole loop so far on the embedded default: tiny base + synthetic data, no downloads."""
    from finetune.base import write_tiny_base
    from finetune.config import TrainConfig, tiny_overrides
    from finetune.data import format_summary, scan_dataset
    from finetune.synth import make_synthetic_dataset
    from finetune.train import train

    home = _home()
    base = home / "models" / "tiny-sd"
    data = home / "datasets" / "synth"
    print(f"sdloop demo in {home.resolve()}")
    if not (base / "model_index.json").is_file():
        write_tiny_base(base, seed=0, overwrite=True)
        print(f"[1/3] base: wrote the tiny SD-1.x base to {base}")
    else:
        print(f"[1/3] base: reusing {base}")
    if not data.is_dir():
        make_synthetic_dataset(data, n=args.n, seed=0)
        print(f"[2/3] data: drew {args.n} captioned synthetic images into {data}")
    else:
        print(f"[2/3] data: reusing {data}")
    report = scan_dataset(data, progress=not args.quiet)
    report_path = home / "reports" / "synth-data_report.json"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report.save(report_path)
    print(format_summary(report))
    print(f"      data report: {report_path}")
    run_dir = home / "runs" / time.strftime("demo-%Y%m%d-%H%M%S")
    values = {**tiny_overrides(), "base": str(base), "data": str(data), "output": str(run_dir)}
    if args.steps:
        values["max_steps"] = args.steps
    cfg = TrainConfig.from_dict(values)
    print(f"[3/3] train: LoRA rank {cfg.rank} on {len(report.items)} images, up to {cfg.max_steps} steps at "
          f"{cfg.resolution} px (early stopping patience {cfg.early_stopping_patience})")
    result = train(cfg, progress=not args.quiet)
    _print_result(result)
    return 0


# ---- parser ------------------------------------------------------------------------------------------------------
def _add_train_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--base", required=False, help="base pipeline: a diffusers folder or a hub id")
    p.add_argument("--data", required=False, help="dataset folder (imagefolder + metadata.jsonl, or .txt captions)")
    p.add_argument("--output", required=False, help="the folder to write")
    p.add_argument("--config", help="a YAML file of TrainConfig keys (see --help-config)")
    for flag, field, typ, text in TRAIN_FLAGS:
        p.add_argument(flag, dest=field, type=typ, default=None, help=text)
    p.add_argument("--validation-split", dest="validation_split", type=float, default=None,
                   help="fraction held out for validation")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="set any config key, e.g. --set lora_dropout=0.1 --set augment.flip_p=0.5 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdloop", description=(
        "From a folder of images to a fine-tuned Stable Diffusion LoRA: check data, train, search. "
        "Every command works offline on local diffusers folders."))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p_base = sub.add_parser("base", help="base models (make the tiny offline base)")
    base_sub = p_base.add_subparsers(dest="base_command", metavar="ACTION")
    p = base_sub.add_parser("tiny", help="write a tiny SD-1.x pipeline with random weights (no network)")
    p.add_argument("out_dir", help="folder to write (diffusers layout)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty folder")
    p.set_defaults(func=cmd_base_tiny)

    p_data = sub.add_parser("data", help="the dataset stage: check a dataset, draw a synthetic one")
    data_sub = p_data.add_subparsers(dest="data_command", metavar="ACTION")
    p = data_sub.add_parser("check", help="check, clean and de-duplicate a dataset; print a summary, write a report")
    p.add_argument("data_dir", help="dataset folder")
    p.add_argument("--json", help="where to write the JSON report (default: $SDLOOP_HOME/reports/)")
    p.add_argument("--config", help="a train YAML whose data_config section to use")
    p.add_argument("--caption-column", help="caption column of metadata.jsonl (default: text)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="set a data config key, e.g. --set near_duplicate_distance=6")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_check)
    p = data_sub.add_parser("synth", help="draw a small captioned dataset of shapes locally")
    p.add_argument("out_dir", help="folder to write (must not exist or be empty)")
    p.add_argument("--n", type=int, default=32, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--caption-format", choices=("imagefolder", "txt"), default="imagefolder",
                   help="metadata.jsonl (imagefolder) or same-stem .txt files (kohya)")
    p.set_defaults(func=cmd_data_synth)

    p = sub.add_parser("train", help="train a LoRA with a validation split, early stopping and resume")
    _add_train_args(p, required=True)
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and help")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", help="hyperparameter search (optuna) on the validation loss")
    _add_train_args(p, required=True)
    p.add_argument("--trials", type=int, default=10, help="number of trials (a resumed study adds this many)")
    p.add_argument("--space", help='search ranges as JSON, e.g. \'{"rank": [4, 8], "learning_rate": [1e-4, 1e-3]}\'')
    p.add_argument("--study-name", default="sdloop", help="optuna study name inside TUNE_DIR/study.db")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("demo", help="the loop on the embedded default: tiny base, synthetic data, no downloads")
    p.add_argument("--n", type=int, default=32, help="synthetic images")
    p.add_argument("--steps", type=int, default=0, help="training steps (default: the tiny recipe's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    _env_defaults()
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Optional[Callable[[argparse.Namespace], int]] = getattr(args, "func", None)
    if func is None:
        # `sdloop data` without an action prints that group's help
        for name in ("base", "data"):
            if args.command == name:
                parser.parse_args([name, "--help"])
        parser.print_help()
        return 2
    if args.command in ("train", "tune") and not getattr(args, "help_config", False):
        missing = [f"--{k}" for k in ("base", "data", "output") if not getattr(args, k, None)]
        if missing and not (args.command == "train" and args.resume and args.output):
            parser.error(f"{args.command} needs {', '.join(missing)}")
    try:
        return func(args)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted; a training run continues from its last checkpoint with --resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
