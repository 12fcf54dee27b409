"""Blind human review (finetune.evaluation.review, review_server, review_summary): the page round trip in headless
Chromium, concurrent reviewers, votes that survive a killed server, the summary's statistics, user mistakes as one
line; and, through HTTP as a client sends it, what keeps the review blind and the count honest: sides from the
folder's secret, signed reviewer ids (invented or altered ones count for nothing), one vote per reviewer and pair,
request size and time limits (raw sockets for the Content-Length cases), bad pair ids a 400 with a body."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional

import pytest
import torch

from finetune.evaluation import review
from finetune.evaluation.metrics import sign_test, wilson
from finetune.evaluation.review_server import MAX_BODY, ReviewServer
from finetune.evaluation.review_summary import summarize
from sdloop.atomic import load_safetensors, save_safetensors
from sdloop_cli.main import main

PAIRS = 4


@pytest.fixture(scope="module")
def runs(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Run A (the trained run) and run B (its copy with other LoRA weights)."""
    root = tmp_path_factory.mktemp("review-runs")
    a, b = root / "champion", root / "challenger"
    shutil.copytree(tiny_run, a)
    shutil.copytree(tiny_run, b)
    lora = b / "lora" / "pytorch_lora_weights.safetensors"
    tensors, meta = load_safetensors(lora)
    gen = torch.Generator().manual_seed(0)
    save_safetensors(lora, {k: (torch.randn(v.shape, generator=gen) if "lora_B" in k else v)
                            for k, v in tensors.items()}, metadata=meta)
    return a, b


