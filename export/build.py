"""``sdloop export``: a finished run folder in, a checked and optimised ONNX export folder out.

Steps (a progress bar shows each): load the base with the run's best LoRA, fuse and check the fusion, export with
optimum, quantise (int8) and optimise per target keeping only what measurements show pays, store large graphs with
external data, run ``onnx.checker``, compare the export's images with the fused PyTorch pipeline's, and write
``manifest.json`` (``sdloop.exportfolder.ExportManifest``: every file's size and SHA-256, the runtime it was measured
with, its native size and limits, the source run, the parity and latency figures). Parity and latency are measured
through the one loader every stage uses (``sdloop.exportload.open_export``). The folder is built under a temporary
name and renamed into place at the end (``export.output``: where an export may be written, its marker, the
leftovers of killed exports), so a failed export (a parity failure included) leaves the previous export as it was.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from export.config import ExportConfig
from export.output import prepare_output
from sdloop.exportfolder import MARKER, ExportManifest

__all__ = ["ExportConfig", "ExportResult", "MARKER", "build_export", "export_pipeline", "prepare_output"]


@dataclass
class ExportResult:
    """Where the export is, what its manifest says, and the summary table printed at the end."""

    export_dir: Path
    manifest: dict[str, Any]
    summary: str


# -- small helpers ----------------------------------------------------------------------------------------------------

EXPORT_PACKAGES = ("sdloop", "torch", "diffusers", "transformers", "peft", "optimum", "optimum-onnx", "onnx",
                   "onnxruntime", "onnxruntime-gpu", "tensorrt")


def evaluation_summary(eval_dir: Path) -> Optional[dict[str, Any]]:
    """The fine-tuned model's headline values from ``eval/eval.json`` when the run was evaluated, else None."""
    path = Path(eval_dir) / "eval.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        label = data.get("models", [None, None])[-1]
        metrics = {k: m["values"][label]["value"] for k, m in data.get("metrics", {}).items()
                   if m.get("computed") and label in m.get("values", {})}
        return {"path": str(path), "model": label, "metrics": metrics}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {"path": str(path), "error": "eval.json could not be read"}


def _latency(pipe: Any, seconds: list[float], cfg: "ExportConfig", size: int) -> Optional[float]:
    """Median seconds per image of a warm pipeline: ``seconds`` already timed, topped up to ``latency_images``."""
    from export.fuse import generate

    missing = cfg.latency_images - len(seconds)
    if missing > 0:
        seconds = seconds + generate(pipe, [(cfg.prompts[0], cfg.seeds[0])] * missing, cfg.steps, size,
                                     cfg.guidance_scale)[1]
    return round(statistics.median(seconds), 4) if seconds else None


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


# -- the export --------------------------------------------------------------------------------------------------------

