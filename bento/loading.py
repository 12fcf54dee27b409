"""Loading a stored version to serve: its pipeline, as its manifest says, and what the version can take.

Part of ``bento.runtime`` (split out so each module reads in one sitting): ``Loaded`` is a version ready to serve,
with the limits its manifest sets (sizes, tokens) and its scheduler's (steps); ``load_pipeline`` opens it through
the one loader (``sdloop.exportload.open_export``) or, for the ``pytorch`` backend, from its source run, after the
export folder's hashes are checked; ``version_state`` is the cheap key that decides when a refused version is tried
again. ``bento.runtime`` re-exports these names, so callers import them from there.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from sdloop.errors import one_line


class PromptTooLong(ValueError):
    """The prompt has more tokens than a text encoder takes (SDXL: either of its two); it is refused rather than cut
    silently."""


class SizeNotSupported(ValueError):
    """A side outside the served version's limits (its manifest's min/max side and multiple, capped by the
    operator's SDLOOP_MAX_SIDE): its UNet halves the latent once per down block, and far from its native size it
    draws repeated tiles."""


class TooManySteps(SizeNotSupported):
    """More denoising steps than the version's scheduler has timesteps (it raises IndexError deep inside)."""


@dataclass
class Loaded:
    """A version ready to serve: its pipeline, its manifest, and what /info reports about how it runs here."""

    tag: str
    pipe: Any
    backend: str
    manifest: Any  # sdloop.exportfolder.ExportManifest
    info: dict[str, Any] = field(default_factory=dict)
    cost: Any = None  # bento.budget.CostModel, measured when it loads
    family: str = "sd1"  # sdloop.families: its tokenizers, ORT class and native size come from it

    @property
    def native(self) -> tuple[int, int]:
        return self.manifest.native_width, self.manifest.native_height

    @property
    def tokenizers(self) -> list[Any]:
        """The pipeline's tokenizers, one per text encoder of its family (SDXL: two, and a prompt must fit both)."""
        from sdloop.families import family_by_name

        found = [getattr(self.pipe, name, None) for name in family_by_name(self.family).tokenizers]
        return [t for t in found if t is not None]

    @property
    def max_tokens(self) -> int:
        return int(self.manifest.limits.get("max_tokens") or min(t.model_max_length for t in self.tokenizers))

    def prompt_tokens(self, text: str) -> int:
        """The prompt's length in tokens: the most any of the family's tokenizers makes of it."""
        return max(len(t(text, truncation=False).input_ids) for t in self.tokenizers)

    @property
    def max_steps(self) -> int:
        """The most steps its scheduler can take: one fewer than its training timesteps (1000 for SD)."""
        return int(getattr(self.pipe.scheduler.config, "num_train_timesteps", 1000)) - 1

    def sides(self, max_side: int) -> tuple[int, int, int]:
        """(smallest side, largest side, multiple) this version takes here: its manifest's limits, capped by the
        operator's SDLOOP_MAX_SIDE."""
        lim = self.manifest.limits
        multiple = int(lim.get("side_multiple") or 8)
        return int(lim.get("min_side") or multiple), min(int(lim.get("max_side") or max_side), max_side), multiple

    def size_for(self, width: Optional[int], height: Optional[int], max_side: int) -> tuple[int, int]:
        """The size to draw: the native one where the request gave none; a side outside the limits is refused
        naming the range it may take."""
        low, high, m = self.sides(max_side)
        out = []
        for name, side, native in (("width", width, self.native[0]), ("height", height, self.native[1])):
            side = native if side is None else side
            if side % m or not low <= side <= high:
                near = min(max(low, round(side / m) * m), high // m * m)
                raise SizeNotSupported(f"{name}: {self.tag} takes {low} to {high} pixels in multiples of {m} (it "
                                       f"draws {self.native[0]}x{self.native[1]} natively, the default); got "
                                       f"{side}, try {near}")
            out.append(side)
        return out[0], out[1]


def configure_threads(threads: int) -> int:
    """Pin torch's threads for this worker (onnxruntime's are set per session); BentoML sets none."""
    import torch

    threads = threads or max(1, (os.cpu_count() or 1))
    torch.set_num_threads(threads)
    return threads


def model_dir(tag: str) -> tuple[str, Path]:
    """The full tag and folder of a stored version, through BentoML's public API (``sdloop.modelstore``): the
    workspace's store under ``sdloop serve``, the Bento's own models inside a built Bento. A missing or unreadable
    version is ``sdloop.modelstore.StoreError`` (one line)."""
    from sdloop.modelstore import version_path

    return version_path(tag)


def load_pipeline(tag: str, backend: str, threads: Optional[int] = None) -> Loaded:
    """A stored version ready to serve: the export run as its manifest says (``threads``: the operator's per-worker
    intra-op threads, None for the manifest's), or (backend ``pytorch``) its source run's PyTorch pipeline.

    Either way the export folder is checked first (``verify``: hashes once per file state), so a damaged or
    tampered version is refused with the first problem found (``ExportFolderError``, one line).
    """
    from sdloop.exportfolder import ExportFolder, ExportFolderError

    tag, path = model_dir(tag)
    if backend == "pytorch":
        from sdloop.runfolder import RunFolder

        manifest = ExportFolder(path).verify()
        family = ExportFolder(path).family(manifest).name
        source = manifest.source_run.get("path")
        if not source:
            raise ExportFolderError(f"{tag} names no source run in its manifest, so the pytorch backend cannot "
                                    "serve it; serve it with SDLOOP_BACKEND=onnx.")
        started = time.perf_counter()
        pipe = RunFolder(Path(source)).load_pipeline(lora=True)
        pipe.fuse_lora()
        pipe.set_progress_bar_config(disable=True)
        import torch

        info = {"providers": ["torch"], "intra_op_num_threads": torch.get_num_threads(),
                "threads_from": "SDLOOP_TORCH_THREADS" if threads else "cores / workers",
                "load_s": round(time.perf_counter() - started, 3)}
    else:
        from sdloop.exportload import open_export

        opened = open_export(path, threads=threads or None)
        pipe, manifest, family = opened.pipe, opened.manifest, opened.family
        info = {**opened.info(), **_session_facts(pipe),
                "threads_from": "SDLOOP_TORCH_THREADS" if threads else "manifest"}
    info["family"] = family
    info["manifest_threads"] = manifest.runtime.get("intra_op_num_threads")
    info["measured_latency"] = {**{k: manifest.latency.get(k) for k in ("export_s", "steps", "size", "threads")},
                                "guidance_scale": (manifest.extra.get("checks") or {}).get("guidance_scale")}
    return Loaded(tag, pipe, backend, manifest, info, family=family)


def _session_facts(pipe: Any) -> dict[str, Any]:
    """What the UNet's onnxruntime session really got (threads, spinning), read back from the session itself."""
    session = getattr(getattr(pipe, "unet", None), "session", None)
    if session is None:
        return {}
    opts = session.get_session_options()
    try:
        spinning = opts.get_session_config_entry("session.intra_op.allow_spinning") != "0"
    except RuntimeError:  # not set: onnxruntime's default, which spins
        spinning = True
    return {"providers": list(session.get_providers()), "intra_op_num_threads": opts.intra_op_num_threads,
            "inter_op_num_threads": opts.inter_op_num_threads, "allow_spinning": spinning,
            "cpu_mem_arena": opts.enable_cpu_mem_arena}


def version_state(tag: str) -> tuple[Any, ...]:
    """A cheap key of a stored version's files (path, size, mtime, ctime, inode): a refusal is retried, and logged
    again, only when this changes (or the pointer names another version)."""
    try:
        full, path = model_dir(tag)
    except Exception as e:  # noqa: BLE001 - a version that is not in the store: its own state
        return ("missing", one_line(e))
    files = []
    for dirpath, _dirs, names in os.walk(path, followlinks=False):
        for name in names:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            files.append((os.path.join(dirpath, name), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    return (full, tuple(sorted(files)))