@pytest.fixture(scope="module")
def review_dir(runs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("reviews") / "a-vs-b"
    return review.prepare_review(*runs, out_dir=folder, n=PAIRS, steps=2, progress=False)


def _fresh(review_dir: Path, tmp_path: Path, same_secret: bool = True) -> Path:
    """A copy of the prepared review folder with no votes (and, unless ``same_secret``, a secret of its own)."""
    folder = tmp_path / "review"
    skip = ("votes.sqlite*",) if same_secret else ("votes.sqlite*", review.SECRET_FILE)
    shutil.copytree(review_dir, folder, ignore=shutil.ignore_patterns(*skip))
    return folder


def _cookie_of(headers) -> str:
    """The reviewer cookie the page set (the value of Set-Cookie's first pair)."""
    return headers["Set-Cookie"].split(";")[0]


def _join(url: str) -> str:
    """Open the review page as a new reviewer; return the cookie header to send with that reviewer's votes."""
    with urllib.request.urlopen(url, timeout=60) as resp:
        return _cookie_of(resp.headers)


def _vote(url: str, cookie: Optional[str], pair: object, choice: str) -> tuple[int, dict]:
    """POST a vote as a browser does; (status, JSON error body or {})."""
    body = urllib.parse.urlencode({"pair": pair, "choice": choice}).encode()
    req = urllib.request.Request(url + "vote", data=body, method="POST", headers={"Cookie": cookie} if cookie else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, {}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _rows(folder: Path) -> list[dict]:
    with review.database(folder / "votes.sqlite") as conn:
        conn.row_factory = lambda cur, row: {d[0]: v for d, v in zip(cur.description, row)}
        return conn.execute("SELECT * FROM votes ORDER BY id").fetchall()


def test_review_folder_holds_pairs_and_images(review_dir: Path, runs: tuple[Path, Path]) -> None:
    data = review.load_review(review_dir)
    assert len(data["pairs"]) == PAIRS and data["runs"]["a"] == str(runs[0].resolve())
    for p in data["pairs"]:
        assert (review_dir / p["a"]).is_file() and (review_dir / p["b"]).is_file()
        assert (review_dir / p["a"]).read_bytes() != (review_dir / p["b"]).read_bytes()
    with review.database(review_dir / "votes.sqlite") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    for private in (review.SECRET_FILE, "votes.sqlite"):  # with the secret anyone could forge reviewers
        assert stat.S_IMODE((review_dir / private).stat().st_mode) == 0o600, private
    # asked again with the same settings: the same folder, kept as it is
    assert review.prepare_review(*runs, out_dir=review_dir, n=PAIRS, steps=2, progress=False) == review_dir


def _click(driver, element_id: str) -> None:
    """Click a vote button and wait for the next page (the form posts, the server redirects).

    The old page is marked with a window property before the click; the wait ends when a document without the
    mark has finished loading. Chromium answers a query about the old page's button during navigation with any of
    several errors (stale element, "node does not belong to the document"), so every WebDriver error while the
    navigation runs means "not yet" rather than a failure.
    """
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_script("window.__sdloopOldPage = true;")
    driver.find_element(By.ID, element_id).click()
    WebDriverWait(driver, 60, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.execute_script(
            "return window.__sdloopOldPage === undefined && document.readyState === 'complete'"))


def test_review_page_round_trip_in_headless_chromium(review_dir: Path, tmp_path: Path) -> None:
    import headless_chromium

    why = headless_chromium.missing()
    if why:
        pytest.skip(why)
    from selenium.webdriver.common.by import By

    folder = _fresh(review_dir, tmp_path)
    server = ReviewServer(folder, port=0).start()
    pair_ids = {p["prompt"]: [] for p in review.load_review(folder)["pairs"]}
    try:
        with headless_chromium.Browser() as driver:
            driver.get(server.url + "?reviewer=alice")
            html = driver.page_source
            assert "champion" not in html and "challenger" not in html and "-a.png" not in html, "blind"
            driver.save_screenshot(str(tmp_path / "review.png"))
            for _ in range(PAIRS):  # alice always picks the left image
                assert driver.execute_script(
                    "return [...document.images].every(i => i.complete && i.naturalWidth > 0)")
                assert driver.find_element(By.ID, "prompt").text.strip("“”") in pair_ids
                _click(driver, "vote-left")
            assert "All 4 pairs reviewed" in driver.find_element(By.ID, "done").text
            driver.delete_all_cookies()
            driver.get(server.url + "?reviewer=bob")
            _click(driver, "vote-none")
            _click(driver, "vote-right")
            assert "bob" in driver.page_source and "2 of 4 pairs reviewed" in driver.page_source
    finally:
        server.stop()

    rows = _rows(folder)
    assert [r["reviewer_name"] for r in rows] == ["alice"] * 4 + ["bob"] * 2
    assert len({r["reviewer"] for r in rows}) == 2 and all(r["reviewer"].startswith("r") for r in rows)
    assert sorted(r["pair"] for r in rows[:4]) == list(range(PAIRS)), "each pair once, in alice's own order"
    for r in rows:
        other = "b" if r["left_run"] == "a" else "a"
        expected = {"left": r["left_run"], "right": other, "none": "none"}[r["choice"]]
        assert r["winner"] == expected and r["left_run"] == server.app.left_run(r["reviewer"], r["pair"])
    assert [r["choice"] for r in rows] == ["left"] * 4 + ["none", "right"]

    s = summarize(folder)
    a_wins = sum(r["winner"] == "a" for r in rows)
    assert (s.votes, s.reviewers, s.ties, s.a_wins, s.b_wins) == (6, 2, 1, a_wins, 5 - a_wins)
    assert s.p_value == pytest.approx(sign_test(5 - a_wins, a_wins))


def test_concurrent_reviewers_lose_no_vote(review_dir: Path, tmp_path: Path) -> None:
    folder = _fresh(review_dir, tmp_path)
    server = ReviewServer(folder, port=0).start()
    errors: list[BaseException] = []

    def reviewer(i: int) -> None:
        try:
            cookie = _join(server.url)
            for pair in range(PAIRS):
                status, _ = _vote(server.url, cookie, pair, ("left", "right", "none")[(i + pair) % 3])
                assert status == 200  # the redirect to the next pair, followed
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=reviewer, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        server.stop()
    assert not errors, errors
    rows = _rows(folder)
    assert len(rows) == 8 * PAIRS and len({(r["reviewer"], r["pair"]) for r in rows}) == 8 * PAIRS
    assert summarize(folder).reviewers == 8


def test_a_vote_survives_a_killed_server(runs: tuple[Path, Path], review_dir: Path, tmp_path: Path) -> None:
    """The front door (`sdloop review RUN_A RUN_B`) in its own process, killed with SIGKILL after one vote."""
    folder = _fresh(review_dir, tmp_path)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "sdloop_cli", "review", str(runs[0]), str(runs[1]), "--dir",
                             str(folder), "--n", str(PAIRS), "--steps", "2", "--port", "0", "--quiet"],
                            stdout=subprocess.PIPE, text=True, cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root), "PYTHONUNBUFFERED": "1"})
    try:
        lines = []
        while not any("serving the blind review at" in ln for ln in lines):
            line = proc.stdout.readline()
            assert line, f"the server stopped: {lines}"
            lines.append(line)
        url = next(ln for ln in lines if "serving" in ln).split(" at ")[1].split()[0]
        with urllib.request.urlopen(url + "?reviewer=carol", timeout=60) as resp:
            assert "Blind review" in resp.read().decode()
            cookie = _cookie_of(resp.headers)
        assert _vote(url, cookie, 2, "left")[0] == 200
    finally:
        proc.kill()  # SIGKILL: no clean shutdown, no checkpoint of the WAL
        proc.wait(30)
    rows = _rows(folder)
    assert [(r["reviewer_name"], r["pair"], r["choice"]) for r in rows] == [("carol", 2, "left")]
    assert any(str(folder) in ln for ln in lines), "it says where the votes are"


