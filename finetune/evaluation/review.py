"""Blind human review of two runs: ``sdloop review RUN_A RUN_B`` and ``sdloop review summary DIR``.

The review folder holds ``review.json`` (the pairs: prompt, seed, and one image of each run, copied in so the folder
stands alone), ``images/``, ``votes.sqlite`` and ``review.secret``. This module owns the folder and the votes: the
web page is ``finetune.evaluation.review_server``, the statistics ``finetune.evaluation.review_summary``.

Blindness and honest counting rest on the folder's secret (32 random bytes, made once, 0600, never sent anywhere):

- which run a reviewer sees on the left of a pair is an HMAC of the reviewer id and the pair under the secret, so
  knowing the source, the pair ids and the seeds tells nobody which side is which;
- a reviewer id is random and handed out by the server in a cookie signed with the secret (``rid:name:sig``); a vote
  counts only with a cookie the server signed, so invented or altered ids are refused (and counted as refused), and
  nobody can vote as someone else by guessing their id;
- one vote per reviewer and pair: a repeat replaces the earlier one.

Each vote is one row, committed (sqlite WAL, synchronous=FULL) before the reply is sent, so a vote a reviewer saw
accepted survives a crash; every request has its own connection, so concurrent reviewers are safe. The secret and the
votes file are created 0600: with the secret anyone could forge reviewers.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import random
import re
import secrets
import shutil
import sqlite3
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from finetune.evaluation.inputs import (Generation, Model, default_n, generate, image_paths, make_seeds,
                                  read_prompts)
from finetune.evaluation.evaluate import DEFAULT_GUIDANCE, DEFAULT_STEPS
from sdloop.atomic import atomic_dir, write_json_atomic
from sdloop.errors import UserError
from sdloop.runfolder import RunFolder

REVIEW_SCHEMA = "sdloop-review"
COOKIE = "sdloop_reviewer"
SECRET_FILE = "review.secret"
CHOICES = ("left", "none", "right")
REVIEWER_ID = re.compile(r"r[0-9a-f]{16}")
REVIEWER_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
DatabaseError = sqlite3.DatabaseError  # for the summary and the server, which import no database driver
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
# added since: the name a reviewer gave (?reviewer=NAME) and which secret signed the reviewer (NULL: a vote from
# before reviewer ids were signed, which the summary does not count)
LATER_COLUMNS = {"reviewer_name": "TEXT", "secret_id": "TEXT"}
REFUSED_SQL = "CREATE TABLE IF NOT EXISTS refused (reason TEXT PRIMARY KEY, count INTEGER NOT NULL, last TEXT NOT NULL)"


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
    """A connection with WAL, full sync and a generous busy timeout (one per request/thread); a new file is 0600."""
    _private_file(Path(db))
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
    review_secret(folder)  # after the folder is in place: atomic_dir gives its files the umask's mode
    with database(folder / "votes.sqlite") as conn:
        ensure_schema(conn)
    return folder


def _private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 unless it exists (sqlite then opens it; a new votes file is private); an
    existing one that others may read (an older release's) is tightened, by path, when it is ours."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        with contextlib.suppress(OSError):
            if os.stat(path).st_mode & 0o077:
                os.chmod(path, 0o600)
    except OSError:
        return  # an unwritable folder: sqlite's own error says so


def review_secret(folder: Path, create: bool = True) -> Optional[bytes]:
    """The folder's secret (32 random bytes), made once, 0600; None when it is missing and ``create`` is False.

    Written to a private temporary file and hard-linked into place, so two servers starting together agree on one
    secret and neither ever reads a half-written one."""
    path = Path(folder) / SECRET_FILE
    if not path.exists() and create:
        fd, tmp = _private_temp(path)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise ReviewError(f"{path} cannot be read ({type(e).__name__}); restore it or delete it (the votes cast "
                          "so far then no longer count).") from None
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise ReviewError(f"{path} is damaged; delete it to make a new one (the votes cast so far then no longer "
                          "count).")
    return bytes.fromhex(text)


def _private_temp(path: Path) -> tuple[int, str]:
    return tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mkstemp files are 0600


def secret_id(secret: bytes) -> str:
    """A public name of a secret (not the secret): which secret signed a vote."""
    return hashlib.sha256(b"sdloop-review-secret-id:" + secret).hexdigest()[:12]


def ensure_schema(conn: sqlite3.Connection) -> None:
    """The votes table with today's columns (an older folder's table gains them) and the refusal counts."""
    conn.execute(SCHEMA_SQL)
    have = {row[1] for row in conn.execute("PRAGMA table_info(votes)")}
    for name, kind in LATER_COLUMNS.items():
        if name not in have:
            try:
                conn.execute(f"ALTER TABLE votes ADD COLUMN {name} {kind}")
            except sqlite3.OperationalError as e:  # another server added it a moment ago
                if "duplicate column" not in str(e):
                    raise
    conn.execute(REFUSED_SQL)


def votes_count(folder: Path) -> int:
    db = Path(folder) / "votes.sqlite"
    if not db.is_file():
        return 0
    with database(db) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM votes").fetchone()[0])


@dataclass(frozen=True)
class Reviewer:
    """A reviewer the server handed out: a random id and the name they gave (empty when none)."""

    id: str
    name: str = ""

    @property
    def shown(self) -> str:
        return self.name or self.id


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class ReviewApp:
    """The review folder as a web app's state: reviewer ids and their signatures, sides, order, votes, refusals."""

    FLUSH_EVERY_S = 2.0  # refusal counts reach the file at most this often: a flood of bad votes costs no fsyncs

    def __init__(self, review_dir: str | Path) -> None:
        self.folder = Path(review_dir).expanduser()
        self.data = load_review(self.folder)
        self.db = self.folder / "votes.sqlite"
        self.secret = review_secret(self.folder) or b""
        self.secret_id = secret_id(self.secret)
        with database(self.db) as conn:
            ensure_schema(conn)
        self.pairs = {p["id"]: p for p in self.data["pairs"]}
        self._refused: Counter[str] = Counter()
        self._refused_lock = threading.Lock()
        self._flushed = time.monotonic()

    # -- identity ---------------------------------------------------------------------------------------------------

    def _mac(self, *parts: str) -> str:
        return hmac.new(self.secret, ":".join(parts).encode(), hashlib.sha256).hexdigest()

    def new_reviewer(self, name: str = "") -> Reviewer:
        """A fresh reviewer id (random), with the name they gave when it is a valid one."""
        return Reviewer("r" + secrets.token_hex(8), name if REVIEWER_NAME.fullmatch(name or "") else "")

    def token(self, reviewer: Reviewer) -> str:
        """The cookie value for ``reviewer``: ``id:name:signature`` (HMAC-SHA256 under the folder's secret)."""
        return f"{reviewer.id}:{reviewer.name}:{self._mac('reviewer', reviewer.id, reviewer.name)[:32]}"

    def reviewer_of(self, token: Optional[str]) -> tuple[Optional[Reviewer], str]:
        """(the reviewer, "") for a token this server signed; (None, why) otherwise: ``no_cookie``, ``unsigned``
        (not of our form: an invented id) or ``bad_signature`` (our form, altered or signed by another secret)."""
        if not token:
            return None, "no_cookie"
        parts = token.split(":")
        if len(parts) != 3 or not REVIEWER_ID.fullmatch(parts[0]) or (parts[1] and not REVIEWER_NAME.fullmatch(
                parts[1])) or not re.fullmatch(r"[0-9a-f]{32}", parts[2]):
            return None, "unsigned"
        if not hmac.compare_digest(parts[2], self._mac("reviewer", parts[0], parts[1])[:32]):
            return None, "bad_signature"
        return Reviewer(parts[0], parts[1]), ""

    # -- what each reviewer sees ------------------------------------------------------------------------------------

    def left_run(self, reviewer_id: str, pair: int) -> str:
        """Which run ('a' or 'b') this reviewer sees on the left of this pair: the same on every reload, and
        unknowable without the folder's secret."""
        return "b" if int(self._mac("side", reviewer_id, str(pair))[:8], 16) & 1 else "a"

    def order(self, reviewer_id: str) -> list[int]:
        """The pairs in this reviewer's own random order."""
        ids = sorted(self.pairs)
        random.Random(self._mac("order", reviewer_id)).shuffle(ids)
        return ids

    def voted(self, reviewer_id: str) -> set[int]:
        with database(self.db) as conn:
            return {r[0] for r in conn.execute("SELECT pair FROM votes WHERE reviewer = ?", (reviewer_id,))}

    def next_pair(self, reviewer_id: str) -> tuple[Optional[int], int]:
        done = self.voted(reviewer_id)
        todo = [i for i in self.order(reviewer_id) if i not in done]
        return (todo[0] if todo else None), len(done)

    def image(self, reviewer_id: str, pair: int, side: str) -> bytes:
        left = self.left_run(reviewer_id, pair)
        run = left if side == "left" else ("b" if left == "a" else "a")
        return (self.folder / self.pairs[pair][run]).read_bytes()

    # -- votes ------------------------------------------------------------------------------------------------------

    def vote(self, reviewer: Reviewer, pair: int, choice: str, user_agent: str = "") -> str:
        """Store one vote durably: "new", or "replaced" when this reviewer had voted on this pair (the last vote
        stands: one vote per reviewer and pair)."""
        if pair not in self.pairs or choice not in CHOICES:
            raise ValueError(f"pair {pair!r} / choice {choice!r}")
        p = self.pairs[pair]
        left = self.left_run(reviewer.id, pair)
        winner = "none" if choice == "none" else (left if choice == "left" else ("b" if left == "a" else "a"))
        with database(self.db) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                existed = conn.execute("SELECT 1 FROM votes WHERE reviewer = ? AND pair = ?",
                                       (reviewer.id, pair)).fetchone() is not None
                conn.execute(
                    "INSERT INTO votes (reviewer, pair, prompt, seed, left_run, choice, winner, created, user_agent, "
                    "reviewer_name, secret_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (reviewer, pair) "
                    "DO UPDATE SET left_run = excluded.left_run, choice = excluded.choice, winner = excluded.winner, "
                    "created = excluded.created, user_agent = excluded.user_agent, "
                    "reviewer_name = excluded.reviewer_name, secret_id = excluded.secret_id",
                    (reviewer.id, pair, p["prompt"], p["seed"], left, choice, winner, _now(), user_agent[:200],
                     reviewer.name or None, self.secret_id))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return "replaced" if existed else "new"

    def refuse(self, reason: str) -> None:
        """Count a vote the page refused (``reason``: unsigned, bad_signature, no_cookie, bad_request, ...)."""
        with self._refused_lock:
            self._refused[reason] += 1
            due = time.monotonic() - self._flushed >= self.FLUSH_EVERY_S
        if due:
            self.flush_refused()

    def flush_refused(self) -> None:
        """Add the refusals counted in memory to the folder's ``refused`` table (what ``review summary`` reports)."""
        with self._refused_lock:
            pending, self._refused = self._refused, Counter()
            self._flushed = time.monotonic()
        if not pending:
            return
        with database(self.db) as conn:
            for reason, n in pending.items():
                conn.execute("INSERT INTO refused (reason, count, last) VALUES (?, ?, ?) ON CONFLICT (reason) DO "
                             "UPDATE SET count = count + excluded.count, last = excluded.last", (reason, n, _now()))
