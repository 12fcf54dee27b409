"""What one serving worker holds: the champion's pipeline, the lock around it, the poller that follows promotions,
and the metrics it reports.

Why these shapes:
- One pipeline per worker, used by one request at a time (``ModelHolder.lock``): diffusers pipelines keep per-call
  state (scheduler timesteps), so two threads in one pipeline corrupt each other's images.
- A deadline per request, checked between denoising steps (``callback_on_step_end`` raises): a client that got its
  504 does not leave a generation running that delays everyone behind it. Waiting for the lock counts too.
- New champions: a daemon thread polls the pointer file's mtime (``sdloop.champion``) every ``poll_s`` and loads a
  new champion beside the old one, then swaps the reference; a request in flight finishes on the pipeline it took.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from prometheus_client import Counter, Histogram

from sdloop.champion import MODEL_NAME, current_champion_tag, pointer_mtime

log = logging.getLogger("sdloop.serve")

GENERATIONS = Counter("sdloop_generations", "Images generated", ["model_version"])
FEEDBACK = Counter("sdloop_feedback", "Feedback accepted", ["kind"])
ERRORS = Counter("sdloop_errors", "Requests that failed", ["endpoint", "reason"])
STEPS = Counter("sdloop_denoise_steps", "Denoising steps run (stops growing when a deadline interrupts)")
LATENCY = Histogram("sdloop_generation_latency_seconds", "Time of one txt2img request, lock wait included",
                    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300))


class DeadlineExceeded(Exception):
    """The request's deadline passed; ``steps`` denoising steps had run when it was interrupted."""

    def __init__(self, steps: int, where: str) -> None:
        super().__init__(f"deadline passed {where} after {steps} denoising step(s); the generation was stopped")
        self.steps = steps


class NotReady(Exception):
    """No model is loaded yet (no champion promoted, or it is still loading)."""


class PromptTooLong(ValueError):
    """The prompt has more tokens than the text encoder takes; it is refused rather than cut silently."""


class SizeNotSupported(ValueError):
    """A side this model's exported graph cannot take (its UNet halves the latent once per down block)."""


@dataclass
class Loaded:
    tag: str
    pipe: Any
    backend: str
    max_tokens: int
    side_multiple: int


def configure_threads(threads: int) -> int:
    """Pin torch's threads for this worker (onnxruntime's are set per session); BentoML sets none."""
    import torch

    threads = threads or max(1, (os.cpu_count() or 1))
    torch.set_num_threads(threads)
    return threads


def model_dir(tag: str) -> tuple[str, Path]:
    """The full tag and folder of a stored version: the workspace's model store first, then BentoML's own (inside a
    built Bento that is the Bento's models, which carry the champion it was built with)."""
    from bentoml._internal.models import ModelStore
    from bentoml.exceptions import NotFound

    from sdloop.workspace import use_bentoml_home

    try:
        model = ModelStore(str(use_bentoml_home() / "models")).get(tag)
    except NotFound:
        import bentoml

        model = bentoml.models.get(tag)
    return str(model.tag), Path(model.path)


def load_pipeline(tag: str, backend: str, threads: int) -> Loaded:
    """The onnxruntime pipeline of a stored export, or (backend ``pytorch``) its source run's PyTorch pipeline."""
    tag, path = model_dir(tag)
    if backend == "pytorch":
        from sdloop.runfolder import RunFolder

        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        pipe = RunFolder(Path(manifest["source_run"]["path"])).load_pipeline(lora=True)
        pipe.fuse_lora()
        pipe.set_progress_bar_config(disable=True)
    else:
        import onnxruntime as ort
        from optimum.onnxruntime import ORTStableDiffusionPipeline

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        provider = os.environ.get("SDLOOP_ORT_PROVIDER", "CPUExecutionProvider")
        pipe = ORTStableDiffusionPipeline.from_pretrained(str(path), export=False, session_options=opts,
                                                          provider=provider)
    pipe.set_progress_bar_config(disable=True)
    downsamples = max(0, len(pipe.unet.config.get("block_out_channels") or [0]) - 1) \
        if isinstance(pipe.unet.config, dict) else max(0, len(pipe.unet.config.block_out_channels) - 1)
    multiple = int(getattr(pipe, "vae_scale_factor", 8)) * 2 ** downsamples
    return Loaded(tag, pipe, backend, int(pipe.tokenizer.model_max_length), multiple)


