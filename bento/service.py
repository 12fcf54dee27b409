"""The sdloop service: txt2img from the champion, every generation logged, feedback stored, admin reload.

``bentoml serve`` from the repo root (or ``sdloop serve``). Settings come from the environment so a container is
configured without code: SDLOOP_HOME / BENTOML_HOME (model store and champion pointer), SDLOOP_STORE_URL (PostgreSQL
for several replicas), SDLOOP_WORKERS (default: cores) and SDLOOP_THREADS, SDLOOP_TORCH_THREADS (per worker),
SDLOOP_BACKEND (onnx, or pytorch as the fallback), SDLOOP_POLL_S (how often a worker checks for a new champion),
SDLOOP_ADMIN_TOKEN, SDLOOP_IMAGE_DIR, SDLOOP_DEADLINE_S, SDLOOP_MODEL_TAG (served when no champion pointer exists).
"""

from __future__ import annotations

import os
from typing import Any

from sdloop.workspace import use_bentoml_home

use_bentoml_home()
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

import bentoml  # noqa: E402 - after BENTOML_HOME

from bento.schemas import FeedbackRequest, FeedbackResponse, Txt2ImgRequest, Txt2ImgResponse  # noqa: E402
from sdloop.champion import current_champion_tag  # noqa: E402

CORES = os.cpu_count() or 1
WORKERS = int(os.environ.get("SDLOOP_WORKERS") or CORES)


@bentoml.service(name="sdloop", workers=WORKERS, threads=int(os.environ.get("SDLOOP_THREADS") or 8),
                 traffic={"timeout": 3700})
class SDService:
    def __init__(self) -> None:
        from bento.runtime import ModelHolder, configure_threads
        from monitor.store import open_store

        threads = configure_threads(int(os.environ.get("SDLOOP_TORCH_THREADS") or max(1, CORES // WORKERS)))
        self.store = open_store()
        self.model = ModelHolder(backend=os.environ.get("SDLOOP_BACKEND", "onnx"), threads=threads,
                                 poll_s=float(os.environ.get("SDLOOP_POLL_S") or 5),
                                 fallback_tag=os.environ.get("SDLOOP_MODEL_TAG") or None)

    def __is_ready__(self) -> bool:
        return self.model.loaded is not None

    @bentoml.on_shutdown
    def _stop_polling(self) -> None:
        self.model.stop()

    @bentoml.api(route="/txt2img", input_spec=Txt2ImgRequest)
    def txt2img(self, **params: Any) -> bytes:
        """One image as image/png; generation id, seed and model version in X-Generation-Id, X-Seed,
        X-Model-Version."""
        from bento import handlers

        return handlers.txt2img(self.model, self.store, params, png=True)

    @bentoml.api(route="/txt2img_json", input_spec=Txt2ImgRequest)
    def txt2img_json(self, **params: Any) -> Txt2ImgResponse:
        """Images as base64 PNG, each with its generation id and seed, and the model version."""
        from bento import handlers

        return handlers.txt2img(self.model, self.store, params, png=False)

    @bentoml.api(route="/feedback", input_spec=FeedbackRequest)
    def feedback(self, ctx: bentoml.Context, **params: Any) -> FeedbackResponse:
        """Rate a generation; a repeat from the same client replaces its earlier feedback."""
        from bento import handlers

        return handlers.with_status(ctx, handlers.feedback(self.store, params, ctx.request))

    @bentoml.api(route="/admin/reload")
    def admin_reload(self, ctx: bentoml.Context) -> dict:
        """Load the current champion now (Authorization: Bearer $SDLOOP_ADMIN_TOKEN)."""
        from bento import handlers

        return handlers.with_status(ctx, handlers.admin_reload(self.model, ctx.request))


# `bentoml build` imports this module: the champion of the workspace's store goes into the Bento with it (served from
# there when the container has no champion pointer: SDLOOP_MODEL_TAG=sdloop:latest in bentofile.yaml).
_packed = current_champion_tag()
if _packed and os.environ.get("SDLOOP_PACK_CHAMPION", "1") != "0":
    SDService.models.append(bentoml.models.BentoModel(_packed))
