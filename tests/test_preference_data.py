"""The preference data of a kto or dpo retraining, built from a real store (sqlite, and PostgreSQL where CI has one),
the service's kept PNGs and a real review folder voted through the review app: who counts, what is skipped and why,
and that nothing of the user's changes. No model: seconds."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from monitor.config import MonitorConfig
from monitor.preference_data import PREFERENCES, build_preference_data
from monitor.store import ChoiceOfAnotherKey, NotInPair, Store, UnknownPair


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, workspace: Path) -> Any:
    url = f"sqlite:///{workspace / 'monitor.db'}" if request.param == "sqlite" \
        else request.getfixturevalue("postgres_db")
    s = Store(url)
    yield s
    s.close()


def _gen(store: Store, root: Path, prompt: str, colour: tuple[int, int, int], keep: bool = True) -> str:
    path = root / "generations" / f"{prompt.replace(' ', '-')}-{colour[0]}-{colour[1]}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), colour).save(path)
    gid = store.log_generation(prompt=prompt, negative_prompt="", params={}, model_version="sdloop:v1",
                               latency_s=0.1, descriptors={}, image_path=str(path))
    if not keep:
        path.unlink()
    return gid


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(("votes.sqlite", "monitor.db"))}


def _readable(folder: Path, pairs: int = 0, singles: int = 0) -> None:
    """The folder is a preference dataset the dataset stage reads without a skipped line (`sdloop data check`)."""
    from finetune.data.preference import find_preference_file, scan_preferences

    scan = scan_preferences(folder, find_preference_file(folder), progress=False)
    assert not scan.skipped, scan.skipped
    assert (scan.stats["pairs"], scan.stats["singles"]) == (pairs, singles)


def _review(folder: Path, n: int = 3) -> Path:
    """A review folder as `sdloop review` writes it (review.json, images), its votes cast through the review app."""
    (folder / "images").mkdir(parents=True)
    pairs = []
    for i in range(n):
        for side, c in (("a", (200, 0, 0)), ("b", (0, 0, 200))):
            Image.new("RGB", (64, 64), (c[0], 10 * i, c[2])).save(folder / "images" / f"{i:04d}-{side}.png")
        pairs.append({"id": i, "prompt": f"a red circle {i}", "seed": i, "a": f"images/{i:04d}-a.png",
                      "b": f"images/{i:04d}-b.png", "key_a": f"ka{i}", "key_b": f"kb{i}"})
    (folder / "review.json").write_text(json.dumps({"schema": "sdloop-review", "schema_version": 1, "created": "",
                                                    "runs": {"a": "A", "b": "B"}, "generation": {},
                                                    "pairs": pairs}))
    return folder


def test_choices_follow_the_feedback_rules(store: Store, workspace: Path) -> None:
    a, b = _gen(store, workspace, "a red circle", (200, 0, 0)), _gen(store, workspace, "a red circle", (0, 0, 200))
    pid = store.create_pair([a, b], api_key_id=None)
    first = store.add_choice(pid, b, "alice")
    assert first["rejected"] == a and not first["updated_existing"]
    again = store.add_choice(pid, a, "alice")  # a repeat replaces: one row per rater and pair
    assert again["updated_existing"] and again["chosen"] == a and store.count_choices() == 1
    assert store.count_feedback() == 1  # a choice is new evidence for the policy's min_new_feedback
    with pytest.raises(UnknownPair):
        store.add_choice("0" * 32, a, "alice")
    with pytest.raises(NotInPair):
        store.add_choice(pid, "not-in-it", "alice")
    with pytest.raises(ChoiceOfAnotherKey):  # alice's row was written without a key
        store.add_choice(pid, b, "alice", api_key_id=7)
    assert store.pair_choices()[0]["chosen"] == a


def test_kto_singles_from_thumbs_and_ratings(store: Store, workspace: Path, tmp_path: Path) -> None:
    loved = [_gen(store, workspace, f"a red circle {i}", (200, i, 0)) for i in range(6)]
    hated = [_gen(store, workspace, f"a blue square {i}", (0, i, 200)) for i in range(3)]
    middling = _gen(store, workspace, "a green star", (0, 200, 0))
    gone = _gen(store, workspace, "a gone star", (0, 100, 0), keep=False)
    for i, gid in enumerate(loved):
        store.add_feedback(gid, "alice", rating=5)
        store.add_feedback(gid, f"bob-{i}", thumbs=1)
        store.add_feedback(gid, f"eve-{i}", rating=4)
    for gid in hated:
        store.add_feedback(gid, "carol", rating=1, thumbs=-1)
    store.add_feedback(middling, "dave", rating=3)
    store.add_feedback(middling, "erin", rating=3)
    store.add_feedback(gone, "dave", rating=5), store.add_feedback(gone, "erin", rating=5)
    before = _tree(workspace / "generations")
    cfg = MonitorConfig.from_dict({"max_rater_share": 0.5, "gate_holdout_share": 0.2})
    data = build_preference_data(store, cfg, tmp_path / "kto", "kto", gate_dir=tmp_path / "gate")
    lines = [json.loads(x) for x in (data.data_dir / PREFERENCES).read_text().splitlines()]
    labels = sorted(x["label"] for x in lines)
    assert data.counts["held_out"] == 2 and len(list((tmp_path / "gate").iterdir())) == 2
    assert labels.count("undesirable") == 3 and labels.count("desirable") == 4  # 6 loved - 2 held out
    assert all((data.data_dir / x["image"]).is_file() and x["weight"] == 1.0 and x["rater"] for x in lines)
    assert data.counts["middling"] == 1 and data.counts["missing_image"] == 1
    # alice rated all six loved ones, but counts on at most half of the 9 kept (4): the rest stand on bob's votes
    assert data.raters["limit_per_rater"] == 4
    assert max(r["examples"] for r in data.raters["largest"]) <= 4
    record = json.loads(data.record.read_text())
    reasons = {e["key"]: e["reason"] for e in record["examples"]}
    assert "missing_image" in reasons[gone] and "middling" in reasons[middling]
    assert _tree(workspace / "generations") == before  # read, linked, never changed
    _readable(data.data_dir, singles=7)


def test_dpo_pairs_from_choices_and_review_votes(store: Store, workspace: Path, tmp_path: Path) -> None:
    from finetune.evaluation.review import ReviewApp

    pairs = []
    for i in range(3):
        a = _gen(store, workspace, f"a red circle {i}", (200, i, 0))
        b = _gen(store, workspace, f"a red circle {i}", (0, i, 200), keep=i != 2)  # pair 2: one side missing
        pid = store.create_pair([a, b])
        store.add_choice(pid, a, f"user-{i}")
        pairs.append((pid, a, b))
    folder = _review(workspace / "reviews" / "A-vs-B")
    app = ReviewApp(folder)
    r1, r2 = app.new_reviewer(), app.new_reviewer()

    def prefer(who: Any, pair: int, run: str) -> None:  # the page shows each reviewer its own random sides
        app.vote(who, pair, "left" if app.left_run(who.id, pair) == run else "right")

    prefer(r1, 0, "a"), prefer(r2, 0, "a"), app.vote(r1, 1, "none"), prefer(r2, 2, "b")
    with sqlite3.connect(folder / "votes.sqlite") as conn:  # a vote for a pair this folder does not hold
        conn.execute("INSERT INTO votes (reviewer, pair, prompt, seed, left_run, choice, winner, created, "
                     "secret_id) VALUES (?, 99, 'x', 0, 'a', 'left', 'a', '', ?)", (r1.id, app.secret_id))
        conn.execute("INSERT INTO votes (reviewer, pair, prompt, seed, left_run, choice, winner, created) VALUES "
                     "('forged', 1, 'x', 0, 'a', 'left', 'a', '')")
    before = _tree(workspace)
    data = build_preference_data(store, MonitorConfig.from_dict({"max_rater_share": 1.0}), tmp_path / "dpo", "dpo")
    lines = [json.loads(x) for x in (data.data_dir / PREFERENCES).read_text().splitlines()]
    # 2 choices (the third has a side missing) + review pairs 0 and 2 (pair 1: no preference)
    assert len(lines) == 4 and data.counts["in"] == 4, json.loads(data.record.read_text())["examples"]
    assert data.counts["missing_image"] == 1 and data.counts["unknown_pair"] == 1
    assert data.counts["no_preference"] == 1 and data.counts["unsigned"] == 1
    for x in lines:
        chosen, rejected = Image.open(data.data_dir / x["chosen"]), Image.open(data.data_dir / x["rejected"])
        assert chosen.getpixel((0, 0))[0] != rejected.getpixel((0, 0))[0]
    by_prompt = {x["prompt"]: x for x in lines}
    assert Image.open(data.data_dir / by_prompt["a red circle 0"]["chosen"]).getpixel((0, 0))[0] == 200
    assert by_prompt["a red circle 0"]["weight"] == 1.0
    record = json.loads(data.record.read_text())
    assert any("unknown_pair" in n["reason"] for n in record["notes"])
    assert _tree(workspace) == before
    _readable(data.data_dir, pairs=4)


@pytest.mark.parametrize("sets, words", [(["objective=ppo"], "objective='ppo' is invalid"),
                                         (["objective=dpo", "from_champion=false"], "need from_champion"),
                                         (["desirable_rating=2"], "desirable_rating=2 is invalid")])
def test_a_bad_preference_setting_is_one_line(workspace: Path, capsys: pytest.CaptureFixture, sets: list[str],
                                              words: str) -> None:
    from sdloop_cli.main import main

    assert main(["retrain", *[a for s in sets for a in ("--set", s)]]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_version_5_store_migrates_to_6_keeping_its_rows(backend: str, tmp_path: Path,
                                                         request: pytest.FixtureRequest) -> None:
    import datetime as dt

    from monitor.store import MIGRATIONS, SCHEMA_VERSION, _versions, generations

    url = f"sqlite:///{tmp_path / 'm.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_db")
    old = Store(url, migrate=False)
    now = dt.datetime.now(dt.timezone.utc)
    with old.engine.begin() as conn:  # a store as version 5 left it, with rows
        _versions.create(conn)
        for version in range(1, 6):
            MIGRATIONS[version - 1](conn)
            conn.execute(_versions.insert().values(version=version, applied=now))
        for gid in ("g1", "g2"):
            conn.execute(generations.insert().values(id=gid, created=now, prompt="p", negative_prompt="", params={},
                                                     model_version="m", latency_s=0.1, descriptors={}))
    old.close()
    new = Store(url)
    assert new.schema_version() == SCHEMA_VERSION == 6 and new.get_generation("g1")["prompt"] == "p"
    pid = new.create_pair(["g1", "g2"])
    assert new.add_choice(pid, "g2", "alice")["rejected"] == "g1" and new.migrate() == []
    new.close()
