"""`sdloop demo`: the whole loop on the shipped drawing base, offline.

Part of the command line (``sdloop_cli.main`` assembles the parser): it parses and calls the stage; the stage's
``UserError`` becomes one line in ``sdloop_cli.main.main``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any


from sdloop_cli.train import _print_result

TOTAL = 10  # the demo's numbered steps


def cmd_demo(args: argparse.Namespace) -> int:
    """The loop on the embedded default, on things a person can see: the shipped drawing base learns a new colour
    from synthetic data, and the pixel checker measures it before and after. No downloads, no pretraining."""
    from finetune.training.config import TrainConfig, tiny_overrides
    from finetune.data.check import format_summary, scan_dataset
    from finetune.demo import check_and_report, demo_base, demo_data, demo_recipe, one_thread
    from finetune.training.train import train
    from sdloop.workspace import home, reports_dir, runs_dir

    concept = args.concept
    print(f"sdloop demo in {home()}")
    data, said = demo_data(args.n, concept)  # checks --n before anything is written
    base, base_said = demo_base()
    print(f"[1/{TOTAL}] base: {base_said}")
    print(f"[2/{TOTAL}] data: {said}")
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
    print(f"[3/{TOTAL}] train: LoRA rank {cfg.rank} on {len(report.items)} images, {cfg.max_steps} steps at "
          f"{cfg.resolution} px, batch {cfg.batch_size} (no validation split: the pixel checker judges the result)")
    with one_thread():
        result = train(cfg, progress=not args.quiet)
        _print_result(result)
        print(f"[4/{TOTAL}] check: the pixel checker reads {concept!r} prompts drawn by the base and by base + LoRA")
        check = check_and_report(base, result.run_dir, concept)
        for line in check.lines():
            print(f"      {line}")
        print(f"      before/after grid: {result.run_dir / 'concept_before_after.png'}")
        print(f"      scores: {result.run_dir / 'concept_check.json'}")
        print(f"[5/{TOTAL}] eval: FID/KID against the demo images, image statistics, caption following, base vs LoRA")
        evaluation = _demo_evaluation(result.run_dir, data, concept, quiet=args.quiet)
        for line in (evaluation.data.get("decision") or {}).get("lines", []):
            print(f"      {line}")   # what decides the comparison (caption following here), and whether it is noise
        print(f"      report: {evaluation.report}")
        print(f"[6/{TOTAL}] export: fuse the LoRA, ONNX with optimum, parity against PyTorch, publish and promote")
        from export import demo_step

        tag, exported = demo_step(result.run_dir, progress=not args.quiet)
    print(f"      export: {exported.export_dir}")
    print(f"      champion: {tag} (sdloop models list)")
    from sdloop_cli.demo_loop import loop_turn

    with one_thread():
        loop_turn(concept, args.quiet, first=7, total=TOTAL, steps=args.steps)
    print("      serve it yourself (Ctrl-C stops the server):")
    print("      sdloop serve --port 3000")
    print("      curl -s localhost:3000/info        # the version served, its native size (the default), providers")
    print("      curl -s -X POST localhost:3000/txt2img -H 'Content-Type: application/json' "
          f"-d '{{\"prompt\": \"{_demo_prompt(concept)}\", \"seed\": 0}}' -D - -o image.png")
    print("      ID=$(curl -s -D - -o /dev/null -X POST localhost:3000/txt2img -H 'Content-Type: application/json' "
          "-d '{\"prompt\": \"a red circle\"}' | tr -d '\\r' | awk -F': ' 'tolower($1) == \"x-generation-id\" "
          "{print $2}')")
    print("      curl -s -X POST localhost:3000/feedback -H 'Content-Type: application/json' "
          "-d '{\"generation_id\": \"'$ID'\", \"rating\": 5}'   # rate the image you got")
    return 0


def _demo_prompt(concept: str) -> str:
    from finetune.evaluation.shapecheck import eval_captions

    return eval_captions(1, 0, concept=concept)[0]


def _demo_evaluation(run_dir: Path, data: Path, concept: str, quiet: bool) -> Any:
    """The demo's evaluation: concept prompts (the demo trains without a validation split) against its images."""
    from finetune.evaluation.evaluate import evaluate_run
    from finetune.evaluation.shapecheck import eval_captions

    from sdloop.runfolder import RunFolder

    prompts = eval_captions(8, 1, concept=concept)
    # recorded in the run, so `sdloop eval RUN`, `sdloop review` and a retraining's comparison need no flags
    RunFolder(run_dir).write_eval_defaults(prompts, data, why="the demo trains on every image (no validation "
                                                              "split): its concept prompts against its images")
    return evaluate_run(run_dir, prompts=prompts, reference=data, n=8, steps=20, progress=not quiet)


def add_parsers(sub: Any, parser: argparse.ArgumentParser) -> None:
    """Add this module's commands to the top-level subparsers."""
    p = sub.add_parser("demo", help="the loop on the embedded default: tiny base, synthetic data, no downloads")
    p.add_argument("--n", type=int, default=64, help="synthetic images (at least 8; half show the new concept)")
    p.add_argument("--steps", type=int, default=0, help="training steps (default: the tiny recipe's)")
    p.add_argument("--concept", choices=("brown", "tiny", "pink"), default="brown",
                   help="what the fine-tune teaches, a word the drawing base never saw: a colour (brown), a size "
                   "(tiny), or pink, which shows a limit: the base's VAE decodes it badly")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)
