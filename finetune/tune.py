"""Hyperparameter search with optuna on the fixed-noise validation loss.

Each trial is an ordinary training run in ``TUNE_DIR/trials/trial_NNN`` (so the best one is a normal run folder);
the objective is the run's best validation loss; each validation is reported to optuna so a median pruner stops
trials that trail the others. The study lives in ``TUNE_DIR/study.db`` (sqlite): running the command again adds
trials to the same study, and a trial killed mid-way is marked failed and retried by the next ones.
"""

from __future__ import annotations

from sdloop.errors import UserError

import csv
import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from sdloop.atomic import atomic_path, write_text_atomic
from .config import SearchSpace, TrainConfig


class TuneError(UserError):
    """The search cannot run; the message says what to change."""


@dataclass
class TuneSummary:
    best_trial: int
    best_value: float
    best_params: dict[str, Any]
    best_run_dir: Path
    table: str
    storage: str
    plot: Path
    csv: Path


def _suggest(trial: Any, space: SearchSpace) -> dict[str, Any]:
    return {
        "learning_rate": trial.suggest_float("learning_rate", *space.learning_rate, log=True),
        "rank": trial.suggest_categorical("rank", [int(r) for r in space.rank]),
        "lora_dropout": trial.suggest_float("lora_dropout", *space.lora_dropout),
        "weight_decay": trial.suggest_float("weight_decay", *space.weight_decay, log=True),
        "batch_size": trial.suggest_categorical("batch_size", [int(b) for b in space.batch_size]),
    }


def _table(rows: list[dict[str, Any]]) -> str:
    head = f"{'trial':>5} {'state':9} {'val loss':>9} {'best step':>9} {'lr':>9} {'rank':>4} {'dropout':>7} " \
           f"{'wd':>8} {'batch':>5}"
    lines = [head, "-" * len(head)]
    for r in rows:
        p = r["params"]
        val = f"{r['value']:.5f}" if r["value"] is not None else "-"
        lines.append(f"{r['number']:>5} {r['state']:9} {val:>9} {str(r.get('best_step', '-')):>9} "
                     f"{p.get('learning_rate', 0):>9.2e} {p.get('rank', '-'):>4} {p.get('lora_dropout', 0):>7.3f} "
                     f"{p.get('weight_decay', 0):>8.1e} {p.get('batch_size', '-'):>5}")
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["value"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    colours = {"COMPLETE": "#3182bd", "PRUNED": "#bdbdbd"}
    for r in done:
        c = colours.get(r["state"], "#e6550d")
        axes[0].scatter(r["number"], r["value"], color=c)
        axes[1].scatter(r["params"]["learning_rate"], r["value"], color=c, s=20 + 6 * r["params"]["rank"])
    best_so_far, xs, ys = None, [], []
    for r in sorted(done, key=lambda r: r["number"]):
        if r["state"] == "COMPLETE" and (best_so_far is None or r["value"] < best_so_far):
            best_so_far = r["value"]
        if best_so_far is not None:
            xs.append(r["number"])
            ys.append(best_so_far)
    axes[0].step(xs, ys, where="post", color="#31a354", label="best so far")
    axes[0].set_xlabel("trial")
    axes[0].set_ylabel("best validation loss (pruned: last reported)")
    axes[0].legend(fontsize=8)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("learning rate (marker size: rank)")
    axes[1].set_ylabel("validation loss")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("sdloop tune: blue complete, grey pruned")
    fig.tight_layout()
    with atomic_path(path, fsync=False) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def tune(base_cfg: TrainConfig, tune_dir: Path, n_trials: int, space: Optional[SearchSpace] = None,
         progress: bool = True, study_name: str = "sdloop") -> TuneSummary:
    """Run ``n_trials`` more trials of the study in ``tune_dir`` and summarise every trial so far."""
    import optuna

    from .train import TrainingError, train

    if n_trials < 0:
        raise TuneError(f"--trials={n_trials} is invalid: a number of trials >= 0.")
    if base_cfg.data_config.validation_split <= 0:
        raise TuneError("tune optimises the validation loss: data.validation_split must be > 0.")
    space = space or SearchSpace()
    tune_dir.mkdir(parents=True, exist_ok=True)
    (tune_dir / "search_space.json").write_text(json.dumps(dataclasses.asdict(space), indent=2))
    storage = f"sqlite:///{(tune_dir / 'study.db').resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    n_startup = max(2, min(5, n_trials // 3))
    study = optuna.create_study(
        study_name=study_name, storage=storage, direction="minimize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=base_cfg.seed, n_startup_trials=n_startup),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=n_startup, n_warmup_steps=base_cfg.validation_every),
    )
    # a trial killed with the process stays RUNNING in the database: mark it failed so it does not linger
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)

    def objective(trial: Any) -> float:
        params = _suggest(trial, space)
        run_dir = tune_dir / "trials" / f"trial_{trial.number:03d}"
        if run_dir.exists():  # leftovers of a killed attempt with the same number
            shutil.rmtree(run_dir)
        values = {**base_cfg.to_dict(), **params, "output": str(run_dir),
                  "alpha": base_cfg.alpha / base_cfg.rank * params["rank"]}  # keep the scale alpha/rank
        cfg = TrainConfig.from_dict(values)
        trial.set_user_attr("run_dir", str(run_dir))

        def report(step: int, val_loss: float) -> bool:
            trial.report(val_loss, step)
            return trial.should_prune()

        try:
            result = train(cfg, progress=progress, on_validation=report)
        except TrainingError as e:  # a diverged trial is a bad trial, not a failed search
            trial.set_user_attr("error", str(e))
            raise optuna.TrialPruned(str(e)) from None
        trial.set_user_attr("best_step", result.best_step)
        if result.stopped.startswith("stopped by the caller"):
            raise optuna.TrialPruned(f"pruned at step {result.final_step}")
        if result.best_val_loss is None:
            raise TuneError("the run produced no validation loss.")
        return float(result.best_val_loss)

    if n_trials:
        study.optimize(objective, n_trials=n_trials, catch=())

    rows = []
    for t in study.get_trials(deepcopy=False):
        value = t.value if t.value is not None else (t.intermediate_values[max(t.intermediate_values)]
                                                     if t.intermediate_values else None)
        rows.append({"number": t.number, "state": t.state.name, "value": value, "params": t.params,
                     "best_step": t.user_attrs.get("best_step"), "run_dir": t.user_attrs.get("run_dir")})
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    if not complete:
        raise TuneError("no trial completed; widen the search space or run more trials.")
    best = study.best_trial
    csv_path = tune_dir / "trials.csv"
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["trial", "state", "value", "best_step", "learning_rate", "rank", "lora_dropout", "weight_decay",
                    "batch_size", "run_dir"])
        for r in rows:
            p = r["params"]
            w.writerow([r["number"], r["state"], r["value"], r["best_step"], p.get("learning_rate"), p.get("rank"),
                        p.get("lora_dropout"), p.get("weight_decay"), p.get("batch_size"), r["run_dir"]])
    plot = _plot(rows, tune_dir / "trials.png")
    best_run = Path(best.user_attrs["run_dir"])
    summary = {"best_trial": best.number, "best_value": best.value, "best_params": best.params,
               "best_run_dir": str(best_run), "trials": rows}
    write_text_atomic(tune_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    return TuneSummary(best_trial=best.number, best_value=float(best.value), best_params=best.params,
                       best_run_dir=best_run, table=_table(rows), storage=storage, plot=plot, csv=csv_path)