class _Steps:
    """A tqdm bar over the export's steps (stderr, with ETA), quiet when progress is off."""

    def __init__(self, total: int, progress: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="export", unit="step", file=sys.stderr, disable=not progress,
                        bar_format="{desc}: {n_fmt}/{total_fmt} steps |{bar}| {elapsed}<{remaining}")

    def start(self, what: str) -> None:
        self.bar.set_description_str(f"export: {what}")

    def done(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _check_cases(cfg: ExportConfig) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(parity cases, extra cases): every prompt x seed, and for int8 more seeds of the same prompts until the KID
    sets hold ``int8_images`` images."""
    cases = [(p, s) for p in cfg.prompts for s in cfg.seeds]
    extra: list[tuple[str, int]] = []
    if cfg.precision == "int8":
        seed = max(cfg.seeds) + 1
        while len(cases) + len(extra) < cfg.int8_images:
            extra += [(p, seed) for p in cfg.prompts]
            seed += 1
        extra = extra[:max(0, cfg.int8_images - len(cases))]
    return cases, extra


def _optimise(tmp: Path, cfg: ExportConfig, rt: dict[str, Any], size: int, external: int, steps: "_Steps"
              ) -> dict[str, Any]:
    """int8 quantisation (when asked) and the target's optimisation, each kept only where it measures faster."""
    from export import optimize as opt

    optimizations: dict[str, Any] = {}
    if cfg.precision == "int8":
        steps.start("int8 quantisation")
        optimizations["int8"] = opt.quantize_int8(tmp, rt, size, cfg.reps, cfg.keep, external, steps.start)
        steps.done()
    steps.start(f"{cfg.target} optimisation")
    if cfg.target == "cpu":
        optimizations["graph"] = opt.optimize_cpu(tmp, rt, size, cfg.reps, cfg.keep, external, steps.start)
    elif cfg.target == "cuda":
        optimizations["cuda"] = opt.optimize_cuda(tmp, cfg.precision, external, steps.start)
    else:
        optimizations["tensorrt"] = {"engine_cache": opt.TRT_CACHE, "fp16": cfg.precision == "fp16"}
    steps.done()
    return optimizations


def _parity(tmp: Path, cfg: ExportConfig, rt: dict[str, Any], cases: list, extra: list, reference: list, size: int,
            steps: "_Steps") -> tuple[dict[str, Any], Any, Optional[float]]:
    """The exported pipeline's images against the fused PyTorch ones: (figures, tolerance used, latency)."""
    import gc

    from export import onnx as ox
    from export.fuse import generate
    from sdloop.exportload import open_export

    steps.start("parity with PyTorch")
    ort_pipe = open_export(tmp, verify=False, runtime=rt).pipe   # as the service will run it
    generate(ort_pipe, cases[:1], 1, size, cfg.guidance_scale)  # warm-up: first runs allocate
    images, ort_seconds = generate(ort_pipe, cases + extra, cfg.steps, size, cfg.guidance_scale)
    ort_lat = _latency(ort_pipe, ort_seconds, cfg, size)
    del ort_pipe
    gc.collect()
    figures = ox.compare_images(reference[:len(cases)], images[:len(cases)])
    steps.done()
    max_kid = None
    if cfg.precision == "int8":
        steps.start("int8 KID")
        from export.quality import kid

        figures["kid"], figures["kid_std"] = (round(v, 6) for v in kid(reference, images))
        figures["kid_images"] = len(images)
        max_kid = cfg.int8_max_kid
        steps.done()
    tolerance = ox.check_parity(figures, cfg.precision, {**ox.TOLERANCES[cfg.precision], **cfg.tolerances},
                                max_kid=max_kid)
    return figures, tolerance, ort_lat


@dataclass
class _Shape:
    """What the PyTorch pipeline says about its export (read before the pipeline is dropped): its family and sizes."""

    side_multiple: int   # a side must be a multiple of it: the VAE's scale times the UNet's downsamplings
    max_tokens: int      # the prompt length every text encoder takes (SDXL: both tokenizers', the smaller)
    family: str          # sdloop.families: picks the ORT class and the components the export must hold

    @classmethod
    def of(cls, pipe: Any, family_name: Optional[str] = None) -> "_Shape":
        """``family_name``: the run's base's family (it tells sd2 from sd1, which a pipeline's class does not)."""
        from sdloop.families import family_by_name, family_of

        family = family_by_name(family_name) if family_name else \
            family_of({**dict(pipe.config), "_class_name": type(pipe).__name__})
        blocks = len(getattr(pipe.unet.config, "block_out_channels", None) or [0])
        tokens = [int(getattr(pipe, name).model_max_length) for name in family.tokenizers
                  if getattr(pipe, name, None) is not None]
        return cls(int(getattr(pipe, "vae_scale_factor", 8)) * 2 ** max(0, blocks - 1), min(tokens), family.name)


def _manifest(tmp: Path, export_id: str, cfg: ExportConfig, source: dict[str, Any], size: int, shape: _Shape,
              threads: int, fusion: Any, figures: dict[str, Any], tolerance: Any,
              latency: tuple[Optional[float], Optional[float]], optimizations: dict[str, Any], checker: Any,
              rt: dict[str, Any]) -> ExportManifest:
    """EXPORT_DIR/manifest.json: where it came from, what was done to it, how to run it, the sizes it serves (native:
    the size it was checked at, the run's training resolution), every file's hash, and the figures that prove it."""
    from export import onnx as ox
    from sdloop.exportfolder import file_table, limits_for
    from sdloop.provenance import git_commit, package_versions

    pt_lat, ort_lat = latency
    extra = {k: v for k, v in source.items() if k not in ("source_run", "family")}
    extra.update({
        "checks": {"prompts": list(cfg.prompts), "seeds": list(cfg.seeds), "steps": cfg.steps, "size": size,
                   "guidance_scale": cfg.guidance_scale},
        "fusion": fusion.to_dict(), "optimizations": optimizations, "parts": ox.sizes(tmp), "checker": checker,
        "config": dataclasses.asdict(cfg), "packages": package_versions(EXPORT_PACKAGES), "git_commit": git_commit(),
    })
    return ExportManifest(
        export_id=export_id, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), target=cfg.target,
        precision=str(cfg.precision), native_width=size, native_height=size, family=shape.family,
        limits=limits_for(size, shape.side_multiple, shape.max_tokens), runtime=rt, files=file_table(tmp),
        source_run=dict(source.get("source_run") or {}),
        parity={**figures, "tolerance": tolerance, "passed": True},
        latency={"pytorch_s": pt_lat, "export_s": ort_lat,
                 "speedup": round(pt_lat / ort_lat, 3) if pt_lat and ort_lat else None,
                 "threads": threads, "steps": cfg.steps, "size": size, "pytorch": "eager, fused LoRA"},
        extra=extra)


