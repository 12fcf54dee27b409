"""Benchmark: sdloop's trainer against the plain LoRA loop, side by side on the same base, data and settings.

    python benchmarks/train.py [--base DIR] [--data DIR] [--n 48] [--resolution 64] [--batch-size 4] [--lr 5e-3]
                               [--steps 400] [--eval-every 10] [--device cpu|cuda] [--threads 2] [--quick]
                               [--json PATH] [--sdloop-variant NAME:KEY=VALUE,...]

The plain loop (``benchmarks/plain_loop.py``) is what the diffusers example train_text_to_image_lora.py does: VAE
and text encoder every step, plain epsilon MSE, AdamW at a constant learning rate, no early stopping. The sdloop side
is the real trainer, ``finetune.training.train.train()`` in a fresh process, with its own recipe (``tiny_overrides()``: latent
and text caches, min-SNR gamma 5, cosine schedule with warm-up, early stopping, sample grids and checkpoints at each
validation). Both use the same base, data and train/validation split, batch size, resolution, learning rate, LoRA
targets, rank, alpha, seed and torch thread count; sdloop's max_steps is the plain loop's ``--steps``. Every
measured run is its own subprocess.

(a) speed: steps/s over a fixed window after warm-up (``--warmup-steps``, ``--timed-steps``), ``--repeats``
    back-to-back pairs (plain, sdloop) in alternating order; the reported ratio is the median of the pairs' ratios
    (this cancels the slow drift of a shared machine), the absolute figures the medians of the runs. Peak memory
    of each process: ru_maxrss on CPU, torch.cuda.max_memory_allocated on CUDA. The VAE + text-encoder share of a
    plain step is timed inside it; sdloop's step must beat the plain step by at least that share.
(b) time to quality: wall-clock seconds from the process launch (interpreter start, imports, model loading, dataset
    scan and cache build for sdloop) until the fixed-noise validation loss (``finetune.training.validate.validation_loss_sum``
    on the same validation items) first reaches the best level the plain loop reaches in its ``--steps`` steps.
    Both evaluate at step 0 and every ``--eval-every`` steps; the evaluations' own time is subtracted from both
    timelines (the first one only up to a typical evaluation's time: the rest is one-time first-forward warm-up a
    run without evaluation pays too). What is left for sdloop still holds its sample grids and checkpoints; the
    table shows them apart. ``--sdloop-variant`` adds sdloop runs with other settings, to see what dominates.

Runs disturbed by other processes (more than ``--max-others`` of the CPU taken by processes not ours, from
/proc/stat) are run again, up to ``--retries`` times; before each run the benchmark waits for an idle CPU.
Progress goes to stderr; stdout gets the table and a one-line summary; ``--json`` writes every figure.
"""

from __future__ import annotations

import time

_T_PROCESS = time.time()  # a child's first Python statement: interpreter start-up lies before it

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional  # noqa: E402

HERE = Path(__file__).resolve().parent


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# =================================================================================================================
# children: one measured run each
# =================================================================================================================

def _peak_memory(device: str) -> dict[str, Any]:
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}  # KiB on Linux
    if device == "cuda":
        import torch

        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def child_plain(spec: dict[str, Any], role: str) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    t_torch = time.time()
    sys.path.insert(0, str(HERE))
    from plain_loop import run_plain

    events: list = []
    speed = role == "plain-speed"
    res = run_plain(spec["base"], spec["data"], spec["train_items"], spec["val_items"],
                    resolution=spec["resolution"], batch_size=spec["batch_size"], learning_rate=spec["lr"],
                    rank=spec["rank"], alpha=spec["alpha"], target_modules=spec["target_modules"],
                    steps=spec["warmup_steps"] + spec["timed_steps"] if speed else spec["steps"], seed=spec["seed"],
                    flip_p=spec["flip_p"], latents_from=spec["plain_latents"], device=spec["device"],
                    eval_every=0 if speed else spec["eval_every"], validation_timesteps=spec["validation_timesteps"],
                    val_augment=spec["augment"],
                    window=(spec["warmup_steps"], spec["timed_steps"]) if speed else None,
                    log=lambda s: print(s, file=sys.stderr, flush=True), events=events)
    res.update(events=events, t_process=_T_PROCESS, t_torch=t_torch, t_end=time.time(),
               torch_threads=torch.get_num_threads(), **_peak_memory(spec["device"]))
    return res


