"""The blind review page: a small stdlib web server over a review folder (``finetune.evaluation.review``).

``GET /`` shows a reviewer the next pair in their own order (a new reviewer gets a fresh id in a signed cookie;
``?reviewer=NAME`` gives it a name), ``GET /image/PAIR/left|right`` the images, ``POST /vote`` stores a vote. What a
caller sends is bounded before anything is read or stored:

- a vote needs a ``Content-Length`` (411 without one or with a chunked body), a well-formed one (400: a negative or
  non-numeric length), at most ``MAX_BODY`` bytes (413, answered without reading the body);
- the whole request must arrive within ``request_timeout_s`` (408; a connection that sends too slowly is closed);
- a pair id is a small number naming a pair (400 otherwise, however long), a choice one of left/none/right (400);
- a vote needs a reviewer cookie this server signed (403 for an invented or altered one, 400 for none): refused
  votes are counted per reason (``review summary`` reports them), never stored;
- every error is a JSON body ``{"status": "error", "code": N, "error": "..."}`` (an HTML page to a browser), and a
  bug in a handler is a 500 with one log line, never a dropped connection or a traceback on the client's side.
"""

from __future__ import annotations

import html
import json
import logging
import re
import socket
import threading
import time
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional
from urllib.parse import parse_qs, urlparse

from finetune.evaluation.review import CHOICES, COOKIE, ReviewApp, Reviewer, ReviewError

log = logging.getLogger("sdloop.review")

MAX_BODY = 2048            # a vote is about 30 bytes of form data
REQUEST_TIMEOUT_S = 10.0   # from the connection to the last byte of the request
DRAIN_BYTES = 64 * 1024    # unread body bytes read (and dropped) after an early answer, so the client sees it

PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>sdloop blind review</title>
<meta name="viewport" content="width=device-width,initial-scale=1"><style>
body{{font:15px/1.45 system-ui,sans-serif;max-width:980px;margin:24px auto;padding:0 16px;color:#1d2327}}
h1{{font-size:20px;margin:0}}.sub{{color:#5a6470;margin:2px 0 16px}}.prompt{{font-size:18px;margin:12px 0}}
.pair{{display:grid;grid-template-columns:1fr 1fr;gap:20px}}figure{{margin:0;text-align:center}}
img{{width:100%;max-width:420px;aspect-ratio:1;object-fit:contain;image-rendering:pixelated;border:1px solid #ccd;
border-radius:6px;background:#fff}}figcaption{{color:#5a6470}}.buttons{{display:flex;gap:12px;margin:18px 0}}
button{{flex:1;font-size:16px;padding:12px;border-radius:8px;border:1px solid #aab;background:#f3f5f7;cursor:pointer}}
button:hover{{background:#e4e9ee}}.done{{background:#e6f4ea;padding:16px;border-radius:8px}}
.small{{color:#6b7580;font-size:13px}}</style></head><body>
<h1>Blind review</h1><p class="sub">{sub}</p>{body}
<p class="small">Keys: 1 = left, 2 = no preference, 3 = right. Models are not named and sides are random.</p>
<script>document.addEventListener('keydown',e=>{{const id={{'1':'vote-left','2':'vote-none','3':'vote-right'}}[e.key];
const b=id&&document.getElementById(id);if(b)b.click();}});</script></body></html>"""


def page(app: ReviewApp, reviewer: Reviewer) -> str:
    """The reviewer's next pair (or the thank-you), with their progress."""
    pair, done = app.next_pair(reviewer.id)
    total = len(app.pairs)
    sub = f"reviewer <b>{html.escape(reviewer.shown)}</b> · {done} of {total} pairs reviewed"
    if pair is None:
        body = f'<div class="done" id="done">All {total} pairs reviewed. Thank you! Your votes are saved.</div>'
    else:
        p = app.pairs[pair]
        figs = "".join(f'<figure><img id="img-{side}" src="/image/{pair}/{side}" alt="{side} image">'
                       f"<figcaption>{side}</figcaption></figure>" for side in ("left", "right"))
        body = (f'<p class="prompt" id="prompt">“{html.escape(p["prompt"])}”</p><div class="pair">{figs}</div>'
                f'<form method="post" action="/vote" class="buttons"><input type="hidden" name="pair" '
                f'value="{pair}"><button id="vote-left" name="choice" value="left">Left is better</button>'
                '<button id="vote-none" name="choice" value="none">No preference</button>'
                '<button id="vote-right" name="choice" value="right">Right is better</button></form>')
    return PAGE.format(sub=sub, body=body)


def parse_pair(text: str, app: ReviewApp) -> Optional[int]:
    """A pair id as sent (a few digits naming a pair), else None: no huge number is ever converted."""
    return int(text) if re.fullmatch(r"[0-9]{1,9}", text or "") and int(text) in app.pairs else None


class _Handler(BaseHTTPRequestHandler):
    app: ReviewApp
    request_timeout_s: float = REQUEST_TIMEOUT_S
    server_version = "sdloop-review"

    # -- the connection: a deadline for the whole request, an answer always ---------------------------------------

    def setup(self) -> None:
        self.timeout = self.request_timeout_s + 1.0  # each read (socketserver applies it); the timer, first, all
        super().setup()
        self._timed_out = self._responded = self._unread = False
        self._timer = threading.Timer(self.request_timeout_s, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        """The request did not arrive in time: stop reading it (a blocked read returns), then answer 408."""
        self._timed_out = True
        try:
            self.connection.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (TimeoutError, ConnectionError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - a bug: one line in the log, a 500 to the client, never a traceback
            log.error("review page: %s while answering %s: %s", type(e).__name__, getattr(self, "path", "?"), e)
            self.close_connection = True
            if not self._responded:
                self._error(500, "the review page failed on this request; the server log says why")
        if self._timed_out and not self._responded:
            self.app.refuse("timeout")
            self._error(408, f"the request did not arrive within {self.request_timeout_s:g} s")

    def finish(self) -> None:
        self._timer.cancel()
        try:
            super().finish()
            if self._unread:  # answered before reading the body: read a little of it so the answer is not reset
                self.connection.shutdown(socket.SHUT_WR)
                self.connection.settimeout(0.5)
                left, until = DRAIN_BYTES, time.monotonic() + 1.0
                while left > 0 and time.monotonic() < until and (chunk := self.connection.recv(min(left, 8192))):
                    left -= len(chunk)
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: votes are in the database
        return

    def send_response_only(self, code: int, message: Optional[str] = None) -> None:
        self._responded = True
        super().send_response_only(code, message)

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """http.server's own refusals (bad request line, headers too long) in our error form, with a status line even
        when the request line was too broken to name an HTTP version (no client speaks HTTP/0.9)."""
        self.close_connection = True
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        self._error(code, message or HTTPStatus(code).phrase)

    # -- answers ----------------------------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, ctype: str, headers: Optional[dict[str, str]] = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if getattr(self, "command", "") != "HEAD":
                self.wfile.write(body)
        except OSError:
            self.close_connection = True

    def _error(self, status: int, message: str) -> None:
        """An error answer: HTML for a browser, JSON for everyone else."""
        wants_html = "text/html" in (self.headers.get("Accept", "") if getattr(self, "headers", None) else "")
        if wants_html:
            body = PAGE.format(sub=f"{status} {HTTPStatus(status).phrase}",
                               body=f'<div class="done" id="error">{html.escape(message)}</div>').encode()
            return self._send(status, body, "text/html; charset=utf-8")
        body = json.dumps({"status": "error", "code": status, "error": message}).encode()
        self._send(status, body, "application/json")

    def _reviewer(self) -> tuple[Optional[Reviewer], str]:
        try:
            cookie = SimpleCookie(self.headers.get("Cookie", ""))
        except CookieError:
            return None, "unsigned"
        return self.app.reviewer_of(cookie[COOKIE].value if COOKIE in cookie else None)

    # -- routes -----------------------------------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._timer.cancel()
        if self._timed_out:
            return
        url = urlparse(self.path)
        if url.path == "/healthz":
            return self._send(200, b"ok", "text/plain; charset=utf-8")
        reviewer, _ = self._reviewer()
        if url.path == "/":
            asked = parse_qs(url.query, max_num_fields=20).get("reviewer", [""])[0].strip()
            headers = {}
            if reviewer is None or (asked and asked != reviewer.name):
                reviewer = self.app.new_reviewer(asked)
                headers["Set-Cookie"] = (f"{COOKIE}={self.app.token(reviewer)}; Path=/; Max-Age=31536000; "
                                         "SameSite=Strict; HttpOnly")
            return self._send(200, page(self.app, reviewer).encode(), "text/html; charset=utf-8", headers)
        m = re.fullmatch(r"/image/([^/]*)/(left|right)", url.path)
        if m:
            pair = parse_pair(m.group(1), self.app)
            if pair is None:
                return self._error(400, f"no pair {m.group(1)[:40]!r}: pairs are 0 to {len(self.app.pairs) - 1}")
            if reviewer is None:
                return self._error(403, "open the review page first: images are shown to its reviewers")
            return self._send(200, self.app.image(reviewer.id, pair, m.group(2)), "image/png")
        return self._error(404, "not found")

    def _body(self) -> Optional[bytes]:
        """The request body within the limits, or None after answering why not (411, 400, 413, 408)."""
        if self.headers.get("Transfer-Encoding"):
            self._unread = True
            self.app.refuse("no_length")
            self._error(411, "send a vote with a Content-Length, not a chunked body")
            return None
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            self._unread = True
            self.app.refuse("no_length")
            self._error(411, "a vote needs a Content-Length")
            return None
        text = lengths[0].strip()
        if len(lengths) > 1 or not re.fullmatch(r"[0-9]+", text):
            self._unread = True
            self.app.refuse("bad_request")
            self._error(400, f"Content-Length {text[:40]!r} is not a byte count")
            return None
        if len(text) > 9 or int(text) > MAX_BODY:
            self._unread = True
            self.app.refuse("too_large")
            self._error(413, f"a vote is at most {MAX_BODY} bytes")
            return None
        want, chunks = int(text), []
        while want > 0:
            try:
                chunk = self.rfile.read(want)
            except OSError:
                chunk = b""
            if not chunk:
                break
            chunks.append(chunk)
            want -= len(chunk)
        if want > 0:
            if self._timed_out:
                self.app.refuse("timeout")
                self._error(408, f"the request did not arrive within {self.request_timeout_s:g} s")
            else:
                self._error(400, "the body is shorter than its Content-Length")
            return None
        self._timer.cancel()
        return b"".join(chunks)

    def do_POST(self) -> None:  # noqa: N802
        if self._timed_out:
            return
        if urlparse(self.path).path != "/vote":
            self._unread = True
            return self._error(404, "not found")
        body = self._body()
        if body is None:
            return
        try:
            form = parse_qs(body.decode("utf-8", "replace"), max_num_fields=10)
        except ValueError:
            form = {}
        choice, pair_text = form.get("choice", [""])[0], form.get("pair", [""])[0]
        reviewer, why = self._reviewer()
        if reviewer is None:
            self.app.refuse(why)
            if why == "no_cookie":
                return self._error(400, "no reviewer cookie: open the review page first (this vote was not counted)")
            return self._error(403, "this reviewer cookie was not made by this review page; open the page to get "
                                    "one (this vote was not counted)")
        pair = parse_pair(pair_text, self.app)
        if choice not in CHOICES or pair is None:
            self.app.refuse("bad_request")
            return self._error(400, f"a vote needs pair (0..{len(self.app.pairs) - 1}) and choice in {CHOICES}")
        self.app.vote(reviewer, pair, choice, self.headers.get("User-Agent", ""))
        self._send(HTTPStatus.SEE_OTHER, b"", "text/plain", {"Location": "/"})


class ReviewServer:
    """The review page on host:port (port 0: a free one), in a background thread or in the foreground."""

    def __init__(self, review_dir: str | Path, host: str = "127.0.0.1", port: int = 8765,
                 request_timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.app = ReviewApp(review_dir)
        handler = type("Handler", (_Handler,), {"app": self.app, "request_timeout_s": float(request_timeout_s)})
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as e:
            raise ReviewError(f"cannot serve on {host}:{port} ({e.strerror or e}); pass another --port.") from None
        self.httpd.daemon_threads = True
        self.thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> "ReviewServer":
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def serve_forever(self) -> None:
        try:
            self.httpd.serve_forever()
        finally:
            self.app.flush_refused()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.app.flush_refused()
