"""`sdloop base` and `sdloop data`: write or pretrain the tiny base; check a dataset, draw a synthetic one.

Part of the command line (``sdloop_cli.main`` assembles the parser): it parses and calls the stage; the stage's
``UserError`` becomes one line in ``sdloop_cli.main.main``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any



def cmd_base_tiny(args: argparse.Namespace) -> int:
    from finetune.pretraining.base import BaseModelError, write_base

    from sdloop.families import family_by_name

    family = family_by_name(args.family)
    # a seed asks for random weights, and so does a family without a drawing base
    weights = args.weights or ("random" if args.seed is not None or family.name != "sd1" else "drawing")
    if weights == "drawing" and args.seed is not None:
        raise BaseModelError("--seed draws random weights: use it with --weights random (the drawing base is the "
                             "shipped pretrained one).")
    seed = args.seed or 0
    out = write_base(args.out_dir, weights=weights, seed=seed, overwrite=args.overwrite, family=family.name)
    what = "pretrained on synthetic shapes" if weights == "drawing" else f"random weights, seed {seed}"
    print(f"wrote the tiny {family.title} base ({what}) to {out}")
    print(f"load it with {family.pipeline_class_name}.from_pretrained({str(out)!r}) or pass --base {out}")
    return 0


def cmd_base_pretrain(args: argparse.Namespace) -> int:
    from finetune.pretraining.pretrain import PretrainConfig, pretrain

    values = {k: getattr(args, k) for k in ("seed", "minutes", "vae_steps", "unet_steps", "images", "threads",
                                            "vae_downsamplings", "noise_offset") if getattr(args, k) is not None}
    if args.train_text_encoder:
        values["train_text_encoder"] = True
    # a resume takes the recorded settings, except the step totals typed here; with nothing to resume it says so
    # and starts over with what was typed (finetune.pretraining.pretrain.prepare_out)
    cfg = None if args.resume else PretrainConfig(**values)
    command = ["sdloop", "base", "pretrain", str(args.out_dir)]
    for key in ("seed", "minutes", "vae_steps", "unet_steps", "images", "vae_downsamplings", "noise_offset",
                "threads"):
        if getattr(args, key) is not None:
            command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    command += [f for f, on in (("--train-text-encoder", args.train_text_encoder), ("--resume", args.resume)) if on]
    record = pretrain(args.out_dir, cfg, resume=args.resume, progress=not args.quiet, command=command,
                      given=values if args.resume else None)
    out = Path(args.out_dir).expanduser().resolve()
    print(f"pretrained the tiny SD-1.x base into {out} in {record['wall_seconds'] / 60:.1f} min "
          f"(VAE {record['phases']['vae']['steps']} steps, UNet {record['phases']['unet']['steps']} steps)")
    shares = record["scores"]["shares"]
    print("caption following (pixel checker, 64 prompts): " + "  ".join(f"{k} {v:.2f}" for k, v in shares.items()))
    print(f"samples: {out / 'pretrain' / 'samples.png'}  loss curves: {out / 'pretrain' / 'loss_curves.png'}")
    print(f"record:  {out / 'sdloop_base.json'}")
    return 0


def _data_config(args: argparse.Namespace) -> Any:
    from finetune.training.config import DataConfig, TrainConfig, build_dataclass
    from sdloop.overrides import apply_overrides

    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values = TrainConfig.from_yaml(args.config).data_config.__dict__.copy()
    values = apply_overrides(DataConfig, values, args.set or [])  # the one --set parser of every command
    if getattr(args, "caption_column", None):
        values["caption_column"] = args.caption_column
    return build_dataclass(DataConfig, values, prefix="data.")


def cmd_data_check(args: argparse.Namespace) -> int:
    from finetune.data.check import DatasetError, check_dataset, format_summary
    from finetune.data.files import display, is_text
    from sdloop.workspace import reports_dir

    column = args.caption_column
    if column is not None and (not column.strip() or not is_text(column)):
        raise DatasetError(f"--caption-column {display(column)!r} is not a column name; name the metadata.jsonl "
                           "column that holds the captions (default: text).")
    cfg = _data_config(args)
    name = Path(args.data_dir).expanduser().resolve().name or "dataset"
    result = check_dataset(args.data_dir, cfg, args.json, reports_dir() / f"{name}-data_report.json",
                           progress=not args.quiet)
    report = result.report
    print(format_summary(report))
    if "preference" in report.stats:  # a preference dataset: usable means usable lines, split by prompt
        if report.preferences:
            print(f"split (seed {cfg.split_seed}, by prompt): {len(result.train)} train / "
                  f"{len(result.validation)} validation preferences")
        print(f"report: {display(result.report_path)}")
        if not report.preferences:
            print(f"error: no usable preferences left in {display(args.data_dir)}; the report lists why each line "
                  "was skipped.", file=sys.stderr)
            return 1
        return 0
    if report.items:
        print(f"split (seed {cfg.split_seed}): {len(result.train)} train / {len(result.validation)} validation")
    print(f"report: {display(result.report_path)}")
    if not report.items:
        print(f"error: no usable images left in {display(args.data_dir)}; the report lists why each file was "
              "skipped.", file=sys.stderr)
        return 1
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from finetune.data.files import display
    from finetune.data.synth import make_synthetic_dataset

    out = make_synthetic_dataset(args.out_dir, n=args.n, seed=args.seed, size=args.size,
                                 caption_format=args.caption_format)
    print(f"wrote {args.n} synthetic captioned images to {display(out)}")
    return 0


def pretrain_default(name: str) -> Any:
    """A PretrainConfig default, as `sdloop base pretrain --help` shows it (one source: the config)."""
    import dataclasses

    from finetune.pretraining.pretrain import PretrainConfig

    return {f.name: f.default for f in dataclasses.fields(PretrainConfig)}[name]


def add_parsers(sub: Any, parser: argparse.ArgumentParser) -> None:
    """Add this module's commands to the top-level subparsers."""
    p_base = sub.add_parser("base", help="base models (make the tiny offline base)")
    base_sub = p_base.add_subparsers(dest="base_command", metavar="ACTION")
    p = base_sub.add_parser("tiny", help="write the tiny SD-1.x pipeline: pretrained on shapes, or random weights "
                            "(no network)")
    p.add_argument("out_dir", help="folder to write (diffusers layout)")
    p.add_argument("--weights", choices=("drawing", "random"), default=None,
                   help="drawing (default): the shipped base pretrained on synthetic shapes; random: random weights "
                   "(fastest for tests)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of random weights (implies --weights random; default: none, the drawing weights)")
    p.add_argument("--family", default="sd1", metavar="FAMILY",
                   help="sd1 (default) or sdxl: a tiny SDXL pipeline (two text encoders, size/crop conditioning), "
                   "random weights only")
    p.add_argument("--overwrite", action="store_true", help="replace a base sdloop wrote earlier (never other "
                   "folders)")
    p.set_defaults(func=cmd_base_tiny)
    p = base_sub.add_parser("pretrain", help="pretrain the tiny base on synthetic shapes (VAE, then UNet), "
                            "resumable")
    p.add_argument("out_dir", help="folder to write (a diffusers pipeline, with pretrain/ records beside it)")
    p.add_argument("--seed", type=int, default=None,
                   help=f"seed of the data, weights and every draw (default {pretrain_default('seed')})")
    p.add_argument("--minutes", type=float, default=None,
                   help=f"time budget of both phases in minutes (default {pretrain_default('minutes'):g})")
    p.add_argument("--vae-steps", type=int, default=None, help="VAE steps (default: from --minutes)")
    p.add_argument("--unet-steps", type=int, default=None, help="UNet steps (default: from --minutes)")
    p.add_argument("--images", type=int, default=None,
                   help=f"synthetic training images (default {pretrain_default('images')})")
    p.add_argument("--vae-downsamplings", type=int, choices=(2, 3), default=None,
                   help=f"2: 16x16 latents at 64 px; 3: 8x8 (default {pretrain_default('vae_downsamplings')})")
    p.add_argument("--noise-offset", type=float, default=None,
                   help=f"offset noise of the UNet phase (default {pretrain_default('noise_offset')})")
    p.add_argument("--train-text-encoder", action="store_true", help="train the text encoder too")
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch CPU threads (default {pretrain_default('threads')}: on a shared machine a second "
                   "thread that waits for a busy core made steps several times slower)")
    p.add_argument("--resume", action="store_true", help="continue the pretraining in OUT_DIR from its last "
                   "checkpoint, with its recorded settings (step totals given here replace the recorded ones); "
                   "with no checkpoint yet it says so and starts over")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_base_pretrain)

    p_data = sub.add_parser("data", help="the dataset stage: check a dataset, draw a synthetic one")
    data_sub = p_data.add_subparsers(dest="data_command", metavar="ACTION")
    parser.set_defaults(group_parsers={"base": p_base, "data": p_data})
    p = data_sub.add_parser("check", help="check, clean and de-duplicate a dataset; print a summary, write a report")
    p.add_argument("data_dir", help="dataset folder")
    p.add_argument("--json", help="where to write the JSON report (default: $SDLOOP_HOME/reports/)")
    p.add_argument("--config", help="a train YAML whose data_config section to use (default: none, DataConfig's "
                   "defaults)")
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
