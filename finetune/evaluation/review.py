"""Blind human review of two runs: ``sdloop review RUN_A RUN_B`` and ``sdloop review summary DIR``.

The review folder holds ``review.json`` (the pairs: prompt, seed, and one image of each run, copied in so the folder
stands alone), ``images/`` and ``votes.sqlite``. A small stdlib web server shows each reviewer the pairs in their own
random order, each pair's two images in a random left/right order fixed per reviewer, and never says which run made
which. Each vote is one row, committed (sqlite WAL, synchronous=FULL) before the reply is sent, so a vote a reviewer
saw accepted survives a crash; every request has its own connection, so concurrent reviewers are safe.
"""

from __future__ import annotations

import contextlib
import html
import json
import re
import secrets
import shutil
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence
from urllib.parse import parse_qs, urlparse

from finetune.evaluation.inputs import (Generation, Model, default_n, generate, image_paths, make_seeds,
                                  read_prompts)
from finetune.evaluation.evaluate import DEFAULT_GUIDANCE, DEFAULT_STEPS
from finetune.evaluation.metrics import sign_test, wilson
from sdloop.atomic import atomic_dir, write_json_atomic
from sdloop.errors import UserError
from sdloop.runfolder import RunFolder
from sdloop.seeding import derive_seed, py_rng

