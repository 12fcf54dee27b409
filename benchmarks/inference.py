"""Benchmark: end-to-end image latency of PyTorch eager (fused LoRA) against sdloop's ONNX export, side by side.

    nice python benchmarks/inference.py [--only tiny|sd15] [--threads 2] [--rounds 5] [--target cpu|cuda|tensorrt]
                                        [--workdir DIR] [--json PATH]

Two pipelines, each with a LoRA on the UNet's and text encoder's attention:
- ``tiny``: the tiny offline base (random weights) trained for a few steps with the tiny recipe, 64x64, 20 steps;
- ``sd15``: an SD-1.5-architecture pipeline built with random weights from its published configs (UNet
  320/640/1280/1280 with cross-attention 768, CLIP ViT-L/14 text encoder, the 4-block VAE), 256x256, 4 steps, a
  random rank-8 LoRA. Latency does not depend on the weights.

Each case is exported by sdloop (``export.build``: fuse, optimum, measured CPU optimisation; fp32, and int8 with its
KID check) and, for the tiny case, by optimum alone (the fused pipeline, no optimisation: "plain ORT"; for sd15 the
export's own measurement of its UNet step, plain against optimised, stands in, to keep three 4-GB pipelines in
memory at most). Then one process per variant (each with its own thread pools, so no variant's idle threads slow
another's) loads and warms up its pipeline, and with the same prompt, seed, steps, size and threads the script runs
rounds of one image per variant in turn, the order reversed every other round (so a shared machine's drifting load
hits every variant alike): PyTorch base without LoRA, PyTorch with the fused LoRA, plain ORT, sdloop fp32, sdloop
int8. Before each image the script waits (up to 10 s) for other processes to leave the CPU, as benchmarks/train.py
does. Reported: the median seconds per image with the median over rounds of each round's ratio to PyTorch fused, and
the best (minimum) seconds with their ratio: PyTorch's OpenMP threads stall for seconds when another process takes
a core (ORT's do not), so on a shared machine the best times are the fairer estimate of the uncontended latency.
int8's quality loss (KID and PSNR against the fused PyTorch images, from its export check) is shown beside its
speed. Targets (2 CPU cores): fp32 >= 2x PyTorch on tiny, >= 2.5x on sd15; int8 faster than
fp32; base vs fused within 2%. On a machine with onnxruntime-gpu, ``--target cuda`` / ``tensorrt`` runs the same
comparison on the GPU.
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
# Published configs of stable-diffusion-v1-5 (unet/config.json, vae/config.json, text_encoder/config.json).
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, sample_size=512, norm_num_groups=32)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
LORA_UNET = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_TEXT = ["q_proj", "k_proj", "v_proj", "out_proj"]


def wait_idle(max_wait: float) -> float:
    """benchmarks/train.py's wait for an idle CPU (other processes' load), loaded by path: one implementation."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sdloop_bench_train", HERE / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod._wait_idle(max_wait, threshold=0.3)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


# -- the two cases ----------------------------------------------------------------------------------------------------

def tiny_case(work: Path) -> dict[str, Any]:
    """The tiny base and a short tiny-recipe run on synthetic data; loaders for its pipelines."""
    from finetune.pretraining.base import write_tiny_base
    from finetune.training.config import TrainConfig, tiny_overrides
    from finetune.data.synth import make_synthetic_dataset
    from finetune.training.train import train
    from sdloop.runfolder import RunFolder

    base, data, run = work / "tiny-base", work / "tiny-data", work / "tiny-run"
    if not (base / "model_index.json").is_file():
        write_tiny_base(base)
    if not data.is_dir():
        make_synthetic_dataset(data, n=24, seed=0)
    if not RunFolder(run).is_finished():
        log("training the tiny run (20 steps)")
        os.environ.setdefault("SDLOOP_HOME", str(work / "home"))
        train(TrainConfig.from_dict({**tiny_overrides(), "base": str(base), "data": str(data), "output": str(run),
                                     "max_steps": 20, "validation_every": 10, "sample_every": 20,
                                     "sample_steps": 2, "sample_seeds": [0], "early_stopping_patience": 0}),
              progress=False)
    rf = RunFolder(run)
    return {"name": "tiny", "size": 64, "steps": 20, "int8_images": 8,
            "source": {"source_run": {"name": run.name, "path": str(run)}},
            "base": lambda: rf.load_pipeline(lora=False), "lora": lambda: rf.load_pipeline(lora=True)}


