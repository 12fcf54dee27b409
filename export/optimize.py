"""Per-target optimisation of an export folder, each step kept only where a measurement says it pays.

- ``cpu``: onnxruntime's graph optimisations (level EXTENDED: portable across x86 CPUs; the hardware-specific
  layout passes run at load) saved into the export, so a session starts from the optimised graph; explicit
  intra/inter-op threads; fp32, because fp16 runs slower than fp32 on the CPU provider. ``int8``: dynamic
  quantisation of the MatMul/Gemm weights of the UNet and the text encoder(s), one sub-model at a time (the CPU provider
  lacks ConvInteger for many shapes, and optimum's ORTQuantizer refuses multi-file models).
- ``cuda``: onnxruntime's transformer/diffusion fusions and fp16, run with IO binding.
- ``tensorrt``: onnxruntime's TensorRT execution provider with an engine cache inside the export.

A target this machine cannot run fails first, in one line naming what is missing. Sessions are opened with the
one loader's options (``sdloop.exportload.session_options``/``providers_for``), so what is measured here is what
parity, the gate and the service run.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from export.errors import ExportError, TargetUnavailableError
from export.onnx import DATA_SUFFIX, GRAPH, graph_paths, store_graph
from sdloop.exportload import providers_for, session_options

TARGETS = ("cpu", "cuda", "tensorrt")
PRECISIONS = {"cpu": ("fp32", "int8"), "cuda": ("fp16", "fp32"), "tensorrt": ("fp16", "fp32")}
PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
INT8_PARTS = ("unet", "text_encoder", "text_encoder_2")   # those present: SDXL has the second encoder
TRT_CACHE = "trt_cache"
# Keep a no-quality-cost step (graph optimisation) when its run time is within this fraction of the original and it
# is faster at something (run or load); int8 costs quality, so it must be strictly faster to stay.
NOISE = 0.02


def default_threads() -> int:
    """The cores this process may use (the affinity mask, not the host's count inside a container)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_precision(target: str, precision: Optional[str]) -> str:
    """The precision for a target (its default when None); a pair that makes no sense is an ExportError."""
    if target not in TARGETS:
        raise ExportError(f"--target {target!r} is not one of {', '.join(TARGETS)}.")
    if precision is None:
        return PRECISIONS[target][0]
    if precision not in PRECISIONS[target]:
        why = {("cpu", "fp16"): "onnxruntime's CPU provider runs fp16 slower than fp32",
               }.get((target, precision), "onnxruntime's dynamic int8 kernels are CPU kernels")
        raise ExportError(f"--precision {precision} does not suit --target {target} ({why}); use "
                          f"{' or '.join(PRECISIONS[target])}.")
    return precision


def _probe(provider: str) -> Optional[str]:
    """None if ``provider`` starts a session on a one-node graph, else why not (one line)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=[provider])
    except Exception as e:  # noqa: BLE001 - missing CUDA/TensorRT libraries, no device
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return None if sess.get_providers()[0] == provider else f"{provider} fell back to {sess.get_providers()[0]}"


def require_target(target: str) -> None:
    """Raise TargetUnavailableError naming what this machine lacks for ``target``; return if it can run it."""
    import onnxruntime as ort

    if target == "cpu":
        return
    provider = PROVIDER[target]
    available = ort.get_available_providers()
    gpu_hint = ("install onnxruntime's GPU build on a machine with an NVIDIA GPU: pip uninstall onnxruntime && "
                "pip install 'sdloop[gpu]'")
    if provider not in available:
        raise TargetUnavailableError(f"--target {target} needs onnxruntime's {provider}, which this onnxruntime "
                                     f"{ort.__version__} lacks (it has {', '.join(available)}); {gpu_hint}.")
    why = _probe(provider)
    if why:
        need = "CUDA, cuDNN and TensorRT libraries" if target == "tensorrt" else "CUDA and cuDNN libraries"
        raise TargetUnavailableError(f"--target {target}: {provider} is installed but cannot start here ({why}); "
                                     f"it needs an NVIDIA GPU and the {need}.")


def runtime(target: str, precision: str, threads: int) -> dict[str, Any]:
    """How to run the export, recorded in its manifest: providers, their options, threads, IO binding."""
    if target == "tensorrt":
        trt = {"trt_fp16_enable": precision == "fp16", "trt_engine_cache_enable": True,
               "trt_engine_cache_path": TRT_CACHE, "trt_timing_cache_enable": True,
               "trt_timing_cache_path": TRT_CACHE}
        providers = [["TensorrtExecutionProvider", trt], ["CUDAExecutionProvider", {}], ["CPUExecutionProvider", {}]]
    elif target == "cuda":
        providers = [["CUDAExecutionProvider", {}], ["CPUExecutionProvider", {}]]
    else:
        providers = [["CPUExecutionProvider", {}]]
    # No spinning: idle intra-op threads that spin-wait steal the cores from whatever runs next (another worker, the
    # next session of the pipeline). Measured on the tiny export, 2 threads on 2 shared cores: 0.05 s per image
    # without spinning against 0.15-0.27 s with it.
    return {"target": target, "providers": providers, "intra_op_num_threads": threads, "inter_op_num_threads": 1,
            "execution_mode": "sequential", "use_io_binding": target != "cpu", "allow_spinning": False}


# -- measuring ---------------------------------------------------------------------------------------------------------

def sample_feeds(sess: Any, part: str, size: int) -> dict[str, np.ndarray]:
    """Random inputs of a graph's own names and shapes for a ``size`` px image (batch 2 for the UNet: guidance), for
    timing a graph alone (here and in benchmarks/onnx_cpu.py)."""
    dims = {"batch_size": 2 if part == "unet" else 1, "sequence_length": 77, "height": size // 8,
            "width": size // 8, "latent_height": size // 8, "latent_width": size // 8,
            "sample_height": size, "sample_width": size}
    rng = np.random.default_rng(0)
    feeds = {}
    for inp in sess.get_inputs():
        shape = [d if isinstance(d, int) else dims.get(d, 1) for d in inp.shape]
        if "int" in inp.type:
            feeds[inp.name] = rng.integers(0, 400, size=shape).astype(np.int64 if "64" in inp.type else np.int32)
        else:
            dtype = np.float16 if "float16" in inp.type else np.float32
            feeds[inp.name] = (np.full(shape, 500.0) if inp.name == "timestep" else rng.standard_normal(shape)
                               ).astype(dtype)
    return feeds


def time_graph(path: Path, rt: dict[str, Any], export_dir: Path, part: str, size: int, reps: int) -> dict[str, float]:
    """Seconds to open a session on one graph and (best of ``reps``, after a warm-up) to run it once."""
    import onnxruntime as ort

    start = time.perf_counter()
    sess = ort.InferenceSession(str(path), session_options(rt), providers=providers_for(rt, export_dir))
    load = time.perf_counter() - start
    feeds = sample_feeds(sess, part, size)
    sess.run(None, feeds)
    runs = []
    for _ in range(max(1, reps)):
        start = time.perf_counter()
        sess.run(None, feeds)
        runs.append(time.perf_counter() - start)
    return {"load_s": round(load, 4), "run_s": round(min(runs), 5)}


def _swap_in(candidate: Path, target: Path) -> None:
    """Replace graph ``target`` (and its external data) by ``candidate`` (and its data)."""
    for f in (target, target.parent / (target.name + DATA_SUFFIX), target.parent / (target.name + ".data")):
        f.unlink(missing_ok=True)
    shutil.move(str(candidate), str(target))
    for suffix in (DATA_SUFFIX, ".data"):
        data = candidate.parent / (candidate.name + suffix)
        if data.is_file():
            shutil.move(str(data), str(target.parent / (target.name + suffix)))


def _try_candidate(part: str, path: Path, make: Callable[[Path], None], rt: dict[str, Any], export_dir: Path,
                   size: int, reps: int, keep: str, strict: bool) -> dict[str, Any]:
    """Build a candidate graph beside ``path``, time both (alternating), keep the candidate if it pays."""
    work = path.parent / ".candidate"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        cand = work / GRAPH
        make(cand)
        # A B B A, best of each: a load that drifts during the measurement favours neither side
        a1, b1, b2, a2 = (time_graph(p, rt, export_dir, part, size, reps) for p in (path, cand, cand, path))
        before, after = ({k: min(x[k], y[k]) for k in x} for x, y in ((a1, a2), (b1, b2)))
        faster_run = after["run_s"] < before["run_s"]
        if strict:
            pays = faster_run
        else:
            pays = (after["run_s"] <= before["run_s"] * (1 + NOISE)
                    and (faster_run or after["load_s"] < before["load_s"]))
        kept = keep == "all" or pays
        if kept:
            _swap_in(cand, path)
        return {"before": before, "after": after, "pays": pays, "kept": kept,
                "speedup": round(before["run_s"] / after["run_s"], 3) if after["run_s"] else None}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- cpu ---------------------------------------------------------------------------------------------------------------

def _ort_offline(src: Path, rt: dict[str, Any]) -> Callable[[Path], None]:
    def make(dst: Path) -> None:
        import onnxruntime as ort

        so = session_options(rt, "ORT_ENABLE_EXTENDED")
        so.optimized_model_filepath = str(dst)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst.name + DATA_SUFFIX)
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return make


def optimize_cpu(export_dir: Path, rt: dict[str, Any], size: int, reps: int, keep: str,
                 external_bytes: int, progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """onnxruntime's offline graph optimisation, per graph, kept where it pays; returns the measurements."""
    report = {}
    for part, path in graph_paths(export_dir).items():
        progress(f"graph optimisation: {part}")
        report[part] = _try_candidate(part, path, _ort_offline(path, rt), rt, export_dir, size, reps, keep,
                                      strict=False)
        store_graph(path, external_bytes)
    return report


def _quantizer(src: Path) -> Callable[[Path], None]:
    def make(dst: Path) -> None:
        import logging

        from onnxruntime.quantization import QuantType, quantize_dynamic

        large = (src.parent / (src.name + DATA_SUFFIX)).is_file()
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # "consider pre-processing" on the root logger: the ORT pass comes after
        try:
            # MatMulConstBOnly: only weight matmuls; attention's activation x activation products stay fp32
            quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul", "Gemm"],
                             weight_type=QuantType.QInt8, per_channel=False, use_external_data_format=large,
                             extra_options={"MatMulConstBOnly": True})
        finally:
            root.setLevel(level)
    return make


