"""What one serving worker holds: the champion's pipeline, the lock around it, the poller that follows promotions,
and the metrics it reports.

Why these shapes:
- One pipeline per worker, used by one request at a time (``ModelHolder.lock``): diffusers pipelines keep per-call
  state (scheduler timesteps), so two threads in one pipeline corrupt each other's images.
- A deadline per request, checked between denoising steps (``callback_on_step_end`` raises): a client that got its
  504 does not leave a generation running that delays everyone behind it. Waiting for the lock counts too, and the
  deadline is checked once more before the first step, so a request whose time ran out in the queue runs no step.
- Admission (``bento.admission``): at most ``queue`` requests wait for the lock, the next one is refused at once
  (429), and a request that its measured seconds per step say cannot finish in time is refused before any step.
- New champions: a daemon thread polls the pointer file's mtime (``sdloop.champion``) every ``poll_s`` and loads a
  new champion beside the old one, then swaps the reference; a request in flight finishes on the pipeline it took.
- An export is run exactly as its manifest says (``sdloop.exportload.open_export``: hashes checked, its providers,
  threads, no spinning, IO binding, free-dimension overrides), so the latency the gate judged is the one served. A
  version that fails its check or does not load is refused: the reason goes to ``last_error`` (/info, the 503 of a
  worker with nothing loaded) and to the log once per version and file state, and the current champion keeps
  serving. A request's default size is the model's native one, from its manifest.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from prometheus_client import Counter, Gauge, Histogram

from bento.admission import Admission
from sdloop.champion import MODEL_NAME, current_champion_tag, pointer_mtime
from sdloop.errors import UserError, one_line

log = logging.getLogger("sdloop.serve")

GENERATIONS = Counter("sdloop_generations", "Images generated", ["model_version"])
FEEDBACK = Counter("sdloop_feedback", "Feedback accepted", ["kind"])
ERRORS = Counter("sdloop_errors", "Requests that failed", ["endpoint", "reason"])
STEPS = Counter("sdloop_denoise_steps", "Denoising steps run (stops growing when a deadline interrupts)")
WAITING = Gauge("sdloop_queue_waiting", "Requests waiting for this worker's pipeline", multiprocess_mode="livesum")
LATENCY = Histogram("sdloop_generation_latency_seconds", "Time of one txt2img request, lock wait included",
                    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300))


class DeadlineExceeded(Exception):
    """The request's deadline passed; ``steps`` denoising steps had run when it was interrupted."""

    def __init__(self, steps: int, where: str) -> None:
        super().__init__(f"deadline passed {where} after {steps} denoising step(s); the generation was stopped")
        self.steps = steps


class Cancelled(Exception):
    """The caller went away (closed its connection) or cancelled its job; ``steps`` denoising steps had run."""

    def __init__(self, steps: int, where: str) -> None:
        super().__init__(f"cancelled {where} after {steps} denoising step(s)")
        self.steps = steps


class NotReady(Exception):
    """No model is loaded yet (no champion promoted, or it is still loading)."""


class PromptTooLong(ValueError):
    """The prompt has more tokens than the text encoder takes; it is refused rather than cut silently."""


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

    @property
    def native(self) -> tuple[int, int]:
        return self.manifest.native_width, self.manifest.native_height

    @property
    def max_tokens(self) -> int:
        return int(self.manifest.limits.get("max_tokens") or self.pipe.tokenizer.model_max_length)

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


def _wait_until(acquire: Callable[..., bool], deadline: float, cancel: Optional[threading.Event],
                slice_s: float = 0.1) -> bool:
    """``acquire(timeout=...)`` until it succeeds (True) or ``deadline`` passes (False), in slices so that a set
    ``cancel`` ends the wait within one slice (``Cancelled``): a caller that went away frees its queue place."""
    while True:
        left = deadline - time.monotonic()
        if cancel is not None and cancel.is_set():
            raise Cancelled(0, "while waiting for the pipeline")
        if acquire(timeout=max(0.0, min(left, slice_s) if cancel is not None else left)):
            return True
        if left <= 0 or time.monotonic() >= deadline:
            return False


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
        pipe, manifest = opened.pipe, opened.manifest
        info = {**opened.info(), **_session_facts(pipe),
                "threads_from": "SDLOOP_TORCH_THREADS" if threads else "manifest"}
    info["manifest_threads"] = manifest.runtime.get("intra_op_num_threads")
    info["measured_latency"] = {**{k: manifest.latency.get(k) for k in ("export_s", "steps", "size", "threads")},
                                "guidance_scale": (manifest.extra.get("checks") or {}).get("guidance_scale")}
    return Loaded(tag, pipe, backend, manifest, info)


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


