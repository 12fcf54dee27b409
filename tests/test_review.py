"""Blind human review (finetune.evaluation.review): the page round trip in headless Chromium, concurrent reviewers, votes that
survive a killed server, the summary's statistics, and user mistakes as one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch

from finetune.evaluation import review
from finetune.evaluation.metrics import sign_test, wilson
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


def _fresh(review_dir: Path, tmp_path: Path) -> Path:
    """A copy of the prepared review folder with no votes."""
    folder = tmp_path / "review"
    shutil.copytree(review_dir, folder, ignore=shutil.ignore_patterns("votes.sqlite*"))
    return folder


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
    # asked again with the same settings: the same folder, kept as it is
    assert review.prepare_review(*runs, out_dir=review_dir, n=PAIRS, steps=2, progress=False) == review_dir


def _click(driver, element_id: str) -> None:
    """Click a vote button and wait for the next page (the form posts, the server redirects)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    button = driver.find_element(By.ID, element_id)
    button.click()
    WebDriverWait(driver, 60).until(expected_conditions.staleness_of(button))
    WebDriverWait(driver, 60).until(lambda d: d.execute_script("return document.readyState") == "complete")


def test_review_page_round_trip_in_headless_chromium(review_dir: Path, tmp_path: Path) -> None:
    import headless_chromium

    why = headless_chromium.missing()
    if why:
        pytest.skip(why)
    from selenium.webdriver.common.by import By

    folder = _fresh(review_dir, tmp_path)
    server = review.ReviewServer(folder, port=0).start()
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
    assert [r["reviewer"] for r in rows] == ["alice"] * 4 + ["bob"] * 2
    assert sorted(r["pair"] for r in rows[:4]) == list(range(PAIRS)), "each pair once, in alice's own order"
    for r in rows:
        other = "b" if r["left_run"] == "a" else "a"
        expected = {"left": r["left_run"], "right": other, "none": "none"}[r["choice"]]
        assert r["winner"] == expected and r["left_run"] == review.left_run(r["reviewer"], r["pair"])
    assert [r["choice"] for r in rows] == ["left"] * 4 + ["none", "right"]

    s = review.summarize(folder)
    a_wins = sum(r["winner"] == "a" for r in rows)
    assert (s.votes, s.reviewers, s.ties, s.a_wins, s.b_wins) == (6, 2, 1, a_wins, 5 - a_wins)
    assert s.p_value == pytest.approx(sign_test(5 - a_wins, a_wins))


def test_concurrent_reviewers_lose_no_vote(review_dir: Path, tmp_path: Path) -> None:
    folder = _fresh(review_dir, tmp_path)
    server = review.ReviewServer(folder, port=0).start()
    errors: list[BaseException] = []

    def reviewer(i: int) -> None:
        try:
            for pair in range(PAIRS):
                body = urllib.parse.urlencode({"pair": pair, "choice": ("left", "right", "none")[(i + pair) % 3]})
                req = urllib.request.Request(server.url + "vote", data=body.encode(), method="POST",
                                             headers={"Cookie": f"{review.COOKIE}=r{i}"})
                with urllib.request.urlopen(req, timeout=60) as resp:
                    assert resp.status == 200  # the redirect to the next pair, followed
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
    assert review.summarize(folder).reviewers == 8


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
        with urllib.request.urlopen(url, timeout=60) as resp:
            assert "Blind review" in resp.read().decode()
        req = urllib.request.Request(url + "vote", data=b"pair=2&choice=left", method="POST",
                                     headers={"Cookie": f"{review.COOKIE}=carol"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200
    finally:
        proc.kill()  # SIGKILL: no clean shutdown, no checkpoint of the WAL
        proc.wait(30)
    rows = _rows(folder)
    assert [(r["reviewer"], r["pair"], r["choice"]) for r in rows] == [("carol", 2, "left")]
    assert any(str(folder) in ln for ln in lines), "it says where the votes are"


def test_summary_statistics_and_command(review_dir: Path, tmp_path: Path, capsys) -> None:
    folder = _fresh(review_dir, tmp_path)
    app = review.ReviewApp(folder)
    votes = 0
    for i in range(10):  # ten reviewers: B preferred by nine, A by one; plus two without a preference
        name = f"r{i}"
        left = review.left_run(name, 0)
        wants = "a" if i == 0 else "b"
        assert app.vote(name, 0, "left" if left == wants else "right")
        votes += 1
    assert not app.vote("r1", 0, "left"), "a second vote on the same pair does not count"
    app.vote("r0", 1, "none")
    app.vote("r1", 1, "none")
    s = review.summarize(folder)
    assert (s.votes, s.reviewers, s.a_wins, s.b_wins, s.ties) == (12, 10, 1, 9, 2)
    assert s.b_win_rate == pytest.approx(0.9)
    assert s.p_value == pytest.approx(2 * 11 / 1024)  # two-sided exact binomial, 9 of 10
    assert s.interval[0] == pytest.approx(0.5958, abs=1e-3) and s.interval[1] == pytest.approx(0.9821, abs=1e-3)
    assert wilson(0, 0) == (None, None) and sign_test(0, 0) is None

    assert main(["review", "summary", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "12 from 10 reviewer(s)" in out and "0.90" in out and "p = 0.0215" in out and "differ" in out
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
