"""The work behind each endpoint, kept beside the service so ``service.py`` stays one screen.

Every error is a JSON body ``{"error": what happened and what to do, "status": one word}`` with its HTTP status:
400 for a request the model cannot take (prompt too long, a size outside its limits), 413 ``too_large`` for one
whose measured memory does not fit the worker's budget (it names the largest size that fits), 404 unknown generation,
401/403 auth (``unauthorized``, ``forbidden``), 429 a key over its rate limit or too many failed admin tokens, 429
``busy`` (the worker's queue is full; ``Retry-After``), 503 not ready (with the reason: nothing promoted yet, or the
version refused and why) or ``store_unavailable`` (the monitoring store cannot be reached; it recovers by itself when
the store is back), 504 deadline (``status: "timeout"``; also a request refused before any step because its measured
steps cannot finish in time). Malformed requests never get here: ``bento.guard`` answers them. Records are committed
to the store before the answer goes out. Settings come from the service's ``ServeConfig``, never from the
environment here.
"""

from __future__ import annotations

import base64
import hmac
import io
import logging
import secrets
import time
import uuid
from typing import Any, Optional

from starlette.responses import JSONResponse, Response

from bento.admission import QueueFull, WontFinish
from bento.auth import FailureLimit, client_address, key_of
from bento.budget import TooLarge
from bento.runtime import ERRORS, FEEDBACK, GENERATIONS, LATENCY, Cancelled, DeadlineExceeded, ModelHolder, \
    NotReady, PromptTooLong, SizeNotSupported
from bento.config import ServeConfig
from bento.schemas import FeedbackRequest, FeedbackResponse, GeneratedImage, Txt2ImgRequest, Txt2ImgResponse

log = logging.getLogger("sdloop.service")
ADMIN_FAILURES = FailureLimit()
_OUTAGES = {"OperationalError", "InterfaceError", "DatabaseError", "DisconnectionError", "TimeoutError",
            "StoreError"}


def store_outage(e: BaseException) -> bool:
    """Whether ``e`` says the monitoring store cannot be reached or read (a 503 that heals), as opposed to a bug.
    By name, so that no module but ``monitor/store*.py`` imports SQLAlchemy."""
    return any(c.__name__ in _OUTAGES and c.__module__.split(".")[0] in ("sqlalchemy", "monitor")
               for c in type(e).__mro__)


def unavailable(e: BaseException, endpoint: str) -> JSONResponse:
    log.warning("%s: the monitoring store is unavailable (%s: %s)", endpoint, type(e).__name__,
                (str(e).splitlines() or [""])[0][:200])
    return error(503, "store_unavailable", "the monitoring store cannot be reached or read; try again shortly "
                                           "(the operator: check SDLOOP_STORE_URL's database)", endpoint)


def error(status: int, word: str, message: str, endpoint: str) -> JSONResponse:
    ERRORS.labels(endpoint=endpoint, reason=word).inc()
    return JSONResponse({"error": message, "status": word}, status_code=status)


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _failed(store: Any, endpoint: str, kind: str, message: str, version: Optional[str]) -> None:
    """Log a request that produced no image (the monitor's error rate); a store failure must not hide the cause."""
    try:
        store.log_failure(endpoint, kind, message, model_version=version)
    except Exception:  # noqa: BLE001
        pass


def _save_image(folder: Optional[Any], data: bytes, generation_id: str) -> Optional[str]:
    """Keep the PNG under $SDLOOP_IMAGE_DIR (default: the workspace's generations/)/YYYY-MM-DD/ID.png: retraining
    learns from the well-rated ones. SDLOOP_IMAGE_DIR=off (``folder`` None) keeps none."""
    from sdloop.atomic import write_bytes_atomic

    if folder is None:
        return None
    path = folder / time.strftime("%Y-%m-%d", time.gmtime()) / f"{generation_id}.png"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, data)
    except OSError as e:  # a full or read-only volume must not fail the request: the image is still answered
        log.warning("could not keep %s (%s); set SDLOOP_IMAGE_DIR to a writable folder, or =off", path, e)
        return None
    return str(path)