def sd15_case(work: Path) -> dict[str, Any]:
    """An SD-1.5-architecture pipeline with random weights (saved once, reused) and a random rank-8 LoRA."""
    base = work / "sd15-random"
    if not (base / "model_index.json").is_file():
        import torch
        from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        from finetune.pretraining.base import write_tiny_base

        log("building the SD-1.5-architecture pipeline with random weights (about 4 GB)")
        torch.manual_seed(0)
        tiny = write_tiny_base(work / "tiny-base") if not (work / "tiny-base").is_dir() else work / "tiny-base"
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**SD15_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)),
            tokenizer=CLIPTokenizer.from_pretrained(tiny, subfolder="tokenizer"),   # ids only: any tokenizer times
            unet=UNet2DConditionModel(**SD15_UNET),
            scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    skip_prk_steps=True, steps_offset=1),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(base)
        del pipe
        gc.collect()

    def load(lora: bool) -> Any:
        import torch
        from peft import LoraConfig

        from sdloop.pipelines import load_pipeline

        pipe = load_pipeline(str(base))
        pipe.set_progress_bar_config(disable=True)
        if lora:
            torch.manual_seed(1)  # the same random LoRA every time
            pipe.unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=LORA_UNET, init_lora_weights=False))
            pipe.text_encoder.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=LORA_TEXT,
                                                     init_lora_weights=False))
        return pipe

    return {"name": "sd15", "size": 256, "steps": 4, "int8_images": 4,
            "source": {"source_run": {"name": "sd15-random-lora"}}, "base": lambda: load(False),
            "lora": lambda: load(True)}


CASES: dict[str, Callable[[Path], dict[str, Any]]] = {"tiny": tiny_case, "sd15": sd15_case}


# -- exports and timing ------------------------------------------------------------------------------------------------

def exports(case: dict[str, Any], work: Path, threads: int, target: str) -> dict[str, Path]:
    """sdloop's exports (fp32, and int8 on cpu) and optimum's plain export of the same fused pipeline."""
    from export.build import ExportConfig, export_pipeline
    from export.fuse import fuse_lora
    from export.onnx import export_onnx

    out = {}
    precisions = ["fp32", "int8"] if target == "cpu" else ["fp16"]
    for precision in precisions:
        path = work / f"{case['name']}-{target}-{precision}"
        if not (path / "manifest.json").is_file():
            log(f"{case['name']}: sdloop export {target}/{precision}")
            cfg = ExportConfig(target=target, precision=precision, prompts=[PROMPT], seeds=[0], steps=case["steps"],
                               threads=threads, reps=2, int8_images=case["int8_images"])
            print(export_pipeline(case["lora"](), path, cfg, case["source"], case["size"]).summary, file=sys.stderr)
        out[precision] = path
    plain = work / f"{case['name']}-plain-optimum"
    if case["name"] == "sd15":  # its UNet step, plain against optimised, is in the export's own measurement
        return out
    if not (plain / "unet" / "model.onnx").is_file():
        log(f"{case['name']}: plain optimum export of the fused pipeline")
        pipe = case["lora"]()
        fuse_lora(pipe)
        export_onnx(pipe, plain)
        del pipe
        gc.collect()
    out["plain"] = plain
    return out


BASE, FUSED, PLAIN = "pytorch base (no LoRA)", "pytorch fused LoRA", "plain ORT (optimum)"


