"""Learning from what users prefer, end to end through the front doors: a real `sdloop serve` with API keys serves
the tiny champion; callers ask for two candidates, say which one they kept (POST /choose) and give thumbs; a review
folder holds people's votes; `sdloop retrain --set objective=kto` and `--set objective=dpo` build the preference
data, train a challenger against the champion, compare, export, gate and promote or reject it.

One served workspace per module: the session's published tiny export (tests/serve_support.py, shared with the serving
tests) in a fresh workspace, its source run copied there (the comparison caches images in the champion's run).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from serve_support import fresh_workspace, publish_variant, shared_store, wait_for, workspace_env
from test_serve_real import _post

SETTINGS = {
    "min_raters": 1, "max_rater_share": 1.0,  # the rater rules have their own tests (test_preference_data)
    "train_overrides": {"max_steps": 2, "validation_every": 2, "sample_every": 2, "sample_steps": 1,
                        "sample_seeds": [0], "early_stopping_patience": 0, "batch_size": 2},
    "gate_images": 2, "gate_steps": 2, "gate_holdout_share": 0.0, "kid_margin": 10.0, "val_loss_margin": 10.0,
    "latency_budget_s": 60.0,
    "export_settings": {"steps": 2, "reps": 1, "prompts": ["a red circle"], "seeds": [0], "latency_images": 1},
}
KEYS = {"app": ["generate", "feedback"], "other": ["generate", "feedback"], "team": ["rater"]}


@pytest.fixture(scope="module")
def served(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`sdloop serve` (keys on, one worker) on a workspace whose champion is the tiny export; the keys it knows."""
    from monitor.store import Store
    from sdloop_cli.demo_loop import served as serve

    champ = shared_store(tiny_run, tmp_path_factory)
    root = tmp_path_factory.mktemp("pref-loop")
    ws = fresh_workspace(champ, root)
    run = ws.home / "runs" / "champion"
    shutil.copytree(tiny_run, run)
    tag = publish_variant(champ, ws, root, lambda m: m["source_run"].update(path=str(run)))
    env = {**ws.env(), "SDLOOP_AUTH": "keys"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with workspace_env(ws.home, ws.bentoml_home):
            from export import registry

            registry.promote(tag, "test")
            store = Store(env["SDLOOP_STORE_URL"])
            keys = {name: store.create_key(name, scopes)[1] for name, scopes in KEYS.items()}
            store.close()
            (ws.home / "monitor.yaml").write_text(yaml.safe_dump(SETTINGS))
            with serve(root / "server.log") as url:
                yield {"url": url, "keys": keys, "home": ws.home, "tag": tag}
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _call(s: dict, path: str, body: dict, key: str = "app") -> tuple[int, dict]:
    code, _, raw = _post(s["url"] + path, body, {"Authorization": f"Bearer {s['keys'][key]}"})
    return code, json.loads(raw)


def _get(s: dict, path: str) -> Any:
    """The JSON of a GET under the app key, or None while it is not 200 (a job not done yet)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(s["url"] + path, headers={"Authorization": f"Bearer {s['keys']['app']}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError:
        return None


def _pair(s: dict, prompt: str, seed: int, key: str = "app") -> dict:
    code, body = _call(s, "/txt2img_json", {"prompt": prompt, "seed": seed, "steps": 2, "candidates": 2}, key)
    assert code == 200, body
    return body


def _tree(*roots: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for root in roots for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith("votes.sqlite")}


def test_two_candidates_and_the_choice_over_http(served: dict) -> None:
    body = _pair(served, "a red circle", 5)
    a, b = (img["generation_id"] for img in body["images"])
    assert body["pair_id"] and [img["seed"] for img in body["images"]] == [5, 6]
    assert all(img["pair_id"] == body["pair_id"] for img in body["images"])
    pid = body["pair_id"]
    for bad in ({"candidates": 3}, {"candidates": 2, "num_images": 3}):  # bounds in the schema: 400 naming it
        code, err = _call(served, "/txt2img_json", {"prompt": "a red circle", "steps": 2, **bad})
        assert code == 400 and err["status"] == "invalid" and "candidates" in json.dumps(err), err
    code, err = _call(served, "/txt2img", {"prompt": "a red circle", "steps": 2, "candidates": 2})
    assert code == 400 and err["status"] == "invalid"
    code, ok = _call(served, "/choose", {"pair_id": pid, "chosen": b})
    assert code == 200 and (ok["chosen"], ok["rejected"], ok["updated"]) == (b, a, False)
    code, ok = _call(served, "/choose", {"pair_id": pid, "chosen": a})  # a repeat replaces: one row per rater
    assert code == 200 and ok["updated"] and ok["chosen"] == a
    code, err = _call(served, "/choose", {"pair_id": "0" * 32, "chosen": a})
    assert (code, err["status"]) == (404, "not_found") and set(err) == {"error", "status"}
    code, err = _call(served, "/choose", {"pair_id": pid, "chosen": "f" * 32})
    assert (code, err["status"]) == (400, "invalid")
    code, err = _call(served, "/choose", {"pair_id": pid, "chosen": a}, key="other")  # not its pair
    assert (code, err["status"]) == (403, "forbidden")
    code, err = _call(served, "/choose", {"pair_id": pid, "chosen": b, "client_id": "app"}, key="team")
    assert (code, err["status"]) == (409, "conflict")  # the row of client "app" was written under another key
    code, ok = _call(served, "/choose", {"pair_id": pid, "chosen": b}, key="team")  # rater: any pair
    assert code == 200 and ok["chosen"] == b
    code, _, _ = _post(served["url"] + "/choose", {"pair_id": pid, "chosen": a})
    assert code == 401
    # a job asked for two candidates answers them as one pair too
    code, job = _call(served, "/jobs", {"prompt": "a red circle", "steps": 2, "candidates": 2})
    assert code == 202, job
    result = wait_for(lambda: _get(served, f"/jobs/{job['job_id']}/result"), timeout=60, every=0.2)
    assert result["pair_id"] and len(result["images"]) == 2
    assert _call(served, "/choose", {"pair_id": result["pair_id"], "chosen": result["images"][1]["generation_id"]})[0] \
        == 200


def test_kto_and_dpo_retrainings_end_to_end(served: dict, capsys: pytest.CaptureFixture) -> None:
    import sqlite3

    from test_preference_data import _review

    from finetune.evaluation.review import ReviewApp
    from finetune.evaluation.shapecheck import eval_captions
    from sdloop.champion import current_champion_tag
    from sdloop_cli.main import main

    first, home = served["tag"], served["home"]
    # callers: two candidates per prompt, the one kept chosen and thumbed up, the other thumbed down by the team
    pairs = []
    for i, prompt in enumerate(eval_captions(6, 31)):
        body = _pair(served, prompt, 10 * i)
        (a, b), pid = (img["generation_id"] for img in body["images"]), body["pair_id"]
        kept, other = (a, b) if i % 2 else (b, a)
        assert _call(served, "/choose", {"pair_id": pid, "chosen": kept})[0] == 200
        assert _call(served, "/feedback", {"generation_id": kept, "thumbs": "up"})[0] == 200
        assert _call(served, "/feedback", {"generation_id": other, "thumbs": "down"}, key="team")[0] == 200
        pairs.append((pid, kept, other, body, prompt))
    # a pair with one side missing: its kept PNG is gone (reported and skipped, by kto and dpo alike)
    gone = next((home / "generations").rglob(f"{pairs[-1][2]}.png"))
    gone.unlink()
    # people's votes on the review page; one vote for a pair the folder does not hold
    folder = _review(home / "reviews" / "champion-vs-other", n=3)
    app = ReviewApp(folder)
    for who in (app.new_reviewer(), app.new_reviewer()):
        for pair in range(3):
            app.vote(who, pair, "left" if app.left_run(who.id, pair) == "a" else "right")
    with sqlite3.connect(folder / "votes.sqlite") as conn:
        conn.execute("INSERT INTO votes (reviewer, pair, prompt, seed, left_run, choice, winner, created, secret_id) "
                     "VALUES (?, 99, 'x', 0, 'a', 'left', 'a', '', ?)", ("r" + "0" * 16, app.secret_id))
    before = _tree(home / "generations", folder)

    # kto: thumbs -> singles -> challenger against the champion -> compare, export, gate: promoted
    capsys.readouterr()
    assert main(["retrain", "--quiet", "--objective", "kto"]) == 0
    out = capsys.readouterr().out
    assert "PROMOTED" in out, out
    second = current_champion_tag()
    assert second != first
    wait_for(lambda: _call(served, "/txt2img_json", {"prompt": "a red circle", "steps": 2})[1]["model_version"]
             == second, timeout=60, every=0.5)

    # dpo: choices and review votes -> pairs -> challenger -> quality gate: rejected before an export is spent on
    # it (trained without a validation split and with no held-out images, it has no evidence to pass on; the
    # export gate's path is the kto turn's, and a full export costs the CI budget ~10 s)
    assert main(["retrain", "--quiet", "--set", "objective=dpo",
                 "--set", "train_overrides.data_config={validation_split: 0.0}"]) == 0
    out = capsys.readouterr().out
    assert "REJECTED" in out and "evidence" in out, out
    assert current_champion_tag() == second
    after = _tree(home / "generations", folder)
    assert {k: after.get(k) for k in before} == before  # nothing of the users' was changed

    assert main(["retrain", "history", "--json"]) == 0
    history = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in history[:2]] == ["rejected", "promoted"]
    assert [s["step"] for s in history[0]["steps"]] == ["data", "train", "compare"]
    assert [s["step"] for s in history[1]["steps"]] == ["data", "train", "compare", "export", "publish", "gate",
                                                        "promote"]
    records = [json.loads(Path(r["steps"][0]["detail"]["record"]).read_text()) for r in history[:2]]
    dpo, kto = records
    assert (kto["objective"], dpo["objective"]) == ("kto", "dpo")
    assert kto["counts"]["in"] == 11 and kto["counts"]["missing_image"] == 1  # 12 thumbs, one image gone
    # 6 choices here, one with a side gone, + 3 review pairs + the first test's job pair; its first pair is a tie
    # (app and team chose differently)
    assert dpo["counts"]["missing_image"] == 1 and dpo["counts"]["unknown_pair"] == 1
    assert dpo["counts"]["in"] == 9 and dpo["counts"]["no_preference"] == 1, dpo["counts"]
    assert any("unknown_pair" in n["reason"] for n in dpo["notes"])
    data_dir = Path(history[0]["steps"][0]["detail"]["data_dir"])
    lines = [json.loads(x) for x in (data_dir / "preferences.jsonl").read_text().splitlines()]
    by_prompt = {p[4]: p for p in pairs}
    served_lines = [x for x in lines if x["prompt"] in by_prompt]
    assert len(served_lines) == 5 and len(lines) == 9
    for x in served_lines:  # the chosen side is the PNG the caller kept, byte for byte
        _, kept, _, body, _ = by_prompt[x["prompt"]]
        png = next(img["image_png_base64"] for img in body["images"] if img["generation_id"] == kept)
        assert (data_dir / x["chosen"]).read_bytes() == base64.b64decode(png)
    compare = history[1]["steps"][2]["detail"]
    assert compare["win_rate"]["applies"] and compare["win_rate"]["judged"] >= 1
    assert "preference win rate" in compare["win_rate"]["text"]
