"""Benchmark: a real `sdloop serve` on 127.0.0.1, first against the export's own latency, then under a bounded load.

    python benchmarks/serve.py [--home WORKSPACE] [--requests 160] [--clients 8] [--size 128] [--steps 10]
    python benchmarks/serve.py --native-only [--native-requests 30]

First, the service against the export (what the gate judged): one worker with the export's own runtime (its
manifest's threads), one client, ``--native-requests`` requests at the model's native size with no size given, the
steps and guidance the export measured at; the median latency the service reports (X-Latency-S: from the request
reaching the handler to the images, lock and checks included) and the client's round trip (PNG encoding, logging and
HTTP too), each side by side with the manifest's ``latency.export_s`` and the ratio (goal: within 10%). The export is
also timed again in this process (the same loader and call as the export's own measurement), alternating with the
requests: the manifest's figure was taken whenever the export ran, and on a shared machine that alone moves it by
half; the ratio against the figure taken now, under the same load, is the one that says what serving costs.

Then configurations, side by side: 1 worker with the export's threads (its manifest's, all the cores it was exported
on), 1 worker with 1 thread, N workers (N = cores) of 1 thread each, and N workers with the export's threads (what
`sdloop serve` does by default). Each: start the server, wait for /readyz, 2 warm-up requests per
worker, then ``--requests`` txt2img_json requests from ``--clients`` concurrent clients; throughput, p50/p95/p99
latency and errors. Then 500 concurrent feedback posts (32 clients) against the N-worker server and the rows the store
holds afterwards. ``--home``: a workspace whose model store has a champion (default: one is built in a temporary
folder from the tiny random base: train 8 steps, export, publish, promote; about two minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _post(url: str, body: dict) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:
        return 0, str(e).encode()


def build_champion(root: Path) -> Path:
    """A workspace with a promoted champion: the tiny random base, 8 training steps, exported and published."""
    from export import registry
    from export.build import ExportConfig, build_export
    from finetune.pretraining.base import write_tiny_base
    from finetune.training.config import TrainConfig, tiny_overrides
    from finetune.data.synth import make_synthetic_dataset
    from finetune.training.train import train

    os.environ["SDLOOP_HOME"] = str(root / "home")
    os.environ.pop("BENTOML_HOME", None)
    base, data, run = write_tiny_base(root / "base"), make_synthetic_dataset(root / "data", n=24, seed=0), root / "run"
    train(TrainConfig.from_dict({**tiny_overrides(), "base": str(base), "data": str(data), "output": str(run),
                                 "max_steps": 8, "early_stopping_patience": 0}), progress=False)
    # 20 steps, as a request: the latency the export records is measured at these steps and its native size
    build_export(run, root / "export", ExportConfig(steps=20, reps=1, prompts=["a red circle"]), progress=False)
    registry.promote(registry.publish(root / "export")[0], "benchmark")
    return root / "home"


class Server:
    """`sdloop serve` in its own session; stopped by its PID."""

    def __init__(self, home: Path, store_url: str, workers: int, torch_threads: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "SDLOOP_HOME": str(home), "BENTOML_HOME": str(home / "bentoml"),
               "SDLOOP_STORE_URL": store_url,
               # throughput, not admission: a queue as deep as the 8 request threads refuses nothing (no 429)
               "SDLOOP_QUEUE": os.environ.get("SDLOOP_QUEUE", "7")}
        args = [sys.executable, "-m", "sdloop_cli", "serve", "--port", str(self.port), "--workers", str(workers),
                "--threads", "8"] + (["--torch-threads", str(torch_threads)] if torch_threads else [])
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        end = time.monotonic() + 300
        while time.monotonic() < end and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        self.log.seek(0)
        raise SystemExit(f"the server did not become ready:\n{self.log.read().decode()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _direct(home: Path, info: dict[str, Any]) -> Any:
    """A callable that generates one image with the served version opened by the one loader in this process, as the
    export measured it (the same runtime, torch threads and call): the export's latency measured again now."""
    import torch

    os.environ.update({"SDLOOP_HOME": str(home), "BENTOML_HOME": str(home / "bentoml")})
    from bento.runtime import model_dir
    from sdloop.exportload import open_export

    m = info["measured_latency"]
    torch.set_num_threads(int(m["threads"] or info["manifest_threads"] or 1))
    pipe = open_export(model_dir(info["model_version"])[1]).pipe

    def once() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            pipe("a red circle", num_inference_steps=m["steps"], height=m["size"], width=m["size"],
                 guidance_scale=m.get("guidance_scale") or 7.5, generator=torch.Generator().manual_seed(0),
                 output_type="np")
        return time.perf_counter() - t0

    return once


