"""The second half of `sdloop demo`: one full turn of the monitoring and retraining loop, with simulated users.

A real `sdloop serve` (one worker) serves the champion on 127.0.0.1. Two waves of simulated users call it over HTTP:
yesterday's ask for the colours the base always knew, today's for the new concept. Each user asks for two candidates
(``"candidates": 2``) and rates both with the pixel checker's eyes (finetune/evaluation/shapecheck.py): the colour
they asked for drawn is a 4 (a 5 and a thumbs up if the size is right too), anything else a 1 with a thumbs down; and
keeps the better one (``POST /choose``; equal ones: no choice, as a person with no preference). The monitor then
compares today against yesterday (the frozen reference window: the champion's first generations), the policy
decides, and a retraining with the demo's objective (``finetune.demo.DEMO_OBJECTIVE``: sft on the champion's data
plus the well-rated images, or kto on the thumbs, or dpo on the choices) trains a challenger, compares, exports,
gates, and promotes or rejects it; the running service picks up a promotion by itself.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from sdloop.errors import UserError

WAVE = 16          # users per wave (each asks for two candidates of one prompt)
STEPS = 20         # denoising steps of the served images


def demo_monitor_settings(steps: int = 40) -> dict[str, Any]:
    """The demo's monitor settings: windows and counts that fit two waves of 16 generations, and a short
    continuation of the champion (the demo recipe's rate and batch, 40 steps)."""
    return {"min_generations": WAVE, "min_feedback": 8, "min_new_feedback": 8, "current_hours": 1,
            "train_overrides": {"max_steps": steps, "sample_every": steps}, "gate_images": 16, "gate_steps": 20,
            "latency_budget_s": 60.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url: str, body: Optional[dict[str, Any]] = None, timeout: float = 120) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw[:1] in (b"{", b"[") else raw
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, None


@contextmanager
def served(log: Path, progress: bool = False) -> Iterator[str]:
    """`sdloop serve` on a free local port for the block; its output goes to ``log``. ``progress``: a line on stderr
    counting the seconds until it answers /readyz (loading the model takes a while on a busy machine)."""
    port = _free_port()
    env = {**os.environ, "SDLOOP_POLL_S": "1", "BENTOML_DO_NOT_TRACK": "true"}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sdloop_cli", "serve", "--port", str(port), "--workers", "1",
                                 "--threads", "4"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        with _bar(progress, desc="      starting the server", total=None, unit="poll",
                  bar_format="{desc}: {elapsed}") as bar:
            while _call(url + "/readyz", timeout=5)[0] != 200:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise UserError(f"the demo's server did not start; its log is {log}")
                time.sleep(0.5)
                bar.update()
        yield url
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def simulated_rating(image: Any, prompt: str) -> tuple[int, Optional[str]]:
    """What a user who asked for ``prompt`` thinks of ``image``: (rating, thumbs)."""
    from finetune.evaluation.shapecheck import parse_caption, read_attributes

    asked, read = parse_caption(prompt), read_attributes(image)
    if read.get("colour") != asked.get("colour"):
        return 1, "down"
    return (5, "up") if read.get("size") == asked.get("size") else (4, None)


def _bar(enabled: bool, **kw: Any) -> Any:
    """A tqdm bar on stderr that disappears when done (nothing when ``enabled`` is False), as the other stages'."""
    from tqdm import tqdm

    return tqdm(disable=not enabled, leave=False, file=sys.stderr, **kw)


def wave(url: str, prompts: list[str], seed: int, client: str, bar: Any = None) -> list[int]:
    """One wave of users: each asks for two candidates of its prompt over HTTP, rates them, keeps the better one.
    Returns the ratings (one per image).

    Each image is rated by the user who asked for it and by a second user who sees it (the same eyes, another client
    id): retraining counts a generation only once ``min_raters`` (2) distinct raters voted on it. The choice is the
    asking user's (``POST /choose``); two images rated alike are no choice."""
    from PIL import Image

    ratings = []
    for i, prompt in enumerate(prompts):
        code, body = _call(url + "/txt2img_json", {"prompt": prompt, "seed": seed + 2 * i, "steps": STEPS,
                                                   "guidance_scale": 5.0, "candidates": 2})  # native size
        if code != 200:
            raise UserError(f"the demo's server answered {code} to txt2img: {str(body)[:200]}")
        rated = []
        for img in body["images"]:
            rating, thumbs = simulated_rating(Image.open(io.BytesIO(base64.b64decode(img["image_png_base64"]))),
                                              prompt)
            for rater in (f"{client}-{i}", f"{client}-{i}-viewer"):
                fb = {"generation_id": img["generation_id"], "rating": rating, "client_id": rater}
                if thumbs:
                    fb["thumbs"] = thumbs
                _post(url + "/feedback", fb)
            rated.append((rating, img["generation_id"]))
        if len(rated) == 2 and rated[0][0] != rated[1][0] and body.get("pair_id"):
            _post(url + "/choose", {"pair_id": body["pair_id"], "chosen": max(rated)[1], "client_id": f"{client}-{i}"})
        ratings += [r for r, _ in rated]
        if bar is not None:
            bar.update()
    return ratings


def _post(url: str, body: dict[str, Any]) -> None:
    code, answer = _call(url, body)
    if code != 200:
        raise UserError(f"the demo's server answered {code} to {url.rsplit('/', 1)[-1]}: {str(answer)[:200]}")


def loop_turn(concept: str, quiet: bool, first: int, total: int, steps: int = 0) -> None:
    """Serve, simulate two waves of users, check, retrain (``steps``: the challenger's, default 40); print each step
    (numbered from ``first``)."""
    import datetime as dt

    from finetune.evaluation.shapecheck import eval_captions
    from monitor.check import run_check
    from monitor.config import MonitorConfig
    from monitor.retrain import retrain
    from sdloop.champion import current_champion_tag
    from sdloop.workspace import monitor_dir

    from finetune.demo import DEMO_OBJECTIVE, DEMO_OBJECTIVE_LR

    settings = demo_monitor_settings(steps or 40)
    if DEMO_OBJECTIVE != "sft":  # the preference objective at the rate its benchmark chose, from the champion's LoRA
        settings["train_overrides"]["learning_rate"] = DEMO_OBJECTIVE_LR
    cfg = MonitorConfig.from_dict({**settings, "gate_prompts": eval_captions(8, 1, concept=concept),
                                   "objective": DEMO_OBJECTIVE})
    log = monitor_dir() / "demo-server.log"
    print(f"[{first}/{total}] serve: `sdloop serve` on 127.0.0.1 (1 worker; log {log})", flush=True)
    with served(log, progress=not quiet) as url:
        champion = current_champion_tag()
        code, info = _call(url + "/info", timeout=10)
        how = "" if code != 200 else (f" ({info['native_width']}x{info['native_height']} by default, "
                                      f"{', '.join(info['providers'])}, {info['intra_op_num_threads']} thread(s))")
        print(f"      {url} serves {champion}{how}   (GET {url}/info)")
        with _bar(not quiet, total=2 * WAVE, desc="      users", unit="user") as bar:
            bar.set_postfix_str("yesterday's colours")
            yesterday = wave(url, eval_captions(WAVE, 7), seed=100, client="yesterday", bar=bar)
            today_started = dt.datetime.now(dt.timezone.utc)
            bar.set_postfix_str(f"today's {concept!r}")
            today = wave(url, eval_captions(WAVE, 8, concept=concept), seed=200, client="today", bar=bar)
        print(f"[{first + 1}/{total}] users: {WAVE} asked for two candidates with the usual colours (mean rating "
              f"{sum(yesterday) / max(1, len(yesterday)):.1f}), then {WAVE} asking for {concept!r} (mean rating "
              f"{sum(today) / max(1, len(today)):.1f}), each keeping the better one; the pixel checker plays the "
              "users")
        print(f"[{first + 2}/{total}] monitor: today against the reference window frozen from the champion's "
              "first generations", flush=True)
        if not quiet:
            print("      building the Evidently report and deciding ...", file=sys.stderr, flush=True)
        check = run_check(cfg, since=today_started)
        if not quiet:
            print(f"      report built in {check.report.build_s:.0f} s", file=sys.stderr, flush=True)
        for line in check.lines():
            print(f"      {line}")
        print(f"      evidently ui --workspace {monitor_dir() / 'evidently'}   (the report history)")
        note = "" if check.decision.retrain else " (the policy did not ask for it; the demo runs the turn anyway)"
        learns = {"sft": "the champion's data plus the well-rated generations",
                  "kto": "kto on the generations users thumbed up or down, against the champion",
                  "dpo": "dpo on the candidates users kept over the other, against the champion"}[cfg.objective]
        print(f"[{first + 3}/{total}] retrain: {learns}{note}")
        outcome = retrain(cfg, trigger="demo", progress=not quiet, say=lambda s: print(f"      {s}"))
        for line in outcome.lines():
            print(f"      {line}")
        if outcome.promoted:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                code, body = _call(url + "/txt2img_json", {"prompt": eval_captions(1, 9, concept=concept)[0],
                                                           "steps": 2})
                if code == 200 and body["model_version"] == outcome.challenger:
                    print(f"      the running service now serves {outcome.challenger}")
                    break
                time.sleep(1)
    print("      sdloop retrain history   (every step of every retraining)")
