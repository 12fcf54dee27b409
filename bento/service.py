"""The sdloop service: txt2img from the champion, every generation logged, feedback stored, two candidates and the
caller's choice between them (``"candidates": 2``, POST /choose: bento/pairs.py), admin reload, GET /info,
and long generations as jobs (POST /jobs, GET /jobs/ID, GET /jobs/ID/result, DELETE /jobs/ID: bento/jobs.py).

``bentoml serve`` from the repo root (or ``sdloop serve``, which checks the settings, the store and the port first).
Settings come from the environment so a container is configured without code; ``bento.config.ServeConfig`` reads
and checks them (SDLOOP_WORKERS, SDLOOP_THREADS, SDLOOP_TORCH_THREADS, SDLOOP_BACKEND, SDLOOP_POLL_S,
SDLOOP_DEADLINE_S, SDLOOP_QUEUE, SDLOOP_MEMORY_MB, SDLOOP_MEMORY_SHARE, SDLOOP_MMAP_THRESHOLD_KIB, SDLOOP_MAX_*,
SDLOOP_STORE_URL, SDLOOP_IMAGE_DIR, SDLOOP_ADMIN_TOKEN, SDLOOP_MODEL_TAG, SDLOOP_AUTH, SDLOOP_RATE_LIMIT_PER_MIN,
SDLOOP_TRUSTED_PROXIES, SDLOOP_JOBS, SDLOOP_JOB_TTL_S), and
SDLOOP_HOME / BENTOML_HOME name the model store and champion pointer.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from sdloop.workspace import use_bentoml_home

use_bentoml_home()
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

import bentoml  # noqa: E402 - after BENTOML_HOME
from starlette.applications import Starlette  # noqa: E402
from starlette.routing import Route  # noqa: E402

from bento.config import ServeConfig  # noqa: E402
from bento.guard import RequestGuard  # noqa: E402
from bento.schemas import (ChooseRequest, ChooseResponse, FeedbackRequest, FeedbackResponse,  # noqa: E402
                           Txt2ImgRequest, Txt2ImgResponse)
from sdloop.champion import current_champion_tag  # noqa: E402

CONFIG = ServeConfig.from_env()  # workers and request threads are fixed when the class is declared


def _info(request: Any) -> Any:
    from bento import handlers  # the handlers (and the metrics they register) load in the workers only

    return handlers.info(request)


def _jobs(name: str) -> Any:
    async def endpoint(request: Any) -> Any:  # bento/job_routes.py (its metrics) loads in the workers only
        from bento import job_routes

        return await getattr(job_routes, name)(request)

    return endpoint


# GET: BentoML's own APIs are all POST. /jobs: long generations as jobs (bento/jobs.py; the guard checks them too)
_INFO = Starlette(routes=[Route("/info", _info, methods=["GET"]),
                          Route("/jobs", _jobs("submit"), methods=["POST"]),
                          Route("/jobs/{job_id}", _jobs("status"), methods=["GET"]),
                          Route("/jobs/{job_id}", _jobs("cancel"), methods=["DELETE"]),
                          Route("/jobs/{job_id}/cancel", _jobs("cancel"), methods=["POST"]),
                          Route("/jobs/{job_id}/result", _jobs("result"), methods=["GET"])])


@bentoml.asgi_app(_INFO, path="/")
@bentoml.service(name="sdloop", workers=CONFIG.workers, threads=CONFIG.threads, traffic={"timeout": 3700})
class SDService:
    def __init__(self) -> None:
        from bento.budget import budget_for, configure_allocator
        from bento.runtime import ModelHolder, configure_threads
        from monitor.store import open_store

        self.config = cfg = ServeConfig.from_env()  # this worker's settings, read once
        if cfg.mmap_threshold_kib:  # large buffers go back to the system when freed (bento/budget.py)
            configure_allocator(cfg.mmap_threshold_kib * 1024)
        configure_threads(cfg.torch_threads or max(1, (os.cpu_count() or 1) // cfg.workers))
        self.store = open_store(cfg.resolved_store_url())
        self.model = ModelHolder(backend=cfg.backend, threads=cfg.torch_threads or None, poll_s=cfg.poll_s,
                                 fallback_tag=cfg.model_tag or None, max_side=cfg.max_side,
                                 queue=cfg.queue, memory=budget_for(cfg.memory_mb, cfg.memory_share, cfg.workers))
        from bento.jobs import JobRunner

        self.jobs = JobRunner(self.model, self.store, cfg)  # this worker's job queue and runner (SDLOOP_JOBS)

    def __is_ready__(self) -> bool:
        return self.model.loaded is not None

    @bentoml.on_shutdown
    def _stop_polling(self) -> None:
        self.jobs.stop()  # its running job stops within a step; jobs left are marked failed
        self.model.stop()

    @bentoml.api(route="/txt2img", input_spec=Txt2ImgRequest)
    def txt2img(self, ctx: bentoml.Context, **params: Any) -> bytes:
        """One image as image/png (default size: the model's native one); generation id, seed and model version in
        X-Generation-Id, X-Seed, X-Model-Version."""
        from bento import handlers

        return handlers.with_status(ctx, handlers.txt2img(self.model, self.store, params, png=True,
                                                          config=self.config, request=ctx.request))

    @bentoml.api(route="/txt2img_json", input_spec=Txt2ImgRequest)
    def txt2img_json(self, ctx: bentoml.Context, **params: Any) -> Txt2ImgResponse:
        """Images as base64 PNG, each with its generation id and seed, and the model version."""
        from bento import handlers

        return handlers.with_status(ctx, handlers.txt2img(self.model, self.store, params, png=False,
                                                          config=self.config, request=ctx.request))

    @bentoml.api(route="/feedback", input_spec=FeedbackRequest)
    def feedback(self, ctx: bentoml.Context, **params: Any) -> FeedbackResponse:
        """Rate a generation; a repeat from the same client replaces its earlier feedback."""
        from bento import handlers

        return handlers.with_status(ctx, handlers.feedback(self.store, params, ctx.request))

    @bentoml.api(route="/choose", input_spec=ChooseRequest)
    def choose(self, ctx: bentoml.Context, **params: Any) -> ChooseResponse:
        """Say which of two candidates (``"candidates": 2``) was kept; a repeat replaces the earlier choice."""
        from bento import handlers, pairs

        return handlers.with_status(ctx, pairs.choose(self.store, params, ctx.request))

    @bentoml.api(route="/admin/reload")
    def admin_reload(self, ctx: bentoml.Context) -> dict:
        """Load the current champion now (Authorization: Bearer $SDLOOP_ADMIN_TOKEN)."""
        from bento import handlers

        return handlers.with_status(ctx, handlers.admin_reload(self.model, ctx.request, self.config))


SDService.add_asgi_middleware(RequestGuard)  # malformed requests and unknown callers end here (bento/guard.py)

# `bentoml build` imports this module: the champion of the workspace's store goes into the Bento with it (served from
# there when the container has no champion pointer: SDLOOP_MODEL_TAG=sdloop:latest in bentofile.yaml).
_packed = current_champion_tag()
if _packed and CONFIG.pack_champion:
    SDService.models.append(bentoml.models.BentoModel(_packed))
elif CONFIG.pack_champion and len(sys.argv) > 1 and sys.argv[1] == "build" and "bentoml" in sys.argv[0]:
    # a Bento without a model builds "successfully" at 0 B and serves 503 forever in its container: refuse
    raise SystemExit("error: no champion to pack into the Bento (the workspace's model store has none): promote a "
                     "version first (`sdloop models promote TAG`, or run `sdloop demo`), or build without a model "
                     "with SDLOOP_PACK_CHAMPION=0 when the container gets its store another way.")
