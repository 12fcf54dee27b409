"""The ONNX export of a fused pipeline with optimum, its graphs' storage and checks, and the parity check.

The export folder is optimum's ONNX pipeline layout (``unet/model.onnx``, ``text_encoder/``, ``vae_decoder/``,
``vae_encoder/``, ``tokenizer/``, ``scheduler/``, ``model_index.json``; SDXL adds ``text_encoder_2/`` and
``tokenizer_2/``), so the family's stock optimum class (``ORTStableDiffusionPipeline``,
``ORTStableDiffusionXLPipeline``) loads it with ``from_pretrained(EXPORT_DIR)`` as it is. A graph whose
weights pass a size threshold is stored with ONNX external data in one ``model.onnx_data`` file beside it (protobuf
cannot hold more than 2 GB, and an SD-1.5 UNet is 3.4 GB in fp32); ``onnx.checker`` then checks it by path.

Parity: the same prompts and seeds go through the fused PyTorch pipeline and the exported one; the largest pixel
difference and the PSNR are recorded, and past the precision's tolerance the export fails saying by how much.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from export.errors import ExportError, ParityError

# every graph optimum writes for the families it exports (SD3 and Flux have a transformer and a third encoder)
PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae_decoder", "vae_encoder")
GRAPH = "model.onnx"
DATA_SUFFIX = "_data"          # optimum's name for a graph's external data: model.onnx_data
MAX_PSNR = 100.0               # identical images: PSNR is infinite; JSON has no infinity, so it is capped here

# Per precision: the largest pixel difference allowed (0..255 scale) and the lowest PSNR (dB). fp32 differs from
# PyTorch by rounding only (measured: under 0.01 levels on the tiny base after 20 steps); fp16 drifts over the
# denoising steps, so only its PSNR is held; int8 is judged by KID over image sets (``int8_max_kid``), not by pixels.
TOLERANCES: dict[str, dict[str, Optional[float]]] = {
    "fp32": {"max_pixel_difference": 4.0, "min_psnr": 40.0},
    "fp16": {"max_pixel_difference": None, "min_psnr": 25.0},
    "int8": {"max_pixel_difference": None, "min_psnr": None},
}


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """Silence the tracer's and optimum's chatter (TracerWarnings, "Using framework PyTorch") during an export."""
    loggers = [logging.getLogger(n) for n in ("optimum", "optimum.exporters", "optimum.onnxruntime",
                                              "torch.onnx", "root")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def export_onnx(pipe: Any, out_dir: Path, opset: Optional[int] = None) -> list[str]:
    """Export an in-memory diffusers pipeline (LoRA already fused) to optimum's ONNX layout; return its parts."""
    from optimum.exporters.onnx import onnx_export_from_model

    with quiet_export():
        try:
            onnx_export_from_model(pipe, Path(out_dir), opset=opset, do_validation=False, no_post_process=True)
        except Exception as e:  # noqa: BLE001 - an architecture optimum cannot trace
            raise ExportError(f"optimum could not export this pipeline ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); sdloop exports the families in "
                              "sdloop.families (SD 1.x, 2.x, SDXL).") \
                from None
    return list(graph_paths(out_dir))


def graph_paths(export_dir: Path) -> dict[str, Path]:
    """{part: path of its model.onnx} for every part present in an export folder."""
    return {p: Path(export_dir) / p / GRAPH for p in PARTS if (Path(export_dir) / p / GRAPH).is_file()}


def _external_locations(model: Any) -> set[str]:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    locations = set()
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    return locations


