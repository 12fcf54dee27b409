"""Benchmark: where an SD-1.5-size image's time goes on the CPU, and what static shapes and CPU fusions buy.

    nice python benchmarks/onnx_cpu.py [--threads 2] [--rounds 4] [--steps 4] [--size 256] [--workdir DIR]

The end-to-end benchmark (benchmarks/inference.py) gives onnxruntime 1.92x over PyTorch eager at SD-1.5 size, 256
px, 4 steps, against a 2.5x goal. This one splits the image into its parts (text encoder once, UNet once per step
at batch 2 for guidance, VAE decoder once) and times each part, side by side in one process with the same threads:

- PyTorch eager (diffusers' modules, ``torch.inference_mode``);
- onnxruntime as sdloop runs an export (``sdloop.exportload.session_options`` on the cpu runtime: explicit threads,
  no spinning, sequential);
- the same with onnxruntime's free-dimension overrides (static shapes: batch, sequence, latent height and width fixed
  to the served size, so the session plans its memory and picks kernels once);
- the UNet after onnxruntime's transformer-optimizer fusions that have CPU kernels (LayerNormalization,
  SkipLayerNormalization, attention; GroupNorm, BiasSplitGelu and NhwcConv are CUDA-only and left out).

Rounds alternate the order (a drifting load hits every variant alike); before each timing the script waits up to 10 s
for other processes to leave the CPU and reports how busy it was. The pipeline (random SD-1.5 weights: latency does
not depend on them) and its plain optimum export are built once into the work folder (about 10 minutes and 7 GB).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _bench(name: str) -> Any:
    """A sibling benchmark module, loaded by path (one implementation of the SD-1.5 case and the idle wait)."""
    spec = importlib.util.spec_from_file_location(f"sdloop_bench_{name}", HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build(work: Path) -> Path:
    """The SD-1.5-architecture pipeline (benchmarks/inference.py's sd15 case) and its plain optimum export."""
    import gc

    from export.onnx import export_onnx

    inference = _bench("inference")
    case = inference.sd15_case(work)
    plain = work / "sd15-plain-optimum"
    if not (plain / "vae_decoder" / "model.onnx").is_file():
        inference.log("plain optimum export of the SD-1.5-size pipeline")
        pipe = case["base"]()
        export_onnx(pipe, plain)
        del pipe
        gc.collect()
    return plain


def fused_unet(plain: Path, work: Path) -> tuple[Path, dict[str, int]]:
    """The UNet after the transformer optimizer's CPU fusions (built once), and the fused operator counts."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    out = work / "sd15-unet-cpu-fused" / "model.onnx"
    opts = FusionOptions("unet")
    for cuda_only in ("enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu", "enable_bias_add",
                      "enable_nhwc_conv", "enable_packed_kv", "enable_packed_qkv"):
        setattr(opts, cuda_only, False)
    stats: dict[str, int] = {}
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            model = optimize_model(str(plain / "unet" / "model.onnx"), model_type="unet", num_heads=0, hidden_size=0,
                                   opt_level=0, optimization_options=opts, use_gpu=False)
        except TypeError:  # onnxruntime 1.32's UNet attention fusion on numpy 2 (see export/optimize.py)
            opts.enable_attention = False
            model = optimize_model(str(plain / "unet" / "model.onnx"), model_type="unet", num_heads=0,
                                   hidden_size=0, opt_level=0, optimization_options=opts, use_gpu=False)
        stats = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
        model.save_model_to_file(str(out), use_external_data_format=True)
    return out, stats


def sessions(plain: Path, fused: Path, threads: int, size: int) -> dict[str, tuple[Any, str]]:
    """onnxruntime sessions as sdloop runs an export, with and without static shapes."""
    import onnxruntime as ort

    from export.optimize import runtime
    from sdloop.exportload import session_options

    lat = size // 8
    static = {"text_encoder": {"batch_size": 1, "sequence_length": 77},
              "unet": {"batch_size": 2, "sequence_length": 77, "height": lat, "width": lat},
              "vae_decoder": {"batch_size": 1, "latent_height": lat, "latent_width": lat}}
    out = {}
    for part in ("text_encoder", "unet", "vae_decoder"):
        for label, path, overrides in ((f"ort {part}", plain / part / "model.onnx", {}),
                                       (f"ort {part} static", plain / part / "model.onnx", static[part]),
                                       *(((f"ort {part} cpu-fused", fused, {}),) if part == "unet" else ())):
            rt = {**runtime("cpu", "fp32", threads), "free_dimension_overrides": overrides}
            out[label] = (ort.InferenceSession(str(path), session_options(rt), providers=["CPUExecutionProvider"]),
                          part)
    return out


def torch_parts(work: Path, size: int) -> dict[str, Callable[[], Any]]:
    """PyTorch eager calls of the same three parts with the same shapes."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    base = work / "sd15-random"
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae").eval()
    text = CLIPTextModel.from_pretrained(base, subfolder="text_encoder").eval()
    lat = size // 8
    x, t, e = torch.randn(2, 4, lat, lat), torch.tensor([500, 500]), torch.randn(2, 77, 768)
    z, ids = torch.randn(1, 4, lat, lat), torch.randint(0, 400, (1, 77))

    def run(f: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            with torch.inference_mode():
                return f()
        return call

    return {"pytorch text_encoder": run(lambda: text(ids)), "pytorch unet": run(lambda: unet(x, t, e)),
            "pytorch vae_decoder": run(lambda: vae.decode(z))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=4, help="UNet calls per image in the end-to-end sums")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--workdir", default=None, help="default $SDLOOP_HOME/benchmarks")
    args = p.parse_args(argv)

    import torch

    from export.optimize import sample_feeds
    from sdloop.workspace import home

    torch.set_num_threads(args.threads)
    work = Path(args.workdir) if args.workdir else home() / "benchmarks"
    work.mkdir(parents=True, exist_ok=True)
    wait_idle = _bench("inference").wait_idle
    plain = build(work)
    fused, stats = fused_unet(plain, work)
    calls: dict[str, Callable[[], Any]] = dict(torch_parts(work, args.size))
    for label, (sess, part) in sessions(plain, fused, args.threads, args.size).items():
        f = sample_feeds(sess, part, args.size)
        calls[label] = lambda s=sess, f=f: s.run(None, f)
    for call in calls.values():
        call()  # warm-up: first runs allocate
    times: dict[str, list[float]] = {k: [] for k in calls}
    busy: list[float] = []
    names = list(calls)
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            busy.append(wait_idle(10.0))
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in times.items()}
    print(f"SD-1.5 architecture, {args.size}x{args.size}, {args.threads} threads, {args.rounds} rounds; CPU busy "
          f"with other processes {statistics.median(busy):.0%} (median), load average {os.getloadavg()[0]:.2f}")
    if stats:
        print(f"CPU fusions in the UNet: {stats}")
    print(f"{'part / variant':34s} {'best s':>8s} {'median s':>9s}  vs PyTorch (best)")
    for k, v in times.items():
        part = k.split()[1]
        ratio = best[f"pytorch {part}"] / best[k]
        print(f"{k:34s} {best[k]:8.3f} {statistics.median(v):9.3f}  {ratio:.2f}x")
    print(f"\none image = text encoder + {args.steps} x UNet + VAE decoder (best times):")

    def image(te: str, unet: str, vae: str) -> float:
        return best[te] + args.steps * best[unet] + best[vae]

    pt = image("pytorch text_encoder", "pytorch unet", "pytorch vae_decoder")
    for label, combo in (("PyTorch eager", ("pytorch text_encoder", "pytorch unet", "pytorch vae_decoder")),
                         ("onnxruntime as exported", ("ort text_encoder", "ort unet", "ort vae_decoder")),
                         ("onnxruntime, static shapes", ("ort text_encoder static", "ort unet static",
                                                         "ort vae_decoder static")),
                         ("onnxruntime, CPU-fused UNet", ("ort text_encoder", "ort unet cpu-fused",
                                                          "ort vae_decoder"))):
        s = image(*combo)
        print(f"  {label:30s} {s:7.2f} s  {pt / s:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
