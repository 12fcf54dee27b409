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
  serving. A request's default size is the model's native one, from its manifest. Loading a version and its limits
  live in ``bento.loading`` (re-exported here); its memory budget and measured cost in ``bento.budget``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Optional

from prometheus_client import Counter, Gauge, Histogram

from bento.admission import Admission
from bento.loading import (Loaded, PromptTooLong, SizeNotSupported, TooManySteps, configure_threads,  # noqa: F401
                           load_pipeline, model_dir, version_state)
from sdloop.champion import MODEL_NAME, current_champion_tag, pointer_mtime
from sdloop.errors import UserError, one_line

log = logging.getLogger("sdloop.serve")
_MEASURED: dict[tuple[Any, ...], Any] = {}  # (tag, backend, threads, max side) -> bento.budget.CostModel

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

        from bento.budget import resident_bytes

        # once per version, backend, threads and size cap in a process: a service restarted in the same process (a
        # test's, an embedding's) draws the same model at the same cost, and a worker loads each version once anyway
        key = (loaded.tag, self.backend, loaded.info.get("intra_op_num_threads"), self.max_side)
        if key in _MEASURED:
            loaded.cost = _MEASURED[key]
            return
        started = time.monotonic()
        low, high, multiple = loaded.sides(self.max_side)
        with self.lock:
            loaded.cost = _MEASURED[key] = calibrate(run, loaded.native, multiple, high,
                                                     self.memory[0] - resident_bytes())
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
            n = loaded.prompt_tokens(text)
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
