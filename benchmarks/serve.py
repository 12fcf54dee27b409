"""Benchmark: a real `sdloop serve` on 127.0.0.1, first against the export's own latency, then under a bounded load.

    python benchmarks/serve.py [--home WORKSPACE] [--requests 160] [--clients 8] [--size 128] [--steps 10]
    python benchmarks/serve.py --native-only [--native-requests 30]
    python benchmarks/serve.py --load [--load-requests 96] [--load-clients 16] [--load-queue 2] [--disconnects 4]

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

Last (``--load``: only this), the load run (``load_run``): 2 workers with a small queue (``--load-queue``) and a
memory budget (SDLOOP_MEMORY_MB) chosen from the model's measured cost so that the largest item of the mix is refused
(413); more clients than the queues hold (429, retried after its Retry-After); mixed native and large requests with a
deadline; the workers' resident memory before, during and after the burst against the budget; then clients that
close their socket mid-generation, the steps that ran after they left and the latency of the next small request.
About 1.5 minutes on 2 busy cores with the tiny model (the counts are flags).
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
import threading
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

    def __init__(self, home: Path, store_url: str, workers: int, torch_threads: int,
                 env: dict[str, str] | None = None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "SDLOOP_HOME": str(home), "BENTOML_HOME": str(home / "bentoml"),
               "SDLOOP_STORE_URL": store_url,
               # throughput, not admission: a queue as deep as the 8 request threads refuses nothing (no 429)
               "SDLOOP_QUEUE": os.environ.get("SDLOOP_QUEUE", "7"), **(env or {})}
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


def _request(url: str, body: dict, timeout: float = 600) -> tuple[int, dict[str, str], bytes]:
    """POST ``body`` as JSON: the status (0: no answer), the answer's headers and body."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()
    except OSError as e:
        return 0, {}, str(e).encode()


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _steps_total(url: str) -> float:
    """The server's ``sdloop_denoise_steps_total`` (BentoML sums the workers' counters in /metrics)."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("sdloop_denoise_steps_total"):
                return float(line.split()[-1])
    return 0.0


def worker_pids(server_pid: int) -> list[int]:
    """The worker processes of a `bentoml serve` (PID ``server_pid``): its descendants running BentoML's worker
    module. `bentoml serve` with N workers is one arbiter process (circus, the PID `sdloop serve` execs into) with N
    children ``python -m _bentoml_impl.worker.service ... --worker-id i``, each in a session of its own."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parent[int(d.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                continue

    def under(pid: int) -> bool:
        seen = 0
        while pid > 1 and seen < 64:
            pid, seen = parent.get(pid, 0), seen + 1
            if pid == server_pid:
                return True
        return False

    found = []
    for pid in sorted(p for p in parent if under(p)):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "worker" in cmd:
            found.append(pid)
    return found