def test_summary_statistics_and_command(review_dir: Path, tmp_path: Path, capsys) -> None:
    folder = _fresh(review_dir, tmp_path)
    app = review.ReviewApp(folder)
    people = [app.new_reviewer(f"p{i}") for i in range(10)]

    def side(person: review.Reviewer, wants: str) -> str:
        return "left" if app.left_run(person.id, 0) == wants else "right"

    for i, person in enumerate(people):  # ten reviewers: B preferred by nine, A by one; plus two without a preference
        assert app.vote(person, 0, side(person, "a" if i <= 1 else "b")) == "new"
    assert app.vote(people[1], 0, side(people[1], "b")) == "replaced", "a repeat replaces the reviewer's vote"
    app.vote(people[0], 1, "none")
    app.vote(people[1], 1, "none")
    with review.database(folder / "votes.sqlite") as conn:  # votes as an older page stored them: not signed
        for i in range(5):
            conn.execute("INSERT INTO votes (reviewer, pair, prompt, seed, left_run, choice, winner, created) "
                         "VALUES (?, 0, 'p', 0, 'a', 'left', 'a', 'now')", (f"old-{i}",))
    s = summarize(folder)
    assert (s.votes, s.reviewers, s.a_wins, s.b_wins, s.ties) == (12, 10, 1, 9, 2)
    assert s.dropped == {"unsigned": 5}
    assert s.b_win_rate == pytest.approx(0.9)
    assert s.p_value == pytest.approx(2 * 11 / 1024)  # two-sided exact binomial, 9 of 10
    assert s.interval[0] == pytest.approx(0.5958, abs=1e-3) and s.interval[1] == pytest.approx(0.9821, abs=1e-3)
    assert wilson(0, 0) == (None, None) and sign_test(0, 0) is None

    assert main(["review", "summary", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "12 from 10 signed reviewer(s)" in out and "0.90" in out and "p = 0.0215" in out and "differ" in out
    assert "5 stored vote(s): 5 cast before reviewer ids were signed" in out
    assert main(["review", "summary", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["b_wins"] == 9


def test_review_user_mistakes_are_one_line(runs: tuple[Path, Path], review_dir: Path, tmp_path: Path,
                                           capsys) -> None:
    a, b = (str(r) for r in runs)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("mine")
    cases = [
        ["review", "summary", str(tmp_path / "nope")],
        ["review", a, a],
        ["review", a, str(tmp_path / "not-a-run")],
        ["review", a, b, "--dir", str(review_dir), "--n", "2", "--steps", "2"],   # holds another review
        ["review", a, b, "--dir", str(tmp_path / "junk"), "--n", "2", "--steps", "2"],
    ]
    for argv in cases:
        capsys.readouterr()
        assert main([*argv, "--quiet"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, (argv, err)
    assert (tmp_path / "junk" / "x.txt").read_text() == "mine", "a folder that is not ours is left alone"
    assert len(review.load_review(review_dir)["pairs"]) == PAIRS


# -- blind and honest, through HTTP ------------------------------------------------------------------------------------

@pytest.fixture
def served(review_dir: Path, tmp_path: Path):
    """A fresh review folder served on a free port, with a 1.5 s request deadline."""
    server = ReviewServer(_fresh(review_dir, tmp_path), port=0, request_timeout_s=1.5).start()
    try:
        yield server
    finally:
        server.stop()


def test_sides_come_from_the_folders_secret(review_dir: Path, tmp_path: Path) -> None:
    """Who sees which run on the left follows the folder's secret: the same secret, the same sides; another secret
    (same pairs, ids and seeds, everything public equal) other sides. The secret is never served."""
    mine = review.ReviewApp(review_dir)
    twin = review.ReviewApp(_fresh(review_dir, tmp_path / "twin"))
    other = review.ReviewApp(_fresh(review_dir, tmp_path / "other", same_secret=False))
    ids = [f"r{i:016x}" for i in range(64)]
    sides = [mine.left_run(r, p) for r in ids for p in range(PAIRS)]
    assert sides == [twin.left_run(r, p) for r in ids for p in range(PAIRS)]
    theirs = [other.left_run(r, p) for r in ids for p in range(PAIRS)]
    assert sides != theirs and 0.3 < sum(a == b for a, b in zip(sides, theirs)) / len(sides) < 0.7
    assert 0.3 < sides.count("a") / len(sides) < 0.7
    assert other.secret != mine.secret and len(other.secret) == 32
    assert stat.S_IMODE((other.folder / review.SECRET_FILE).stat().st_mode) == 0o600
    server = ReviewServer(other.folder, port=0).start()
    try:
        with urllib.request.urlopen(server.url, timeout=60) as resp:
            page = resp.read().decode()
        assert other.secret.hex() not in page
        for path in (review.SECRET_FILE, "votes.sqlite", "review.json", "images/0000-a.png"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(server.url + path, timeout=60)
            assert e.value.code == 404
    finally:
        server.stop()


def test_forty_invented_reviewers_count_for_nothing(served: ReviewServer, capsys: pytest.CaptureFixture) -> None:
    """40 invented or altered reviewer cookies voting B on one pair: all refused, none stored, no p-value from them;
    a reviewer the page signed still counts, once per pair (a repeat replaces)."""
    url, app = served.url, served.app
    real = _join(url)
    token = real.split("=", 1)[1]
    rid, name, sig = token.split(":")
    invented = [f"carol{i}" for i in range(10)]                                   # plain names, as before
    invented += [f"r{i:016x}::{'0' * 32}" for i in range(10)]                     # our form, made-up signature
    invented += [f"{rid}::{sig[:-1]}{'0' if sig[-1] != '0' else '1'}"] * 10       # a real one, altered
    invented += [f"r{i:016x}:mallory:{sig}" for i in range(10)]                   # a real signature on other ids
    assert len(invented) == 40
    for cookie in invented:
        status, body = _vote(url, f"{review.COOKIE}={cookie}", 0, "right")
        assert status == 403 and body["status"] == "error" and "not counted" in body["error"], (cookie, body)
    assert _vote(url, None, 0, "right")[0] == 400
    assert _vote(url, real, 0, "left")[0] == 200
    assert _vote(url, real, 0, "right")[0] == 200  # changed their mind: replaces
    served.app.flush_refused()
    rows = _rows(served.app.folder)
    assert [(r["reviewer"], r["pair"], r["choice"]) for r in rows] == [(rid, 0, "right")]
    s = summarize(served.app.folder)
    assert (s.votes, s.reviewers) == (1, 1) and s.p_value == pytest.approx(1.0)
    assert s.refused == {"unsigned": 10, "bad_signature": 30, "no_cookie": 1}
    assert main(["review", "summary", str(served.app.folder)]) == 0
    out = capsys.readouterr().out
    assert "41 vote(s) the page did not store" in out and "10 reviewer cookie not made by this page" in out
    # a browser that shows up with an invented cookie is given a fresh signed reviewer
    req = urllib.request.Request(url, headers={"Cookie": f"{review.COOKIE}=carol"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        fresh = _cookie_of(resp.headers).split("=", 1)[1]
    assert app.reviewer_of(fresh)[0] is not None and fresh.split(":")[0] != rid
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Cookie": real}), timeout=60) as resp:
        assert "Set-Cookie" not in resp.headers, "a signed reviewer keeps their id"


def _raw(url: str, data: bytes, hold_s: float = 0.0, timeout: float = 10.0) -> tuple[int, dict, float]:
    """Send ``data`` on a raw socket (then keep it open ``hold_s`` without sending more); (status, JSON body,
    seconds until the answer was complete)."""
    parsed = urllib.parse.urlparse(url)
    t0 = time.monotonic()
    with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout) as s:
        s.sendall(data)
        if hold_s:
            time.sleep(hold_s)
        buf = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            buf += chunk
    elapsed = time.monotonic() - t0
    assert buf, "the server closed the connection without an answer"
    head, _, body = buf.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body or b"{}"), elapsed


def _post(length_header: str, body: bytes = b"", cookie: str = "") -> bytes:
    extra = f"Cookie: {cookie}\r\n" if cookie else ""
    return (f"POST /vote HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n{extra}"
            f"{length_header}\r\n").encode() + body


@pytest.mark.parametrize("request_bytes, status", [
    (_post("Content-Length: -1\r\n"), 400),
    (_post("Content-Length: 12abc\r\n"), 400),
    (_post(""), 411),                                                          # no length: a body cannot be read
    (_post("Transfer-Encoding: chunked\r\n", b"5\r\npair=\r\n0\r\n\r\n"), 411),
    (_post("Content-Length: 300000000\r\n"), 413),                             # answered without reading it
    (_post("Content-Length: 99999999999999999999999999999999\r\n"), 413),
    (_post(f"Content-Length: {MAX_BODY + 1}\r\n", b"pair=0&choice=left&" + b"x" * MAX_BODY), 413),
    (_post("Content-Length: 5\r\nContent-Length: 7\r\n", b"pair=0&"), 400),
])
def test_request_sizes_are_refused_before_the_body_is_read(served: ReviewServer, request_bytes: bytes,
                                                            status: int, capsys: pytest.CaptureFixture) -> None:
    cookie = _join(served.url)
    with_cookie = request_bytes.replace(b"Host: x\r\n", f"Host: x\r\nCookie: {cookie}\r\n".encode())
    got, body, elapsed = _raw(served.url, with_cookie)
    assert (got, body["status"], body["code"]) == (status, "error", status), body
    assert elapsed < 1.0, "answered at once, not after waiting for a body"
    assert not _rows(served.app.folder)
    assert urllib.request.urlopen(served.url + "healthz", timeout=10).read() == b"ok"  # still serving


def test_a_request_that_arrives_too_slowly_is_cut_off(served: ReviewServer, capsys: pytest.CaptureFixture) -> None:
    cookie = _join(served.url)
    # headers that never end, then a body that stops halfway: 408 at the deadline (1.5 s), nothing stored
    for partial in (b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ", _post("Content-Length: 20\r\n", b"pair=0", cookie)):
        status, body, elapsed = _raw(served.url, partial, timeout=10)
        assert (status, body["code"]) == (408, 408) and 1.2 < elapsed < 5, (status, elapsed)
    assert not _rows(served.app.folder)
    served.app.flush_refused()
    with review.database(served.app.folder / "votes.sqlite") as conn:
        assert dict(conn.execute("SELECT reason, count FROM refused").fetchall())["timeout"] == 2
    # the whole vote in time, sent with pauses, is fine
    status, _, _ = _raw(served.url, _post("Content-Length: 18\r\n", b"pair=0&choice=none", cookie))
    assert status == 303 and len(_rows(served.app.folder)) == 1


@pytest.mark.parametrize("path", ["/image/99999999999999999999999999999999/left", "/image/" + "9" * 5000 + "/left",
                                  "/image/abc/left", "/image/-1/right", "/image/%C2%B2/left", "/image/4/left",
                                  "/image//left"],
                         ids=["huge", "5000-digits", "letters", "negative", "superscript", "past-the-end", "empty"])
def test_bad_pair_ids_in_image_urls_are_400(served: ReviewServer, path: str, capsys: pytest.CaptureFixture) -> None:
    cookie = _join(served.url)
    status, body, _ = _raw(served.url, f"GET {path} HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\n\r\n".encode())
    assert status == 400 and body["status"] == "error" and "pair" in body["error"], body


@pytest.mark.parametrize("pair, choice", [("9" * 1500, "left"), ("1e400", "left"), ("²", "left"), ("-1", "left"),
                                          (str(PAIRS), "left"), ("0", "both"), ("", "")],
                         ids=["1500-digits", "1e400", "superscript", "negative", "past-the-end", "bad-choice", "empty"])
def test_bad_votes_are_400_with_a_body(served: ReviewServer, pair: str, choice: str,
                                       capsys: pytest.CaptureFixture) -> None:
    cookie = _join(served.url)
    status, body = _vote(served.url, cookie, pair, choice)
    assert status == 400 and body["status"] == "error" and "a vote needs pair" in body["error"], body
    req = urllib.request.Request(served.url + "vote", data=urllib.parse.urlencode({"pair": pair}).encode(),
                                 headers={"Cookie": cookie, "Accept": "text/html"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400 and "<html" in e.value.read().decode()  # a browser gets a page
    assert not _rows(served.app.folder)
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("request_bytes, status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"PUT /vote HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", 501),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(150)) + b"\r\n", 431),
], ids=["garbage", "long-url", "put", "many-headers"])
def test_broken_requests_get_an_answer_with_a_body(served: ReviewServer, request_bytes: bytes, status: int,
                                                   capsys: pytest.CaptureFixture) -> None:
    got, body, _ = _raw(served.url, request_bytes)
    assert (got, body["status"], body["code"]) == (status, "error", status)