def txt2img(model: ModelHolder, store: Any, params: dict[str, Any], png: bool, config: ServeConfig,
            request: Any = None) -> Any:
    """Generate (at the model's native size unless the request names one), log every image (descriptors,
    parameters with the size drawn, latency, version), and answer PNG or JSON."""
    endpoint = "txt2img" if png else "txt2img_json"
    req = Txt2ImgRequest.model_construct(**params)
    if png and (req.num_images != 1 or getattr(req, "candidates", 1) != 1):
        return error(400, "invalid", "num_images/candidates: the PNG endpoint returns one image; use /txt2img_json "
                                     "for several", endpoint)
    if req.seed is None:
        req.seed = secrets.randbelow(2**31)
    # from its arrival (stamped by the guard): the wait for one of BentoML's request threads counts against it too
    started = getattr(request.state, "arrived", None) if request is not None else None
    started = time.monotonic() if started is None else started
    state = request.state if request is not None else None
    try:
        tag, images = model.generate(req, started + req.timeout_s, cancel=getattr(state, "disconnected", None))
    except Cancelled as e:  # nobody reads this answer: the client closed its connection
        _failed(store, endpoint, "cancelled", f"the client disconnected; {e}", model.version)
        log.info("%s: the client disconnected; %s", endpoint, e)
        return error(499, "client_closed", f"the client closed its connection; {e}", endpoint)
    except DeadlineExceeded as e:
        _failed(store, endpoint, "timeout", str(e), model.version)
        return error(504, "timeout", f"{e}; raise timeout_s (at most 3600) or ask for fewer steps or pixels",
                     endpoint)
    except WontFinish as e:
        _failed(store, endpoint, "timeout", str(e), model.version)
        return error(504, "timeout", f"{e}; raise timeout_s or ask for fewer steps or pixels", endpoint)
    except QueueFull as e:  # not logged to the store: under load that would add a write per refusal
        resp = error(429, "busy", f"{e}, or send it to another replica", endpoint)
        resp.headers["Retry-After"] = str(e.retry_after)
        return resp
    except NotReady as e:
        _failed(store, endpoint, "not_ready", str(e), model.version)
        return error(503, "not_ready", f"no model is loaded ({e}); promote a version that works with `sdloop "
                                       "models promote TAG` (or `sdloop models rollback`) and wait for /readyz",
                     endpoint)
    except PromptTooLong as e:
        return error(400, "prompt_too_long", str(e), endpoint)
    except TooLarge as e:
        return error(413, "too_large", str(e), endpoint)
    except SizeNotSupported as e:
        return error(400, "invalid", str(e), endpoint)
    except Exception as e:  # noqa: BLE001 - counted in the error rate the monitor watches, then answered as a 500
        _failed(store, endpoint, "server_error", f"{type(e).__name__}: {e}", model.version)
        raise
    latency = time.monotonic() - started
    LATENCY.observe(latency)
    key = key_of(request)
    try:
        out = log_images(store, config, model.backend, req, tag, images, latency, key.id if key else None)
    except Exception as e:  # noqa: BLE001 - an image that cannot be logged is not answered: it could not be rated
        if store_outage(e):
            return unavailable(e, endpoint)
        raise
    if png:
        return Response(base64.b64decode(out[0].image_png_base64), media_type="image/png",
                        headers={"X-Generation-Id": out[0].generation_id, "X-Seed": str(out[0].seed),
                                 "X-Model-Version": tag, "X-Latency-S": f"{latency:.4f}"})
    return Txt2ImgResponse(model_version=tag, latency_s=round(latency, 4), images=out)


def log_images(store: Any, config: ServeConfig, backend: str, req: Txt2ImgRequest, tag: str,
               images: list[tuple[int, Any]], latency: float, api_key_id: Optional[int]) -> list[GeneratedImage]:
    """Log every generated image (descriptors, parameters with the size drawn and its seed, latency, version, the
    key behind it), keep its PNG, count it, and return the answer's images; two candidates (``candidates: 2``) are
    recorded as one pair, whose id each image carries. Shared by the synchronous endpoints and
    the jobs runner (``bento/jobs.py``), so a job's images reach the monitor and retraining exactly as theirs do.
    A store error propagates (the caller answers it): an image that cannot be logged is never answered."""
    from sdloop.descriptors import image_descriptors

    params_logged = req.model_dump(exclude={"prompt", "negative_prompt"})
    out = []
    for seed, image in images:
        data = _png(image)
        gid = uuid.uuid4().hex
        store.log_generation(prompt=req.prompt, negative_prompt=req.negative_prompt,
                             params={**params_logged, "seed": seed, "backend": backend},
                             model_version=tag, latency_s=latency, descriptors=image_descriptors(image),
                             image_path=_save_image(config.generations_dir, data, gid), generation_id=gid,
                             api_key_id=api_key_id)
        GENERATIONS.labels(model_version=tag).inc()
        out.append(GeneratedImage(generation_id=gid, seed=seed, image_png_base64=base64.b64encode(data).decode()))
    if getattr(req, "candidates", 1) == 2 and len(out) == 2:  # one pair for POST /choose (bento/pairs.py)
        pair_id = store.create_pair([o.generation_id for o in out], api_key_id=api_key_id)
        for o in out:
            o.pair_id = pair_id
    return out