class ModelHolder:
    """The worker's current champion pipeline, kept up to date by a polling thread."""

    def __init__(self, name: str = MODEL_NAME, backend: str = "onnx", threads: int = 1, poll_s: float = 5.0,
                 fallback_tag: Optional[str] = None) -> None:
        self.name, self.backend, self.threads, self.poll_s = name, backend, threads, poll_s
        self.fallback_tag = fallback_tag
        self.lock = threading.Lock()  # the pipeline: one request at a time
        self._loading = threading.Lock()  # one load at a time
        self.loaded: Optional[Loaded] = None
        self.last_error: Optional[str] = None
        self._seen_mtime: Optional[int] = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="sdloop-champion-poller", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception as e:  # noqa: BLE001 - keep serving the current model; report why
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("loading the champion failed; still serving %s", self.version)
            self._stop.wait(self.poll_s)

    @property
    def version(self) -> Optional[str]:
        loaded = self.loaded
        return loaded.tag if loaded else None

    def refresh(self, force: bool = False) -> Optional[str]:
        """Load the champion if the pointer changed (or ``force``); return the version now served."""
        with self._loading:
            mtime = pointer_mtime(self.name)
            if not force and mtime == self._seen_mtime and self.loaded is not None:
                return self.version
            tag = current_champion_tag(self.name) or (self.fallback_tag if mtime is None else None)
            if tag and tag != self.version and not (tag == self.fallback_tag and self.loaded is not None):
                started = time.monotonic()
                loaded = load_pipeline(tag, self.backend, self.threads)
                self.loaded = loaded  # requests in flight keep the pipeline they took
                log.info("serving %s (%s) after %.1f s of loading", tag, self.backend, time.monotonic() - started)
            self._seen_mtime = mtime
            self.last_error = None
            return self.version

    def stop(self) -> None:
        self._stop.set()

    def generate(self, req: Any, deadline: float) -> tuple[str, list[tuple[int, Any]]]:
        """Run one request on the current pipeline under the lock; interrupt it at ``deadline`` (monotonic)."""
        import torch

        if not self.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise DeadlineExceeded(0, "while waiting for the pipeline")
        try:
            loaded = self.loaded
            if loaded is None:
                raise NotReady(self.last_error or "no champion model is loaded yet")
            for field, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt)):
                n = len(loaded.pipe.tokenizer(text, truncation=False).input_ids)
                if n > loaded.max_tokens:
                    raise PromptTooLong(f"{field} has {n} tokens; the text encoder takes at most "
                                        f"{loaded.max_tokens}: shorten it")
            for field, side in (("width", req.width), ("height", req.height)):
                m = loaded.side_multiple
                if side % m:
                    raise SizeNotSupported(f"{field}: {loaded.tag} takes multiples of {m} pixels; got {side}, try "
                                           f"{max(1, side // m) * m}")
            steps = [0]

            def on_step(_pipe: Any, _i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
                steps[0] += 1
                STEPS.inc()
                if time.monotonic() > deadline:
                    raise DeadlineExceeded(steps[0], "during denoising")
                return kwargs

            seeds = [req.seed + i for i in range(req.num_images)]
            out = loaded.pipe(prompt=req.prompt, negative_prompt=req.negative_prompt or None,
                              num_inference_steps=req.steps, guidance_scale=req.guidance_scale, width=req.width,
                              height=req.height, num_images_per_prompt=req.num_images,
                              generator=[torch.Generator().manual_seed(s) for s in seeds],
                              callback_on_step_end=on_step, output_type="pil")
            return loaded.tag, list(zip(seeds, out.images))
        finally:
            self.lock.release()