def child_sdloop(spec: dict[str, Any], role: str, out_dir: Path) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    t_torch = time.time()
    import finetune.training.train as ftrain
    from finetune.training.config import TrainConfig, tiny_overrides
    from sdloop.overrides import apply_overrides

    # instrumentation only: the trainer's documented event hook (TrainHooks.event) time-stamps its phases
    events: list = []

    def record(kind: str, start: float, end: float, value: Any) -> None:
        events.append((kind, start, end, value))

    speed = role == "sdloop-speed"
    steps = spec["warmup_steps"] + spec["timed_steps"] + 1 if speed else spec["steps"]
    values = {**tiny_overrides(), "base": spec["base"], "data": spec["data"], "output": str(out_dir),
              "resolution": spec["resolution"], "batch_size": spec["batch_size"], "learning_rate": spec["lr"],
              "rank": spec["rank"], "alpha": spec["alpha"], "target_modules": list(spec["target_modules"]),
              "seed": spec["seed"], "max_steps": steps, "validation_timesteps": spec["validation_timesteps"],
              "validation_every": steps if speed else spec["eval_every"], "augment": dict(spec["augment"])}
    if speed:
        values["early_stopping_patience"] = 0
    overrides = list(spec["sdloop_set"]) + list(spec.get("variant_set", []))
    values = apply_overrides(TrainConfig, values, overrides)
    cfg = TrainConfig.from_dict(values)
    callbacks: list = []

    def on_validation(step: int, val: float) -> bool:
        callbacks.append((step, val, time.time()))
        print(f"sdloop step {step:4d}  val_loss {val:.5f}", file=sys.stderr, flush=True)
        return False

    result = ftrain.train(cfg, progress=False, hooks=ftrain.TrainHooks(event=record, on_validation=on_validation))
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    manifest = json.loads((out_dir / "manifest.json").read_text())
    split = json.loads((out_dir / "split.json").read_text())
    return {"overrides": overrides, "events": events, "callbacks": callbacks, "metrics": rows, "manifest": manifest, "split": split,
            "config": cfg.to_dict(), "stopped": result.stopped, "final_step": result.final_step,
            "best_step": result.best_step, "best_val_loss": result.best_val_loss, "t_process": _T_PROCESS,
            "t_torch": t_torch, "t_end": time.time(), "torch_threads": torch.get_num_threads(),
            **_peak_memory(spec["device"])}