def export_pipeline(pipe: Any, output: Path, cfg: ExportConfig, source: dict[str, Any], size: int,
                    progress: bool = True) -> ExportResult:
    """Fuse ``pipe``'s LoRA, export, optimise, check and write ``output`` atomically (see the module docstring).

    ``source`` goes into the manifest as it is (the run it came from; ``family``, when given, is its base's model
    family); ``size`` is the check images' side and the export's native size.
    """
    import gc

    import torch

    from export import onnx as ox
    from export import optimize as opt
    from export.fuse import fuse_and_check, generate
    from export.output import building, clean_leftovers, describe, write_marker
    from sdloop.atomic import write_json_atomic

    run_path = (source.get("source_run") or {}).get("path")
    output = prepare_output(output, Path(run_path) if run_path else None)
    removed = clean_leftovers(output)
    export_id = uuid.uuid4().hex
    shape = _Shape.of(pipe, source.get("family"))
    threads = cfg.threads or opt.default_threads()
    cases, extra = _check_cases(cfg)
    external = int(cfg.external_data_mb * 1e6)
    steps = _Steps(6 + 2 * (cfg.precision == "int8"), progress)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        steps.start("fuse the LoRA")
        pipe.set_progress_bar_config(disable=True)
        fusion, reference, pt_seconds = fuse_and_check(pipe, cases, cfg.steps, size, cfg.guidance_scale)
        if extra:
            more, more_seconds = generate(pipe, extra, cfg.steps, size, cfg.guidance_scale)
            reference, pt_seconds = reference + more, pt_seconds + more_seconds
        pt_lat = _latency(pipe, pt_seconds, cfg, size)   # warm: the unfused images ran first
        steps.done()
        with building(output, export_id) as tmp:
            steps.start("optimum ONNX export")
            ox.export_onnx(pipe, tmp, opset=cfg.opset or None)
            del pipe
            gc.collect()
            ox.fix_permissions(tmp)
            for path in ox.graph_paths(tmp).values():
                ox.store_graph(path, external)
            steps.done()
            rt = opt.runtime(cfg.target, cfg.precision, threads)
            optimizations = _optimise(tmp, cfg, rt, size, external, steps)
            ox.fix_permissions(tmp)
            steps.start("onnx.checker")
            checker = ox.check_graphs(tmp)
            steps.done()
            figures, tolerance, ort_lat = _parity(tmp, cfg, rt, cases, extra, reference, size, steps)
            steps.start("manifest")
            ox.fix_permissions(tmp)
            manifest = _manifest(tmp, export_id, cfg, source, size, shape, threads, fusion, figures, tolerance,
                                 (pt_lat, ort_lat), optimizations, checker, rt).to_dict()
            write_json_atomic(tmp / "manifest.json", manifest)
            write_marker(tmp, export_id, finished=True)   # last: the folder is a finished export from here on
            prepare_output(output, Path(run_path) if run_path else None)  # still ours to replace, after minutes
            steps.done()
    finally:
        steps.close()
        torch.set_num_threads(old_threads)
    summary = summary_table(manifest)
    return ExportResult(output, manifest, summary + ("\n" + describe(removed) if removed else ""))


