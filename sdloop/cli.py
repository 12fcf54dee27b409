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
    from sdloop.workspace import home

    return home()


# ---- base --------------------------------------------------------------------------------------------------------
def cmd_base_tiny(args: argparse.Namespace) -> int:
    from finetune.base import BaseModelError, write_base

    weights = args.weights or ("random" if args.seed is not None else "drawing")  # a seed asks for random weights
    if weights == "drawing" and args.seed is not None:
        raise BaseModelError("--seed draws random weights: use it with --weights random (the drawing base is the "
                             "shipped pretrained one).")
    seed = args.seed or 0
    out = write_base(args.out_dir, weights=weights, seed=seed, overwrite=args.overwrite)
    what = "pretrained on synthetic shapes" if weights == "drawing" else f"random weights, seed {seed}"
    print(f"wrote the tiny SD-1.x base ({what}) to {out}")
    print(f"load it with StableDiffusionPipeline.from_pretrained({str(out)!r}) or pass --base {out}")
    return 0


def cmd_base_pretrain(args: argparse.Namespace) -> int:
    from finetune.pretrain import PretrainConfig, pretrain

    cfg = None
    values = {k: getattr(args, k) for k in ("seed", "minutes", "vae_steps", "unet_steps", "images", "threads",
                                            "vae_downsamplings", "noise_offset") if getattr(args, k) is not None}
    if args.train_text_encoder:
        values["train_text_encoder"] = True
    if args.resume and values:
        print("note: --resume continues with the settings recorded in OUT_DIR/pretrain/config.json; "
              f"ignoring {', '.join(sorted(values))}", file=sys.stderr)
    elif not args.resume:
        cfg = PretrainConfig(**values)
    command = ["sdloop", "base", "pretrain", str(args.out_dir)]
    for key in ("seed", "minutes", "vae_steps", "unet_steps", "images", "vae_downsamplings", "noise_offset",
                "threads"):
        if getattr(args, key) is not None:
            command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    command += [f for f, on in (("--train-text-encoder", args.train_text_encoder), ("--resume", args.resume)) if on]
    record = pretrain(args.out_dir, cfg, resume=args.resume, progress=not args.quiet, command=command)
    out = Path(args.out_dir).expanduser().resolve()
    print(f"pretrained the tiny SD-1.x base into {out} in {record['wall_seconds'] / 60:.1f} min "
          f"(VAE {record['phases']['vae']['steps']} steps, UNet {record['phases']['unet']['steps']} steps)")
    shares = record["scores"]["shares"]
    print("caption following (pixel checker, 64 prompts): " + "  ".join(f"{k} {v:.2f}" for k, v in shares.items()))
    print(f"samples: {out / 'pretrain' / 'samples.png'}  loss curves: {out / 'pretrain' / 'loss_curves.png'}")
    print(f"record:  {out / 'sdloop_base.json'}")
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
    from finetune.data import DatasetError, check_dataset, format_summary
    from finetune.data_files import display, is_text

    column = args.caption_column
    if column is not None and (not column.strip() or not is_text(column)):
        raise DatasetError(f"--caption-column {display(column)!r} is not a column name; name the metadata.jsonl "
                           "column that holds the captions (default: text).")
    cfg = _data_config(args)
    name = Path(args.data_dir).expanduser().resolve().name or "dataset"
    result = check_dataset(args.data_dir, cfg, args.json, _home() / "reports" / f"{name}-data_report.json",
                           progress=not args.quiet)
    report = result.report
    print(format_summary(report))
    if report.items:
        print(f"split (seed {cfg.split_seed}): {len(result.train)} train / {len(result.validation)} validation")
    print(f"report: {display(result.report_path)}")
    if not report.items:
        print(f"error: no usable images left in {display(args.data_dir)}; the report lists why each file was "
              "skipped.", file=sys.stderr)
        return 1
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from finetune.data_files import display
    from finetune.synth import make_synthetic_dataset

    out = make_synthetic_dataset(args.out_dir, n=args.n, seed=args.seed, size=args.size,
                                 caption_format=args.caption_format)
    print(f"wrote {args.n} synthetic captioned images to {display(out)}")
    return 0


# ---- train -------------------------------------------------------------------------------------------------------
def build_train_config(args: argparse.Namespace, base_values: Optional[dict[str, Any]] = None) -> Any:
    """Config precedence: defaults < --config file < explicit flags < --set key=value."""
    from finetune.config import TrainConfig, apply_overrides, load_config_file

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
        values = apply_overrides(values, [f"data_config.validation_split={args.validation_split}"])
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
    from finetune.tune import parse_space, tune

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


