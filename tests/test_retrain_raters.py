"""Retraining data that one caller cannot steer: the rater rules (``min_raters``, ``max_rater_share``) on a real
store of generations with real PNGs, the gate's held-out reference built beside the training data and disjoint from
it, and the quality gate that does not count KID against training data."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from monitor.config import MonitorConfig
from monitor.gate import quality_gate
from monitor.raters import Vote, one_per_rater, settle, share_limit, tally
from monitor.retrain_data import build_retrain_data
from monitor.retrain_select import holdout_size
from monitor.store import Store

HONEST = 20
ATTACK = 191


def _noise_png(seed: int) -> bytes:
    """A 64 px image no other image looks like (the dataset check removes near duplicates)."""
    import random

    rng = random.Random(seed)
    img = Image.frombytes("RGB", (64, 64), bytes(rng.getrandbits(8) for _ in range(64 * 64 * 3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _generation(store: Store, images: Path, name: str, key_id: int | None = None) -> str:
    path = images / f"{name}.png"
    path.write_bytes(_noise_png(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)))
    return store.log_generation(prompt=f"a prompt for {name}", negative_prompt="", params={}, model_version="m",
                                latency_s=0.1, descriptors={}, image_path=str(path), api_key_id=key_id)


@pytest.fixture(scope="module")
def crowd(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """20 generations rated 4 by two honest raters each; 191 rated 5 by one caller's key under invented client ids
    (two per generation), and by a second key of the same caller on all of them; one rated 5 by one rater only."""
    root = tmp_path_factory.mktemp("crowd")
    images = root / "generations"
    images.mkdir()
    store = Store(f"sqlite:///{root / 'store.db'}")
    mallory, _ = store.create_key("mallory", ["generate", "feedback"])
    mallory2, _ = store.create_key("mallory-2", ["rater"])
    honest = [_generation(store, images, f"honest-{i}") for i in range(HONEST)]
    for i, gid in enumerate(honest):
        store.add_feedback(gid, f"person-{i}-a", rating=4)
        store.add_feedback(gid, f"person-{i}-b", rating=4)
    attack = [_generation(store, images, f"attack-{i}", mallory.id) for i in range(ATTACK)]
    for i, gid in enumerate(attack):
        for j in range(2):  # invented client ids: under one key they are one rater
            store.add_feedback(gid, f"invented-{i}-{j}", rating=5, api_key_id=mallory.id)
    lonely = _generation(store, images, "lonely")
    store.add_feedback(lonely, "only-me", rating=5)
    return {"store": store, "honest": honest, "attack": attack, "lonely": lonely, "mallory": mallory,
            "mallory2": mallory2}


def _decisions(result: Any) -> dict[str, dict]:
    return {f["generation_id"]: f for f in result.files if f["source"] == "generation"}


def test_one_caller_with_invented_client_ids_does_not_dominate(crowd: dict[str, Any], tiny_run: Path,
                                                               tmp_path: Path) -> None:
    store = crowd["store"]
    result = build_retrain_data(tiny_run, store, MonitorConfig(), tmp_path / "one-key")  # the defaults
    files = _decisions(result)
    assert all(files[g]["decision"] == "in" for g in crowd["honest"])
    assert not any(files[g]["decision"] == "in" for g in crowd["attack"]), "one key is one rater: below min_raters"
    assert all("fewer than min_raters 2" in files[g]["reason"] for g in crowd["attack"])
    assert files[crowd["lonely"]]["decision"] == "out" and "1 distinct rater(s)" in files[crowd["lonely"]]["reason"]
    c = result.counts
    assert c["too_few_raters"] == ATTACK + 1 and c["added"] == HONEST and c["raters"] == 2 * HONEST

    # the same caller with a second key reaches min_raters: now the cap holds each key to its share
    for gid in crowd["attack"]:
        store.add_feedback(gid, "panel", rating=5, api_key_id=crowd["mallory2"].id)
    try:
        result = build_retrain_data(tiny_run, store, MonitorConfig(), tmp_path / "two-keys")
    finally:
        with store.engine.begin() as conn:  # the module's crowd as it was
            conn.exec_driver_sql("DELETE FROM feedback WHERE client_id = 'panel'")
    files = _decisions(result)
    kept = [g for g, f in files.items() if f["decision"] == "in"]
    theirs = [g for g in kept if g in set(crowd["attack"])]
    assert all(files[g]["decision"] == "in" for g in crowd["honest"]), "honest data is never pushed out"
    assert len(theirs) / len(kept) <= 0.2 and len(theirs) == 5  # 5 of 25: the share, not 191 of 211
    c = result.counts
    assert c["rater_cap"] == ATTACK - 5 and c["added"] == HONEST + 5 and c["votes_set_aside"] > 0
    assert c["raters"] == 2 * HONEST + 2
    record = json.loads(result.record.read_text())
    assert record["left_out"]["rater_cap"] == ATTACK - 5 and record["left_out"]["too_few_raters"] == 1
    assert record["raters"]["limit_per_rater"] == 5 and record["raters"]["largest"][0]["share"] == 0.2
    assert {r["rater"] for r in record["raters"]["largest"][:2]} == {f"key:{crowd['mallory'].id}",
                                                                     f"key:{crowd['mallory2'].id}"}
    capped = next(files[g] for g in crowd["attack"] if files[g]["decision"] == "out")
    assert "over their rater's share" in capped["reason"] and "max_rater_share 0.2" in capped["reason"]
    assert "from 42 rater(s)" in result.summary() and "good only with votes over a rater's share" in result.summary()


def test_a_generation_rated_by_one_rater_counts_only_when_min_raters_allows(crowd: dict[str, Any], tiny_run: Path,
                                                                            tmp_path: Path) -> None:
    store = crowd["store"]
    strict = _decisions(build_retrain_data(tiny_run, store, MonitorConfig(min_raters=2), tmp_path / "strict"))
    assert strict[crowd["lonely"]]["decision"] == "out"
    assert "from 1 distinct rater(s), fewer than min_raters 2" in strict[crowd["lonely"]]["reason"]
    lenient = MonitorConfig(min_raters=1, max_rater_share=1.0)
    assert _decisions(build_retrain_data(tiny_run, store, lenient, tmp_path / "lenient"))[crowd["lonely"]][
        "decision"] == "in"
    assert all(strict[g]["decision"] == "in" for g in crowd["honest"])  # two raters each
    three = _decisions(build_retrain_data(tiny_run, store, MonitorConfig(min_raters=3), tmp_path / "three"))
    assert not any(f["decision"] == "in" for f in three.values())


def test_the_gate_reference_is_held_out_of_the_training_data(crowd: dict[str, Any], tiny_run: Path,
                                                             tmp_path: Path) -> None:
    store = crowd["store"]
    cfg = MonitorConfig(gate_holdout_share=0.2)
    result = build_retrain_data(tiny_run, store, cfg, tmp_path / "data", gate_dir=tmp_path / "gate")
    files = _decisions(result)
    gate = sorted(g for g, f in files.items() if f["decision"] == "gate")
    assert len(gate) == result.gate_images == holdout_size(HONEST, 0.2) == 4 and result.gate_dir == tmp_path / "gate"
    assert result.counts["added"] == HONEST - 4
    # disjoint by generation, by file and by bytes from everything the challenger will train on
    meta = [json.loads(line) for line in (result.data_dir / "metadata.jsonl").read_text().splitlines()]
    trained_names = {m["file_name"] for m in meta}
    assert not any(g in name for g in gate for name in trained_names)
    gate_files = sorted((tmp_path / "gate").iterdir())
    assert sorted(p.stem for p in gate_files) == gate
    gate_bytes = {hashlib.sha256(p.read_bytes()).hexdigest() for p in gate_files}
    trained_bytes = {it.sha256 for it in result.report.items}
    assert gate_bytes and not gate_bytes & trained_bytes
    assert {hashlib.sha256((result.data_dir / n).read_bytes()).hexdigest() for n in trained_names} == trained_bytes
    record = json.loads(result.record.read_text())
    assert record["gate_dir"] == str(tmp_path / "gate") and record["counts"]["held_out"] == 4
    assert all("held out of the training data" in files[g]["reason"] for g in gate)
    # the same generations on every retraining (chosen by id, not by chance)
    again = build_retrain_data(tiny_run, store, cfg, tmp_path / "data2", gate_dir=tmp_path / "gate2")
    assert sorted(g for g, f in _decisions(again).items() if f["decision"] == "gate") == gate
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_holdout_sizes() -> None:
    assert [holdout_size(n, 0.2) for n in (0, 3, 4, 10, 20, 100)] == [0, 0, 2, 2, 4, 20]
    assert holdout_size(100, 0.0) == 0 and holdout_size(5, 0.5) == 2


def test_the_gate_does_not_count_kid_against_training_data() -> None:
    comparison = {"metrics": {"kid": {"computed": True, "values": {"a": {"value": 0.30}, "b": {"value": 0.01}}}}}
    cfg = MonitorConfig()
    fair = quality_gate(comparison, (None, None, False), cfg)
    assert fair.passed and fair.checks[0].passed is True and "held-out" in fair.checks[0].text
    unfair = quality_gate(comparison, (None, None, False), cfg, not_held_out="fewer than 2 held out")
    assert unfair.checks[0].passed is None and "KID not counted: fewer than 2 held out" in unfair.checks[0].text
    assert not unfair.passed, "with nothing else to go on, a challenger is not promoted"


def test_settle_keeps_each_rater_within_the_share() -> None:
    """Pure: 10 generations rated by two honest raters each, 50 by one heavy rater (plus a sidekick)."""
    votes, fid = [], 0
    for g in range(10):
        for r in ("a", "b"):
            fid += 1
            votes.append(Vote(fid, f"h{g}", f"{r}{g}", 4, None))
    for g in range(50):
        for r in ("heavy", "sidekick", "heavy"):  # a repeat of one rater on one generation is one vote
            fid += 1
            votes.append(Vote(fid, f"x{g}", r, 5, None))
    assert len(one_per_rater(votes)) == 20 + 100

    def select(tallies: dict) -> list[str]:
        return sorted(g for g, t in tallies.items() if len(t.raters) >= 2)

    s = settle(votes, select, 0.25)
    heavy = [g for g in s.kept if g.startswith("x")]
    assert len(heavy) == share_limit(0.25, len(s.kept)) == 3 and len(s.kept) == 13
    assert heavy == ["x0", "x1", "x2"], "a rater's oldest votes count first"
    assert s.counted_on["heavy"] / len(s.kept) <= 0.25 and tally(one_per_rater(votes))["x9"].ratings == 2
    assert share_limit(0.2, 3) == 1 and share_limit(0.2, 10) == 2 and share_limit(1.0, 7) == 7


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'monitor.db'}"
    return request.getfixturevalue("postgres_db")


def test_votes_are_read_and_weighed_alike_on_both_databases(url: str, tmp_path: Path, monkeypatch) -> None:
    from monitor.retrain_select import select_generations

    monkeypatch.setenv("SDLOOP_HOME", str(tmp_path / "home"))
    store = Store(url)
    key, _ = store.create_key("k", ["feedback"])
    images = tmp_path / "img"
    images.mkdir()
    a, b, c = (_generation(store, images, n) for n in ("a", "b", "c"))
    store.log_generation(prompt="never rated", negative_prompt="", params={}, model_version="m", latency_s=0.1,
                         descriptors={})
    for client in ("x", "y", "z"):
        store.add_feedback(a, client, rating=5, api_key_id=key.id)   # one key: one rater
    store.add_feedback(b, "p", rating=4)
    store.add_feedback(b, "q", thumbs=1)
    store.add_feedback(c, "p", rating=1)
    store.add_feedback(c, "r", comment="no vote")
    votes, unrated = store.rating_votes()
    assert len(votes) == 6 and unrated == 1 and {v["api_key_id"] for v in votes} == {key.id, None}
    sel = select_generations(store, MonitorConfig(), None, hold_out=True)
    decided = {e["generation_id"]: (e["decision"], e["raters"]) for e in sel.entries}
    assert decided == {a: ("out", 1), b: ("in", 2), c: ("out", 1)}
    assert (sel.counts["too_few_raters"], sel.counts["dropped_low"], sel.counts["held_out"]) == (1, 1, 0)
    assert sel.disliked.keys() == {c} and sel.raters["voted"] == 3 and sel.raters["contributed"] == 2
    store.close()


@pytest.mark.parametrize("low, passed, words", [(-0.0001, True, "within noise"), (0.02, False, "beyond noise"),
                                                (None, False, "worse than the margin 0.01")])
def test_a_small_held_out_reference_fails_kid_only_beyond_noise(low: float | None, passed: bool, words: str) -> None:
    kid = {"computed": True, "values": {"a": {"value": 0.0}, "b": {"value": 0.05}}}
    if low is not None:
        kid["difference"] = {"value": 0.05, "low": low, "high": 0.1}
    check = quality_gate({"metrics": {"kid": kid}}, (0.5, 0.5, True), MonitorConfig(kid_margin=0.01)).checks[0]
    assert check.passed is passed and words in check.text, check.text
