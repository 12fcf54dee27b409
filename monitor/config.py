"""Settings of the monitoring and retraining loop: windows, test thresholds, the policy, the data, the gate, the
schedule.

Every threshold an Evidently test uses is a field here, so no library default is ever silently in charge, and every
field says what it does (``sdloop monitor report --help-config`` lists them). ``__post_init__`` checks each type
first (``check_types``, as every config does), then each range, and names the field, so a typo in
``$SDLOOP_HOME/monitor.yaml`` or in ``--set`` (read by ``sdloop.overrides``, the parser of every command) fails before
any report runs. The defaults suit a service with at least a few dozen generations a day; the demo and the tests
override only window sizes and counts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from sdloop.config_types import build_dataclass, check_types, help_field
from sdloop.configfile import ConfigError, load_config_file
from sdloop.overrides import apply_overrides

OBJECTIVES = ("sft", "kto", "dpo")
DRIFT_METHODS = ("psi", "wasserstein", "ks", "jensenshannon", "kl_div", "chisquare")
CONFIG_FILE = "monitor.yaml"


_f = help_field  # a field with its help text


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"monitor setting {name}={value!r} is invalid: {allowed}.")


@dataclass
class MonitorConfig:
    """Everything the monitor, the policy, the retraining and the scheduler can be told."""

    # -- windows -------------------------------------------------------------------------------------------------
    current_hours: float = _f(24.0, "Length of the current window (ending now) that reports and checks look at.")
    reference_hours: float = _f(168.0, "Length of the reference window frozen when a champion is promoted: the "
                                       "champion's own generations of this many hours before the promotion (a "
                                       "version that served before, e.g. a rollback to it), when it served "
                                       "min_generations there; otherwise its first min_generations after it. Only "
                                       "the champion's own traffic is ever its reference.")
    min_generations: int = _f(30, "Fewer generations than this in either window: the report says 'not enough "
                                  "data' instead of a verdict.")
    keep_reports: int = _f(168, "Report folders kept in $SDLOOP_HOME/monitor/reports (the oldest beyond this are "
                                "deleted; a report is about 4 MB of HTML, an hourly check makes 24 a day).")
    min_feedback: int = _f(10, "Fewer rated generations than this in the current window: no feedback verdict.")
    # -- drift tests ---------------------------------------------------------------------------------------------
    prompt_drift_method: str = _f("wasserstein", f"Drift method of the prompt descriptors, one of {DRIFT_METHODS}.")
    prompt_drift_threshold: float = _f(0.5, "Drift score above which a prompt descriptor has drifted (for "
                                            "wasserstein: in reference standard deviations, or in the descriptor's "
                                            "spread floor when the reference barely varies, see monitor/drift.py; "
                                            "two samples of 30 from "
                                            "one distribution already differ by 0.29 typically, 0.51 at the 95th "
                                            "percentile).")
    prompt_text_threshold: float = _f(0.95, "Threshold of Evidently's text drift of the raw prompts (a classifier's "
                                            "ROC AUC telling the windows apart); shown in the report, not counted.")
    image_drift_method: str = _f("wasserstein", f"Drift method of the image descriptors, one of {DRIFT_METHODS}.")
    image_drift_threshold: float = _f(0.5, "Drift score above which an image descriptor has drifted (same scale "
                                           "as prompt_drift_threshold).")
    drift_share: float = _f(0.5, "Share of drifted columns (prompts or images) that counts as drift of the group.")
    rating_psi_threshold: float = _f(0.2, "PSI of the rating distribution above which ratings have drifted (0.1: "
                                          "some change, 0.2: a significant one, the usual reading of PSI).")
    # -- feedback and service tests ------------------------------------------------------------------------------
    min_mean_rating: float = _f(3.0, "Mean rating (1-5) of the current window below this is bad feedback.")
    max_thumbs_down_share: float = _f(0.4, "Share of thumbs-down votes above this is bad feedback.")
    max_latency_p95_s: float = _f(30.0, "95th percentile generation latency (s) above this fails the service test.")
    max_error_rate: float = _f(0.05, "Share of failed requests above this fails the service test.")
    # -- policy --------------------------------------------------------------------------------------------------
    cooldown_hours: float = _f(24.0, "No retraining sooner than this after the last one (a failed gate counts).")
    min_new_feedback: int = _f(20, "Feedback rows since the last retraining needed before retraining on it.")
    # -- retraining data -----------------------------------------------------------------------------------------
    keep_rating: int = _f(4, "Generations rated at or above this (or thumbs up) join the retraining data.")
    drop_rating: int = _f(2, "Generations rated at or below this (or thumbs down) are kept out of it.")
    max_new_images: int = _f(1000, "At most this many rated generations join the retraining data (best first).")
    min_raters: int = _f(2, "Distinct raters a generation needs before its good rating counts for the retraining "
                            "data (a rater is an API key, or a client id where the service runs without keys); a "
                            "low rating or a thumbs down keeps a generation out whatever the count.")
    max_rater_share: float = _f(0.2, "Largest share of the generations added to the retraining data that one rater's "
                                     "votes may count on (each rater may always count on one); a rater's votes "
                                     "beyond it, newest first, are not counted, so one caller cannot fill the data.")
    gate_holdout_share: float = _f(0.2, "Share of the well-rated generations held out of the retraining data as the "
                                        "gate's KID reference (at least 2, at most half; none when fewer than 4 are "
                                        "kept, and KID then does not count): the challenger is judged on images it "
                                        "did not train on.")
    # -- preference data (objective kto or dpo) ----------------------------------------------------------------
    objective: str = _f("sft", f"What the challenger learns, one of {OBJECTIVES}: sft fine-tunes on the champion's "
                               "data plus well-rated generations; kto on single generations marked desirable or "
                               "undesirable (thumbs, ratings); dpo on pairs where one image was preferred "
                               "(two-candidate choices, review votes). kto and dpo train a LoRA starting at the "
                               "champion's, the champion frozen as the reference (their beta and weights: "
                               "train_overrides).")
    desirable_rating: int = _f(4, "kto: a generation whose counted ratings average at or above this (or, unrated, "
                                  "whose thumbs are up) is desirable; at or below drop_rating, or thumbs down, "
                                  "undesirable; in between, left out.")
    pair_min_raters: int = _f(1, "dpo: distinct raters a pair needs before its preference counts (a two-candidate "
                                 "pair is chosen on by the caller who asked for it, so 1); max_rater_share still "
                                 "caps each rater.")
    review_dirs: list[str] = _f([], "dpo: review folders (sdloop review) whose votes become pairs; empty: every "
                                    "folder under $SDLOOP_HOME/reviews. A vote for left or right is a pair, 'no "
                                    "preference' none.")
    # -- retraining ----------------------------------------------------------------------------------------------
    from_champion: bool = _f(True, "Start the challenger's LoRA from the champion's weights (else from scratch).")
    train_overrides: dict = _f({}, "Training settings that replace the champion's for the challenger, e.g. "
                                   "{max_steps: 200}.")
    gate_prompts: list[str] = _f([], "Fixed prompts the challenger and champion are compared on (empty: the champion "
                                "run's validation captions).")
    gate_images: int = _f(16, "Images per model in the comparison (the prompts cycle; KID needs a dozen or more).")
    gate_seed: int = _f(0, "Seed of the comparison's per-image seeds: the same images for every retraining.")
    gate_steps: int = _f(20, "Denoising steps of the comparison images.")
    export_settings: dict = _f({}, "Export settings of the challenger (sdloop export's --set keys), e.g. {steps: 8}.")
    # -- the gate ------------------------------------------------------------------------------------------------
    kid_margin: float = _f(0.01, "The challenger's KID may exceed the champion's by at most this much.")
    val_loss_margin: float = _f(0.02, "The challenger's best validation loss may exceed the champion's by at most "
                                      "this much (skipped when either has none).")
    latency_budget_s: float = _f(0.0, "Largest exported latency (s per image) the challenger may have; 0: the "
                                      "champion's times (1 + latency_margin).")
    latency_margin: float = _f(0.5, "With latency_budget_s 0: how much slower than the champion is still fine.")
    # -- the scheduler -------------------------------------------------------------------------------------------
    monitor_every_minutes: float = _f(60.0, "The monitoring check runs this often.")
    retrain_cron: str = _f("0 3 * * 0", "When the scheduled retraining runs (crontab: minute hour day month "
                                        "weekday with 0 or 7 = Sunday, in the scheduler machine's local time zone).")
    misfire_grace_s: int = _f(3600, "A run missed by less than this (scheduler down, machine asleep) still runs "
                                    "once when the scheduler is back; older misses are skipped.")

    def __post_init__(self) -> None:
        check_types(self, "")
        for name in ("current_hours", "reference_hours", "cooldown_hours"):
            value = getattr(self, name)
            _check(math.isfinite(value) and 0 < value <= 24 * 366, name, value, "a number of hours in (0, 8784]")
        _check(0 < self.monitor_every_minutes <= 60 * 24 * 31, "monitor_every_minutes", self.monitor_every_minutes,
               "a number of minutes in (0, 44640]")
        _check(1 <= self.min_generations <= 10**7, "min_generations", self.min_generations, "an integer >= 1")
        _check(1 <= self.min_feedback <= 10**7, "min_feedback", self.min_feedback, "an integer >= 1")
        _check(0 <= self.min_new_feedback <= 10**7, "min_new_feedback", self.min_new_feedback, "an integer >= 0")
        for name in ("prompt_drift_method", "image_drift_method"):
            _check(getattr(self, name) in DRIFT_METHODS, name, getattr(self, name), f"one of {DRIFT_METHODS}")
        _check(1 <= self.keep_reports <= 10**6, "keep_reports", self.keep_reports, "an integer in [1, 1000000]")
        _check(0.5 <= self.prompt_text_threshold < 1, "prompt_text_threshold", self.prompt_text_threshold,
               "a ROC AUC in [0.5, 1)")
        for name in ("prompt_drift_threshold", "image_drift_threshold", "rating_psi_threshold"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value > 0, name, value, "a positive number")
        for name in ("drift_share", "max_thumbs_down_share", "max_error_rate"):
            value = getattr(self, name)
            _check(0 <= value <= 1, name, value, "a share in [0, 1]")
        _check(1 <= self.min_mean_rating <= 5, "min_mean_rating", self.min_mean_rating, "a rating in [1, 5]")
        _check(self.max_latency_p95_s > 0, "max_latency_p95_s", self.max_latency_p95_s, "a positive number of seconds")
        _check(1 <= self.keep_rating <= 5, "keep_rating", self.keep_rating, "a rating in [1, 5]")
        _check(1 <= self.drop_rating < self.keep_rating, "drop_rating", self.drop_rating,
               f"a rating in [1, keep_rating={self.keep_rating})")
        _check(self.objective in OBJECTIVES, "objective", self.objective, f"one of {OBJECTIVES}")
        _check(self.objective == "sft" or self.from_champion, "objective", self.objective,
               "kto and dpo train against the champion frozen as the reference, so they need from_champion: true")
        _check(self.drop_rating < self.desirable_rating <= 5, "desirable_rating", self.desirable_rating,
               f"a rating in (drop_rating={self.drop_rating}, 5]")
        _check(1 <= self.pair_min_raters <= 1000, "pair_min_raters", self.pair_min_raters, "an integer in [1, 1000]")
        _check(all(isinstance(p, str) and p.strip() for p in self.review_dirs), "review_dirs", self.review_dirs,
               "a list of review folders")
        _check(0 <= self.max_new_images <= 10**6, "max_new_images", self.max_new_images, "an integer in [0, 1000000]")
        _check(1 <= self.min_raters <= 1000, "min_raters", self.min_raters, "an integer in [1, 1000]")
        _check(math.isfinite(self.max_rater_share) and 0 < self.max_rater_share <= 1, "max_rater_share",
               self.max_rater_share, "a share in (0, 1]")
        _check(math.isfinite(self.gate_holdout_share) and 0 <= self.gate_holdout_share <= 0.5, "gate_holdout_share",
               self.gate_holdout_share, "a share in [0, 0.5]")
        _check(all(isinstance(p, str) and p.strip() for p in self.gate_prompts), "gate_prompts", self.gate_prompts,
               "a list of non-empty prompts")
        _check(2 <= self.gate_images <= 10000, "gate_images", self.gate_images, "an integer in [2, 10000]")
        _check(0 <= self.gate_seed < 2**63, "gate_seed", self.gate_seed, "a seed in [0, 2**63)")
        _check(1 <= self.gate_steps <= 1000, "gate_steps", self.gate_steps, "an integer in [1, 1000]")
        for name in ("kid_margin", "val_loss_margin", "latency_budget_s", "latency_margin"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value >= 0, name, value, "a number >= 0")
        _check(1 <= self.misfire_grace_s <= 7 * 86400, "misfire_grace_s", self.misfire_grace_s,
               "seconds in [1, 604800]")
        _check(len(self.retrain_cron.split()) == 5, "retrain_cron", self.retrain_cron,
               "five crontab fields: minute hour day month weekday, e.g. '0 3 * * 0'")
        try:
            from monitor.scheduler import cron_trigger  # crontab weekdays (0 = Sunday), not APScheduler's

            cron_trigger(self.retrain_cron)
        except ValueError as e:
            raise ConfigError(f"monitor setting retrain_cron={self.retrain_cron!r} is invalid: {e}.") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MonitorConfig":
        """Build from a partial mapping; unknown keys and wrong types are named."""
        return build_dataclass(cls, values, prefix="")

    @classmethod
    def load(cls, path: Optional[str | Path] = None, overrides: Optional[dict[str, Any]] = None,
             sets: Sequence[str] = ()) -> "MonitorConfig":
        """The settings in force: ``path`` (or ``$SDLOOP_HOME/monitor.yaml`` when it exists), then ``overrides``,
        then ``sets``: ``--set KEY=VALUE`` items, read by the one parser every command uses (``sdloop.overrides``),
        so ``--set train_overrides.max_steps=50`` changes one key of the file's mapping and keeps the others."""
        from sdloop.workspace import home

        values: dict[str, Any] = {}
        if path is not None:
            values = load_config_file(path)
        elif (home() / CONFIG_FILE).is_file():
            values = load_config_file(home() / CONFIG_FILE)
        if not isinstance(values, dict):
            raise ConfigError(f"{path or home() / CONFIG_FILE} must hold key: value lines (a mapping).")
        merged = dict(values)
        for key, value in (overrides or {}).items():  # a mapping setting given here changes only its keys
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        return cls.from_dict(apply_overrides(cls, merged, sets))