def quantize_int8(export_dir: Path, rt: dict[str, Any], size: int, reps: int, keep: str, external_bytes: int,
                  progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Dynamic int8 quantisation of the UNet's and text encoder's MatMul/Gemm weights, kept where faster."""
    report = {}
    paths = graph_paths(export_dir)
    for part in INT8_PARTS:
        if part in paths:
            progress(f"int8 quantisation: {part}")
            report[part] = _try_candidate(part, paths[part], _quantizer(paths[part]), rt, export_dir, size, reps,
                                          keep, strict=True)
            store_graph(paths[part], external_bytes)
    return report


# -- cuda (GPU machines only) -----------------------------------------------------------------------------------------

MODEL_TYPES = {"unet": "unet", "vae_decoder": "vae", "vae_encoder": "vae", "text_encoder": "clip",
               "text_encoder_2": "clip"}


def optimize_cuda(export_dir: Path, precision: str, external_bytes: int,
                  progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """onnxruntime's diffusion fusions (attention, GroupNorm, BiasSplitGelu, NHWC conv) and fp16, per graph.

    onnxruntime 1.32's UNet attention fusion fails on numpy 2 (``int()`` of a 1-element array in
    fusion_attention_unet.py); the graph is then fused without it, and the manifest says so.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    report = {}
    for part, path in graph_paths(export_dir).items():
        model_type = MODEL_TYPES.get(part)
        if model_type is None:
            continue
        progress(f"cuda fusions: {part}")
        opts = FusionOptions(model_type)
        if model_type == "unet":
            opts.enable_packed_kv = opts.enable_packed_qkv = precision == "fp16"
        notes = []
        try:
            m = optimize_model(str(path), model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
                               optimization_options=opts, use_gpu=True, provider="cuda")
        except TypeError as e:
            notes.append(f"attention fusion skipped ({e})")
            opts.enable_attention = False
            m = optimize_model(str(path), model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
                               optimization_options=opts, use_gpu=True, provider="cuda")
        if precision == "fp16":
            m.convert_float_to_float16(keep_io_types=False)
        work = path.parent / ".candidate"
        work.mkdir(exist_ok=True)
        m.save_model_to_file(str(work / GRAPH), use_external_data_format=True)
        _swap_in(work / GRAPH, path)
        shutil.rmtree(work, ignore_errors=True)
        store_graph(path, external_bytes)
        report[part] = {"fused_operators": {k: v for k, v in m.get_fused_operator_statistics().items() if v},
                        "precision": precision, "notes": notes}
    return report
