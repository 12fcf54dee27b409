"""The gate in front of the service's APIs: malformed requests and unknown callers are answered here, in one line.

Why a middleware: BentoML validates an API's input inside its own endpoint wrapper and logs every validation 400 as
an ERROR with a traceback, answers without the ``status`` field our clients read, and turns a multipart body without
a boundary into a 500. This ASGI middleware (added with ``Service.add_asgi_middleware``, BentoML's public hook) reads
the body of each API request first and checks what a client can get wrong: headers (NUL characters, an over-long
``X-Client-Id``), the content type, the JSON against the same pydantic schema (strict numbers, no NUL in text), and,
with ``SDLOOP_AUTH=keys``, the API key, its scope and its rate limit. A refusal is ``{"error", "status"}`` (plus
pydantic's ``detail`` for a schema error), one WARNING line, and a count in ``sdloop_errors_total``; a request that
passes goes on to BentoML with its body replayed and its key in ``request.state.api_key``.

Jobs (``bento/jobs.py``): ``POST /jobs`` is checked as txt2img is (body schema, key, ``generate`` scope, rate limit).
Reading or cancelling a job (``/jobs/ID...``) has no body; with keys on it needs a known key (401 otherwise) but
neither a scope nor a token of the rate limit: a client polls its job's status, and that must not use up the budget
of its generations. Whether the key may see that job (the one that submitted it, or an admin key) is the handler's
question, answered 404 otherwise so that another key learns nothing of the job's existence.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Any, Awaitable, Callable, Optional

from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse

from bento.auth import Authenticator, client_address, presented_key
from bento.config import ServeConfig
from bento.schemas import ChooseRequest, FeedbackRequest, Txt2ImgRequest

log = logging.getLogger("sdloop.service")

# path -> (endpoint name in the metrics, request schema, scope a key needs)
ROUTES: dict[str, tuple[str, Optional[type[BaseModel]], str]] = {
    "/txt2img": ("txt2img", Txt2ImgRequest, "generate"),
    "/txt2img_json": ("txt2img_json", Txt2ImgRequest, "generate"),
    "/feedback": ("feedback", FeedbackRequest, "feedback"),
    "/choose": ("choose", ChooseRequest, "feedback"),  # which of two candidates was kept: /feedback's rules
    "/admin/reload": ("admin_reload", None, "admin"),
    "/jobs": ("jobs", Txt2ImgRequest, "generate"),  # submit a job: checked exactly as a txt2img request is
}
JOB_PREFIX = "/jobs/"  # GET /jobs/ID, GET /jobs/ID/result, DELETE /jobs/ID, POST /jobs/ID/cancel: see job_access
MAX_BODY = 1 << 20          # the largest valid request is a few KB
MAX_CLIENT_ID = 200         # as FeedbackRequest.client_id

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Refusal(Exception):
    """A request answered here: its status, one word, what to do, and optionally pydantic's detail and headers."""

    def __init__(self, status: int, word: str, message: str, detail: Any = None,
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.word, self.message, self.detail, self.headers = status, word, message, detail, headers

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {"error": self.message, "status": self.word}
        if self.detail is not None:
            body["detail"] = self.detail
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def refuse(scope: Scope, endpoint: str, refusal: Refusal, proxies: list[Any]) -> JSONResponse:
    """Count and log a client's mistake in one WARNING line (never a traceback), and build its answer."""
    from bento.runtime import ERRORS  # registered in the workers only

    ERRORS.labels(endpoint=endpoint, reason=refusal.word).inc()
    log.warning("%s %s from %s: %d %s: %s", scope.get("method"), scope.get("path"),
                client_address(scope, proxies), refusal.status, refusal.word, refusal.message)
    return refusal.response()


def check_headers(scope: Scope) -> None:
    """NUL in a header value (PostgreSQL cannot store it), an over-long X-Client-Id, a body that is not JSON (a form,
    which BentoML would try to read and fail on with a traceback, or a 500 without a boundary)."""
    for name, value in scope.get("headers", []):
        if b"\x00" in value:
            raise Refusal(400, "invalid", f"header {name.decode('latin-1')} contains a NUL character")
        if name == b"x-client-id" and len(value) > MAX_CLIENT_ID:
            raise Refusal(400, "invalid", f"X-Client-Id has {len(value)} characters; at most {MAX_CLIENT_ID}")
    media = dict(scope.get("headers", [])).get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
    if media not in ("", "application/json"):  # BentoML would parse forms (a 500 without a boundary) and pickles
        raise Refusal(415, "unsupported_media_type", f"Content-Type {media!r} is not accepted: send a JSON body "
                                                     "with 'Content-Type: application/json'")


def check_body(body: bytes, schema: Optional[type[BaseModel]]) -> None:
    """The body against the endpoint's schema (the same one BentoML validates with, so they agree)."""
    if schema is None:
        return
    try:
        schema.model_validate_json(body)
    except ValidationError as e:
        detail = json.loads(e.json(include_context=False, include_input=False, include_url=False))
        where = "; ".join(f"{'.'.join(str(p) for p in d['loc']) or 'body'}: {d['msg']}" for d in detail)
        raise Refusal(400, "invalid", where, detail=detail) from None


def identify(auth: Authenticator, scope: Scope) -> Any:
    """The caller's active key record (any scope, no rate-limit token taken), or a 401 Refusal."""
    key = presented_key(scope)
    record = auth.lookup(key) if key else None
    if record is None:
        raise Refusal(401, "unauthorized", "send the API key that submitted the job as 'Authorization: Bearer "
                                           "sdk_...'; this one is missing, unknown or revoked",
                      headers={"WWW-Authenticate": "Bearer"})
    return record


class RequestGuard:
    """ASGI middleware: checks each POST to an API before BentoML sees it (see the module docstring)."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app
        self._auth: Optional[Authenticator] = None

    def current(self) -> Authenticator:
        """The running service instance's settings (read once per instance, as the handlers read them), with their
        key cache and rate buckets; a new instance (a restart in a test) gets fresh ones."""
        import bentoml

        config: ServeConfig = bentoml.get_current_service().config
        if self._auth is None or self._auth.config is not config:
            self._auth = Authenticator(config)
        return self._auth

    async def job_access(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A job's status, result or cancel: headers checked, and with keys on a known key in ``state.api_key``."""
        auth = self.current()
        try:
            check_headers(scope)
            if auth.config.keys_on:
                key = await run_in_threadpool(identify, auth, scope)
                scope.setdefault("state", {})["api_key"] = key
        except Refusal as refusal:
            await refuse(scope, "jobs", refusal, auth.config.proxy_networks)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path", "").startswith(JOB_PREFIX):
            await self.job_access(scope, receive, send)
            return
        route = ROUTES.get(scope.get("path", "")) if scope["type"] == "http" else None
        if route is None or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        endpoint, schema, needs = route
        # a request's deadline counts from here: reading its body, this check and BentoML's thread pool count too
        scope.setdefault("state", {})["arrived"] = time.monotonic()
        auth = self.current()
        body, more = b"", True
        try:
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > MAX_BODY:
                    raise Refusal(413, "too_large", f"the body is over {MAX_BODY} bytes")
            check_headers(scope)
            if auth.config.keys_on:  # before the body's check: a caller without a key learns nothing of the schema
                key = await run_in_threadpool(auth.authorize, scope, needs)
                scope.setdefault("state", {})["api_key"] = key
            check_body(body, schema)
        except Refusal as refusal:
            await refuse(scope, endpoint, refusal, auth.config.proxy_networks)(scope, receive, send)
            return
        # a client that closes its connection cancels its generation within one step: after the whole body the only
        # message left on the connection is http.disconnect, so one task waits for it and sets the request's event
        # (the sync handler's thread checks it between steps); the app's own receive() gets the same message
        disconnected = threading.Event()
        scope["state"]["disconnected"] = disconnected

        async def watch() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected.set()
            return message

        watcher = asyncio.ensure_future(watch())
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await asyncio.shield(watcher)
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            await self.app(scope, replay, send)
        finally:
            watcher.cancel()