def build_export(run_dir: Path, output: Optional[Path] = None, cfg: Optional[ExportConfig] = None,
                 progress: bool = True) -> ExportResult:
    """Export a finished run folder (its best LoRA, fused) to ``output`` (default: under the workspace's exports)."""
    from export.optimize import require_target
    from sdloop.runfolder import RunFolder
    from sdloop.workspace import exports_dir

    cfg = cfg or ExportConfig()
    run = RunFolder(run_dir).require_finished()
    m = run.manifest()
    require_target(cfg.target)
    if output is None:
        output = exports_dir() / f"{run.path.resolve().name}-{cfg.target}-{cfg.precision}"
    prepare_output(output, run.path)
    source = {
        "source_run": {"path": str(run.path.resolve()), "name": run.path.resolve().name,
                       "manifest": m.to_dict()},
        "base_model": m.base_model, "base_fingerprint": m.base_fingerprint, "dataset": m.dataset,
        "dataset_fingerprint": m.dataset_fingerprint, "best_step": m.best_step, "best_val_loss": m.best_val_loss,
        "evaluation": evaluation_summary(run.eval_dir), "family": run.family().name,
    }
    # passed straight in: export_pipeline drops the PyTorch pipeline once exported (an SD-1.5 one is 4 GB). A run
    # whose base is of another family than its LoRA (a base folder swapped since) is refused by load_pipeline in one
    # line naming both families.
    return export_pipeline(run.load_pipeline(lora=True), output, cfg, source, cfg.size or run_resolution(run),
                           progress)


def run_resolution(run: Any) -> int:
    """The run's training resolution: its manifest's, or its config.yaml's for runs whose manifest lacks it."""
    import yaml

    try:
        if "resolution" in json.loads(run.manifest_path.read_text(encoding="utf-8")):
            return int(run.manifest().resolution)
        return int((yaml.safe_load(run.config.read_text(encoding="utf-8")) or {}).get("resolution", 512))
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError):
        return 512


def summary_table(manifest: dict[str, Any]) -> str:
    """The table printed at the end of an export: parts and sizes, parity, latency before and after."""
    lines = [f"export {manifest.get('target')}/{manifest.get('precision')} of run "
             f"{manifest.get('source_run', {}).get('name', '?')}",
             f"  {'part':14s} {'size':>12s}  external data"]
    total = 0
    for part, info in manifest.get("parts", {}).items():
        total += info["bytes"]
        lines.append(f"  {part:14s} {_mb(info['bytes']):>12s}  {'yes' if info['external_data'] else 'no'}")
    lines.append(f"  {'total':14s} {_mb(total):>12s}")
    p = manifest.get("parity", {})
    kid = f"; KID {p['kid']:.4f} (sd {p['kid_std']:.4f}, {p['kid_images']} images)" if "kid" in p else ""
    lines.append(f"  parity: largest pixel difference {p.get('max_pixel_difference', 0):.3f} of 255, "
                 f"PSNR {p.get('psnr', 0):.1f} dB on {p.get('images', 0)} image(s){kid}: passed")
    lat = manifest.get("latency", {})
    if lat.get("pytorch_s") and lat.get("export_s"):
        lines.append(f"  latency per image ({lat['size']}x{lat['size']}, {lat['steps']} steps, {lat['threads']} "
                     f"threads): PyTorch {lat['pytorch_s']:.3f} s -> export {lat['export_s']:.3f} s "
                     f"({lat['speedup']:.2f}x)")
    for kind, parts in manifest.get("optimizations", {}).items():
        for part, r in parts.items() if isinstance(parts, dict) else ():
            if isinstance(r, dict) and "kept" in r:
                lines.append(f"  {kind} {part}: {r['before']['run_s'] * 1000:.1f} -> {r['after']['run_s'] * 1000:.1f} "
                             f"ms per call, {'kept' if r['kept'] else 'not kept (no gain)'}")
    return "\n".join(lines)
