"""The one loader of an export: parity, the gate, the benchmarks, the promotion's smoke test and the service all open
an export folder here, so all of them run it the way its manifest says and measure the same thing.

``open_export(DIR)`` checks the folder (``ExportFolder.verify``: its files, and that its model family agrees with
them), then builds the family's optimum ORT pipeline (``ORTStableDiffusionPipeline`` for SD 1.x/2.x,
``ORTStableDiffusionXLPipeline`` for SDXL: ``sdloop.families``) with the manifest's runtime: its providers in order
(a CUDA or TensorRT export is never silently run on the CPU: a provider this onnxruntime lacks is one line), explicit
intra/inter-op threads, sequential execution, no spinning (idle threads that spin steal the cores from the next
session and from other workers), IO binding where the export used it, and any free-dimension overrides the export
measured as faster. ``smoke_test`` generates one image at the
native size and refuses a model that draws nothing (non-finite or constant pixels).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from sdloop.errors import UserError
from sdloop.exportfolder import ExportFolder, ExportFolderError, ExportManifest


class SmokeTestError(UserError):
    """The model loads but draws nothing usable (or does not load): it must not become the champion."""

    exit_code = 1


def session_options(rt: dict[str, Any], level: str = "ORT_ENABLE_ALL") -> Any:
    """onnxruntime SessionOptions for a runtime section: explicit threads (onnxruntime's default spins a thread per
    core), sequential execution, spinning as recorded, the recorded free-dimension overrides, and no CPU memory arena
    unless the runtime asks for one (``cpu_mem_arena``): the arena keeps what the largest request took for the life
    of the process (a worker that drew 256x256 x4 once stayed about 350 MB above its idle size), while without it
    the memory goes back when the request ends, at no measured cost in latency (tiny export, 64x64, 20 runs each,
    alternating: 0.0553 s with the arena, 0.0545 s without at 20 steps; 0.0112 s and 0.0111 s at 2)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(rt.get("intra_op_num_threads") or 1)
    so.inter_op_num_threads = int(rt.get("inter_op_num_threads") or 1)
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.enable_cpu_mem_arena = bool(rt.get("cpu_mem_arena", False))
    so.log_severity_level = 4  # fatal only: a graph that fails to load is our one line, not also a C++ log line
    if not rt.get("allow_spinning", True):
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    for name, value in (rt.get("free_dimension_overrides") or {}).items():
        so.add_free_dimension_override_by_name(str(name), int(value))
    return so


def providers_for(rt: dict[str, Any], export_dir: Path) -> list[Any]:
    """The runtime's providers, in order, with cache paths made absolute inside ``export_dir``."""
    out = []
    for name, opts in rt["providers"]:
        opts = {k: (str(Path(export_dir) / v) if k.endswith("_path") else v) for k, v in (opts or {}).items()}
        out.append((name, opts) if opts else name)
    return out


def require_providers(rt: dict[str, Any]) -> None:
    """Refuse, in one line, a runtime whose first provider this onnxruntime lacks (no silent CPU fallback)."""
    import onnxruntime as ort

    first = rt["providers"][0][0]
    available = ort.get_available_providers()
    if first not in available:
        raise ExportFolderError(f"this export was made for {rt.get('target', first)} and runs on {first}, which "
                                f"onnxruntime {ort.__version__} here lacks (it has {', '.join(available)}); serve it "
                                "on a machine with that provider (pip install 'sdloop[gpu]'), or export the run again "
                                "with --target cpu.")


