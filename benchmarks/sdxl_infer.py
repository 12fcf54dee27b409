"""Benchmark: end-to-end image latency of the tiny SDXL base, PyTorch eager (fused LoRA) against sdloop's ONNX export.

    nice python benchmarks/sdxl_infer.py [--threads 2] [--rounds 6] [--steps 20] [--size 64] [--int8]
                                         [--workdir DIR] [--json PATH]

The pipeline is the offline tiny SDXL base (``sdloop base tiny DIR --family sdxl``: random weights, two CLIP text
encoders, the UNet's added text/time conditioning) with a random rank-4 LoRA on the UNet's attention and on both text
encoders' q/v projections, the layers a run trains. sdloop exports it as a run is exported (``export.build``: fuse
into the UNet and both encoders, optimum, measured CPU optimisation, parity), once into ``--workdir``; ``--int8`` adds
the int8 export. Then, in one process with the same torch and onnxruntime threads, the same prompt, seed, steps and
size, rounds of one image per variant in turn, the order reversed every other round (A B, B A, ...: a shared
machine's drifting load hits both alike). Before each image the script waits (up to ``--idle-wait`` s) for other
processes to leave the CPU and records how busy it was. Reported: median and best seconds per image, and the median
over rounds of each round's ratio to PyTorch (how many times faster the export is). Latency does not depend on the
weights, so random ones measure what a trained tiny SDXL run costs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

PROMPT = "a red circle on a blue background"
LORA_UNET = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_TEXT = ["q_proj", "v_proj"]
PYTORCH = "PyTorch eager, fused LoRA"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def wait_idle(max_wait: float) -> float:
    """benchmarks/train.py's wait for an idle CPU (other processes' load), loaded by path: one implementation."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sdloop_bench_train", HERE / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod._wait_idle(max_wait, threshold=0.3)


def base(work: Path) -> Path:
    """The tiny SDXL base, written once into the work folder."""
    from finetune.pretraining.base import write_tiny_base

    path = work / "tiny-sdxl-base"
    if not (path / "model_index.json").is_file():
        write_tiny_base(path, seed=0, family="sdxl")
    return path


def with_lora(path: Path) -> Any:
    """The base with the same random LoRA every time (seeded) on the UNet and both text encoders."""
    import torch
    from peft import LoraConfig

    from sdloop.pipelines import load_pipeline

    pipe = load_pipeline(str(path))
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(1)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_UNET, init_lora_weights=False))
    for name in ("text_encoder", "text_encoder_2"):
        getattr(pipe, name).add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TEXT,
                                                   init_lora_weights=False))
    return pipe


def export(path: Path, work: Path, precision: str, args: argparse.Namespace) -> Path:
    """sdloop's export of the LoRA pipeline (cpu, ``precision``), made once."""
    from export.build import ExportConfig, export_pipeline

    out = work / f"tiny-sdxl-cpu-{precision}"
    if not (out / "manifest.json").is_file():
        log(f"sdloop export cpu/{precision}")
        cfg = ExportConfig(precision=precision, prompts=[PROMPT], seeds=[0], steps=args.steps, threads=args.threads,
                           reps=2)
        print(export_pipeline(with_lora(path), out, cfg, {"source_run": {"name": "tiny-sdxl-random-lora"}},
                              args.size, progress=False).summary, file=sys.stderr)
        gc.collect()
    return out


def timer(pipe: Any, args: argparse.Namespace) -> Callable[[], float]:
    """One image of the benchmark's prompt, seed, steps and size; its seconds."""
    import torch

    def one() -> float:
        g = torch.Generator("cpu").manual_seed(0)
        start = time.perf_counter()
        with torch.inference_mode():
            pipe(PROMPT, num_inference_steps=args.steps, height=args.size, width=args.size, generator=g,
                 output_type="np")
        return time.perf_counter() - start
    return one


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from export.fuse import fuse_lora
    from sdloop.exportload import open_export

    torch.set_num_threads(args.threads)
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    path = base(work)
    exports = {f"sdloop export, {p}": export(path, work, p, args) for p in (["fp32", "int8"] if args.int8
                                                                               else ["fp32"])}
    pipe = with_lora(path)
    fuse_lora(pipe)
    runners = {PYTORCH: timer(pipe, args)}
    manifests = {}
    for name, folder in exports.items():
        opened = open_export(folder, threads=args.threads)
        runners[name] = timer(opened.pipe, args)
        manifests[name] = opened.manifest
    for one in runners.values():  # warm-up: first calls allocate and pick kernels
        one()
    names, times, busy = list(runners), {n: [] for n in runners}, []
    load = [round(os.getloadavg()[0], 2)]
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            busy.append(wait_idle(args.idle_wait))
            times[name].append(runners[name]())
        log(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names))
    load.append(round(os.getloadavg()[0], 2))
    return {"size": args.size, "steps": args.steps, "threads": args.threads, "rounds": args.rounds,
            "load_average": load, "busy_before_images": {"median": round(statistics.median(busy), 3),
                                                         "max": round(max(busy), 3)},
            "median_s": {n: round(statistics.median(v), 4) for n, v in times.items()},
            "best_s": {n: round(min(v), 4) for n, v in times.items()},
            "speedup_vs_pytorch": {n: round(statistics.median(a / b for a, b in zip(times[PYTORCH], v)), 3)
                                   for n, v in times.items() if n != PYTORCH},
            "quality": {n: {k: m.parity.get(k) for k in ("psnr", "max_pixel_difference", "kid")}
                        for n, m in manifests.items()},
            "family": {n: m.family for n, m in manifests.items()}, "times": times}


def table(r: dict[str, Any]) -> str:
    lines = [f"tiny SDXL base (random weights, random LoRA), {r['size']}x{r['size']}, {r['steps']} steps, "
             f"{r['threads']} threads, {r['rounds']} rounds (load average {r['load_average'][0]} -> "
             f"{r['load_average'][1]}; CPU busy with other processes before an image: median "
             f"{r['busy_before_images']['median']:.0%}, max {r['busy_before_images']['max']:.0%})",
             "",
             "| variant | median s | best s | vs PyTorch (median of rounds) | quality vs PyTorch fused |",
             "| --- | --- | --- | --- | --- |"]
    for name, s in r["median_s"].items():
        speed = r["speedup_vs_pytorch"].get(name)
        q = r["quality"].get(name) or {}
        qual = f"PSNR {q['psnr']:.1f} dB" if q.get("psnr") is not None else ""
        lines.append(f"| {name} | {s:.4f} | {r['best_s'][name]:.4f} | {f'{speed:.2f}x' if speed else '1x'} | "
                     f"{qual} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads (default 2)")
    ap.add_argument("--rounds", type=int, default=6, help="timed rounds, one image per variant each (default 6)")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps per image (default 20)")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (default 64, the base's)")
    ap.add_argument("--int8", action="store_true", help="add the int8 export")
    ap.add_argument("--idle-wait", dest="idle_wait", type=float, default=5.0,
                    help="seconds to wait for an idle CPU before each image (default 5)")
    ap.add_argument("--workdir", default=None, help="base and exports, reused (default $SDLOOP_HOME/benchmarks/sdxl)")
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args(argv)
    if args.workdir is None:
        from sdloop.workspace import home

        args.workdir = str(home() / "benchmarks" / "sdxl")
    result = run(args)
    print(table(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