class ModelHolder:
    """The worker's current champion pipeline, kept up to date by a polling thread."""

    def __init__(self, name: str = MODEL_NAME, backend: str = "onnx", threads: Optional[int] = None,
                 poll_s: float = 5.0, fallback_tag: Optional[str] = None, max_side: int = 1024,
                 queue: int = 4, memory: Optional[tuple[float, str]] = None) -> None:
        self.name, self.backend, self.threads, self.poll_s = name, backend, threads, poll_s
        self.fallback_tag, self.max_side = fallback_tag, max_side
        self.memory = memory  # (bytes this worker may use, how that was set); None: no memory budget
        self.lock = threading.Lock()  # the pipeline: one request at a time
        self.admission = Admission(queue)  # how many may wait for it, and what a request costs here
        self._loading = threading.Lock()  # one load at a time
        self.loaded: Optional[Loaded] = None
        self._rest = 0.0  # resident bytes after the last request (or load): what the worker holds at rest
        self.last_error: Optional[str] = None
        self._failed: Optional[tuple[str, Any]] = None  # (tag, version_state) of the last refused version
        self._poll_problem: Optional[str] = None
        self._seen_mtime: Optional[int] = -1
        self._stop = threading.Event()
        # set once the first load was tried: BentoML hands requests to a worker that is still loading (another worker
        # answered /readyz), and those wait for it rather than get a 503
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="sdloop-champion-poller", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
                self._poll_problem = None
            except Exception as e:  # noqa: BLE001 - reading the pointer failed: keep serving, say it once
                text = f"{type(e).__name__}: {one_line(e)}"
                self.last_error = text
                if text != self._poll_problem:
                    self._poll_problem = text
                    log.error("checking the champion failed (%s); still serving %s", text, self.version)
            self._started.set()
            self._stop.wait(self.poll_s)

    @property
    def version(self) -> Optional[str]:
        loaded = self.loaded
        return loaded.tag if loaded else None

    def refresh(self, force: bool = False) -> Optional[str]:
        """Load the champion if the pointer changed (or ``force``); return the version now served.

        A version that is refused stays refused (not loaded again, not logged again) until the pointer names another
        version or its files change; ``force`` (POST /admin/reload) tries it again.
        """
        with self._loading:
            mtime = pointer_mtime(self.name)
            if not force and mtime == self._seen_mtime and self._failed is None and self.loaded is not None:
                return self.version
            self._seen_mtime = mtime
            tag = current_champion_tag(self.name) or (self.fallback_tag if mtime is None else None)
            if not tag or tag == self.version or (tag == self.fallback_tag and self.loaded is not None):
                self._failed, self.last_error = None, None
                return self.version
            state = version_state(tag)
            if not force and self._failed == (tag, state):
                return self.version
            started = time.monotonic()
            try:
                loaded = load_pipeline(tag, self.backend, self.threads)
            except Exception as e:  # noqa: BLE001 - refuse the version, keep the champion, say why once
                self._refuse(tag, state, e)
                return self.version
            if self.memory is not None:
                self._calibrate(loaded)
            self.loaded = loaded  # requests in flight keep the pipeline they took
            self._rest = 0.0
            self._failed, self.last_error = None, None
            log.info("serving %s (%s, %s, %s intra-op thread(s) from the %s) after %.1f s of loading", loaded.tag,
                     self.backend, ", ".join(map(str, loaded.info.get("providers", []))),
                     loaded.info.get("intra_op_num_threads"), loaded.info.get("threads_from"),
                     time.monotonic() - started)
            return self.version

    def _calibrate(self, loaded: Loaded) -> None:
        """Measure what a request costs the new version here (``bento.budget.calibrate``), under the pipeline lock so
        no other generation's memory is counted: serving pauses for those few seconds of a promotion."""
        import torch

        from bento.budget import calibrate

        def run(width: int, height: int, on_step: Callable[[], None]) -> None:
            def step(_pipe: Any, _i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
                on_step()
                return kwargs

            loaded.pipe(prompt="a photo", num_inference_steps=2, guidance_scale=7.5, width=width, height=height,
                        num_images_per_prompt=1, generator=torch.Generator().manual_seed(0),
                        callback_on_step_end=step, output_type="pil")

        started = time.monotonic()
        from bento.budget import resident_bytes

        low, high, multiple = loaded.sides(self.max_side)
        with self.lock:
            loaded.cost = calibrate(run, loaded.native, multiple, high, self.memory[0] - resident_bytes())
        log.info("measured %s in %.1f s: %s", loaded.tag, time.monotonic() - started,
                 "; ".join(f"{s['width']}x{s['height']}: {s['bytes'] / 2**20:.0f} MiB, {s['seconds_per_step']:.3f} "
                           "s/step" for s in loaded.cost.samples))

    def budget(self, loaded: Optional[Loaded] = None) -> Any:
        """This worker's memory budget with the served version's cost model (None: no budget)."""
        from bento.budget import Budget

        loaded = loaded or self.loaded
        if self.memory is None:
            return None
        return Budget(self.memory[0], self.memory[1], loaded.cost if loaded else None)

    def resting_bytes(self) -> float:
        """What this worker holds between requests: its resident memory after the last one (or now, before any)."""
        from bento.budget import resident_bytes

        return self._rest or resident_bytes()

    def check_memory(self, req: Any, loaded: Optional[Loaded], resident: float) -> None:
        """Refuse (``bento.budget.TooLarge``) a request that would take this worker past its memory budget, now
        holding ``resident`` bytes; a size outside the model's limits or more steps than its scheduler has is
        ``SizeNotSupported`` (``TooManySteps``) first."""
        if loaded is None:
            return
        width, height = loaded.size_for(req.width, req.height, self.max_side)
        if req.steps > loaded.max_steps:
            raise TooManySteps(f"steps: {loaded.tag}'s scheduler takes at most {loaded.max_steps} steps; got "
                               f"{req.steps}")
        budget = self.budget(loaded)
        if budget is not None:
            budget.check(width, height, req.num_images, resident, loaded.sides(self.max_side))

    def _refuse(self, tag: str, state: Any, error: BaseException) -> None:
        self._failed = (tag, state)
        self.last_error = f"{tag} was refused: {one_line(error).rstrip('.')}"
        serving = f"still serving {self.version}" if self.loaded else "no model is served"
        if isinstance(error, UserError):
            log.error("%s; %s", self.last_error, serving)
        else:  # not a damaged export but a bug: its traceback, once per version and file state
            log.error("%s; %s", self.last_error, serving, exc_info=error)

    def info(self) -> dict[str, Any]:
        """What GET /info answers: the served version and how it runs, and why a newer one was refused."""
        loaded = self.loaded
        out: dict[str, Any] = {"status": "ready" if loaded else "not_ready", "model_version": self.version,
                               "backend": self.backend}
        if loaded:
            low, high, m = loaded.sides(self.max_side)
            out.update(loaded.info)
            out.update({"native_width": loaded.native[0], "native_height": loaded.native[1],
                        "default_width": loaded.native[0], "default_height": loaded.native[1],
                        "limits": {**loaded.manifest.limits, "min_side": low, "max_side": high, "side_multiple": m,
                                   "max_tokens": loaded.max_tokens, "max_steps": loaded.max_steps}})
        budget = self.budget(loaded)
        if budget is not None:
            from bento.budget import resident_bytes

            out["budget"] = budget.public(resident_bytes())
        out["last_error"] = self.last_error
        return out

    def stop(self) -> None:
        self._stop.set()

    def generate(self, req: Any, deadline: float, cancel: Optional[threading.Event] = None,
                 progress: Optional[Callable[[int, int], None]] = None) -> tuple[str, list[tuple[int, Any]]]:
        """Run one request on the current pipeline under the lock; interrupt it at ``deadline`` (monotonic), or
        within one step of ``cancel`` being set (the client disconnected, or cancelled its job: ``Cancelled``).

        ``progress(i, n)`` is called after each denoising step (i of n), from the generating thread. A request that
        reaches a worker still loading waits for that first load (within its deadline). A request without
        width/height gets the model's native size; ``req`` is updated to the size drawn."""
        import torch

        from bento.budget import resident_bytes

        self.check_memory(req, self.loaded, self.resting_bytes())  # before it waits: it cannot fit even at rest
        self.admission.enter()  # QueueFull: too many wait already
        WAITING.set(self.admission.waiting)
        try:
            if not _wait_until(self._started.wait, deadline, cancel):
                raise DeadlineExceeded(0, "while the worker loads its model")
            if not _wait_until(self.lock.acquire, deadline, cancel):
                raise DeadlineExceeded(0, "while waiting for the pipeline")
            try:
                return self._run(req, deadline, torch, cancel, progress)
            finally:
                self.lock.release()
        finally:
            self.admission.leave()
            WAITING.set(self.admission.waiting)

    def _run(self, req: Any, deadline: float, torch: Any, cancel: Optional[threading.Event] = None,
             progress: Optional[Callable[[int, int], None]] = None) -> tuple[str, list[tuple[int, Any]]]:
        """One request under the lock: checked against the model, its deadline and the measured time per step, then
        run; the steps' timings go back to the admission estimates (also of an interrupted run)."""
        held = time.monotonic()
        loaded = self.loaded
        if loaded is None:
            raise NotReady(self.last_error or "no champion model is loaded yet")
        for field_name, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt)):
            n = len(loaded.pipe.tokenizer(text, truncation=False).input_ids)
            if n > loaded.max_tokens:
                raise PromptTooLong(f"{field_name} has {n} tokens; the text encoder takes at most "
                                    f"{loaded.max_tokens}: shorten it")
        from bento.budget import give_back, resident_bytes

        self.check_memory(req, loaded, resident_bytes())  # what the worker holds now (a promotion holds two)
        req.width, req.height = loaded.size_for(req.width, req.height, self.max_side)
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(0, "before the first denoising step")
        if cancel is not None and cancel.is_set():
            raise Cancelled(0, "before the first denoising step")
        shape = (req.width, req.height, req.num_images, req.guidance_scale > 1)
        guess = loaded.cost.seconds_per_step(req.width, req.height, req.num_images) if loaded.cost else None
        self.admission.check_time(shape, req.steps, left, guess)  # WontFinish
        ends: list[float] = []

        def on_step(_pipe: Any, _i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            ends.append(time.monotonic())
            STEPS.inc()
            if ends[-1] > deadline:
                raise DeadlineExceeded(len(ends), "during denoising")
            if cancel is not None and cancel.is_set():
                raise Cancelled(len(ends), "during denoising")
            if progress is not None:
                progress(len(ends), req.steps)
            return kwargs

        try:
            seeds = [req.seed + i for i in range(req.num_images)]
            out = loaded.pipe(prompt=req.prompt, negative_prompt=req.negative_prompt or None,
                              num_inference_steps=req.steps, guidance_scale=req.guidance_scale, width=req.width,
                              height=req.height, num_images_per_prompt=req.num_images,
                              generator=[torch.Generator().manual_seed(s) for s in seeds],
                              callback_on_step_end=on_step, output_type="pil")
            return loaded.tag, list(zip(seeds, out.images))
        finally:
            if len(ends) >= 2:
                self.admission.stepped(shape, (ends[-1] - ends[0]) / (len(ends) - 1))
            if ends:  # a request refused before its first step says nothing of how long one takes
                self.admission.ran(time.monotonic() - held)
            give_back()  # a large request's freed memory goes back to the system, not kept at its peak
            self._rest = resident_bytes()