def load_ort_pipeline(export_dir: Path, providers: Sequence[Any], options: Any = None,
                      use_io_binding: Optional[bool] = None, family: Any = None) -> Any:
    """optimum's ORT pipeline of the export's family (``family``, else the one its folder names) on an export folder,
    with explicit providers and session options (never the hub)."""
    family = family if family is not None else ExportFolder(export_dir).family()
    cls = family.ort_pipeline_class()
    # "You have disabled the safety checker": optimum builds the pipeline without one, as the export has none
    logging.getLogger("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = cls.from_pretrained(
            str(export_dir), export=False, providers=list(providers), session_options=options,
            use_io_binding=use_io_binding, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class OpenedExport:
    """A loaded export: the pipeline, the manifest it was run by, and what the sessions really got."""

    path: Path
    pipe: Any
    manifest: ExportManifest
    runtime: dict[str, Any]
    providers: list[str]
    load_s: float
    family: str = "sd1"

    @property
    def native_size(self) -> tuple[int, int]:
        return self.manifest.native_width, self.manifest.native_height

    def info(self) -> dict[str, Any]:
        """What a readiness/info endpoint reports: how this export runs here."""
        rt = self.runtime
        return {"export_id": self.manifest.export_id, "family": self.family, "target": self.manifest.target,
                "precision": self.manifest.precision, "providers": self.providers,
                "native_width": self.manifest.native_width, "native_height": self.manifest.native_height,
                "limits": self.manifest.limits, "intra_op_num_threads": rt.get("intra_op_num_threads"),
                "allow_spinning": rt.get("allow_spinning"), "use_io_binding": rt.get("use_io_binding"),
                "free_dimension_overrides": rt.get("free_dimension_overrides") or {},
                "measured_latency_s": self.manifest.latency.get("export_s"), "load_s": round(self.load_s, 3)}


def open_export(export_dir: Path | str, threads: Optional[int] = None, verify: bool = True,
                runtime: Optional[dict[str, Any]] = None) -> OpenedExport:
    """Check and load an export as its manifest says. ``threads`` overrides the intra-op threads (a worker that shares
    the host's cores with others); ``runtime`` replaces the whole runtime section (the export stage measuring a
    candidate before it writes the manifest); ``verify=False`` skips the hash check (the folder being built)."""
    folder = ExportFolder(export_dir)
    # unverified: a folder being built passes its runtime; any other is run as its (unchecked) manifest says
    manifest = folder.verify() if verify else (folder.manifest() if runtime is None else None)
    rt = dict(runtime if runtime is not None else manifest.runtime)  # type: ignore[union-attr]
    if threads:
        rt["intra_op_num_threads"] = int(threads)
    require_providers(rt)
    family = folder.family(manifest)  # the manifest's (checked against the files by verify), else the folder's
    start = time.perf_counter()
    try:
        pipe = load_ort_pipeline(folder.path, providers_for(rt, folder.path), session_options(rt),
                                 use_io_binding=rt.get("use_io_binding"), family=family)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a graph onnxruntime cannot read, a missing tokenizer: one line
        raise ExportFolderError(f"{folder.path} does not load ({type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no message'}); publish a "
                                "fresh export.") from None
    load_s = time.perf_counter() - start
    if manifest is None:
        manifest = _unverified_manifest(folder, rt)
    got = list(getattr(pipe.unet, "session", None).get_providers()) if hasattr(pipe.unet, "session") else []
    return OpenedExport(folder.path, pipe, manifest, rt, got, load_s, family.name)


def _unverified_manifest(folder: ExportFolder, rt: dict[str, Any]) -> ExportManifest:
    """A stand-in manifest for a folder still being built (no manifest yet): only the runtime is known."""
    try:
        return folder.manifest()
    except ExportFolderError:
        return ExportManifest(export_id="", created="", target=str(rt.get("target", "cpu")), precision="",
                              native_width=0, native_height=0, limits={}, runtime=rt, files={})


def smoke_test(opened: OpenedExport, steps: int = 4, prompt: str = "a red circle on a blue background",
               seed: int = 0) -> dict[str, float]:
    """Generate one image at the native size; refuse (SmokeTestError) non-finite or constant pixels.

    Why: a NaN UNet exports, passes a parity check against an equally broken PyTorch pipeline and serves black
    squares with 200 "ok"; a version must draw something before it may become the champion.
    """
    import numpy as np
    import torch

    width, height = opened.native_size
    try:
        with warnings.catch_warnings():  # diffusers' deprecation notes about optimum's components: not the user's
            warnings.simplefilter("ignore", FutureWarning)
            out = opened.pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=5.0, width=width,
                              height=height, generator=torch.Generator().manual_seed(seed), output_type="np")
        image = np.asarray(out.images[0], dtype=np.float64)
    except Exception as e:  # noqa: BLE001 - any failure to draw refuses the version
        raise SmokeTestError(f"{opened.path} failed its smoke test: generating one {width}x{height} image raised "
                             f"{type(e).__name__} ({str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
                             "the champion is unchanged.") from None
    if not bool(np.isfinite(image).all()):
        raise SmokeTestError(f"{opened.path} failed its smoke test: its {width}x{height} image has non-finite "
                             "pixels (NaN or inf weights); the champion is unchanged.")
    spread = float(image.max() - image.min()) * 255 if image.size else 0.0
    if spread < 2.0:
        raise SmokeTestError(f"{opened.path} failed its smoke test: its {width}x{height} image is one flat colour "
                             f"(pixel range {spread:.2f} of 255); the champion is unchanged.")
    return {"width": width, "height": height, "steps": steps, "pixel_range": round(spread, 2),
            "mean": round(float(image.mean()) * 255, 2)}