def child_main(role: str, spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    if role.startswith("plain"):
        res = child_plain(spec, role)
    else:
        res = child_sdloop(spec, role, Path(out_path).with_suffix(".run"))
    Path(out_path).write_text(json.dumps(res))
    return 0


# =================================================================================================================
# parent: prepare, run the children, analyse
# =================================================================================================================

def _cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPU time spent busy over ``seconds`` (from /proc/stat); -1 where unavailable."""
    def read() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:]]
        return sum(vals), vals[3] + vals[4]  # total, idle + iowait
    try:
        t1, i1 = read()
        time.sleep(seconds)
        t2, i2 = read()
    except OSError:
        return -1.0
    return 1.0 - (i2 - i1) / max(1, t2 - t1)


def _wait_idle(max_wait: float, threshold: float = 0.25) -> float:
    """Wait (up to ``max_wait`` s) until other processes leave the CPU; return the last busy fraction."""
    deadline = time.time() + max_wait
    busy = _cpu_busy()
    warned = False
    while busy > threshold and time.time() < deadline:
        if not warned:
            log(f"CPU {busy:.0%} busy with other processes; waiting up to {max_wait:.0f} s for it to go idle")
            warned = True
        busy = _cpu_busy(2.0)
    if busy > threshold:
        log(f"warning: CPU still {busy:.0%} busy; the timings of the next run may be slowed")
    return busy


def _proc_stat() -> tuple[int, int]:
    """(total, idle + iowait) jiffies of all CPUs since boot; (0, 0) where /proc/stat is missing."""
    try:
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:]]
    except OSError:
        return 0, 0
    return sum(vals), vals[3] + vals[4]


class Runner:
    """Runs the children one at a time; a run during which other processes took more than ``max_others`` of the
    machine (CPU time not ours, from /proc/stat and our children's rusage) is run again, up to ``retries`` times."""

    def __init__(self, args: argparse.Namespace, workdir: Path, spec: dict[str, Any]) -> None:
        self.args, self.workdir, self.spec = args, workdir, spec
        self.count = 0
        self.discarded: list[dict[str, Any]] = []

    def run(self, role: str, extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        for attempt in range(self.args.retries + 1):
            res = self._run_once(role, extra or {})
            if res["others_cpu_share"] <= self.args.max_others or attempt == self.args.retries:
                if res["others_cpu_share"] > self.args.max_others:
                    log(f"warning: keeping {role} although other processes took {res['others_cpu_share']:.0%} of "
                        "the CPU during it (no retries left)")
                return res
            log(f"other processes took {res['others_cpu_share']:.0%} of the CPU during {role}; running it again")
            self.discarded.append({k: res.get(k) for k in ("role", "others_cpu_share", "t_launch", "t_exit",
                                                            "window")})
        raise AssertionError("unreachable")

    def _run_once(self, role: str, extra: dict[str, Any]) -> dict[str, Any]:
        self.count += 1
        tag = f"{self.count:02d}-{role}"
        spec_path, out_path = self.workdir / f"{tag}.spec.json", self.workdir / f"{tag}.out.json"
        spec_path.write_text(json.dumps({**self.spec, **extra}))
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
                   SDLOOP_HOME=str(self.workdir / f"{tag}.home"), OMP_NUM_THREADS=str(self.args.threads),
                   MKL_NUM_THREADS=str(self.args.threads), TOKENIZERS_PARALLELISM="false")
        if self.args.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        busy = _wait_idle(self.args.wait_idle)
        log(f"run {tag} (CPU busy before: {busy:.0%})")
        ru0, st0 = resource.getrusage(resource.RUSAGE_CHILDREN), _proc_stat()
        t_launch = time.time()
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_child", role, "--_spec",
                               str(spec_path), "--_out", str(out_path)], env=env, cwd=self.workdir,
                              stdout=sys.stderr, stderr=sys.stderr)
        t_exit = time.time()
        ru1, st1 = resource.getrusage(resource.RUSAGE_CHILDREN), _proc_stat()
        if proc.returncode != 0:
            raise SystemExit(f"benchmark child {tag} failed with exit code {proc.returncode}")
        ours = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
        hz = os.sysconf("SC_CLK_TCK")
        busy_s = ((st1[0] - st0[0]) - (st1[1] - st0[1])) / hz
        others = max(0.0, busy_s - ours) / max(1e-9, (t_exit - t_launch) * (os.cpu_count() or 1))
        res = json.loads(out_path.read_text())
        res.update(role=role, tag=tag, t_launch=t_launch, t_exit=t_exit, cpu_busy_before=busy,
                   others_cpu_share=others, child_cpu_s=ours)
        log(f"run {tag} done in {t_exit - t_launch:.1f} s (other processes: {others:.0%} of the CPU)")
        return res