# ---- eval and review ---------------------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a run against its base, or (--compare) two runs against each other; print the table and paths."""
    from finetune.evaluate import compare_runs, evaluate_run

    opts = {"prompts": args.prompts, "n": args.n, "reference": args.reference, "features": args.features,
            "clip": args.clip, "is_classifier": args.is_classifier, "steps": args.steps, "guidance": args.guidance,
            "seed": args.seed, "resamples": args.bootstrap, "quiet": args.quiet}
    if args.compare:
        if len(args.runs) != 2:
            raise UserError(f"--compare needs two run folders (sdloop eval --compare RUN_A RUN_B), "
                            f"got {len(args.runs)}.")
        result = compare_runs(args.runs[0], args.runs[1], out_dir=args.output, **opts)
    else:
        if len(args.runs) != 1:
            raise UserError(f"sdloop eval takes one run folder, got {len(args.runs)}; to compare two runs pass "
                            "--compare RUN_A RUN_B.")
        if args.output:
            raise UserError("--output is for --compare; an evaluation is written into RUN_DIR/eval/.")
        result = evaluate_run(args.runs[0], **opts)
    print("\n".join(result.lines()))
    print(f"images:  {result.generated} generated, {result.reused} reused from earlier evaluations")
    print(f"report:  {result.report}")
    print(f"json:    {result.json_path}")
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    """Serve the blind review page for two runs (``sdloop review summary DIR`` reads the votes)."""
    if args.first == "summary":
        return cmd_review_summary(args)
    from finetune.review import ReviewServer, prepare_review

    folder = prepare_review(args.first, args.second, out_dir=args.dir, prompts=args.prompts, n=args.n,
                            steps=args.steps, guidance=args.guidance, seed=args.seed, progress=not args.quiet)
    server = ReviewServer(folder, host=args.host, port=args.port)
    print(f"review folder: {folder}")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: the page has no login; anyone who can reach {args.host}:{args.port} can vote.")
    print(f"serving the blind review at {server.url}  (Ctrl-C stops; each vote is saved as it is cast)")
    print(f"results: sdloop review summary {folder}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nstopped; the votes are in " + str(folder / "votes.sqlite"))
    finally:
        server.httpd.server_close()
    return 0


def cmd_review_summary(args: argparse.Namespace) -> int:
    """Print the review's win rate, counts and sign test (``--json`` for the numbers as JSON)."""
    from finetune.review import summarize

    summary = summarize(args.second)
    print(json.dumps(summary.to_dict(), indent=2) if args.json else "\n".join(summary.lines()))
    return 0