def load_variant(name: str, case: dict[str, Any], work: Path, threads: int, target: str) -> Any:
    """One pipeline to time: PyTorch (base or fused LoRA), optimum's plain export, or an sdloop export."""
    from export.fuse import fuse_lora
    from export.optimize import runtime
    from sdloop.exportload import load_ort_pipeline, open_export, providers_for, session_options

    if name.startswith("pytorch"):
        pipe = case["base"]() if name == BASE else case["lora"]()
        if name == FUSED:
            fuse_lora(pipe)
        return pipe.to("cuda") if target != "cpu" else pipe
    if name == PLAIN:
        rt = runtime(target, "fp32", threads)
        path = work / f"{case['name']}-plain-optimum"
        return load_ort_pipeline(path, providers_for(rt, path), session_options(rt), rt["use_io_binding"])
    return open_export(work / f"{case['name']}-{target}-{name.split()[-1]}", threads=threads).pipe


def child(name: str, case_name: str, work: Path, threads: int, target: str) -> None:
    """A measuring process: load one variant, warm it up, then time one image per "run" line on stdin."""
    import torch

    torch.set_num_threads(threads)
    case = CASES[case_name](work)
    pipe = load_variant(name, case, work, threads, target)
    pipe.set_progress_bar_config(disable=True)

    def one() -> float:
        g = torch.Generator("cpu").manual_seed(0)
        start = time.perf_counter()
        with torch.inference_mode():
            pipe(PROMPT, num_inference_steps=case["steps"], height=case["size"], width=case["size"], generator=g,
                 output_type="np")
        return time.perf_counter() - start

    one()
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        print(f"{one():.6f}", flush=True)