def with_status(ctx: Any, resp: Any) -> Any:
    """BentoML copies ctx.response.status_code onto the answer of an API that takes a context: carry ours over."""
    if isinstance(resp, Response):
        ctx.response.status_code = resp.status_code
    return resp


def feedback(store: Any, params: dict[str, Any], request: Any) -> Any:
    """Store (or replace) a client's feedback on a generation; 404 for an id never logged. With keys, the rater is
    the key (a client id names a user under it) and a key rates only its own generations unless it holds ``rater``;
    without keys the rater is the client id the caller declares, else ``anonymous`` (never its address)."""
    from monitor.store import FeedbackOfAnotherKey, UnknownGeneration

    fb = FeedbackRequest.model_construct(**params)
    key = key_of(request)
    client = fb.client_id or request.headers.get("x-client-id") or (key.name if key else "anonymous")
    try:
        if key is not None and store.get_generation(fb.generation_id) is not None \
                and not store.may_rate(key, fb.generation_id):
            return error(403, "forbidden", f"key {key.name!r} may rate only the generations it made (the 'rater' "
                                           "scope rates any)", "feedback")
        row = store.add_feedback(fb.generation_id, client, rating=fb.rating,
                                 thumbs=None if fb.thumbs is None else (1 if fb.thumbs == "up" else -1),
                                 comment=fb.comment, tags=list(fb.tags or []), api_key_id=key.id if key else None)
    except UnknownGeneration:
        return error(404, "not_found", f"generation_id {fb.generation_id!r} is unknown: use the generation_id a "
                                       "txt2img answer returned", "feedback")
    except FeedbackOfAnotherKey as e:
        return error(409, "conflict", str(e), "feedback")
    except Exception as e:  # noqa: BLE001
        if store_outage(e):
            return unavailable(e, "feedback")
        raise
    FEEDBACK.labels(kind="update" if row["updated_existing"] else "new").inc()
    return FeedbackResponse(status="stored", feedback_id=row["id"], updated=row["updated_existing"])


def admin_reload(model: ModelHolder, request: Any, config: ServeConfig) -> Any:
    """Load the champion now. Needs ``Authorization: Bearer $SDLOOP_ADMIN_TOKEN`` (or, with keys, a key with the
    admin scope, checked by the guard); disabled (403) without either. After 5 wrong tokens from one address in a
    minute, 429 until the minute is over: the token cannot be guessed at request speed. A refused version is a 500
    with the reason; the version served before keeps serving."""
    if key_of(request) is None:
        token = config.admin_token
        if not token:
            return error(403, "disabled", "admin endpoints are disabled: set SDLOOP_ADMIN_TOKEN on the server to "
                                          "enable them", "admin_reload")
        address = client_address(request.scope, config.proxy_networks)
        wait = ADMIN_FAILURES.retry_after(address)
        if wait:
            resp = error(429, "rate_limited", f"too many wrong admin tokens from {address}; retry in {wait} s",
                         "admin_reload")
            resp.headers["Retry-After"] = str(wait)
            return resp
        given = request.headers.get("authorization", "")
        if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(), token.encode()):
            ADMIN_FAILURES.failed(address)
            log.warning("POST /admin/reload from %s: 401 wrong or missing admin token", address)
            resp = error(401, "unauthorized", "send the admin token as 'Authorization: Bearer TOKEN'",
                         "admin_reload")
            resp.headers["WWW-Authenticate"] = "Bearer"
            return resp
    before = model.version
    try:
        now = model.refresh(force=True)
    except Exception as e:  # noqa: BLE001 - the pointer could not be read: the old model keeps serving
        return error(500, "reload_failed", f"reading the champion pointer failed ({type(e).__name__}: {e}); "
                                           f"still serving {before}", "admin_reload")
    if model.last_error:
        return error(500, "reload_failed", f"{model.last_error}; still serving {now or 'nothing'}", "admin_reload")
    return {"status": "ok", "previous": before, "model_version": now}


def info(_request: Any) -> Any:
    """GET /info: the served version, how it runs (providers, threads, spinning, IO binding), its native size and
    limits, the latency its export measured, the backend and the last refusal; 200 even when nothing is loaded (that
    is what /readyz is for), so an operator can read why."""
    import bentoml

    service = bentoml.get_current_service()
    body = service.model.info()
    settings = service.config.public()
    body["settings"] = {k: settings[k] for k in ("deadline_s", "max_side", "max_steps", "max_images", "queue",
                                                 "memory_mb", "workers", "torch_threads", "poll_s")}
    return JSONResponse(body)
