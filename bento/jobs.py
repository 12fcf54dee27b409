"""Long generations as jobs: submit, status with progress (step i of n), result, cancel, bound to the caller's key.

Why our own contract and not BentoML's ``@bentoml.task``: a task there has no progress and no owner, and its state
lives in the one worker process that took it. Here:

- ``POST /jobs`` takes the body of ``/txt2img_json`` (checked by ``bento.guard`` like it: schema, key, ``generate``
  scope, rate limit) and answers 202 at once with ``job_id`` (``secrets.token_hex(16)``: 128 random bits) and the
  links below. ``GET /jobs/ID``: ``{"job_id", "status": queued|running|done|failed|cancelled, "step", "steps",
  "model_version", "error", "created", "updated", "cancel_requested"}``. ``GET /jobs/ID/result``: exactly what
  ``/txt2img_json`` answers, once done (409 ``not_done`` before). ``DELETE /jobs/ID`` (or ``POST /jobs/ID/cancel``):
  a queued job is cancelled at once, a running one within one denoising step. Errors are ``{"error", "status"}``.
- Identity: with ``SDLOOP_AUTH=keys`` a job belongs to the key that submitted it; only that key, or one with the
  ``admin`` scope, may read or cancel it; any other key gets the same 404 as an unknown id, so it learns nothing of
  the job's existence. With keys off, the unguessable id is the capability.
- The state is a row of the monitoring store (``Store.create_job`` and friends, schema version 5), not this
  process's memory: with several workers and replicas behind a load balancer, the status, result and cancel of a job
  may land anywhere. Each worker runs its own jobs one at a time in a runner thread (``JobRunner``) from a bounded
  queue (``SDLOOP_JOBS``; past it 429 ``busy`` with ``Retry-After``), through the same pipeline, lock, admission and
  deadline as the synchronous endpoints (``ModelHolder.generate``), so a job never runs beside another generation.
  Progress is written at most every ``POLL_S`` by a watcher thread (never by the generating thread, which holds the
  pipeline), which also polls the row for a cancel that landed on another worker, and touches its jobs' rows every
  ``HEARTBEAT_S``: a queued or running job whose row was not touched for ``STALE_S`` reads as failed (its worker
  stopped) instead of running for ever.
- The deadline is the request's ``timeout_s`` from the submit: time in the job queue counts, as it does for txt2img.
  Every image is logged to the store exactly as the synchronous path logs it (``handlers.log_images``), and a job
  that ends without images is logged as a failure like a failed request. A finished job's status and result are
  kept ``SDLOOP_JOB_TTL_S`` (default 3600 s) after it ended, then purged (lazily, at most once a minute per worker,
  on a submit).

This module runs jobs (``Job``, ``JobRunner``); ``bento/job_routes.py`` answers their HTTP endpoints.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

from prometheus_client import Counter

from bento.admission import QueueFull, WontFinish
from bento.budget import TooLarge
from bento.handlers import _failed, log_images, store_outage
from bento.runtime import Cancelled, DeadlineExceeded, NotReady, PromptTooLong, SizeNotSupported
from bento.schemas import Txt2ImgRequest, Txt2ImgResponse

log = logging.getLogger("sdloop.service")

JOBS = Counter("sdloop_jobs", "Generation jobs: submitted, and finished by how they ended", ["state"])
POLL_S = 0.5            # progress written, and a cancel from another worker looked for, at most this often
HEARTBEAT_S = 10.0      # a worker touches its queued and running jobs' rows this often ...
STALE_S = 60.0          # ... and a queued or running job untouched this long reads as failed
PURGE_EVERY_S = 60.0
ACTIVE = ("queued", "running")
STOPPED = "the worker that ran it stopped; submit it again"
ENDPOINT = "jobs"
ID_PATTERN = re.compile(r"[0-9a-f]{32}")  # a job id: secrets.token_hex(16)


@dataclass
class Job:
    """What the owning worker keeps about one of its queued or running jobs."""

    id: str
    deadline: float                      # monotonic: the submit's arrival + timeout_s
    key_id: Optional[int]
    cancel: threading.Event = field(default_factory=threading.Event)
    step: int = 0                        # the last step done, as the generating thread reported it ...
    steps: int = 0
    written: int = 0                     # ... and the last one written to the store


class JobRunner:
    """One worker's jobs: a bounded queue, the thread that runs them one at a time, and the watcher that keeps their
    rows alive and notices cancels made on other workers."""

    def __init__(self, model: Any, store: Any, config: Any) -> None:
        self.model, self.store, self.config = model, store, config
        self.capacity = config.jobs
        self.worker = f"{socket.gethostname()}:{os.getpid()}"[:200]
        self._cond = threading.Condition()
        self._queue: deque[str] = deque()
        self._reserved = 0
        self._owned: dict[str, Job] = {}
        self._stop = threading.Event()
        self._last_purge = 0.0
        self._threads = [threading.Thread(target=self._run, name="sdloop-jobs", daemon=True),
                         threading.Thread(target=self._watch, name="sdloop-jobs-watch", daemon=True)]
        for t in self._threads:
            t.start()

    # -- the queue ------------------------------------------------------------------------------------------------

    def reserve(self) -> bool:
        """Hold a place in the queue for a job about to be recorded (False: the queue is full)."""
        with self._cond:
            if self._stop.is_set() or len(self._queue) + self._reserved >= self.capacity:
                return False
            self._reserved += 1
            return True

    def release(self) -> None:
        with self._cond:
            self._reserved -= 1

    def enqueue(self, job: Job) -> None:
        """Queue a job recorded in the store (its place was reserved)."""
        with self._cond:
            self._reserved -= 1
            self._owned[job.id] = job
            self._queue.append(job.id)
            self._cond.notify()

    def retry_after(self) -> int:
        with self._cond:
            ahead = len(self._queue) + 1
        return self.model.admission.retry_after(ahead)

    def cancel_local(self, job_id: str) -> None:
        """A cancel for a job of this worker: a running one stops within a step, a queued one leaves the queue."""
        with self._cond:
            job = self._owned.get(job_id)
            if job is None:
                return
            job.cancel.set()
            if job_id in self._queue:  # its row says cancelled already (or will, when the runner reaches it)
                self._queue.remove(job_id)
                self._owned.pop(job_id, None)

    def maybe_purge(self) -> None:
        """Delete jobs past the TTL, at most once per PURGE_EVERY_S in this worker (best effort)."""
        now = time.monotonic()
        if now - self._last_purge < PURGE_EVERY_S:
            return
        self._last_purge = now
        try:
            gone = self.store.purge_jobs(dt.datetime.now(dt.timezone.utc)
                                         - dt.timedelta(seconds=self.config.job_ttl_s))
            if gone:
                log.info("jobs: purged %d job(s) older than SDLOOP_JOB_TTL_S=%s", gone, self.config.job_ttl_s)
        except Exception as e:  # noqa: BLE001 - the next submit tries again
            log.warning("jobs: purging old jobs failed (%s: %s)", type(e).__name__, str(e)[:200])

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop taking jobs; the running one stops within a step. Jobs it leaves are marked failed (best effort;
        otherwise they read as failed once their heartbeat is STALE_S old)."""
        self._stop.set()
        with self._cond:
            left = list(self._owned.values())
            self._queue.clear()
            self._cond.notify_all()
        for job in left:
            job.cancel.set()
        for t in self._threads:
            t.join(timeout_s)
        for job in left:
            try:
                self.store.finish_job(job.id, "failed", error=STOPPED)
            except Exception:  # noqa: BLE001 - the stale heartbeat says it anyway
                pass

    # -- the threads ----------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop.is_set():
                    self._cond.wait(1.0)
                if self._stop.is_set():
                    return
                job = self._owned[self._queue.popleft()]
            try:
                self._execute(job)
            except Exception as e:  # noqa: BLE001 - a bug: the job fails with the reason, the runner goes on
                log.error("jobs: job %s failed", job.id, exc_info=e)
                _failed(self.store, ENDPOINT, "server_error", f"{type(e).__name__}: {e}", self.model.version)
                self._finish(job, "failed", error=f"server_error: {type(e).__name__}: {e}")
            finally:
                with self._cond:
                    self._owned.pop(job.id, None)

    def _watch(self) -> None:
        beat = time.monotonic()
        problem = ""
        while not self._stop.wait(POLL_S):
            with self._cond:
                ids = list(self._owned)
            if not ids:
                continue
            try:
                for job in self._progressed():
                    job.written = job.step
                    if self.store.job_progress(job.id, job.step, job.steps):
                        job.cancel.set()  # cancelled on another worker: the next step ends it
                for job_id in self.store.jobs_to_cancel(ids):
                    self.cancel_local(job_id)
                if time.monotonic() - beat >= HEARTBEAT_S:
                    self.store.touch_jobs(ids)
                    beat = time.monotonic()
                problem = ""
            except Exception as e:  # noqa: BLE001 - the store is down: say it once, keep trying
                text = f"{type(e).__name__}: {str(e)[:200]}"
                if text != problem:
                    log.warning("jobs: the monitoring store cannot be read (%s); cancels from other workers and "
                                "heartbeats wait for it", text)
                problem = text

    def _progressed(self) -> list[Job]:
        with self._cond:
            return [j for j in self._owned.values() if j.step != j.written]

    def _finish(self, job: Job, state: str, **values: Any) -> None:
        try:
            if self.store.finish_job(job.id, state, **values):
                JOBS.labels(state=state).inc()
        except Exception as e:  # noqa: BLE001 - its heartbeat stops, so it reads as failed later
            log.warning("jobs: could not record job %s as %s (%s: %s)", job.id, state, type(e).__name__,
                        str(e)[:200])

    def _generate(self, job: Job, req: Txt2ImgRequest, progress: Any) -> tuple[str, list[tuple[int, Any]]]:
        """The model's generate; a pipeline queue full of synchronous requests means wait for room (within the
        deadline, ending at once on a cancel), not failure."""
        while True:
            try:
                return self.model.generate(req, job.deadline, cancel=job.cancel, progress=progress)
            except QueueFull as e:
                wait = min(float(e.retry_after), job.deadline - time.monotonic())
                if wait <= 0:
                    raise DeadlineExceeded(0, "while waiting for room in the worker's queue") from None
                if job.cancel.wait(wait):
                    raise Cancelled(0, "while waiting for room in the worker's queue") from None

    def _execute(self, job: Job) -> None:
        store, model = self.store, self.model
        row = store.start_job(job.id, self.worker)
        if row is None:  # cancelled while queued (here or on another worker), or purged
            return
        req = Txt2ImgRequest.model_validate(row["request"])

        def progress(i: int, n: int) -> None:
            # no store call here: this thread holds the pipeline, and a slow store must not slow the steps; the
            # watcher writes the step (at most every POLL_S) and reads the cancel flag back in the same call
            job.steps, job.step = n, i  # steps first: the watcher reads step, then steps

        started = time.monotonic()
        try:
            tag, images = self._generate(job, req, progress)
        except Cancelled as e:
            if self._stop.is_set():
                _failed(store, ENDPOINT, "cancelled", f"the worker stopped; {e}", model.version)
                self._finish(job, "failed", error=STOPPED, step=e.steps)
            else:
                _failed(store, ENDPOINT, "cancelled", f"the job was cancelled; {e}", model.version)
                self._finish(job, "cancelled", error=str(e), step=e.steps)
            return
        except (DeadlineExceeded, WontFinish) as e:
            _failed(store, ENDPOINT, "timeout", str(e), model.version)
            self._finish(job, "failed", error=f"timeout: {e}; raise timeout_s (at most 3600) or ask for fewer "
                                              "steps or pixels")
            return
        except NotReady as e:
            _failed(store, ENDPOINT, "not_ready", str(e), model.version)
            self._finish(job, "failed", error=f"not_ready: no model is loaded ({e}); submit it again once "
                                              "/readyz answers 200")
            return
        except (PromptTooLong, SizeNotSupported) as e:
            self._finish(job, "failed", error=f"invalid: {e}")
            return
        except TooLarge as e:  # the worker's memory is held by something else now (a promotion loads two models)
            self._finish(job, "failed", error=f"too_large: {e}")
            return
        latency = time.monotonic() - started
        try:
            out = log_images(store, self.config, model.backend, req, tag, images, latency, job.key_id)
        except Exception as e:  # noqa: BLE001 - images that cannot be logged are not answered: they could not be rated
            if not store_outage(e):
                raise
            self._finish(job, "failed", error="store_unavailable: the monitoring store could not record the images; "
                                              "submit it again shortly")
            return
        answer = Txt2ImgResponse(model_version=tag, latency_s=round(latency, 4), images=out)
        self._finish(job, "done", result=answer.model_dump(mode="json"), model_version=tag, step=req.steps)
