"""Hyperparameter search with optuna on the fixed-noise validation loss.

Each trial is an ordinary training run in ``TUNE_DIR/trials/<study>/trial_NNN`` (so the best one is a normal run
folder); the objective is the run's best validation loss; each validation is reported to optuna, and the trainer's
``StopReason.PRUNED`` says that the pruner stopped a trial. Studies live in ``TUNE_DIR/study.db`` (sqlite): running
the command again adds trials to the same study. Several studies may share one ``TUNE_DIR``; each has its own folder
(trial runs, ``trials.csv``, ``trials.png``, ``summary.json``, ``search_space.json``), so nothing of one study is
touched by another.

A study remembers its search space, its training config and its dataset fingerprint: adding trials with other
settings would compare validation losses that are not comparable, so that is refused with both versions named (a
new ``--study-name`` starts a new study). A trial left RUNNING by a killed process is marked failed through optuna's
public ``Study.tell`` and retried with the same parameters in the same folder, resuming from its last checkpoint.
Only one ``sdloop tune`` works on a ``TUNE_DIR`` at a time (a lock file), which is what makes a RUNNING trial found
at start-up a dead one. sdloop never deletes a trial folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from sdloop.atomic import check_writable_dir, write_json_atomic
from sdloop.errors import UserError
from sdloop.seeding import derive_seed

from finetune.training.config import ConfigError, SearchSpace, TrainConfig
from finetune.training.tune_report import PARAMS, trial_table, write_csv, write_plot, write_summary

STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
OURS = {"study.db", "tune.lock", "trials", "trials.csv", "trials.png", "summary.json", "search_space.json"}
MAX_TRIALS = 100_000
SPACE_ATTR, CONFIG_ATTR, DATA_ATTR = "sdloop_search_space", "sdloop_train_config", "sdloop_dataset_fingerprint"


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
    study_dir: Path


def parse_space(text: str) -> SearchSpace:
    """The search space of ``--space`` JSON; every mistake (JSON, keys, shapes, types, bounds) is one TuneError."""
    example = 'e.g. --space \'{"rank": [4, 8], "learning_rate": [1e-4, 1e-3]}\''
    try:
        values = json.loads(text)
    except RecursionError:
        raise TuneError(f"--space is not valid JSON (nested too deeply); {example}.") from None
    except ValueError as e:
        where = f" at line {e.lineno}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e).splitlines()[0]
        raise TuneError(f"--space is not valid JSON ({msg}{where}); {example} (double quotes).") from None
    if not isinstance(values, dict):
        raise TuneError(f"--space must be a JSON object of ranges, not a {type(values).__name__}; {example}.")
    known = [f.name for f in dataclasses.fields(SearchSpace)]
    unknown = sorted(k for k in values if k not in known)
    if unknown:
        raise TuneError(f"unknown --space key(s) {', '.join(unknown)}; known keys: {', '.join(known)}.")
    try:
        return SearchSpace(**values)
    except ConfigError as e:
        raise TuneError(f"--space: {e}") from None


def _suggest(trial: Any, space: SearchSpace) -> dict[str, Any]:
    return {
        "learning_rate": trial.suggest_float("learning_rate", *space.learning_rate, log=True),
        "rank": trial.suggest_categorical("rank", list(space.rank)),
        "lora_dropout": trial.suggest_float("lora_dropout", *space.lora_dropout),
        "weight_decay": trial.suggest_float("weight_decay", *space.weight_decay, log=True),
        "batch_size": trial.suggest_categorical("batch_size", list(space.batch_size)),
    }


# ---- the tune folder: ours, writable, one process at a time ------------------------------------------------------

def _check_tune_dir(tune_dir: Path) -> Path:
    """``tune_dir`` checked, nothing made yet: a folder that is new, empty or a tune folder sdloop made."""
    if tune_dir.exists() and not tune_dir.is_dir():
        raise TuneError(f"--output {tune_dir} is a file; tune --output takes a folder (new, or one sdloop tune made).")
    if tune_dir.is_dir():
        try:
            names = {p.name for p in tune_dir.iterdir()}
        except OSError as e:
            raise TuneError(f"cannot read --output {tune_dir}: {e.strerror or e}; choose a folder you can use.") \
                from None
        if names and not (tune_dir / "study.db").is_file() and not names <= OURS:
            raise TuneError(f"--output {tune_dir} holds files sdloop tune did not make (no study.db); choose a new "
                            "or empty folder.")
    return tune_dir


def _make_tune_dir(tune_dir: Path) -> Path:
    try:
        check_writable_dir(tune_dir, "the tune folder")
    except UserError as e:
        raise TuneError(str(e)) from None
    return tune_dir


@contextlib.contextmanager
def _locked(tune_dir: Path) -> Iterator[None]:
    """Hold ``tune_dir/tune.lock`` for the search (released by the OS if the process dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the RUNNING-trial rule then assumes one process per folder
        yield
        return
    with open(tune_dir / "tune.lock", "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise TuneError(f"another `sdloop tune` is working on {tune_dir} (it holds tune.lock); wait for it to "
                            "finish, or use another --output.") from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _load_study(storage: str, study_name: str, seed: int, n_trials: int, validation_every: int, pruner: Any,
                tune_dir: Path) -> Any:
    """Create or load the study, with a sampler seeded by (seed, study, trials so far): each run of the command
    draws new parameters instead of repeating the first run's startup trials."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    n_startup = max(2, min(5, n_trials // 3))
    try:
        existing = len(optuna.create_study(study_name=study_name, storage=storage, direction="minimize",
                                           load_if_exists=True).get_trials(deepcopy=False))
        sampler = optuna.samplers.TPESampler(seed=derive_seed(seed, "tune", study_name, existing) % 2**32,
                                             n_startup_trials=n_startup)
        pruner = pruner or optuna.pruners.MedianPruner(n_startup_trials=n_startup, n_warmup_steps=validation_every)
        return optuna.load_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
    except (SQLAlchemyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TuneError(f"{tune_dir / 'study.db'} is not a readable optuna study database ({first[:160]}); move it "
                        "away, or use another --output.") from None


# ---- what a study remembers ----------------------------------------------------------------------------------------

def _setup_record(cfg: TrainConfig) -> dict[str, Any]:
    """The training settings that make trials comparable: the config without the searched keys and the output."""
    values = cfg.to_dict()
    for key in ("output", *(k for k in PARAMS if k != "rank")):  # rank stays: alpha/rank is the LoRA scale
        values.pop(key, None)
    for key in ("base", "data"):
        p = Path(values[key]).expanduser()
        if p.exists():
            values[key] = str(p.resolve())
    return values


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} {json.dumps(a)} -> {json.dumps(b)}")
    return out


def _check_or_record(study: Any, space: Optional[SearchSpace], cfg: TrainConfig, fingerprint: str,
                     study_name: str) -> SearchSpace:
    """The study's search space; refuse a changed space, config or dataset on a study that has trials."""
    attrs = study.user_attrs
    has_trials = bool(study.get_trials(deepcopy=False))
    new_setup = _setup_record(cfg)
    fresh = "; run with the same settings, or start a new study with another --study-name"
    if SPACE_ATTR in attrs and (has_trials or space is None):
        stored = SearchSpace(**attrs[SPACE_ATTR])
        if space is not None and space.to_dict() != stored.to_dict():
            diff = "; ".join(_differences(stored.to_dict(), space.to_dict()))
            raise TuneError(f"study {study_name!r} searched another space (old -> new: {diff}); run without --space "
                            f"to continue it, or start a new study with another --study-name.")
        space = stored
    space = space or SearchSpace()
    if has_trials and CONFIG_ATTR in attrs and attrs[CONFIG_ATTR] != new_setup:
        diff = _differences(attrs[CONFIG_ATTR], new_setup)
        shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
        raise TuneError(f"study {study_name!r} was trained with other settings (old -> new: {shown}){fresh}.")
    if has_trials and attrs.get(DATA_ATTR) and attrs[DATA_ATTR] != fingerprint:
        raise TuneError(f"the dataset {cfg.data} changed since study {study_name!r} began (fingerprint "
                        f"{attrs[DATA_ATTR][:12]} -> {fingerprint[:12]}): its validation losses would not compare"
                        f"{fresh}.")
    study.set_user_attr(SPACE_ATTR, space.to_dict())
    study.set_user_attr(CONFIG_ATTR, new_setup)
    study.set_user_attr(DATA_ATTR, fingerprint)
    return space


def _preflight(cfg: TrainConfig, progress: bool) -> str:
    """Check the base and the dataset once before any trial (a bad one is one error, not N failed trials); return
    the dataset's fingerprint."""
    from sdloop.pipelines import resolve_base

    from finetune.data.check import scan_dataset, split_items
    from finetune.training.setup import warn_upscale

    resolve_base(cfg.base)
    report = scan_dataset(cfg.data, cfg.data_config, progress=progress)
    if not report.items:
        raise TuneError(f"no usable images in {cfg.data}; run `sdloop data check {cfg.data}` to see why.")
    if not split_items(report.items, cfg.data_config)[1]:
        raise TuneError(f"the validation split of {cfg.data} is empty and tune optimises the validation loss; "
                        f"run `sdloop data check {cfg.data}` to see why.")
    warn_upscale(report.items, cfg.resolution)  # once for the search; the trials do not repeat it
    return report.fingerprint


# ---- trial folders -------------------------------------------------------------------------------------------------

def _rel(tune_dir: Path, run_dir: Any) -> str:
    """A trial folder as stored in the study: relative to ``tune_dir``, so the folder can move."""
    p = Path(str(run_dir))
    if p.is_absolute():
        with contextlib.suppress(ValueError):
            return p.relative_to(tune_dir.resolve()).as_posix()
    return p.as_posix()


def _claims(study: Any, tune_dir: Path) -> dict[str, list[Any]]:
    """Each trial folder the study's records name, with the trials that name it."""
    out: dict[str, list[Any]] = {}
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("run_dir"):
            out.setdefault(_rel(tune_dir, t.user_attrs["run_dir"]), []).append(t)
    return out


def _check_unclaimed(study: Any, tune_dir: Path, study_dir: Path, study_name: str) -> None:
    """Refuse trial folders that the study's records do not name (e.g. study.db was replaced): never reuse them."""
    if not study_dir.is_dir():
        return
    claims = _claims(study, tune_dir)
    strays = sorted(p.name for p in study_dir.iterdir()
                    if p.name.startswith("trial_") and _rel(tune_dir, tune_dir / "trials" / study_name / p.name)
                    not in claims)
    if strays:
        raise TuneError(f"{study_dir} holds trial folders that study {study_name!r} in study.db has no record of "
                        f"({', '.join(strays[:3])}); was study.db replaced? Move them away, or use another "
                        "--study-name.")


def _retry_killed_trials(study: Any, tune_dir: Path) -> list[int]:
    """Mark trials left RUNNING by a killed process failed (optuna's public ``tell``), and queue one retry of each
    killed or interrupted trial with its parameters and folder; return the numbers of the trials retried."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    out = []
    for t in trials:
        if t.state == TrialState.RUNNING:  # we hold the lock: its process is gone
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        elif not (t.state == TrialState.FAIL and t.user_attrs.get("interrupted")):
            continue
        if set(t.params) == set(PARAMS) and t.user_attrs.get("run_dir") and t.number not in retried:
            study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number,
                                                            "retry_dir": _rel(tune_dir, t.user_attrs["run_dir"])})
            out.append(t.number)
    return out


def _trial_folder(trial: Any, study: Any, tune_dir: Path, study_dir: Path) -> tuple[Path, bool]:
    """The folder of ``trial`` and whether to resume in it.

    A retry takes over its killed trial's folder when every record that names the folder is a failed trial (a
    leftover of this study, nothing of value in it), and resumes from its last checkpoint; otherwise a trial gets
    a new ``trial_NNN`` folder, which must not exist.
    """
    retry_dir = trial.user_attrs.get("retry_dir")
    if retry_dir:
        others = [t for t in _claims(study, tune_dir).get(retry_dir, []) if t.number != trial.number]
        if others and all(t.state.name == "FAIL" for t in others):
            path = tune_dir / retry_dir
            return path, (path / "config.yaml").is_file()
    path = study_dir / f"trial_{trial.number:03d}"
    if path.exists():
        raise TuneError(f"{path} already exists and study {study_dir.name!r} has no record of it; move it away, or "
                        "use another --study-name.")
    return path, False


# ---- the search ----------------------------------------------------------------------------------------------------

def tune(base_cfg: TrainConfig, tune_dir: Path, n_trials: int, space: Optional[SearchSpace] = None,
         progress: bool = True, study_name: str = "sdloop", pruner: Any = None) -> TuneSummary:
    """Run ``n_trials`` more trials of study ``study_name`` in ``tune_dir`` and summarise every trial so far.

    ``space`` None continues an existing study with its own space (or searches the default space); a space that
    differs from the study's is refused. ``pruner`` replaces the median pruner (tests prune at the first report).
    """
    import optuna

    from finetune.training.train import DivergedError, StopReason, TrainHooks, train

    if not 0 <= n_trials <= MAX_TRIALS:
        raise TuneError(f"--trials={n_trials} is invalid: a number of trials in [0, {MAX_TRIALS}].")
    if not STUDY_NAME.match(study_name) or re.fullmatch(r"trial_\d+", study_name):
        raise TuneError(f"--study-name {study_name!r} is invalid: 1 to 64 letters, digits, '.', '_' or '-', starting "
                        "with a letter or digit (it names the study's folder).")
    if base_cfg.data_config.validation_split <= 0:
        raise TuneError("tune optimises the validation loss: data.validation_split must be > 0.")
    tune_dir = _check_tune_dir(Path(tune_dir).expanduser().resolve())
    fingerprint = _preflight(base_cfg, progress)
    with _locked(_make_tune_dir(tune_dir)):
        storage = f"sqlite:///{(tune_dir / 'study.db').resolve()}"
        # ERROR: optuna logs a failed trial's traceback as a warning; the error itself reaches the user in one line
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        study = _load_study(storage, study_name, base_cfg.seed, n_trials, base_cfg.validation_every, pruner, tune_dir)
        space = _check_or_record(study, space, base_cfg, fingerprint, study_name)
        study_dir = tune_dir / "trials" / study_name
        _check_unclaimed(study, tune_dir, study_dir, study_name)
        _retry_killed_trials(study, tune_dir)
        write_json_atomic(study_dir / "search_space.json", space.to_dict())

        def objective(trial: Any) -> float:
            params = _suggest(trial, space)
            run_dir, resume = _trial_folder(trial, study, tune_dir, study_dir)
            values = {**base_cfg.to_dict(), **params, "output": str(run_dir),
                      "alpha": base_cfg.alpha / base_cfg.rank * params["rank"]}  # keep the scale alpha/rank
            trial.set_user_attr("run_dir", _rel(tune_dir, run_dir))

            def report(step: int, val_loss: float) -> bool:
                trial.report(val_loss, step)
                return trial.should_prune()

            try:
                result = train(TrainConfig.from_dict(values), resume=resume, progress=progress, on_validation=report,
                               hooks=TrainHooks(warn_upscale=False))
            except DivergedError as e:  # a diverged trial is a bad trial, not a failed search; other errors stop it
                trial.set_user_attr("error", str(e))
                raise optuna.TrialPruned(str(e)) from None
            except KeyboardInterrupt:  # optuna marks it failed; the next `sdloop tune` retries it in its folder
                trial.set_user_attr("interrupted", True)
                raise
            trial.set_user_attr("best_step", result.best_step)
            if result.stop_reason == StopReason.PRUNED:
                raise optuna.TrialPruned(f"pruned at step {result.final_step}")
            if result.best_val_loss is None:
                raise TuneError("the run produced no validation loss; check data.validation_split.")
            return float(result.best_val_loss)

        if n_trials:
            study.optimize(objective, n_trials=n_trials, catch=())
        return _summarise(study, tune_dir, study_dir, study_name, space, storage)


def _summarise(study: Any, tune_dir: Path, study_dir: Path, study_name: str, space: SearchSpace,
               storage: str) -> TuneSummary:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state.name == "WAITING":
            continue
        value = t.value if t.value is not None else (t.intermediate_values[max(t.intermediate_values)]
                                                     if t.intermediate_values else None)
        run_dir = t.user_attrs.get("run_dir")
        rows.append({"number": t.number, "state": t.state.name, "value": value, "params": t.params,
                     "best_step": t.user_attrs.get("best_step"), "error": t.user_attrs.get("error"),
                     "run_dir": str(tune_dir / _rel(tune_dir, run_dir)) if run_dir else None})
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    best = min(complete, key=lambda r: r["value"]) if complete else None
    csv_path = write_csv(rows, study_dir / "trials.csv")
    plot = write_plot(rows, study_dir / "trials.png", study_name)
    write_summary(rows, study_dir / "summary.json", study_name, best, space.to_dict())
    if best is None:
        errors = [r["error"] for r in rows if r.get("error")]
        why = f" (last error: {errors[-1]})" if errors else ""
        raise TuneError(f"no trial of study {study_name!r} completed{why}; widen the search space or run more "
                        "trials.")
    return TuneSummary(best_trial=best["number"], best_value=float(best["value"]), best_params=best["params"],
                       best_run_dir=Path(best["run_dir"]), table=trial_table(rows), storage=storage, plot=plot,
                       csv=csv_path, study_dir=study_dir)