def native_vs_export(home: Path, store_url: str, requests: int) -> dict[str, Any]:
    """The service at the model's native size against the latency its export measured, as one client sees it; the
    export is also timed again here, alternating with the requests, so a busy machine slows both alike."""
    server = Server(home, store_url, 1, 0)
    try:
        with urllib.request.urlopen(server.url + "/info", timeout=30) as r:
            info = json.loads(r.read())
        measured = info["measured_latency"]
        direct = _direct(home, info)
        body = {"prompt": "a red circle", "steps": measured["steps"], "seed": 0}  # no size: the native one
        if measured.get("guidance_scale") is not None:
            body["guidance_scale"] = measured["guidance_scale"]
        served, round_trip, now = [], [], []
        for i in range(3 + requests):  # 3 warm-up rounds: first runs allocate
            req = urllib.request.Request(server.url + "/txt2img", data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
            t0 = time.perf_counter()
            with urllib.request.urlopen(req, timeout=600) as r:
                r.read()
                latency = float(r.headers["X-Latency-S"])
            wall = time.perf_counter() - t0
            again = direct()
            if i >= 3:
                served.append(latency)
                round_trip.append(wall)
                now.append(again)
    finally:
        server.stop()
    return {"info": info, "export_s": float(measured["export_s"]), "now_s": statistics.median(now),
            "served_s": statistics.median(served), "round_trip_s": statistics.median(round_trip),
            "requests": requests}


def print_native(r: dict[str, Any]) -> None:
    info, m = r["info"], r["info"]["measured_latency"]
    print(f"\nthe service against its export: {info['model_version']} at its native {info['native_width']}x"
          f"{info['native_height']}, {m['steps']} steps, guidance {m.get('guidance_scale')}, "
          f"{', '.join(info['providers'])}, {info['intra_op_num_threads']} intra-op thread(s) (manifest: "
          f"{info['manifest_threads']}), medians of {r['requests']} sequential requests")
    print(f"{'latency per image':46s} {'s':>8s} {'vs manifest':>12s} {'vs now':>8s}")
    for label, key in (("export, as its manifest records (export_s)", "export_s"),
                       ("export, timed again now (same loader)", "now_s"),
                       ("service (X-Latency-S: handler to images)", "served_s"),
                       ("client round trip (PNG, logging, HTTP too)", "round_trip_s")):
        print(f"{label:46s} {r[key]:8.4f} {r[key] / r['export_s']:12.2f} {r[key] / r['now_s']:8.2f}")


def load(url: str, body: dict, requests: int, clients: int) -> dict[str, Any]:
    """Send ``requests`` requests from ``clients`` threads; throughput, latency percentiles, and what the failed
    requests were (status and the start of the answer, printed once per kind)."""
    def one(_: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        code, out = _post(url, body)
        if code != 200:
            seen = f"{code} {out[:200].decode(errors='replace')}"
            if seen not in failures:
                failures.add(seen)
                print(f"  failed: {seen}", file=sys.stderr, flush=True)
        return code, time.perf_counter() - t0

    failures: set[str] = set()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    lat = sorted(s for _, s in results)
    q = statistics.quantiles(lat, n=100, method="inclusive")
    return {"rps": requests / wall, "p50": q[49], "p95": q[94], "p99": q[98],
            "errors": sum(code != 200 for code, _ in results), "wall": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", type=Path, help="workspace with a champion (default: build one)")
    p.add_argument("--requests", type=int, default=160)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--feedback", type=int, default=500)
    p.add_argument("--native-requests", type=int, default=30, help="requests of the service-vs-export comparison")
    p.add_argument("--native-only", action="store_true", help="only the service-vs-export comparison")
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        home = args.home.resolve() if args.home else build_champion(Path(tmp))
        store_url = f"sqlite:///{Path(tmp) / 'bench-monitor.db'}"
        print_native(native_vs_export(home, store_url, args.native_requests))
        if args.native_only:
            return 0
        body = {"prompt": "a red circle on a blue background", "steps": args.steps, "width": args.size,
                "height": args.size, "seed": 0}
        configs = [("1 worker, the export's threads", 1, 0), ("1 worker, 1 thread", 1, 1),
                   (f"{cores} workers, 1 thread each", cores, 1), (f"{cores} workers, the export's threads", cores, 0)]
        rows = []
        for label, workers, threads in configs:
            server = Server(home, store_url, workers, threads)
            try:
                load(server.url + "/txt2img_json", body, 2 * workers, workers)  # warm-up
                rows.append((label, load(server.url + "/txt2img_json", body, args.requests, args.clients)))
            finally:
                server.stop()
            print(f"  {label}: {rows[-1][1]['rps']:.2f} req/s", file=sys.stderr, flush=True)
        base = rows[0][1]["rps"]
        print(f"\n{args.requests} txt2img requests ({args.size}x{args.size}, {args.steps} steps) from {args.clients} "
              f"concurrent clients, {cores} cores")
        print(f"{'configuration':34s} {'req/s':>7s} {'x':>6s} {'p50 s':>7s} {'p95 s':>7s} {'p99 s':>7s} {'errors':>6s}")
        for label, r in rows:
            print(f"{label:34s} {r['rps']:7.2f} {r['rps'] / base:6.2f} {r['p50']:7.3f} {r['p95']:7.3f} "
                  f"{r['p99']:7.3f} {r['errors']:6d}")
        server = Server(home, store_url, cores, 1)
        try:
            code, out = _post(server.url + "/txt2img_json", {**body, "steps": 2})
            gid = json.loads(out)["images"][0]["generation_id"]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=32) as pool:
                codes = list(pool.map(lambda i: _post(server.url + "/feedback", {
                    "generation_id": gid, "rating": 1 + i % 5, "client_id": f"bench-{i}"})[0], range(args.feedback)))
            wall = time.perf_counter() - t0
        finally:
            server.stop()
        from monitor.store import Store

        stored = len(Store(store_url).feedback_for(gid))
        print(f"\n{args.feedback} concurrent feedback posts (32 clients, {cores} workers, sqlite WAL): "
              f"{sum(c == 200 for c in codes)} answered 200, {stored} rows stored, {args.feedback / wall:.0f} posts/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