def _vm_mib(pid: int) -> dict[str, float]:
    """VmRSS (resident now) and VmHWM (its peak) of ``pid`` in MiB; empty once it has exited."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(rest.split()[0]) / 1024
    except OSError:
        pass
    return out


def _cost_mib(cost: dict[str, Any], width: int, height: int, images: int) -> float:
    """``bento.budget.CostModel.bytes_for`` from /info's cost model, in MiB: what the worker predicts a request
    takes above what it holds (safety factor included), the figure it compares with its budget."""
    t = (width // 8) * (height // 8)
    return images * (cost["a"] * t + cost["b"] * t * t) * cost.get("safety", 1.0) / 2**20


def choose_budget(info: dict[str, Any], fits: tuple[int, int, int], refused: tuple[int, int, int]) -> tuple[int, str]:
    """SDLOOP_MEMORY_MB for the load run: the resident memory /info reports plus the geometric mean of what the
    largest item that should fit (``fits``: width, height, images) and the item that should not (``refused``) are
    predicted to take, so either side has the same factor of room: resident growth after large requests, and a
    cost model refitted on the new budget, move the prediction by less than that."""
    budget = info["budget"]
    need_fit, need_refused = _cost_mib(budget["cost_model"], *fits), _cost_mib(budget["cost_model"], *refused)
    extra = (need_fit * need_refused) ** 0.5
    mb = int(budget["resident_mib"] + extra + 0.5)
    why = (f"a worker holds {budget['resident_mib']:.0f} MiB at rest; its cost model predicts "
           f"{need_fit:.0f} MiB for {fits[0]}x{fits[1]} x {fits[2]} (must fit) and {need_refused:.0f} MiB for "
           f"{refused[0]}x{refused[1]} x {refused[2]} (must be refused): {budget['resident_mib']:.0f} + "
           f"sqrt({need_fit:.0f} x {need_refused:.0f}) = {mb} MiB, a factor {extra / max(need_fit, 1e-9):.1f} "
           "of room either side")
    return mb, why


def load_run(home: Path, store_url: str, args: argparse.Namespace,
             info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The service under a bounded, mixed load, as a busy day sends it (issue 17, "Performance and load").

    A 2-worker server with a queue of ``--load-queue`` per worker and a memory budget (SDLOOP_MEMORY_MB) chosen from
    the model's cost model so that its native size and the mix's mid-size items fit and its largest item does not
    (413). ``--load-clients`` clients send ``--load-requests`` requests in all, cycling through the mix (5 native,
    1 x 128x128 x 4, 1 x 256x256 x 1, 1 x 256x256 x 4 of every 8; sides capped at the model's largest), each with a
    ``--load-deadline`` s deadline; a request refused 429 is sent again after its Retry-After (at most 5 s), up to
    ``--load-retries`` times, as a polite client does; each 429 is counted. The clients stop starting requests
    after ``--load-seconds``. Meanwhile the worker processes' resident memory is sampled. Then, with the server
    idle, ``--disconnects`` clients each send a long
    request (``--disconnect-steps`` steps at the largest side) and close the socket after 0.5 s: the steps counter
    in /metrics must stop within one step per generation, and a small request sent right after must take about what
    it takes on an idle server."""
    cores = os.cpu_count() or 1
    if info is None or "budget" not in info:  # the budget needs the cost model of this model on this machine
        probe = Server(home, store_url, 1, 0)
        try:
            info = _get_json(probe.url + "/info")
        finally:
            probe.stop()
    low, high, m = (info["limits"][k] for k in ("min_side", "max_side", "side_multiple"))
    native = (info["native_width"], info["native_height"])
    top = high // m * m
    mid = max(low, min(top, native[0] * 2) // m * m)
    mix = [("native", None, 1)] * 5 + [("mid x4", mid, 4), ("large x1", top, 1), ("large x4", top, 4)]
    mix_sizes = {label: ((side or native[0]), (side or native[1]), n) for label, side, n in mix}
    fits = max((v for k, v in mix_sizes.items() if k != "large x4"),
               key=lambda v: _cost_mib(info["budget"]["cost_model"], *v))
    memory_mb, why = choose_budget(info, fits, mix_sizes["large x4"])
    env = {"SDLOOP_QUEUE": str(args.load_queue), "SDLOOP_MEMORY_MB": str(memory_mb)}
    print(f"\nload run: SDLOOP_MEMORY_MB={memory_mb} ({why})", file=sys.stderr, flush=True)

    server = Server(home, store_url, 2, 0, env)
    try:
        url = server.url + "/txt2img_json"
        pids = worker_pids(server.proc.pid)
        served = _get_json(server.url + "/info")["budget"]
        predicted = {k: _cost_mib(served["cost_model"], *v) for k, v in mix_sizes.items()}
        small = {"prompt": "a red circle", "steps": args.steps, "seed": 0, "timeout_s": args.load_deadline}
        for _ in range(2 * len(pids) or 2):  # warm-up: first runs allocate
            _request(url, small)
        idle = []
        for _ in range(3):
            t0 = time.perf_counter()
            _request(url, small)
            idle.append(time.perf_counter() - t0)
        before = {pid: _vm_mib(pid) for pid in pids}
        peak_seen = {pid: v.get("VmRSS", 0.0) for pid, v in before.items()}
        sampling = True

        def sample() -> None:
            while sampling:
                for pid in pids:
                    peak_seen[pid] = max(peak_seen[pid], _vm_mib(pid).get("VmRSS", 0.0))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        counter = iter(range(args.load_requests))
        guard = threading.Lock()
        results: list[tuple[str, int, float]] = []
        refusals: list[str] = []  # each 429 answered, retried or not
        seen: set[str] = set()
        stop_at = time.monotonic() + args.load_seconds

        def client(_: int) -> None:
            while time.monotonic() < stop_at:
                with guard:
                    i = next(counter, None)
                if i is None:
                    return
                label, side, n = mix[i % len(mix)]
                body = {**small, "seed": i, "num_images": n, **({"width": side, "height": side} if side else {})}
                for attempt in range(1 + args.load_retries):
                    t0 = time.perf_counter()
                    code, headers, out = _request(url, body, timeout=args.load_deadline + 60)
                    wall = time.perf_counter() - t0
                    with guard:
                        text = f"{code} {out[:160].decode(errors='replace')}"
                        if code not in (200, 429, 413) and text not in seen:
                            seen.add(text)
                            print(f"  load: {label}: {text}", file=sys.stderr, flush=True)
                        if code == 429:
                            refusals.append(label)
                    if code != 429:
                        break
                    time.sleep(min(5.0, float(headers.get("Retry-After") or 1)))  # as a polite client does
                with guard:
                    results.append((label, code, wall))  # the last attempt's answer

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.load_clients) as pool:
            list(pool.map(client, range(args.load_clients)))
        burst_s = time.perf_counter() - t0
        time.sleep(2.0)  # the last requests' memory given back
        sampling = False
        sampler.join()
        after = {pid: _vm_mib(pid) for pid in pids}

        # clients that go away: long requests, the socket closed after 0.5 s; the server idle otherwise
        long = json.dumps({"prompt": "a red circle", "steps": args.disconnect_steps, "width": top, "height": top,
                           "seed": 0, "timeout_s": 3600}).encode()
        s0 = _steps_total(server.url)
        socks, answered = [], 0
        for _ in range(args.disconnects):
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(b"POST /txt2img_json HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(long) + long)
            socks.append(s)
        time.sleep(0.5)
        at_close = _steps_total(server.url)  # read just before the close: steps ending meanwhile count as after it
        for s in socks:
            s.settimeout(0.001)
            try:
                answered += bool(s.recv(1))  # answered within the 0.5 s (a 429): not a generation left running
            except OSError:
                pass
            s.close()
        closed = time.monotonic()
        # the next small request, sent at once as a polite client does (a 429 retried after its Retry-After): the
        # abandoned requests free their queue places within a step (a wait slice when queued), not at the close
        t1, next_busy = time.perf_counter(), 0
        for _ in range(5):
            code_next, headers, _ = _request(url, small)
            if code_next != 429:
                break
            next_busy += 1
            time.sleep(min(5.0, float(headers.get("Retry-After") or 1)))
        next_s = time.perf_counter() - t1
        last, stable_since = _steps_total(server.url), time.monotonic()
        while time.monotonic() - stable_since < 2.0 and time.monotonic() - closed < 60:  # still for 2 s
            time.sleep(0.1)
            now = _steps_total(server.url)
            if now != last:
                last, stable_since = now, time.monotonic()
        small_steps = args.steps if code_next == 200 else 0
        per_step = served["cost_model"]["sa"] * (top // 8) ** 2 + served["cost_model"]["sb"] * (top // 8) ** 4
    finally:
        server.stop()
    codes = [c for _, c, _ in results]
    ok = [(label, wall) for label, c, wall in results if c == 200]
    rows = {}
    for label in ["all"] + list(dict.fromkeys(label for label, _, _ in mix)):
        lat = sorted(w for lbl, w in ok if label in ("all", lbl))
        q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) >= 2 else lat * 100
        rows[label] = {"n": len(lat), "p50": q[49] if lat else None, "p95": q[94] if lat else None,
                       "sent": sum(1 for lbl, _, _ in results if label in ("all", lbl)),
                       "busy": sum(1 for lbl in refusals if label in ("all", lbl))}
    return {"memory_mb": memory_mb, "why": why, "served_budget": served, "predicted": predicted, "mix": mix_sizes,
            "sent": len(results), "admitted": codes.count(200), "busy": len(refusals), "gave_up": codes.count(429),
            "retries": args.load_retries,
            "too_large": codes.count(413), "timeouts": codes.count(504),
            "failed": sum(c >= 500 and c != 504 for c in codes), "no_answer": codes.count(0),
            "other": sorted({c for c in codes if c not in (0, 200, 429, 413, 504) and c < 500}),
            "rows": rows, "burst_s": burst_s, "idle_s": statistics.median(idle), "deadline": args.load_deadline,
            "clients": args.load_clients, "queue": args.load_queue, "pids": pids, "before": before,
            "after": after, "peak_seen": peak_seen, "disconnects": args.disconnects, "answered": answered,
            "steps_at_close": at_close - s0, "steps_after_close": last - at_close - small_steps,
            "next_s": next_s, "next_busy": next_busy, "next_code": code_next,
            "long": (top, args.disconnect_steps, per_step), "cores": cores, "load_avg": os.getloadavg()}


def print_load(r: dict[str, Any]) -> None:
    print(f"\nload run: a real `sdloop serve` on 127.0.0.1, 2 workers, SDLOOP_QUEUE={r['queue']} per worker, "
          f"SDLOOP_MEMORY_MB={r['memory_mb']} per worker; {r['clients']} clients, {r['sent']} requests in "
          f"{r['burst_s']:.1f} s, deadline (timeout_s) {r['deadline']:g} s; {r['cores']} cores, load average "
          f"{r['load_avg'][0]:.2f} at the end")
    print(f"  budget: {r['why']}")
    b = r["served_budget"]
    print(f"  the server's /info: {b['memory_limit_mib']:.0f} MiB ({b['source']}), resident "
          f"{b['resident_mib']:.0f} MiB; predicted per request: " +
          ", ".join(f"{k} ({w}x{h} x {n}) {r['predicted'][k]:.0f} MiB" for k, (w, h, n) in r["mix"].items()))
    print(f"  of {r['sent']} requests: admitted (200) {r['admitted']}, refused too large (413) {r['too_large']}, "
          f"refused busy (429) {r['busy']} times (a refused request retried after Retry-After, at most "
          f"{r['retries']} times; {r['gave_up']} still refused then), failed (5xx) {r['failed']}, timeouts (504) "
          f"{r['timeouts']}, no answer {r['no_answer']}" + (f", other {r['other']}" if r["other"] else ""))
    print(f"  {'requests':20s} {'sent':>5s} {'429s':>5s} {'200':>5s} {'p50 s':>7s} {'p95 s':>7s} {'deadline s':>10s}"
          "   (p50/p95: the admitted ones)")
    for label, row in r["rows"].items():
        p50 = f"{row['p50']:7.3f}" if row["p50"] is not None else f"{'-':>7s}"
        p95 = f"{row['p95']:7.3f}" if row["p95"] is not None else f"{'-':>7s}"
        print(f"  {label:20s} {row['sent']:5d} {row['busy']:5d} {row['n']:5d} {p50} {p95} {r['deadline']:10g}")
    print(f"  {'worker PID':>12s} {'before MiB':>10s} {'peak MiB':>9s} {'VmHWM MiB':>9s} {'after MiB':>9s} "
          f"{'budget MiB':>10s}")
    for pid in r["pids"]:
        print(f"  {pid:12d} {r['before'][pid].get('VmRSS', 0):10.0f} {r['peak_seen'][pid]:9.0f} "
              f"{r['after'][pid].get('VmHWM', 0):9.0f} {r['after'][pid].get('VmRSS', 0):9.0f} {r['memory_mb']:10d}")
    side, steps, per_step = r["long"]
    print(f"  {r['disconnects']} clients sent {side}x{side}, {steps} steps (about {steps * per_step:.0f} s each "
          f"by the cost model) and closed the socket after 0.5 s ({r['answered']} answered before that): "
          f"{r['steps_at_close']:.0f} step(s) ran before the close, {r['steps_after_close']:.0f} after it (the "
          f"small request's own steps left out); the next small request took "
          f"{r['next_s']:.3f} s ({r['next_code']}"
          + (f", after {r['next_busy']} 429 and its Retry-After" if r["next_busy"] else "") + ") against "
          f"{r['idle_s']:.3f} s idle (behind abandoned generations run to the end it would wait about "
          f"{-(-r['disconnects'] // 2) * steps * per_step:.0f} s)")


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
    p.add_argument("--load", action="store_true", help="only the load run (run last by default)")
    p.add_argument("--load-retries", type=int, default=8, help="retries of a request refused 429 (after Retry-After)")
    p.add_argument("--load-requests", type=int, default=96, help="requests of the load run, all clients together")
    p.add_argument("--load-clients", type=int, default=16, help="concurrent clients of the load run")
    p.add_argument("--load-queue", type=int, default=2, help="SDLOOP_QUEUE per worker in the load run")
    p.add_argument("--load-deadline", type=float, default=30.0, help="timeout_s of the load run's requests")
    p.add_argument("--load-seconds", type=float, default=90.0, help="no new load request starts after this")
    p.add_argument("--disconnects", type=int, default=4, help="clients that close their socket after 0.5 s")
    p.add_argument("--disconnect-steps", type=int, default=200, help="steps of the disconnecting clients' requests")
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        home = args.home.resolve() if args.home else build_champion(Path(tmp))
        store_url = f"sqlite:///{Path(tmp) / 'bench-monitor.db'}"
        if args.load:
            print_load(load_run(home, store_url, args))
            return 0
        native = native_vs_export(home, store_url, args.native_requests)
        print_native(native)
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
        print_load(load_run(home, store_url, args, native["info"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