def _prepare(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    from finetune.pretraining.base import write_tiny_base
    from finetune.training.config import DataConfig, tiny_overrides
    from finetune.data.check import scan_dataset, split_items
    from finetune.data.synth import make_synthetic_dataset

    base = args.base or str(write_tiny_base(workdir / "base"))
    data = args.data or str(make_synthetic_dataset(workdir / "data", n=args.n, seed=0, size=max(64, args.resolution)))
    report = scan_dataset(data, DataConfig(), progress=False)
    train_items, val_items = split_items(report.items, DataConfig())
    if not val_items:
        raise SystemExit("the validation split is empty; use a larger dataset.")
    tiny = tiny_overrides()
    return {
        "base": base, "data": data, "threads": args.threads, "device": args.device, "seed": 0,
        "resolution": args.resolution, "batch_size": args.batch_size, "lr": args.lr or tiny["learning_rate"],
        "rank": tiny["rank"], "alpha": tiny["alpha"], "target_modules": tiny["target_modules"],
        "augment": tiny["augment"], "flip_p": tiny["augment"]["flip_p"],
        "validation_timesteps": 8, "steps": args.steps, "eval_every": args.eval_every,
        "warmup_steps": args.warmup_steps, "timed_steps": args.timed_steps, "plain_latents": args.plain_latents,
        "sdloop_set": list(args.sdloop_set or []),
        "train_items": [{"path": it.path, "caption": it.caption} for it in train_items],
        "val_items": [{"path": it.path, "caption": it.caption, "item": it.__dict__} for it in val_items],
    }


# -- analysis ------------------------------------------------------------------------------------------------------

def _effective_timeline(evals: list[tuple[int, float, float, float]], t_launch: float,
                        first_extra: float = 0.0) -> list[dict[str, Any]]:
    """(step, val, start, end) evaluations -> for each, the seconds from the launch to the evaluation's start minus
    the evaluation time before it: when the weights of that step existed, had nobody evaluated.

    Each evaluation's own duration is excluded, except that the first one (at step 0) is only excused a typical
    evaluation's duration (the median of the later ones) plus ``first_extra``: the rest of it is the one-time cost
    of the first forward passes, which a run without evaluation would pay in its first training step.
    """
    durations = [end - start for _, _, start, end in evals]
    typical = statistics.median(durations[1:]) if len(durations) > 1 else durations[0]
    out, spent = [], 0.0
    for i, (step, val, start, _end) in enumerate(evals):
        excused = durations[i] if i else min(durations[0], typical + first_extra)
        out.append({"step": step, "val_loss": val, "t": start - t_launch - spent, "eval_s": durations[i],
                    "excused_s": excused})
        spent += excused
    return out


def _first_reaching(timeline: list[dict[str, Any]], level: float) -> Optional[dict[str, Any]]:
    return next((p for p in timeline if p["val_loss"] <= level), None)


def _sum_between(events: list, kinds: tuple[str, ...], t0: float, t1: float) -> float:
    return sum(e[2] - e[1] for e in events if e[0] in kinds and t0 <= e[1] < t1)


def _side(res: dict[str, Any], sdloop: bool) -> dict[str, Any]:
    """Evaluations (step, val, start, end), the effective timeline and the start-up parts of one quality run."""
    ev = res["events"]
    if sdloop:
        val_rows = [r for r in res["metrics"] if "val_loss" in r]
        timed = [e for e in ev if e[0] == "eval"]
        if len(val_rows) != len(timed):
            raise SystemExit(f"sdloop: {len(val_rows)} validation rows but {len(timed)} timed evaluations")
        for r, e in zip(val_rows, timed):
            if abs(r["val_loss"] - e[3]) > 1e-6 * max(1.0, abs(r["val_loss"])):
                raise SystemExit(f"sdloop: validation row {r} does not match the timed evaluation {e}")
        evals = [(r["step"], r["val_loss"], e[1], e[2]) for r, e in zip(val_rows, timed)]
        scan = next(e for e in ev if e[0] == "scan_dataset")
        cache_end = max(e[2] for e in ev if e[0] == "cache_build")
        parts = {"process start + torch import": res["t_torch"] - res["t_launch"],
                 "imports (trainer, accelerate)": scan[1] - res["t_torch"],
                 "dataset scan": scan[2] - scan[1],
                 "model load": sum(e[2] - e[1] for e in ev if e[0] == "load_components"),
                 "cache build": sum(e[2] - e[1] for e in ev if e[0] == "cache_build"),
                 "setup (LoRA, optimizer, logs)": evals[0][2] - cache_end}
        first_extra = 0.0
    else:
        evals = [(e[3], e[4], e[1], e[2]) for e in ev if e[0] == "eval"]
        load = next(e for e in ev if e[0] == "load_models")
        parts = {"process start + torch import": res["t_torch"] - res["t_launch"],
                 "imports + model load": load[2] - res["t_torch"],
                 "setup (LoRA, optimizer, loader)": evals[0][2] - load[2]}
        first_extra = sum(e[2] - e[1] for e in ev if e[0] == "eval_import")  # sdloop's evaluator, not the loop's
    return {"evals": evals, "timeline": _effective_timeline(evals, res["t_launch"], first_extra),
            "startup_parts_s": parts, "t_loop": evals[0][2], "events": ev, "t_launch": res["t_launch"]}


def _breakdown(side: dict[str, Any], until: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Where the effective time until the evaluation ``until`` (default: the last) went."""
    point = until or side["timeline"][-1]
    idx = next(i for i, p in enumerate(side["timeline"]) if p["step"] == point["step"])
    point_start = side["evals"][idx][2]
    t_loop = side["t_loop"]
    first = side["timeline"][0]
    warm = first["eval_s"] - first["excused_s"]
    samples = _sum_between(side["events"], ("sample",), t_loop, point_start)
    ckpts = _sum_between(side["events"], ("checkpoint", "save_best"), t_loop, point_start)
    startup = t_loop - side["t_launch"]
    return {"until_step": point["step"], "total_s": point["t"], "startup_s": startup,
            "startup_parts_s": side["startup_parts_s"], "first_forward_warmup_s": warm,
            "training_steps_s": point["t"] - startup - warm - samples - ckpts,
            "sample_grids_s": samples, "checkpoints_s": ckpts}


def _speed_window(res: dict[str, Any], w: int, n: int) -> dict[str, Any]:
    if "window" in res and res["window"]:
        win = dict(res["window"])
    else:  # sdloop: from its own metrics rows (wall at the end of each step)
        walls = {row["step"]: row["wall"] for row in res["metrics"] if "train_loss" in row}
        win = {"warmup": w, "timed": n, "seconds": walls[w + n] - walls[w], "steps_per_s": n / (walls[w + n] - walls[w]),
               "step_times": [walls[k] - walls[k - 1] for k in range(w + 1, w + n + 1)]}
    win["median_step_ms"] = 1000 * statistics.median(win["step_times"])
    return win


def analyse(spec: dict[str, Any], speed_runs: list[dict[str, Any]], plain_q: dict[str, Any],
            sd_q: dict[str, Any], tolerance: float,
            variants: Optional[list[tuple[str, dict[str, Any]]]] = None) -> dict[str, Any]:
    w, n = spec["warmup_steps"], spec["timed_steps"]
    for r in speed_runs:
        r["window"] = _speed_window(r, w, n)
    plain_speed = [r for r in speed_runs if r["role"] == "plain-speed"]
    sd_speed = [r for r in speed_runs if r["role"] == "sdloop-speed"]
    # each repeat is a back-to-back pair (order alternating): the pair's ratio cancels slow drift of the machine
    pairs = [(speed_runs[i], speed_runs[i + 1]) for i in range(0, len(speed_runs) - 1, 2)]
    ratios = [(b if b["role"] == "sdloop-speed" else a)["window"]["steps_per_s"] /
              (a if a["role"] == "plain-speed" else b)["window"]["steps_per_s"] for a, b in pairs]
    ratio = statistics.median(ratios)
    p_sps = statistics.median(r["window"]["steps_per_s"] for r in plain_speed)
    s_sps = statistics.median(r["window"]["steps_per_s"] for r in sd_speed)
    share = {k: statistics.median(r["window"]["share"][k] for r in plain_speed)
             for k in plain_speed[0]["window"]["share"]}
    enc_share = share["vae"] + share["text_encoder"]
    mem_key = "peak_cuda_mib" if spec["device"] == "cuda" else "peak_rss_mib"
    p_mem = statistics.median(r[mem_key] for r in plain_speed)
    s_mem = statistics.median(r[mem_key] for r in sd_speed)
    speed = {
        "plain_steps_per_s": p_sps, "sdloop_steps_per_s": s_sps, "ratio": ratio, "pair_ratios": ratios,
        "plain_steps_per_s_all": [r["window"]["steps_per_s"] for r in plain_speed],
        "sdloop_steps_per_s_all": [r["window"]["steps_per_s"] for r in sd_speed],
        "best_of_ratio": max(r["window"]["steps_per_s"] for r in sd_speed) /
        max(r["window"]["steps_per_s"] for r in plain_speed),
        "plain_step_ms": 1000 / p_sps, "sdloop_step_ms": 1000 / s_sps,
        "plain_median_step_ms": statistics.median(r["window"]["median_step_ms"] for r in plain_speed),
        "sdloop_median_step_ms": statistics.median(r["window"]["median_step_ms"] for r in sd_speed),
        "plain_share": share, "vae_text_encoder_share": enc_share,
        "required_ratio": 1.0 / (1.0 - enc_share),
        "never_slower": min(ratios) >= 1.0,
        "meets_share_target": ratio >= 1.0 / (1.0 - enc_share),
        "memory_metric": mem_key, "plain_peak_mib": p_mem, "sdloop_peak_mib": s_mem, "memory_ratio": s_mem / p_mem,
        "plain_peak_mib_all": [r[mem_key] for r in plain_speed], "sdloop_peak_mib_all": [r[mem_key] for r in sd_speed],
        "others_cpu_share": {r["tag"]: r["others_cpu_share"] for r in speed_runs},
    }
    ps, ss = _side(plain_q, sdloop=False), _side(sd_q, sdloop=True)
    target = min(p["val_loss"] for p in ps["timeline"])
    p_reach = _first_reaching(ps["timeline"], target)
    s_reach = _first_reaching(ss["timeline"], target)
    loose = target * (1 + tolerance)
    p_loose, s_loose = _first_reaching(ps["timeline"], loose), _first_reaching(ss["timeline"], loose)
    s_break = _breakdown(ss, s_reach)
    s_no_samples = s_reach["t"] - s_break["sample_grids_s"] if s_reach else None
    quality = {
        "target_val_loss": target, "first_val_loss": ps["timeline"][0]["val_loss"],
        "plain_reach": p_reach, "sdloop_reach": s_reach,
        "plain_seconds": p_reach["t"], "sdloop_seconds": s_reach["t"] if s_reach else None,
        "speedup": p_reach["t"] / s_reach["t"] if s_reach else None,
        "sdloop_seconds_without_sample_grids": s_no_samples,
        "speedup_without_sample_grids": p_reach["t"] / s_no_samples if s_reach else None,
        "sdloop_best_val_loss": min(p["val_loss"] for p in ss["timeline"]),
        "sdloop_stopped": sd_q["stopped"], "sdloop_final_step": sd_q["final_step"],
        "plain_timeline": ps["timeline"], "sdloop_timeline": ss["timeline"],
        "plain_breakdown": _breakdown(ps, p_reach), "sdloop_breakdown": s_break,
        "tolerance": tolerance, "loose_target": loose,
        "plain_loose": p_loose, "sdloop_loose": s_loose,
        "plain_process_seconds": plain_q["t_exit"] - plain_q["t_launch"],
        "sdloop_process_seconds": sd_q["t_exit"] - sd_q["t_launch"],
        "plain_peak_mib": plain_q[mem_key], "sdloop_peak_mib": sd_q[mem_key],
        "others_cpu_share": {plain_q["tag"]: plain_q["others_cpu_share"], sd_q["tag"]: sd_q["others_cpu_share"]},
    }
    quality["variants"] = []
    for name, res in variants or []:
        vs = _side(res, sdloop=True)
        reach = _first_reaching(vs["timeline"], target)
        br = _breakdown(vs, reach)
        quality["variants"].append({
            "name": name, "overrides": res["overrides"], "seconds": reach["t"] if reach else None,
            "speedup": p_reach["t"] / reach["t"] if reach else None, "reach": reach,
            "best_val_loss": min(p["val_loss"] for p in vs["timeline"]), "stopped": res["stopped"],
            "final_step": res["final_step"], "breakdown": br, "timeline": vs["timeline"]})
    return {"speed": speed, "quality": quality}


def _fmt(v: Optional[float], f: str = "{:.2f}") -> str:
    return "n/a" if v is None else f.format(v)


def report(spec: dict[str, Any], out: dict[str, Any], args: argparse.Namespace) -> tuple[str, str]:
    s, q = out["speed"], out["quality"]
    mem_name = "peak CUDA memory (MiB)" if s["memory_metric"] == "peak_cuda_mib" else "peak RSS (MiB)"
    pr, sr = q["plain_reach"], q["sdloop_reach"]
    pb, sb = q["plain_breakdown"], q["sdloop_breakdown"]
    pl, sl = q["plain_loose"], q["sdloop_loose"]

    def row(label: str, a: str, b: str, r: str = "") -> str:
        return f"{label:46}{a:>10}{b:>10}{r:>16}"

    lines = [
        f"sdloop trainer vs plain loop: {'tiny base' if not args.base else spec['base']}, "
        f"{len(spec['train_items'])} train / {len(spec['val_items'])} validation images, {spec['resolution']} px, "
        f"batch {spec['batch_size']}, lr {spec['lr']:g}, LoRA rank {spec['rank']}, {spec['device']}, "
        f"torch threads {spec['threads']}",
        row("", "plain", "sdloop", "sdloop/plain"),
        row(f"(a) steps/s, steps {spec['warmup_steps'] + 1}-{spec['warmup_steps'] + spec['timed_steps']} "
            f"(median of {len(s['plain_steps_per_s_all'])})", f"{s['plain_steps_per_s']:.2f}",
            f"{s['sdloop_steps_per_s']:.2f}", f"{s['ratio']:.2f}x"),
        f"    sdloop/plain of each back-to-back pair: {', '.join(f'{r:.2f}x' for r in s['pair_ratios'])} "
        f"(median above; best run of each: {s['best_of_ratio']:.2f}x)",
        row("    step time, mean (ms)", f"{s['plain_step_ms']:.1f}", f"{s['sdloop_step_ms']:.1f}",
            f"{s['sdloop_step_ms'] / s['plain_step_ms']:.2f}x"),
        row("    step time, median (ms)", f"{s['plain_median_step_ms']:.1f}", f"{s['sdloop_median_step_ms']:.1f}",
            f"{s['sdloop_median_step_ms'] / s['plain_median_step_ms']:.2f}x"),
        row("    " + mem_name, f"{s['plain_peak_mib']:.0f}", f"{s['sdloop_peak_mib']:.0f}",
            f"{s['memory_ratio']:.2f}x"),
        f"    plain step: VAE {s['plain_share']['vae']:.1%} + text encoder {s['plain_share']['text_encoder']:.1%} = "
        f"{s['vae_text_encoder_share']:.1%}; data loading {s['plain_share']['data']:.1%}; UNet + optimizer "
        f"{s['plain_share']['unet_opt']:.1%}",
        f"    target steps/s sdloop/plain >= {s['required_ratio']:.2f}x (1 / (1 - VAE+text share)): "
        f"{'met' if s['meets_share_target'] else 'MISSED'}; never slower: {'yes' if s['never_slower'] else 'NO'}",
        row(f"(b) time to val loss {q['target_val_loss']:.4f} (s)", f"{q['plain_seconds']:.1f}",
            _fmt(q["sdloop_seconds"], "{:.1f}"), _fmt(q["speedup"], "{:.2f}x faster")),
        row("    reached at step", str(pr["step"]), str(sr["step"]) if sr else "never"),
        row("    start-up until step 1 (s)", f"{pb['startup_s']:.1f}", f"{sb['startup_s']:.1f}"),
        row("    first-forward warm-up (s)", f"{pb['first_forward_warmup_s']:.1f}",
            f"{sb['first_forward_warmup_s']:.1f}"),
        row("    training steps (s)", f"{pb['training_steps_s']:.1f}", f"{sb['training_steps_s']:.1f}"),
        row("    sample grids (s)", "0.0", f"{sb['sample_grids_s']:.1f}"),
        row("    checkpoints + best LoRA (s)", "0.0", f"{sb['checkpoints_s']:.1f}"),
        row("    without sdloop's sample grids (s)", f"{q['plain_seconds']:.1f}",
            _fmt(q["sdloop_seconds_without_sample_grids"], "{:.1f}"),
            _fmt(q["speedup_without_sample_grids"], "{:.2f}x faster")),
        row(f"    within {q['tolerance']:.0%} of it ({q['loose_target']:.4f}) (s)", f"{pl['t']:.1f}",
            _fmt(sl["t"] if sl else None, "{:.1f}"), _fmt(pl["t"] / sl["t"] if sl else None, "{:.2f}x faster")),
        "    sdloop start-up: " + ", ".join(f"{k} {v:.1f}" for k, v in sb["startup_parts_s"].items()),
        "    plain start-up:  " + ", ".join(f"{k} {v:.1f}" for k, v in pb["startup_parts_s"].items()),
        f"    validation loss: step 0 {q['first_val_loss']:.4f}; plain best {q['target_val_loss']:.4f} at step "
        f"{pr['step']} of {spec['steps']}; sdloop best {q['sdloop_best_val_loss']:.4f}, stopped at step "
        f"{q['sdloop_final_step']} ({q['sdloop_stopped']})",
    ]
    for v in q["variants"]:
        lines.append(row(f"    sdloop variant {v['name']} (s)", "", _fmt(v["seconds"], "{:.1f}"),
                         _fmt(v["speedup"], "{:.2f}x faster")))
        lines.append(f"        {' '.join(v['overrides'])}: best {v['best_val_loss']:.4f}, "
                     + (f"reached at step {v['reach']['step']}, " if v["reach"] else "")
                     + f"stopped at step {v['final_step']} ({v['stopped']}); start-up "
                       f"{v['breakdown']['startup_s']:.1f} s, training steps {v['breakdown']['training_steps_s']:.1f} s, "
                       f"sample grids {v['breakdown']['sample_grids_s']:.1f} s")
    mem_short = "peak CUDA memory" if s["memory_metric"] == "peak_cuda_mib" else "peak RSS"
    ttq = (f"time to plain's best val loss {q['speedup']:.2f}x faster ({q['sdloop_seconds']:.0f} s vs "
           f"{q['plain_seconds']:.0f} s)" if q["speedup"] else
           f"plain's best val loss {q['target_val_loss']:.4f} not reached (sdloop best {q['sdloop_best_val_loss']:.4f})")
    summary = (f"steps/s {s['ratio']:.2f}x, {mem_short} {s['memory_ratio']:.2f}x, {ttq} "
               f"({spec['device']}, tiny base, {spec['resolution']} px, batch {spec['batch_size']}; VAE + text encoder "
               f"= {s['vae_text_encoder_share']:.0%} of a plain step)")
    return "\n".join(lines), summary


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", help="diffusers folder (default: the tiny base, written to a temp dir)")
    p.add_argument("--data", help="dataset folder (default: a synthetic one, written to a temp dir)")
    p.add_argument("--n", type=int, default=48, help="images in the synthetic dataset (ignored with --data)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=None, help="learning rate of both (default: the tiny recipe's)")
    p.add_argument("--steps", type=int, default=400, help="plain loop run length; sdloop's max_steps")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--warmup-steps", type=int, default=10, help="speed runs: steps before the timed window")
    p.add_argument("--timed-steps", type=int, default=60, help="speed runs: steps in the timed window")
    p.add_argument("--repeats", type=int, default=4,
                   help="speed runs per variant, in back-to-back pairs (the median pair ratio is reported)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every process")
    p.add_argument("--plain-latents", choices=("mean", "sample"), default="mean",
                   help="plain loop latents: latent_dist.mean (as sdloop caches) or .sample() (the diffusers example)")
    p.add_argument("--tolerance", type=float, default=0.02, help="secondary target: within this of plain's best")
    p.add_argument("--sdloop-set", action="append", metavar="KEY=VALUE", help="extra sdloop config override")
    p.add_argument("--sdloop-variant", action="append", metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                   help="an extra sdloop time-to-quality run with these overrides (diagnostics), e.g. "
                        "'no-grids:sample_every=100000'")
    p.add_argument("--wait-idle", type=float, default=120.0, help="seconds to wait for an idle CPU before a run")
    p.add_argument("--max-others", type=float, default=0.10,
                   help="run again when other processes took more than this share of the CPU during a run")
    p.add_argument("--retries", type=int, default=2, help="reruns of a run disturbed by other processes")
    p.add_argument("--quick", action="store_true", help="short smoke configuration (< 2 minutes)")
    p.add_argument("--json", help="write all results to this JSON file")
    p.add_argument("--keep", help="keep the work folder (runs, metrics) here instead of a temp dir")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_spec", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        return child_main(args._child, args._spec, args._out)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.quick:
        args.n, args.steps, args.warmup_steps, args.timed_steps, args.repeats, args.retries = 24, 20, 3, 10, 1, 0
        args.wait_idle = min(args.wait_idle, 10.0)

    t0 = time.time()
    tmp_ctx = None
    if args.keep:
        workdir = Path(args.keep).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp_ctx = tempfile.TemporaryDirectory(prefix="sdloop-train-bench-")
        workdir = Path(tmp_ctx.name)
    try:
        log(f"preparing base, data and split in {workdir}")
        spec = _prepare(args, workdir)
        runner = Runner(args, workdir, spec)
        speed_runs = []
        for r in range(args.repeats):  # alternate the order so drifting background load hits both alike
            for role in (("plain-speed", "sdloop-speed") if r % 2 == 0 else ("sdloop-speed", "plain-speed")):
                speed_runs.append(runner.run(role))
        plain_q = runner.run("plain-quality")
        sd_q = runner.run("sdloop-quality")
        if [i["path"] for i in spec["val_items"]] != sd_q["split"]["validation"]:
            raise SystemExit("sdloop's validation split differs from the plain loop's; the comparison is void.")
        variants = []
        for v in args.sdloop_variant or []:
            name, _, sets = v.partition(":")
            variants.append((name, runner.run("sdloop-quality", {"variant_set": [x for x in sets.split(",") if x]})))
        out = analyse(spec, speed_runs, plain_q, sd_q, args.tolerance, variants)
        table, summary = report(spec, out, args)
    finally:
        if tmp_ctx is not None:
            tmp_ctx.cleanup()
    total = time.time() - t0
    print(table)
    print(f"summary: {summary}")
    log(f"benchmark finished in {total:.0f} s")
    if args.json:
        import platform

        spec_public = {k: v for k, v in spec.items() if k not in ("train_items", "val_items")}
        spec_public.update(n_train=len(spec["train_items"]), n_val=len(spec["val_items"]),
                           val_items=[i["path"] for i in spec["val_items"]])
        doc = {"command": " ".join([Path(sys.executable).name] + sys.argv), "spec": spec_public, **out,
               "summary": summary, "table": table, "benchmark_seconds": total, "host": platform.node(),
               "cpu_count": os.cpu_count(), "runs": [{k: r.get(k) for k in ("role", "t_launch", "t_exit",
                                                                          "cpu_busy_before", "others_cpu_share",
                                                                          "child_cpu_s", "torch_threads", "peak_rss_mib",
                                                                          "peak_cuda_mib", "window")}
                                                     for r in speed_runs + [plain_q, sd_q]],
               "discarded_runs": runner.discarded}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