def part_bytes(path: Path) -> int:
    """Bytes on disk of a graph and the external data files it references."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    return path.stat().st_size + sum((path.parent / loc).stat().st_size
                                     for loc in _external_locations(model) if (path.parent / loc).is_file())


def store_graph(path: Path, threshold_bytes: int) -> bool:
    """Store one graph as a single file, or with its weights in ``model.onnx_data`` when they pass the threshold.

    Rewrites only when the layout must change; returns whether the graph now uses external data.
    """
    import onnx

    path = Path(path)
    head = onnx.load(str(path), load_external_data=False)
    old = _external_locations(head)
    external = part_bytes(path) >= threshold_bytes
    wanted = {path.name + DATA_SUFFIX}
    if (external and old == wanted) or (not external and not old):
        return external
    model = onnx.load(str(path), load_external_data=True)
    for loc in old:
        (path.parent / loc).unlink(missing_ok=True)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + DATA_SUFFIX, size_threshold=1024, convert_attribute=False)
    else:
        onnx.save_model(model, str(path))
    return external


def check_graphs(export_dir: Path) -> dict[str, str]:
    """Run ``onnx.checker`` on every graph by path (so external data is checked too); raise naming a bad one."""
    import onnx

    checked = {}
    for part, path in graph_paths(export_dir).items():
        try:
            onnx.checker.check_model(str(path))
        except Exception as e:  # noqa: BLE001 - onnx.checker.ValidationError and protobuf errors alike
            raise ExportError(f"{path} fails onnx.checker ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); export again.") from None
        checked[part] = "ok"
    return checked


def sizes(export_dir: Path) -> dict[str, dict[str, Any]]:
    """{part: {"bytes": on disk with external data, "external_data": bool}} for the summary and the manifest."""
    out = {}
    for part, path in graph_paths(export_dir).items():
        out[part] = {"bytes": part_bytes(path), "external_data": (path.parent / (GRAPH + DATA_SUFFIX)).is_file()}
    return out


def fix_permissions(export_dir: Path) -> None:
    """Give every file the mode an ordinary ``open()`` gives: the exporters write external data as 0600."""
    from sdloop.atomic import current_umask

    mask = current_umask()
    for f in Path(export_dir).rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~mask)


# -- parity ----------------------------------------------------------------------------------------------------------

def compare_images(reference: Sequence[np.ndarray], images: Sequence[np.ndarray]) -> dict[str, float]:
    """Largest pixel difference (0..255 scale), mean absolute difference and PSNR (dB, capped) of paired images."""
    if len(reference) != len(images) or not images:
        raise ValueError("parity needs the same number (> 0) of reference and exported images")
    ref = np.stack([np.asarray(a, dtype=np.float64) for a in reference])
    out = np.stack([np.asarray(b, dtype=np.float64) for b in images])
    diff = np.abs(ref - out)
    mse = float(np.mean(diff ** 2))
    psnr = MAX_PSNR if mse == 0 else min(MAX_PSNR, 10 * math.log10(1.0 / mse))
    worst = float(np.max([np.mean((a - b) ** 2) for a, b in zip(ref, out)]))
    return {"max_pixel_difference": round(float(diff.max()) * 255, 4), "mean_abs_difference":
            round(float(diff.mean()) * 255, 5), "psnr": round(psnr, 3),
            "worst_image_psnr": round(MAX_PSNR if worst == 0 else min(MAX_PSNR, 10 * math.log10(1.0 / worst)), 3),
            "images": len(images)}


def check_parity(figures: dict[str, Any], precision: str, tolerances: Optional[dict[str, Optional[float]]] = None,
                 max_kid: Optional[float] = None) -> dict[str, Any]:
    """Raise ParityError past the precision's tolerance, saying by how much; return the tolerance used."""
    tol = dict(TOLERANCES[precision] if tolerances is None else tolerances)
    if max_kid is not None:
        tol["max_kid"] = max_kid
    problems = []
    limit = tol.get("max_pixel_difference")
    if limit is not None and figures["max_pixel_difference"] > limit:
        problems.append(f"largest pixel difference {figures['max_pixel_difference']:.2f} of 255 > {limit:g} "
                        f"(over by {figures['max_pixel_difference'] - limit:.2f})")
    floor = tol.get("min_psnr")
    if floor is not None and figures["psnr"] < floor:
        problems.append(f"PSNR {figures['psnr']:.2f} dB < {floor:g} dB (short by {floor - figures['psnr']:.2f} dB)")
    if tol.get("max_kid") is not None and figures.get("kid") is not None and figures["kid"] > tol["max_kid"]:
        problems.append(f"KID {figures['kid']:.4f} > {tol['max_kid']:g} "
                        f"(over by {figures['kid'] - tol['max_kid']:.4f})")
    if problems:
        raise ParityError(f"the {precision} export does not match the fused PyTorch pipeline on "
                          f"{figures['images']} image(s): {'; '.join(problems)}. Try --precision fp32, or report "
                          "the run and target.")
    return tol
