"""What a search leaves for people to open: the trial table (printed and as CSV), a plot, and summary.json.

Kept apart from ``tune.py`` so the search logic reads on one screen; every file is written atomically into the
study's own folder, so two studies in one ``--output`` never overwrite each other's reports.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Optional

from sdloop.atomic import atomic_path, write_json_atomic

PARAMS = ("learning_rate", "rank", "lora_dropout", "weight_decay", "batch_size")


def trial_table(rows: list[dict[str, Any]]) -> str:
    """The trials as a fixed-width table: number, state, validation loss, best step and the parameters."""
    head = f"{'trial':>5} {'state':9} {'val loss':>9} {'best step':>9} {'lr':>9} {'rank':>4} {'dropout':>7} " \
           f"{'wd':>8} {'batch':>5}"
    lines = [head, "-" * len(head)]
    for r in rows:
        p = r["params"]
        val = f"{r['value']:.5f}" if r["value"] is not None else "-"
        lr = f"{p['learning_rate']:>9.2e}" if "learning_rate" in p else f"{'-':>9}"
        dropout = f"{p['lora_dropout']:>7.3f}" if "lora_dropout" in p else f"{'-':>7}"
        wd = f"{p['weight_decay']:>8.1e}" if "weight_decay" in p else f"{'-':>8}"
        lines.append(f"{r['number']:>5} {r['state']:9} {val:>9} {str(r.get('best_step') or '-'):>9} {lr} "
                     f"{p.get('rank', '-'):>4} {dropout} {wd} {p.get('batch_size', '-'):>5}")
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["trial", "state", "value", "best_step", *PARAMS, "run_dir", "error"])
        for r in rows:
            w.writerow([r["number"], r["state"], r["value"], r["best_step"], *(r["params"].get(k) for k in PARAMS),
                        r["run_dir"], r.get("error") or ""])
    return path


def write_plot(rows: list[dict[str, Any]], path: Path, study_name: str) -> Path:
    """Validation loss per trial with the best-so-far line, and loss against learning rate (marker size: rank)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["value"] is not None and "learning_rate" in r["params"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    colours = {"COMPLETE": "#3182bd", "PRUNED": "#bdbdbd"}
    for r in done:
        c = colours.get(r["state"], "#e6550d")
        axes[0].scatter(r["number"], r["value"], color=c)
        axes[1].scatter(r["params"]["learning_rate"], r["value"], color=c, s=20 + 6 * r["params"].get("rank", 4))
    best_so_far, xs, ys = None, [], []
    for r in sorted(done, key=lambda r: r["number"]):
        if r["state"] == "COMPLETE" and (best_so_far is None or r["value"] < best_so_far):
            best_so_far = r["value"]
        if best_so_far is not None:
            xs.append(r["number"])
            ys.append(best_so_far)
    if xs:
        axes[0].step(xs, ys, where="post", color="#31a354", label="best so far")
        axes[0].legend(fontsize=8)
    from matplotlib.ticker import MaxNLocator

    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_xlabel("trial")
    axes[0].set_ylabel("best validation loss (pruned: last reported)")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("learning rate (marker size: rank)")
    axes[1].set_ylabel("validation loss")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"sdloop tune, study {study_name}: blue complete, grey pruned")
    fig.tight_layout()
    with atomic_path(path, fsync=False) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def write_summary(rows: list[dict[str, Any]], path: Path, study_name: str, best: Optional[dict[str, Any]],
                  space: dict[str, Any]) -> Path:
    summary = {"study": study_name, "search_space": space,
               "best_trial": best["number"] if best else None, "best_value": best["value"] if best else None,
               "best_params": best["params"] if best else None, "best_run_dir": best["run_dir"] if best else None,
               "trials": rows}
    write_json_atomic(path, summary)
    return path
