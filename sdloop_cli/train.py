"""`sdloop train` and `sdloop tune`: the config from flags, file and --set, the trainer, the search.

Part of the command line (``sdloop_cli.main`` assembles the parser): it parses and calls the stage; the stage's
``UserError`` becomes one line in ``sdloop_cli.main.main``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional



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
    ("--objective", "objective", str, "sft (the images), dpo (pairs) or kto (thumbs); dpo/kto need a preference "
     "dataset (preferences.jsonl)"),
    ("--beta", "beta", float, "dpo/kto preference strength (0: the objective's default)"),
    ("--desirable-weight", "desirable_weight", float, "kto weight of desirable images"),
    ("--undesirable-weight", "undesirable_weight", float, "kto weight of undesirable images"),
    ("--init-lora", "init_lora", str, "start from this run's LoRA (dpo/kto: also the frozen reference)"),
]


def build_train_config(args: argparse.Namespace, base_values: Optional[dict[str, Any]] = None) -> Any:
    """Config precedence: defaults < --config file < explicit flags < --set key=value."""
    from finetune.training.config import TrainConfig, load_config_file
    from sdloop.overrides import apply_overrides

    values: dict[str, Any] = dict(base_values or {})
    if args.config:
        values = _merge(values, load_config_file(args.config))
    for key in ("base", "data", "output"):
        if getattr(args, key, None):
            values[key] = str(getattr(args, key))
    for _flag, field, _typ, _help in TRAIN_FLAGS:
        v = getattr(args, field, None)
        if v is not None:
            values[field] = v
    if getattr(args, "validation_split", None) is not None:
        values = _merge(values, {"data_config": {"validation_split": args.validation_split}})
    values = apply_overrides(TrainConfig, values, args.set or [])  # the one --set parser of every command
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
    from finetune.training.config import TrainConfig
    from sdloop.overrides import config_help

    if args.help_config:
        print(config_help(TrainConfig))
        return 0
    if args.resume and args.output and (Path(args.output) / "config.yaml").is_file() and not args.config:
        args.config = str(Path(args.output) / "config.yaml")
    cfg = build_train_config(args)
    from finetune.training.train import train

    _print_result(train(cfg, resume=args.resume, progress=not args.quiet))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from finetune.training.tune import parse_space, tune

    space = parse_space(args.space) if args.space is not None else None  # None: the study's own space
    cfg = build_train_config(args)
    summary = tune(cfg, Path(args.output), n_trials=args.trials, space=space, progress=not args.quiet,
                   study_name=args.study_name)
    print(summary.table)
    print(f"best trial:   #{summary.best_trial} validation loss {summary.best_value:.5f}")
    print(f"best run:     {summary.best_run_dir}")
    print(f"study:        {summary.storage} (study {args.study_name!r})")
    print(f"reports:      {summary.plot}  {summary.csv}  {summary.study_dir / 'summary.json'}")
    return 0


def _add_train_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--base", required=False,
                   help="base pipeline: a diffusers folder or a hub id (default: the --config file's)")
    p.add_argument("--data", required=False, help="dataset folder (imagefolder + metadata.jsonl, or .txt captions; "
                   "default: the --config file's)")
    p.add_argument("--output", required=False, help="the folder to write (default: the --config file's)")
    p.add_argument("--config", help="a YAML file of TrainConfig keys (see --help-config; default: none, the flags "
                   "and TrainConfig's defaults)")
    import dataclasses

    from finetune.training.config import DataConfig, TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for flag, field, typ, text in TRAIN_FLAGS:  # None: the config file's value, else TrainConfig's default (shown)
        p.add_argument(flag, dest=field, type=typ, default=None, help=f"{text} (default {defaults[field]})")
    split = {f.name: f.default for f in dataclasses.fields(DataConfig)}["validation_split"]
    p.add_argument("--validation-split", dest="validation_split", type=float, default=None,
                   help=f"fraction held out for validation (default {split})")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="set any config key, e.g. --set lora_dropout=0.1 --set augment.flip_p=0.5 (repeatable; "
                   "default: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_parsers(sub: Any, parser: argparse.ArgumentParser) -> None:
    """Add this module's commands to the top-level subparsers."""
    p = sub.add_parser("train", help="train a LoRA with a validation split, early stopping and resume")
    _add_train_args(p, required=True)
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and help")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", help="hyperparameter search (optuna) on the validation loss")
    _add_train_args(p, required=True)
    p.add_argument("--trials", type=int, default=10, help="number of trials to add (0: only rewrite the reports)")
    p.add_argument("--space", help='search ranges as JSON, e.g. \'{"rank": [4, 8], "learning_rate": [1e-4, 1e-3]}\' '
                   "(default: the study's own space, or the default space for a new study)")
    p.add_argument("--study-name", default="sdloop",
                   help="study inside TUNE_DIR/study.db; its trials and reports go to TUNE_DIR/trials/NAME/")
    p.set_defaults(func=cmd_tune)