# ---- export and model versions -----------------------------------------------------------------------------------
def _export_settings(args: argparse.Namespace) -> dict[str, Any]:
    """ExportConfig values from the flags, then --set KEY=VALUE (values read as YAML: numbers, lists, strings)."""
    import yaml

    from export.errors import ExportError

    values: dict[str, Any] = {}
    for key in ("target", "precision", "threads", "steps", "size"):
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    if args.prompt:
        values["prompts"] = list(args.prompt)
    if args.external_data_mb is not None:
        values["external_data_mb"] = args.external_data_mb
    for item in args.set or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ExportError(f"--set {item!r} is not KEY=VALUE, e.g. --set int8_images=16.")
        try:
            values[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ExportError(f"--set {item!r}: the value is not valid YAML.") from None
    return values


def cmd_export(args: argparse.Namespace) -> int:
    """Fuse a run's LoRA, export it with optimum, optimise it for a target, prove parity; print the summary."""
    from export.build import ExportConfig, build_export

    cfg = ExportConfig.from_dict(_export_settings(args))
    result = build_export(Path(args.run_dir), Path(args.output) if args.output else None, cfg,
                          progress=not args.quiet)
    print(result.summary)
    print(f"export:   {result.export_dir}")
    print(f"manifest: {result.export_dir / 'manifest.json'}")
    print(f"publish:  sdloop models publish {result.export_dir}")
    return 0


def cmd_models_help(args: argparse.Namespace) -> int:
    args.models_parser.print_help(sys.stderr)
    return 2


def cmd_models_publish(args: argparse.Namespace) -> int:
    from export.registry import publish

    tag, created = publish(Path(args.export_dir), name=args.name)
    print(f"{'published' if created else 'already published as'} {tag}")
    print(f"promote it: sdloop models promote {tag}")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from export.registry import list_versions

    versions = list_versions(args.name)
    if args.json:
        print(json.dumps([{"tag": v.tag, "stage": v.stage, "created": v.created, "labels": v.labels,
                           "key_metrics": v.key_metrics()} for v in versions], indent=2))
        return 0
    if not versions:
        print(f"no versions of model {args.name!r} yet; publish one with `sdloop models publish EXPORT_DIR`.")
        return 0
    print(f"{'TAG':32s} {'STAGE':9s} {'SOURCE RUN':24s} {'TARGET':14s} {'PUBLISHED (UTC)':19s}  KEY METRICS")
    for v in versions:
        target = f"{v.labels.get('target', '?')}/{v.labels.get('precision', '?')}"
        print(f"{v.tag:32s} {v.stage:9s} {v.labels.get('source_run', '?')[:24]:24s} {target:14s} {v.created:19s}  "
              f"{v.key_metrics()}")
    return 0


def cmd_models_show(args: argparse.Namespace) -> int:
    from export.registry import history, show

    v = show(args.tag, args.name)
    events = [e for e in history(args.name) if v.tag in (e.get("tag"), e.get("previous"))]
    print(json.dumps({"tag": v.tag, "stage": v.stage, "created": v.created, "path": str(v.path),
                      "labels": v.labels, "metadata": v.metadata, "champion_history": events}, indent=2))
    return 0


def cmd_models_promote(args: argparse.Namespace) -> int:
    from export.registry import promote

    e = promote(args.tag, args.reason or "", args.name)
    print(f"champion: {e['tag']} (was {e['previous'] or 'none'}); reason: {e['reason']}")
    return 0


def cmd_models_rollback(args: argparse.Namespace) -> int:
    from export.registry import rollback

    e = rollback(args.reason or "", args.name)
    print(f"champion: {e['tag']} (rolled back from {e['previous']}); reason: {e['reason']}")
    return 0


def cmd_models_prune(args: argparse.Namespace) -> int:
    from export.registry import prune

    gone = prune(args.keep, args.name)
    print(f"deleted {len(gone)} version(s){': ' + ', '.join(gone) if gone else ''}; the champion and the previous "
          "one are always kept")
    return 0


def cmd_models_history(args: argparse.Namespace) -> int:
    from export.registry import history

    events = history(args.name)
    if not events:
        print(f"model {args.name!r} has had no champion yet.")
    for e in events:
        print(f"{e['when']}  {e['action']:8s} {e['tag']}  (was {e.get('previous') or 'none'})  {e['reason']}  "
              f"[{e.get('user', '?')}]")
    return 0


# ---- serve -------------------------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the champion with `bentoml serve` from the repo root, on the workspace's model store and monitoring store.
    The process becomes the BentoML server (exec), so its PID is the server's and Ctrl-C or SIGTERM stops it."""
    from sdloop.workspace import home, use_bentoml_home

    root = Path(__file__).resolve().parent.parent
    if not (root / "bentofile.yaml").is_file() or not (root / "bento" / "service.py").is_file():
        raise UserError(f"{root} is not an sdloop source tree (no bentofile.yaml); serve a built Bento with "
                        "`bentoml serve sdloop:latest` instead.")
    for flag, value, low in (("--workers", args.workers, 0), ("--threads", args.threads, 1),
                             ("--torch-threads", args.torch_threads, 0), ("--port", args.port, 1)):
        if value < low or (flag == "--port" and value > 65535):
            raise UserError(f"{flag} {value} is out of range: use an integer >= {low}"
                            f"{' and <= 65535' if flag == '--port' else ''}.")
    os.environ["SDLOOP_HOME"] = str(home())
    use_bentoml_home()
    os.environ.update({"SDLOOP_WORKERS": str(args.workers or os.cpu_count() or 1), "SDLOOP_THREADS": str(args.threads),
                       "SDLOOP_BACKEND": args.backend})
    if args.torch_threads:
        os.environ["SDLOOP_TORCH_THREADS"] = str(args.torch_threads)
    argv = [sys.executable, "-m", "bentoml", "serve", "bento.service:SDService", "--host", args.host,
            "--port", str(args.port), "--working-dir", str(root)]
    print(f"serving the champion of {os.environ['BENTOML_HOME']} on http://{args.host}:{args.port} "
          f"({os.environ['SDLOOP_WORKERS']} worker(s), {args.backend}); store: "
          f"{os.environ.get('SDLOOP_STORE_URL') or home() / 'monitor.db'}", flush=True)
    os.chdir(root)
    os.execv(argv[0], argv)
    return 0  # not reached


# ---- demo --------------------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    """The loop on the embedded default, on things a person can see: the shipped drawing base learns a new colour
    from synthetic data, and the pixel checker measures it before and after. No downloads, no pretraining."""
    from finetune.config import TrainConfig, tiny_overrides
    from finetune.data import format_summary, scan_dataset
    from finetune.demo import check_and_report, demo_base, demo_data, demo_recipe, one_thread
    from finetune.train import train
    from sdloop.workspace import home, reports_dir, runs_dir

    concept = args.concept
    print(f"sdloop demo in {home()}")
    data, said = demo_data(args.n, concept)  # checks --n before anything is written
    base, base_said = demo_base()
    print(f"[1/7] base: {base_said}")
    print(f"[2/7] data: {said}")
    report = scan_dataset(data, progress=not args.quiet)
    report_path = reports_dir() / f"{data.name}-data_report.json"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report.save(report_path)
    print(format_summary(report))
    print(f"      data report: {report_path}")
    run_dir = runs_dir() / time.strftime("demo-%Y%m%d-%H%M%S")
    values = {**tiny_overrides(), **demo_recipe(), "base": str(base), "data": str(data), "output": str(run_dir)}
    if args.steps:
        values["max_steps"] = args.steps
    cfg = TrainConfig.from_dict(values)
    print(f"[3/7] train: LoRA rank {cfg.rank} on {len(report.items)} images, {cfg.max_steps} steps at "
          f"{cfg.resolution} px, batch {cfg.batch_size} (no validation split: the pixel checker judges the result)")
    with one_thread():
        result = train(cfg, progress=not args.quiet)
        _print_result(result)
        print(f"[4/7] check: the pixel checker reads {concept!r} prompts drawn by the base and by base + LoRA")
        check = check_and_report(base, result.run_dir, concept)
        for line in check.lines():
            print(f"      {line}")
        print(f"      before/after grid: {result.run_dir / 'concept_before_after.png'}")
        print(f"      scores: {result.run_dir / 'concept_check.json'}")
        print("[5/7] eval: FID/KID against the demo images, image statistics, caption following, base vs LoRA")
        evaluation = _demo_evaluation(result.run_dir, data, concept, quiet=args.quiet)
        print(f"      report: {evaluation.report}")
        print("[6/7] export: fuse the LoRA, ONNX with optimum, parity against PyTorch, publish and promote")
        from export import demo_step

        tag, exported = demo_step(result.run_dir, progress=not args.quiet)
    print(f"      export: {exported.export_dir}")
    print(f"      champion: {tag} (sdloop models list)")
    print("[7/7] serve it (Ctrl-C stops the server):")
    print("      sdloop serve --port 3000")
    print("      curl -s -X POST localhost:3000/txt2img -H 'Content-Type: application/json' "
          f"-d '{{\"prompt\": \"{_demo_prompt(concept)}\", \"seed\": 0}}' -D - -o image.png")
    print("      curl -s -X POST localhost:3000/feedback -H 'Content-Type: application/json' "
          "-d '{\"generation_id\": \"<X-Generation-Id from above>\", \"rating\": 5}'")
    return 0


def _demo_prompt(concept: str) -> str:
    from finetune.shapecheck import eval_captions

    return eval_captions(1, 0, concept=concept)[0]


def _demo_evaluation(run_dir: Path, data: Path, concept: str, quiet: bool) -> Any:
    """The demo's evaluation: concept prompts (the demo trains without a validation split) against its images."""
    from finetune.evaluate import evaluate_run
    from finetune.shapecheck import eval_captions

    return evaluate_run(run_dir, prompts=eval_captions(8, 1, concept=concept), reference=data, n=8,
                        steps=20, progress=not quiet)


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
    p = base_sub.add_parser("tiny", help="write the tiny SD-1.x pipeline: pretrained on shapes, or random weights "
                            "(no network)")
    p.add_argument("out_dir", help="folder to write (diffusers layout)")
    p.add_argument("--weights", choices=("drawing", "random"), default=None,
                   help="drawing (default): the shipped base pretrained on synthetic shapes; random: random weights "
                   "(fastest for tests)")
    p.add_argument("--seed", type=int, default=None, help="seed of random weights (implies --weights random)")
    p.add_argument("--overwrite", action="store_true", help="replace a base sdloop wrote earlier (never other "
                   "folders)")
    p.set_defaults(func=cmd_base_tiny)
    p = base_sub.add_parser("pretrain", help="pretrain the tiny base on synthetic shapes (VAE, then UNet), "
                            "resumable")
    p.add_argument("out_dir", help="folder to write (a diffusers pipeline, with pretrain/ records beside it)")
    p.add_argument("--seed", type=int, default=None, help="seed of the data, weights and every draw (default 0)")
    p.add_argument("--minutes", type=float, default=None, help="time budget of both phases (default 25)")
    p.add_argument("--vae-steps", type=int, default=None, help="VAE steps (default: from --minutes)")
    p.add_argument("--unet-steps", type=int, default=None, help="UNet steps (default: from --minutes)")
    p.add_argument("--images", type=int, default=None, help="synthetic training images (default 4096)")
    p.add_argument("--vae-downsamplings", type=int, choices=(2, 3), default=None,
                   help="2: 16x16 latents at 64 px; 3: 8x8 (default: see finetune/pretrain.py)")
    p.add_argument("--noise-offset", type=float, default=None, help="offset noise of the UNet phase (default 0.1)")
    p.add_argument("--train-text-encoder", action="store_true", help="train the text encoder too")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2)")
    p.add_argument("--resume", action="store_true", help="continue the pretraining in OUT_DIR from its last "
                   "checkpoint (with its recorded settings)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_base_pretrain)

    p_data = sub.add_parser("data", help="the dataset stage: check a dataset, draw a synthetic one")
    data_sub = p_data.add_subparsers(dest="data_command", metavar="ACTION")
    parser.set_defaults(group_parsers={"base": p_base, "data": p_data})
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
    p.add_argument("--trials", type=int, default=10, help="number of trials to add (0: only rewrite the reports)")
    p.add_argument("--space", help='search ranges as JSON, e.g. \'{"rank": [4, 8], "learning_rate": [1e-4, 1e-3]}\' '
                   "(default: the study's own space, or the default space for a new study)")
    p.add_argument("--study-name", default="sdloop",
                   help="study inside TUNE_DIR/study.db; its trials and reports go to TUNE_DIR/trials/NAME/")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("eval", help="FID/KID (real Inception), image statistics, HTML report: fine-tuned vs base")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a finished run folder (two with --compare)")
    p.add_argument("--compare", action="store_true", help="compare two runs: RUN_A (champion) and RUN_B (challenger)")
    p.add_argument("--prompts", help="prompt file, one a line (default: the validation split's captions)")
    p.add_argument("--n", type=int, default=None, help="images per model (default: 16, a whole number per prompt)")
    p.add_argument("--reference", help="folder of reference images (default: the validation split's images)")
    p.add_argument("--features", help="TorchScript feature extractor (float RGB 299x299 in [0,1] -> [N, d]) "
                   "instead of the FID Inception")
    p.add_argument("--clip", help="CLIP weights for the CLIP score: a local CLIPModel folder or a hub id")
    p.add_argument("--is-classifier", dest="is_classifier",
                   help="TorchScript classifier for the Inception Score (float RGB 299x299 in [0,1] -> logits)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (the base's scheduler)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="seed of the image seeds and the bootstrap")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--output", help="with --compare: folder to write (default RUN_B/eval/compare-<RUN_A name>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("review", help="blind human review page for two runs; `review summary DIR` reads the votes")
    p.add_argument("first", metavar="RUN_A|summary", help="run A (or `summary` to summarise a review folder)")
    p.add_argument("second", metavar="RUN_B|DIR", help="run B (or, after `summary`, the review folder)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on")
    p.add_argument("--port", type=int, default=8765, help="port to serve on (0: any free port)")
    p.add_argument("--dir", help="review folder (default $SDLOOP_HOME/reviews/<A>-vs-<B>)")
    p.add_argument("--prompts", help="prompt file, one a line (default: run A's validation captions)")
    p.add_argument("--n", type=int, default=None, help="pairs to review (default: 16, a whole number per prompt)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="seed of the image seeds")
    p.add_argument("--json", action="store_true", help="with summary: print the numbers as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_review)

    p = sub.add_parser("export", help="fuse a run's LoRA, export ONNX with optimum, optimise for onnxruntime, "
                       "check parity with PyTorch")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder (sdloop train --output)")
    p.add_argument("--output", help="export folder to write (default $SDLOOP_HOME/exports/<run>-<target>-<precision>)")
    p.add_argument("--target", choices=("cpu", "cuda", "tensorrt"), default=None,
                   help="onnxruntime execution provider to optimise for (default cpu)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default=None,
                   help="cpu: fp32 (default) or int8; cuda/tensorrt: fp16 (default) or fp32")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime/torch threads (default: all cores)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps of the parity images (default 20)")
    p.add_argument("--size", type=int, default=None, help="parity image side in pixels (default: the run's)")
    p.add_argument("--prompt", action="append", help="a parity prompt (repeatable; default: three built in)")
    p.add_argument("--external-data-mb", dest="external_data_mb", type=float, default=None,
                   help="graphs whose weights reach this size use ONNX external data (default 1024)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any export setting, e.g. --set int8_images=16 --set keep=all (see export/build.py)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export)

    p_models = sub.add_parser("models", help="model versions in the BentoML store: publish, list, show, promote, "
                              "rollback, prune, history")
    p_models.set_defaults(func=cmd_models_help, models_parser=p_models)
    models_sub = p_models.add_subparsers(dest="models_command", metavar="ACTION")
    for action, func, text in (
            ("publish", cmd_models_publish, "save an export folder as a new version (labels/metadata: its manifest)"),
            ("list", cmd_models_list, "every version with its stage, source run, key metrics and date"),
            ("show", cmd_models_show, "one version's labels, metadata, folder and champion history"),
            ("promote", cmd_models_promote, "make a version the champion (the service serves it)"),
            ("rollback", cmd_models_rollback, "make the previous champion the champion again"),
            ("prune", cmd_models_prune, "delete old versions, never the champion or the previous one"),
            ("history", cmd_models_history, "when which version was champion, and why")):
        p = models_sub.add_parser(action, help=text)
        if action == "publish":
            p.add_argument("export_dir", metavar="EXPORT_DIR", help="a folder made by sdloop export")
        if action in ("show", "promote"):
            p.add_argument("tag", metavar="TAG", help="NAME:VERSION or VERSION, as `sdloop models list` shows")
        if action in ("promote", "rollback"):
            p.add_argument("--reason", help="why (kept in the history)")
        if action == "prune":
            p.add_argument("--keep", type=int, required=True, help="newest versions to keep (plus the champion "
                           "and the previous one)")
        if action == "list":
            p.add_argument("--json", action="store_true", help="print JSON")
        p.add_argument("--name", default="sdloop", help="model name in the store (default sdloop)")
        p.set_defaults(func=func)

    p = sub.add_parser("serve", help="serve the champion over HTTP with BentoML (txt2img, feedback, /metrics)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 to expose)")
    p.add_argument("--port", type=int, default=3000, help="port (default 3000)")
    p.add_argument("--workers", type=int, default=0, help="worker processes, one pipeline each (default: cores)")
    p.add_argument("--threads", type=int, default=8, help="request threads per worker (default 8)")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch/onnxruntime threads per worker (default: cores / workers)")
    p.add_argument("--backend", choices=("onnx", "pytorch"), default="onnx",
                   help="onnx: the exported onnxruntime pipeline; pytorch: the source run's pipeline (fallback)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="the loop on the embedded default: tiny base, synthetic data, no downloads")
    p.add_argument("--n", type=int, default=64, help="synthetic images (at least 8; half show the new concept)")
    p.add_argument("--steps", type=int, default=0, help="training steps (default: the tiny recipe's)")
    p.add_argument("--concept", choices=("brown", "tiny", "pink"), default="brown",
                   help="what the fine-tune teaches, a word the drawing base never saw: a colour (brown), a size "
                   "(tiny), or pink, which shows a limit: the base's VAE decodes it badly")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    _env_defaults()
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Optional[Callable[[argparse.Namespace], int]] = getattr(args, "func", None)
    if func is None:  # `sdloop`, `sdloop base`, `sdloop data` without an action: that level's help, exit 2
        groups: dict[str, argparse.ArgumentParser] = getattr(args, "group_parsers", {})
        (groups.get(args.command) or parser).print_help(sys.stderr)
        return 2
    try:
        return func(args)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        again = {"tune": "the next `sdloop tune` with the same --output retries the interrupted trial from its "
                         "last checkpoint", "train": "continue the run from its last checkpoint with --resume"}
        print(f"\ninterrupted; {again.get(args.command, 'nothing was left half-written')}.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