REVIEW_SCHEMA = "sdloop-review"
COOKIE = "sdloop_reviewer"
CHOICES = ("left", "none", "right")
SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    reviewer TEXT NOT NULL,
    pair INTEGER NOT NULL,
    prompt TEXT NOT NULL,
    seed INTEGER NOT NULL,
    left_run TEXT NOT NULL,           -- 'a' or 'b': what the reviewer saw on the left
    choice TEXT NOT NULL,             -- left, right, none: what the reviewer clicked
    winner TEXT NOT NULL,             -- a, b, none
    created TEXT NOT NULL,
    user_agent TEXT,
    UNIQUE (reviewer, pair)
)"""


class ReviewError(UserError):
    """A review folder is missing, damaged or holds another review; the message says what to do."""


@contextlib.contextmanager
def database(db: Path) -> Iterator[sqlite3.Connection]:
    """``connect`` for one block, closed after it."""
    conn = connect(db)
    try:
        yield conn
    finally:
        conn.close()


def connect(db: Path) -> sqlite3.Connection:
    """A connection with WAL, full sync and a generous busy timeout (one per request/thread)."""
    conn = sqlite3.connect(str(db), timeout=30.0, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def load_review(review_dir: str | Path) -> dict[str, Any]:
    folder = Path(review_dir).expanduser()
    try:
        data = json.loads((folder / "review.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReviewError(f"{folder} is not a review folder (no review.json); make one with "
                          "`sdloop review RUN_A RUN_B`.") from None
    except (OSError, ValueError) as e:
        raise ReviewError(f"{folder / 'review.json'} is damaged ({type(e).__name__}); make the review again "
                          "with `sdloop review RUN_A RUN_B --dir NEW_DIR`.") from None
    if not isinstance(data, dict) or data.get("schema") != REVIEW_SCHEMA or not data.get("pairs"):
        raise ReviewError(f"{folder / 'review.json'} is not an sdloop review; pass the folder "
                          "`sdloop review RUN_A RUN_B` printed.")
    return data


def default_review_dir(run_a: RunFolder, run_b: RunFolder) -> Path:
    from sdloop.workspace import home

    return home() / "reviews" / f"{run_a.path.resolve().name}-vs-{run_b.path.resolve().name}"


def prepare_review(run_a: str | Path, run_b: str | Path, out_dir: Optional[str | Path] = None,
                   prompts: Optional[Sequence[str] | str | Path] = None, n: Optional[int] = None,
                   seeds: Optional[Sequence[int]] = None, steps: int = DEFAULT_STEPS,
                   guidance: float = DEFAULT_GUIDANCE, seed: int = 0, progress: bool = True) -> Path:
    """Generate (or reuse) each run's image for every (prompt, seed) and write the review folder.

    An existing folder with the same pairs is kept as it is, votes and all; one with other pairs is refused.
    """
    from finetune.evaluation.inputs import default_prompts
    from finetune.evaluation.evaluate import Options

    Options(n=n, steps=steps, guidance=guidance).check()
    a, b = RunFolder(run_a).require_finished(), RunFolder(run_b).require_finished()
    if a.path.resolve() == b.path.resolve():
        raise ReviewError(f"a review needs two different runs; both are {a.path}.")
    folder = Path(out_dir).expanduser() if out_dir else default_review_dir(a, b)
    plist = (read_prompts(prompts) if isinstance(prompts, (str, Path)) else list(prompts)) if prompts is not None \
        else default_prompts(a)
    seed_list = [int(s) for s in seeds] if seeds is not None else make_seeds(n or default_n(plist), seed)
    gen = Generation(plist, seed_list, steps, float(guidance), a.manifest().resolution, "review")
    models = [Model("a", "A", a, lora=True), Model("b", "B", b, lora=True)]
    keys = list(zip(*[[p.stem for p in image_paths(m, gen)] for m in models]))
    if (folder / "review.json").exists():  # before any image is made: a refusal costs seconds
        old = load_review(folder)
        if [(p["key_a"], p["key_b"]) for p in old["pairs"]] == keys:
            return folder
        raise ReviewError(f"{folder} already holds a review of other images ({votes_count(folder)} votes kept); "
                          "pass --dir NEW_DIR for this one.")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ReviewError(f"{folder} exists and is not a review folder; pass --dir with a new or empty folder.")
    images = generate(models, gen, progress=progress)
    pairs = [{"id": i, "prompt": plist[gen.prompt_index(i)], "seed": s, "a": f"images/{i:04d}-a.png",
              "b": f"images/{i:04d}-b.png", "key_a": keys[i][0], "key_b": keys[i][1]}
             for i, s in enumerate(seed_list)]
    with atomic_dir(folder) as tmp:
        (tmp / "images").mkdir()
        for p, ga, gb in zip(pairs, images["a"], images["b"]):
            shutil.copyfile(ga.path, tmp / p["a"])
            shutil.copyfile(gb.path, tmp / p["b"])
        write_json_atomic(tmp / "review.json", {
            "schema": REVIEW_SCHEMA, "schema_version": 1,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "runs": {"a": str(a.path.resolve()), "b": str(b.path.resolve())},
            "generation": {"steps": steps, "guidance": guidance, "resolution": gen.resolution}, "pairs": pairs})
        with database(tmp / "votes.sqlite") as conn:
            conn.execute(SCHEMA_SQL)
    return folder


def votes_count(folder: Path) -> int:
    db = Path(folder) / "votes.sqlite"
    if not db.is_file():
        return 0
    with database(db) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM votes").fetchone()[0])


def left_run(reviewer: str, pair: int) -> str:
    """Which run ('a' or 'b') this reviewer sees on the left for this pair: random, but the same on every reload."""
    return "b" if derive_seed("review-side", reviewer, pair) & 1 else "a"


def order(reviewer: str, n: int) -> list[int]:
    ids = list(range(n))
    py_rng("review-order", reviewer).shuffle(ids)
    return ids


# -- the web page ----------------------------------------------------------------------------------------------------

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


class ReviewApp:
    """The review folder as a web app: which pair comes next for whom, and storing votes."""

    def __init__(self, review_dir: str | Path) -> None:
        self.folder = Path(review_dir).expanduser()
        self.data = load_review(self.folder)
        self.db = self.folder / "votes.sqlite"
        with database(self.db) as conn:
            conn.execute(SCHEMA_SQL)
        self.pairs = {p["id"]: p for p in self.data["pairs"]}

    def voted(self, reviewer: str) -> set[int]:
        with database(self.db) as conn:
            return {r[0] for r in conn.execute("SELECT pair FROM votes WHERE reviewer = ?", (reviewer,))}

    def next_pair(self, reviewer: str) -> tuple[Optional[int], int]:
        done = self.voted(reviewer)
        todo = [i for i in order(reviewer, len(self.pairs)) if i not in done]
        return (todo[0] if todo else None), len(done)

    def vote(self, reviewer: str, pair: int, choice: str, user_agent: str = "") -> bool:
        """Store one vote durably; False when this reviewer already voted on this pair (the first vote stands)."""
        p = self.pairs[pair]
        left = left_run(reviewer, pair)
        winner = "none" if choice == "none" else (left if choice == "left" else ("b" if left == "a" else "a"))
        with database(self.db) as conn:
            cur = conn.execute(
                "INSERT OR IGNORE INTO votes (reviewer, pair, prompt, seed, left_run, choice, winner, created, "
                "user_agent) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (reviewer, pair, p["prompt"], p["seed"], left, choice, winner,
                 time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), user_agent[:200]))
            return cur.rowcount == 1

    def image(self, reviewer: str, pair: int, side: str) -> bytes:
        left = left_run(reviewer, pair)
        run = left if side == "left" else ("b" if left == "a" else "a")
        return (self.folder / self.pairs[pair][run]).read_bytes()

    def page(self, reviewer: str) -> str:
        pair, done = self.next_pair(reviewer)
        total = len(self.pairs)
        sub = f"reviewer <b>{html.escape(reviewer)}</b> · {done} of {total} pairs reviewed"
        if pair is None:
            body = (f'<div class="done" id="done">All {total} pairs reviewed. Thank you! Your votes are saved.'
                    "</div>")
        else:
            p = self.pairs[pair]
            figs = "".join(f'<figure><img id="img-{side}" src="/image/{pair}/{side}" alt="{side} image">'
                           f"<figcaption>{side}</figcaption></figure>" for side in ("left", "right"))
            body = (f'<p class="prompt" id="prompt">“{html.escape(p["prompt"])}”</p><div class="pair">{figs}</div>'
                    f'<form method="post" action="/vote" class="buttons"><input type="hidden" name="pair" '
                    f'value="{pair}"><button id="vote-left" name="choice" value="left">Left is better</button>'
                    '<button id="vote-none" name="choice" value="none">No preference</button>'
                    '<button id="vote-right" name="choice" value="right">Right is better</button></form>')
        return PAGE.format(sub=sub, body=body)


def _reviewer_name(text: str) -> Optional[str]:
    text = text.strip()
    return text if re.fullmatch(r"[A-Za-z0-9_.@-]{1,64}", text) else None


class _Handler(BaseHTTPRequestHandler):
    app: ReviewApp
    server_version = "sdloop-review"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: votes are in the database
        return

    def _reviewer(self, query: dict[str, list[str]]) -> tuple[Optional[str], bool]:
        """(reviewer, is new): ``?reviewer=NAME`` sets it; otherwise the cookie; otherwise a new random id."""
        asked = _reviewer_name(query.get("reviewer", [""])[0])
        if asked:
            return asked, True
        cookie = SimpleCookie(self.headers.get("Cookie", ""))
        if COOKIE in cookie and _reviewer_name(cookie[COOKIE].value):
            return cookie[COOKIE].value, False
        return None, False

    def _send(self, status: int, body: bytes, ctype: str, headers: Optional[dict[str, str]] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _text(self, status: int, text: str) -> None:
        self._send(status, text.encode(), "text/plain; charset=utf-8")

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        url = urlparse(self.path)
        query = parse_qs(url.query)
        if url.path == "/healthz":
            return self._text(200, "ok")
        reviewer, new = self._reviewer(query)
        if url.path == "/":
            headers = {}
            if reviewer is None:
                reviewer, new = "r-" + secrets.token_hex(6), True
            if new:
                headers["Set-Cookie"] = f"{COOKIE}={reviewer}; Path=/; Max-Age=31536000; SameSite=Strict"
            return self._send(200, self.app.page(reviewer).encode(), "text/html; charset=utf-8", headers)
        m = re.fullmatch(r"/image/(\d+)/(left|right)", url.path)
        if m and reviewer and int(m.group(1)) in self.app.pairs:
            return self._send(200, self.app.image(reviewer, int(m.group(1)), m.group(2)), "image/png")
        return self._text(404, "not found")

    def do_POST(self) -> None:  # noqa: N802
        if urlparse(self.path).path != "/vote":
            return self._text(404, "not found")
        reviewer, _ = self._reviewer({})
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(min(length, 10_000)).decode("utf-8", "replace"))
        choice, pair = form.get("choice", [""])[0], form.get("pair", [""])[0]
        if reviewer is None:
            return self._text(400, "no reviewer cookie: open the review page first")
        if choice not in CHOICES or not pair.isdigit() or int(pair) not in self.app.pairs:
            return self._text(400, f"a vote needs pair (0..{len(self.app.pairs) - 1}) and choice in {CHOICES}")
        self.app.vote(reviewer, int(pair), choice, self.headers.get("User-Agent", ""))
        self._send(HTTPStatus.SEE_OTHER, b"", "text/plain", {"Location": "/"})


class ReviewServer:
    """The review page on host:port (port 0: a free one), in a background thread or in the foreground."""

    def __init__(self, review_dir: str | Path, host: str = "127.0.0.1", port: int = 8765) -> None:
        handler = type("Handler", (_Handler,), {"app": ReviewApp(review_dir)})
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
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# -- the summary -----------------------------------------------------------------------------------------------------

@dataclass
class ReviewSummary:
    folder: str
    pairs: int
    votes: int
    reviewers: int
    a_wins: int
    b_wins: int
    ties: int
    b_win_rate: Optional[float]       # among votes with a preference
    interval: tuple[Optional[float], Optional[float]]
    p_value: Optional[float]          # two-sided sign test against "no difference"
    runs: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        rate = "n/a" if self.b_win_rate is None else (
            f"{self.b_win_rate:.2f} (95% interval {self.interval[0]:.2f}-{self.interval[1]:.2f}, Wilson)")
        if self.p_value is None:
            test = "no votes with a preference yet"
        else:
            test = (f"p = {self.p_value:.3g}: " + ("the runs differ (p < 0.05)" if self.p_value < 0.05 else
                                                    "no significant difference at 0.05"))
        return [f"review {self.folder}: A = {self.runs.get('a')}, B = {self.runs.get('b')}, {self.pairs} pairs",
                f"votes:        {self.votes} from {self.reviewers} reviewer(s): A preferred {self.a_wins}, "
                f"B preferred {self.b_wins}, no preference {self.ties}",
                f"B win rate:   {rate} (votes with a preference)",
                f"sign test:    {test} (two-sided exact binomial against 50/50, no-preference votes left out)"]


def summarize(review_dir: str | Path) -> ReviewSummary:
    """Win rate of B over A with a 95% interval, vote and reviewer counts, and a two-sided sign test."""
    folder = Path(review_dir).expanduser()
    data = load_review(folder)
    if not (folder / "votes.sqlite").is_file():
        raise ReviewError(f"{folder} has no votes.sqlite; serve the review with `sdloop review RUN_A RUN_B`.")
    try:
        with database(folder / "votes.sqlite") as conn:
            rows = conn.execute("SELECT reviewer, winner FROM votes").fetchall()
    except sqlite3.DatabaseError as e:
        raise ReviewError(f"{folder / 'votes.sqlite'} cannot be read ({e}); it is damaged.") from None
    a_wins = sum(w == "a" for _, w in rows)
    b_wins = sum(w == "b" for _, w in rows)
    decided = a_wins + b_wins
    return ReviewSummary(str(folder), len(data["pairs"]), len(rows), len({r for r, _ in rows}), a_wins, b_wins,
                         len(rows) - decided, b_wins / decided if decided else None, wilson(b_wins, decided),
                         sign_test(b_wins, a_wins), data.get("runs", {}))