def time_variants(names: list[str], case: dict[str, Any], work: Path, threads: int, target: str,
                  rounds: int, busy: list[float], idle_wait: float = 10.0) -> dict[str, list]:
    """One process per variant (its own thread pools: no variant's idle threads slow another's), loaded one after
    the other; then ``rounds`` rounds of one image per variant in turn, the order reversed every other round. Before
    each image the CPU must be idle of other processes (up to ``idle_wait`` s; the busy fraction goes to ``busy``)."""
    import subprocess

    procs: dict[str, Any] = {}
    try:
        for name in names:
            log(f"{case['name']}: loading {name}")
            procs[name] = subprocess.Popen(
                [sys.executable, __file__, "--child", name, "--case", case["name"], "--workdir", str(work),
                 "--threads", str(threads), "--target", target], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                text=True)
            if procs[name].stdout.readline().strip() != "ready":
                raise RuntimeError(f"the {name} process failed to start (see its messages above)")
        times: dict[str, list] = {name: [] for name in names}
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                busy.append(wait_idle(idle_wait))
                procs[name].stdin.write("run\n")
                procs[name].stdin.flush()
                times[name].append(float(procs[name].stdout.readline()))
            log(f"{case['name']}: round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names))
        return times
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.stdin.close()
                p.wait(timeout=120)


def ratio(times: dict[str, list], num: str, den: str) -> float:
    """Median over rounds of num/den (how many times faster den is than num)."""
    return round(statistics.median(a / b for a, b in zip(times[num], times[den])), 3)


def run_case(case: dict[str, Any], work: Path, threads: int, rounds: int, target: str) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    paths = exports(case, work, threads, target)
    manifests = {k: json.loads((v / "manifest.json").read_text()) for k, v in paths.items() if k != "plain"}
    sdloop = [f"sdloop {p}" for p in manifests]
    load, busy = load_average(), []
    if case["name"] == "sd15":  # at most three 4-GB pipelines in memory at once; plain ORT from the UNet step below
        first = time_variants([BASE, FUSED], case, work, threads, target, rounds, busy)
        times = {BASE: first[BASE], **time_variants([FUSED, *sdloop], case, work, threads, target, rounds, busy)}
    else:
        first = times = time_variants([BASE, FUSED, PLAIN, *sdloop], case, work, threads, target, rounds, busy)
    result = {"case": case["name"], "size": case["size"], "steps": case["steps"], "threads": threads,
              "rounds": rounds, "load_average": [load, load_average()],
              "busy_before_images": {"median": round(statistics.median(busy), 3), "max": round(max(busy), 3)},
              "median_s": {k: round(statistics.median(v), 4) for k, v in times.items()},
              "best_s": {k: round(min(v), 4) for k, v in times.items()},
              "speedup_vs_pytorch_fused": {k: ratio(times, FUSED, k) for k in times if not k.startswith("pytorch")},
              "best_speedup_vs_pytorch_fused": {k: round(min(times[FUSED]) / min(v), 3) for k, v in times.items()
                                                if not k.startswith("pytorch")},
              "fused_vs_base": ratio(first, FUSED, BASE),
              "quality": {k: {q: m["parity"].get(q) for q in ("psnr", "max_pixel_difference", "kid", "kid_std",
                                                               "kid_images")} for k, m in manifests.items()},
              "optimizations": {k: m["optimizations"] for k, m in manifests.items()},
              "export_latency": {k: m["latency"] for k, m in manifests.items()},
              "times": times}
    if "sdloop int8" in times and "sdloop fp32" in times:
        result["int8_vs_fp32"] = ratio(times, "sdloop fp32", "sdloop int8")
    return result


def table(r: dict[str, Any]) -> str:
    lines = [f"{r['case']}: {r['size']}x{r['size']}, {r['steps']} steps, {r['threads']} threads, {r['rounds']} rounds "
             f"(load average {r['load_average'][0]} -> {r['load_average'][1]}; CPU busy with other processes "
             f"before an image: median {r['busy_before_images']['median']:.0%}, max "
             f"{r['busy_before_images']['max']:.0%})",
             f"  {'variant':24s} {'median s':>9s} {'x PyTorch':>10s} {'best s':>8s} {'x PyTorch':>10s}  "
             "quality vs PyTorch fused"]
    for name, s in r["median_s"].items():
        speed, best = r["speedup_vs_pytorch_fused"].get(name), r["best_speedup_vs_pytorch_fused"].get(name)
        q = r["quality"].get(name.replace("sdloop ", ""), {})
        qual = (f"PSNR {q['psnr']:.1f} dB" + (f", KID {q['kid']:.4f} (sd {q['kid_std']:.4f}, {q['kid_images']} "
                                              f"images)" if q.get("kid") is not None else "")) if q else ""
        lines.append(f"  {name:24s} {s:9.3f} {(f'{speed:.2f}x' if speed else '-'):>10s} {r['best_s'][name]:8.3f} "
                     f"{(f'{best:.2f}x' if best else '-'):>10s}  {qual}")
    lines.append(f"  fused LoRA vs base: {100 * (r['fused_vs_base'] - 1):+.1f}% time per image "
                 "(median over rounds of fused/base)")
    if r.get("int8_vs_fp32"):
        lines.append(f"  int8 vs sdloop fp32: {r['int8_vs_fp32']:.2f}x")
    for precision, opts in r["optimizations"].items():
        for kind, parts in opts.items():
            for part, o in parts.items():
                if isinstance(o, dict) and "before" in o:
                    lines.append(f"  {precision} export, {kind} {part}: {o['before']['run_s'] * 1000:.1f} -> "
                                 f"{o['after']['run_s'] * 1000:.1f} ms per call, load {o['before']['load_s']:.2f} -> "
                                 f"{o['after']['load_s']:.2f} s: {'kept' if o['kept'] else 'not kept'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("tiny", "sd15"), help="one case only")
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads (default 2)")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (one image per variant each)")
    ap.add_argument("--target", choices=("cpu", "cuda", "tensorrt"), default="cpu")
    ap.add_argument("--workdir", help="bases and exports, reused across runs (default $SDLOOP_HOME/benchmarks/"
                    "inference; about 12 GB with sd15)")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.case, Path(args.workdir), args.threads, args.target)
        return 0
    if args.target != "cpu":
        from export.optimize import require_target

        require_target(args.target)
    from sdloop.workspace import home

    work = Path(args.workdir).resolve() if args.workdir else home() / "benchmarks" / "inference"
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for name, make in CASES.items():
        if args.only and args.only != name:
            continue
        results.append(run_case(make(work), work, args.threads, args.rounds, args.target))
        print(table(results[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
