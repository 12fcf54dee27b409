"""The export stage: fuse the LoRA, export ONNX with optimum, optimise for onnxruntime, prove parity, and keep every
export as a version in the BentoML model store with a champion, promotion and rollback.

Modules: ``fuse`` (merge and check the LoRA), ``onnx`` (optimum export, external data, checker, parity figures),
``optimize`` (per-target optimisation, measured), ``quality`` (KID for int8), ``build`` (``sdloop export``),
``registry`` (``sdloop models``). Nothing heavy is imported here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional


def demo_step(run_dir: Path, output: Optional[Path] = None, progress: bool = True,
              **settings: Any) -> tuple[str, Any]:
    """Export a run (cpu, fp32), publish it and promote it to champion; return (tag, ExportResult).

    For ``sdloop demo``: ``tag, result = demo_step(result.run_dir, progress=not args.quiet)``, then print
    ``result.summary`` and the tag. ``settings`` are ExportConfig fields (e.g. ``steps=10``). The promotion is the
    registry's: the version must pass its smoke test first, or the champion stays as it was.
    """
    from export.build import ExportConfig, build_export
    from export.registry import promote, publish
    from sdloop.champion import current_champion_tag

    result = build_export(Path(run_dir), output, ExportConfig.from_dict(settings), progress=progress)
    tag, _ = publish(result.export_dir)
    if current_champion_tag() != tag:
        promote(tag, reason=f"sdloop demo: export of {Path(run_dir).name}")
    return tag, result
