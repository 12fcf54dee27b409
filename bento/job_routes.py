"""The job endpoints (``POST /jobs``, ``GET /jobs/ID``, ``GET /jobs/ID/result``, ``DELETE /jobs/ID``), mounted by
``bento/service.py``; the guard has checked the body and the key. What a job is, how it runs and why it is ours and
not BentoML's task: ``bento/jobs.py``. Kept apart so each reads on a screen or two: this module answers HTTP, that
one runs generations.
"""

from __future__ import annotations

import datetime as dt
import secrets
import time
from typing import Any, Optional

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from bento.auth import key_of
from bento.budget import TooLarge
from bento.handlers import error, store_outage, unavailable
from bento.jobs import ACTIVE, ENDPOINT, ID_PATTERN, JOBS, STALE_S, STOPPED, Job, JobRunner
from bento.runtime import SizeNotSupported
from bento.schemas import Txt2ImgRequest



def _service() -> Any:
    import bentoml

    return bentoml.get_current_service()


def public(row: dict[str, Any]) -> dict[str, Any]:
    """A job's status as a client reads it; a queued or running job whose heartbeat stopped reads as failed."""
    state, err = row["state"], row["error"]
    if state in ACTIVE and (dt.datetime.now(dt.timezone.utc) - row["updated"]).total_seconds() > STALE_S:
        state, err = "failed", STOPPED
    return {"job_id": row["id"], "status": state, "step": row["step"], "steps": row["steps"],
            "model_version": row["model_version"], "error": err, "created": row["created"].isoformat(),
            "updated": row["updated"].isoformat(), "cancel_requested": row["cancel_requested"]}


def _links(job_id: str) -> dict[str, str]:
    return {"status_url": f"/jobs/{job_id}", "result_url": f"/jobs/{job_id}/result", "cancel_url": f"/jobs/{job_id}"}


def _not_found(job_id: str) -> JSONResponse:
    return error(404, "not_found", f"job {job_id[:64]!r} is unknown: use the job_id that POST /jobs answered, with the "
                                   "key that submitted it (results are kept SDLOOP_JOB_TTL_S after a job ends)",
                 ENDPOINT)


async def _find(request: Any) -> tuple[Optional[dict[str, Any]], Optional[Response]]:
    """The caller's job named in the path, or the answer to give instead (404 for another key's job too)."""
    service = _service()
    job_id = request.path_params["job_id"]
    if not ID_PATTERN.fullmatch(job_id):
        return None, _not_found(job_id)
    try:
        row = await run_in_threadpool(service.store.get_job, job_id)
    except Exception as e:  # noqa: BLE001
        if store_outage(e):
            return None, unavailable(e, ENDPOINT)
        raise
    if row is None:
        return None, _not_found(job_id)
    if service.config.keys_on:
        key = key_of(request)
        if key is None or not (key.allows("admin") or row["api_key_id"] == key.id):
            return None, _not_found(job_id)
    age = (dt.datetime.now(dt.timezone.utc) - row["updated"]).total_seconds()
    if age > service.config.job_ttl_s:  # expired, not purged yet
        return None, _not_found(job_id)
    return row, None


async def submit(request: Any) -> Response:
    """POST /jobs: record the job, queue it on this worker, answer 202 with its id and links."""
    service = _service()
    runner: JobRunner = service.jobs
    try:
        req = Txt2ImgRequest.model_validate_json(await request.body())
    except ValidationError as e:  # the guard checked it already; a second look costs nothing
        return error(400, "invalid", str(e).splitlines()[0], ENDPOINT)
    if req.seed is None:
        req.seed = secrets.randbelow(2**31)
    try:  # what the served version cannot take is refused now, not as a failed job later
        service.model.check_memory(req, service.model.loaded, service.model.resting_bytes())
    except SizeNotSupported as e:
        return error(400, "invalid", str(e), ENDPOINT)
    except TooLarge as e:
        return error(413, "too_large", str(e), ENDPOINT)
    if not runner.reserve():
        wait = runner.retry_after()
        resp = error(429, "busy", f"this worker's job queue is full ({runner.capacity} jobs wait, SDLOOP_JOBS); "
                                  f"retry in about {wait} s, or send it to another replica", ENDPOINT)
        resp.headers["Retry-After"] = str(wait)
        return resp
    arrived = getattr(request.state, "arrived", None) or time.monotonic()
    key = key_of(request)
    job = Job(secrets.token_hex(16), arrived + req.timeout_s, key.id if key else None)
    try:
        row = await run_in_threadpool(service.store.create_job, job.id, req.model_dump(mode="json"), req.steps,
                                      job.key_id, runner.worker)
    except Exception as e:  # noqa: BLE001
        runner.release()
        if store_outage(e):
            return unavailable(e, ENDPOINT)
        raise
    runner.enqueue(job)
    JOBS.labels(state="submitted").inc()
    await run_in_threadpool(runner.maybe_purge)
    return JSONResponse({**public(row), **_links(job.id)}, status_code=202,
                        headers={"Location": f"/jobs/{job.id}"})


async def status(request: Any) -> Response:
    """GET /jobs/ID: status, step i of n, version, error, times."""
    row, answer = await _find(request)
    if answer is not None:
        return answer
    return JSONResponse({**public(row), **_links(row["id"])})


async def result(request: Any) -> Response:
    """GET /jobs/ID/result: what /txt2img_json answers, once the job is done; 409 ``not_done`` before."""
    row, answer = await _find(request)
    if answer is not None:
        return answer
    view = public(row)
    if view["status"] != "done":
        why = f": {view['error']}" if view["error"] else ""
        return error(409, "not_done", f"job {row['id']} is {view['status']} (step {view['step']} of "
                                      f"{view['steps']}){why}; poll GET /jobs/{row['id']} until its status is done",
                     ENDPOINT)
    return JSONResponse(row["result"])


async def cancel(request: Any) -> Response:
    """DELETE /jobs/ID (or POST /jobs/ID/cancel): a queued job is cancelled at once (200), a running one within a
    denoising step (202, ``cancel_requested``); a job that already ended is 409 ``finished``."""
    row, answer = await _find(request)
    if answer is not None:
        return answer
    service = _service()
    if row["state"] in ("done", "failed"):
        return error(409, "finished", f"job {row['id']} already ended ({row['state']}); nothing to cancel", ENDPOINT)
    try:
        after = await run_in_threadpool(service.store.cancel_job, row["id"])
    except Exception as e:  # noqa: BLE001
        if store_outage(e):
            return unavailable(e, ENDPOINT)
        raise
    service.jobs.cancel_local(row["id"])  # ours: at once; another worker's: its watcher sees the flag
    if row["state"] == "queued" and after is not None and after["state"] == "cancelled":
        JOBS.labels(state="cancelled").inc()
    view = public(after or row)
    return JSONResponse({**view, **_links(row["id"])}, status_code=202 if view["status"] == "running" else 200)
