"""`sdloop retrain`: train a challenger on the new evidence, compare it with the champion, and promote it only if it
passes the gate.

The phases read top to bottom in ``retrain``: data (the champion's data plus well-rated generations, a share of them
held out for the gate; with ``objective`` kto or dpo, the preference data of ``monitor.preference_data``), train
(the champion's config, optionally starting from its LoRA; kto/dpo against it as the reference), compare (the
evaluation stage's paired comparison on fixed prompts and seeds, KID against the held-out generations: images
neither model trained on; the pixel checker's preference win rate recorded beside it), the quality gate (a worse
challenger is rejected before an export is spent on it), export, publish (a candidate version), the export gate
(parity, latency), promote. Every phase is a row in the retraining log. Only the last phase touches the champion,
through the registry's atomic pointer, so a crash or a failed gate anywhere leaves the champion serving; one lock
keeps two retrainings (manual and scheduled) from overlapping, and rows left running by a killed process are marked
interrupted by the next one, which starts in a fresh folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from monitor.config import MonitorConfig
from monitor.gate import GateResult, export_gate, parity_failed, quality_gate
from monitor.lock import hold, retrain_lock_path
from monitor.retrain_log import RetrainLog
from monitor.store import Store, open_store
from sdloop.errors import UserError, one_line


class RetrainError(UserError):
    """Retraining cannot start: no champion, or the champion's run folder is gone."""


@dataclass
class RetrainOutcome:
    """What a retraining did: promoted, rejected or failed, why, and where its artifacts are."""

    id: str
    status: str
    reasons: list[str]
    champion: str
    challenger: Optional[str] = None
    run_dir: Optional[Path] = None
    comparison: Optional[Path] = None
    gates: list[GateResult] = field(default_factory=list)
    interrupted_before: list[str] = field(default_factory=list)

    @property
    def promoted(self) -> bool:
        return self.status == "promoted"

    def lines(self) -> list[str]:
        out = [f"retraining {self.id}: {self.status.upper()} (champion was {self.champion}"
               + (f", challenger {self.challenger})" if self.challenger else ")")]
        for gate in self.gates:
            out += [f"  {line}" for line in gate.lines()]
        out += [f"  - {r}" for r in self.reasons]
        if self.comparison:
            out.append(f"  comparison report: {self.comparison}")
        return out


@dataclass
class _Ctx:
    cfg: MonitorConfig
    log: RetrainLog
    rid: str
    champion: Any                # export.registry.Version
    champion_run: Path
    work: Path
    progress: bool
    say: Callable[[str], None]
    trigger: str = "manual"


def retrain(cfg: MonitorConfig, trigger: str = "manual", progress: bool = True, store: Optional[Store] = None,
            say: Callable[[str], None] = print) -> RetrainOutcome:
    """One retraining under the retrain lock (``monitor.lock.Busy`` when another runs). Returns the outcome;
    a user-facing failure inside a phase is a ``failed`` outcome with its reason, a bug is logged and re-raised."""
    store = store or open_store()
    with hold(retrain_lock_path(), "retraining", {"trigger": trigger}, db_url=store.url):
        from sdloop.champion import current_champion_tag

        log = RetrainLog(store)
        stale = log.mark_interrupted(current_champion_tag())
        if stale:
            say(f"marked {len(stale)} retraining(s) left running by a stopped process as interrupted: "
                f"{', '.join(stale)}")
        ctx = _start(cfg, log, trigger, progress, say)
        try:
            outcome = _phases(ctx)
        except UserError as e:
            log.finish(ctx.rid, "failed", [one_line(e)])
            outcome = RetrainOutcome(ctx.rid, "failed", [one_line(e)], ctx.champion.tag)
        except Exception as e:
            log.finish(ctx.rid, "failed", [f"{type(e).__name__}: {one_line(e)} (a bug: see the step's traceback in "
                                           "`sdloop retrain history --json`)"])
            raise
        except BaseException:
            log.finish(ctx.rid, "interrupted", ["stopped by a signal or Ctrl-C; the champion was not changed"])
            raise
        outcome.interrupted_before = stale
        return outcome


def _start(cfg: MonitorConfig, log: RetrainLog, trigger: str, progress: bool,
           say: Callable[[str], None]) -> _Ctx:
    from export.registry import champion
    from sdloop.runfolder import RunFolder
    from sdloop.workspace import monitor_dir

    current = champion()
    if current is None:
        raise RetrainError("there is no champion to retrain from; promote one with `sdloop models promote TAG` "
                           "(or run `sdloop demo`).")
    run_path = (current.metadata.get("source_run") or {}).get("path")
    if not run_path or not RunFolder(run_path).is_finished():
        raise RetrainError(f"the champion {current.tag} was exported from {run_path or 'an unknown run'}, which is "
                           "not a finished run folder here; retraining needs that run (its config and data).")
    _check_settings(cfg, Path(run_path))
    rid = log.begin(trigger, current.tag)
    work = monitor_dir() / "retrains" / rid
    return _Ctx(cfg, log, rid, current, Path(run_path), work, progress, say, trigger)


def _check_settings(cfg: MonitorConfig, champion_run: Path) -> None:
    """Build the challenger's training and export settings now, so a typo in train_overrides or export_settings is
    one line before anything runs, not a failure hours in."""
    from export.build import ExportConfig
    from finetune.training.config import TrainConfig

    probe = _Ctx(cfg, None, "check", None, champion_run, champion_run, False, print)  # type: ignore[arg-type]
    TrainConfig.from_dict(_train_values(probe, champion_run, champion_run / "settings-check"))
    ExportConfig.from_dict(cfg.export_settings)


def _phases(c: _Ctx) -> RetrainOutcome:
    c.say(f"retraining {c.rid} from champion {c.champion.tag} (run {c.champion_run})")
    with c.log.step(c.rid, "data") as d:
        data = _data(c)
        d.update(summary=data["summary"], data_dir=str(data["dir"]), record=data["record"],
                 gate_dir=str(data["gate_dir"]), left_out=data["left_out"], raters=data["raters"])
    with c.log.step(c.rid, "train") as d:
        run_dir, val = _train(c, data["dir"])
        c.log.update(c.rid, run_dir=str(run_dir))
        d.update(summary=f"run {run_dir.name}", run_dir=str(run_dir), val=list(val))
    with c.log.step(c.rid, "compare") as d:
        reference = gate_reference(data, run_dir)
        comparison = _compare(c, run_dir, data["dir"], reference)
        quality = quality_gate(comparison.data, val, c.cfg, not_held_out=reference["not_held_out"])
        from monitor.preference_win import caption_win_rate

        win = caption_win_rate(comparison.data)  # recorded, not gated (monitor/preference_win.py says why)
        c.say(f"      {win['text']}")
        d.update(summary="; ".join(quality.lines()), report=str(comparison.report), gate=quality.to_dict(),
                 reference={k: v for k, v in reference.items() if k != "hashes"}, win_rate=win)
    done = RetrainOutcome(c.rid, "rejected", [], c.champion.tag, None, run_dir, comparison.report, [quality])
    if not quality.passed:
        return _finish(c, done, quality.reasons + ["rejected before export: the challenger draws worse"])
    from export.errors import ParityError

    try:
        with c.log.step(c.rid, "export") as d:
            export_dir = _export(c, run_dir)
            d.update(summary=str(export_dir), export_dir=str(export_dir))
    except ParityError as e:
        parity = parity_failed(one_line(e))
        done.gates.append(parity)
        return _finish(c, done, parity.reasons)
    with c.log.step(c.rid, "publish") as d:
        from export.registry import publish, show

        tag, _ = publish(export_dir)
        done.challenger = tag
        c.log.update(c.rid, challenger=tag)
        d.update(summary=f"candidate {tag}", tag=tag)
    c.say("[6/6] gate: parity, and latency timed in pairs against the champion, then promote or reject")
    with c.log.step(c.rid, "gate") as d:
        challenger = show(tag)
        paired = _paired_latency(c, challenger.path)
        gate = export_gate(c.champion.metadata, challenger.metadata, c.cfg, paired=paired)
        done.gates.append(gate)
        d.update(summary="; ".join(gate.lines()), gate=gate.to_dict(), latency=paired)
    if not gate.passed:
        return _finish(c, done, gate.reasons)
    from sdloop.champion import current_champion_tag

    now_serving = current_champion_tag()
    if now_serving != c.champion.tag:  # promoted or rolled back by hand meanwhile: never compared with that one
        return _finish(c, done, [f"the champion changed during the retraining ({c.champion.tag} -> {now_serving}); "
                                 "the challenger was compared with the old one, so it is not promoted: run "
                                 "`sdloop retrain` again"])
    with c.log.step(c.rid, "promote") as d:
        from export.registry import promote

        checks = "; ".join(ch.text for g in done.gates for ch in g.checks if ch.passed)
        event = promote(tag, reason=f"retraining {c.rid} (trigger {c.trigger}): {checks}")
        d.update(summary=f"{tag} is the champion (was {event['previous']})")
    done.status = "promoted"
    return _finish(c, done, [f"{tag} passed the gate and is the champion; the service loads it at its next poll"])


def _paired_latency(c: _Ctx, challenger_dir: Path) -> Optional[dict[str, Any]]:
    """Both exports timed here in back-to-back pairs (``monitor.gate_latency``); None, said in one line, when the
    champion's export cannot be loaded here (the gate then falls back to the figures the exports recorded)."""
    from monitor.gate_latency import measure_paired

    try:
        return measure_paired(Path(c.champion.path), challenger_dir, say=c.say).to_dict()
    except (UserError, OSError) as e:
        c.say(f"      latency: not timed in pairs ({one_line(e)}); the gate compares the figures the exports "
              "recorded")
        return None


def _finish(c: _Ctx, outcome: RetrainOutcome, reasons: list[str]) -> RetrainOutcome:
    outcome.reasons = reasons
    c.log.finish(c.rid, outcome.status, reasons, challenger=outcome.challenger)
    return outcome


def _data(c: _Ctx) -> dict[str, Any]:
    from monitor.retrain_data import build_retrain_data, left_out

    if c.cfg.objective != "sft":  # kto / dpo: what users preferred (monitor/preference_data.py)
        from monitor.preference_data import retrain_inputs

        return retrain_inputs(c.log.store, c.cfg, c.work, c.say)
    c.say("[1/6] data: the champion's data plus the well-rated generations (a share held out for the gate), through "
          "the dataset check")
    result = build_retrain_data(c.champion_run, c.log.store, c.cfg, c.work / "data", progress=c.progress,
                                gate_dir=c.work / "gate-reference")
    counts = ", ".join(f"{k} {v}" for k, v in result.counts.items())
    c.say(f"      {result.summary().splitlines()[0]}")
    c.say(f"      {counts}; record: {result.record}")
    return {"dir": Path(result.data_dir), "record": str(result.record), "summary": counts,
            "gate_dir": result.gate_dir, "gate_images": result.gate_images, "left_out": left_out(result.counts),
            "raters": result.raters}


def _train_values(c: _Ctx, data_dir: Path, output: Path) -> dict[str, Any]:
    """The champion's training config, on the new data, into a new run, then the configured overrides."""
    values = _champion_config(c.champion_run)
    values.update(data=str(data_dir), output=str(output), init_lora=str(c.champion_run) if c.cfg.from_champion else "")
    # the retraining's objective, not the champion's: a champion a dpo retraining made is retrained with sft on a plain
    # dataset when the settings say sft (with kto/dpo its LoRA, frozen, is the reference: finetune/training/preference_run)
    values["objective"] = c.cfg.objective
    for key, value in c.cfg.train_overrides.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return values


def _train(c: _Ctx, data_dir: Path) -> tuple[Path, tuple[Optional[float], Optional[float], bool]]:
    """Train the challenger. Returns its run folder and (champion loss, challenger loss, measured on one split)."""
    from finetune.training.config import TrainConfig
    from finetune.training.train import train
    from sdloop.runfolder import RunFolder
    from sdloop.workspace import runs_dir

    output = runs_dir() / f"retrain-{c.rid}"
    cfg = TrainConfig.from_dict(_train_values(c, data_dir, output))
    start = "the champion's LoRA" if cfg.init_lora else "scratch"
    c.say(f"[2/6] train: {cfg.max_steps or cfg.epochs} {'steps' if cfg.max_steps else 'epochs'} from {start} "
          f"into {output}")
    result = train(cfg, progress=c.progress)
    champ_cfg = _champion_config(c.champion_run)
    same_adapters = all(champ_cfg.get(k) == getattr(cfg, k) for k in ("rank", "alpha", "target_modules",
                                                                      "train_text_encoder"))
    if cfg.init_lora and same_adapters:
        # step 0 of a run that starts from the champion's weights is the champion on the challenger's split
        start_rows = [r for r in RunFolder(output).read_metrics() if r.get("step") == 0 and "val_loss" in r]
        champion_loss = start_rows[0]["val_loss"] if start_rows else None
        return result.run_dir, (champion_loss, result.best_val_loss, True)
    return result.run_dir, (RunFolder(c.champion_run).manifest().best_val_loss, result.best_val_loss, False)


def _champion_config(champion_run: Path) -> dict[str, Any]:
    """The champion run's training config as it wrote it (config.yaml)."""
    from sdloop.configfile import load_config_file
    from sdloop.runfolder import RunFolder

    return load_config_file(RunFolder(champion_run).config)


def _prompts(c: _Ctx, data_dir: Path) -> list[str]:
    """The fixed prompt set: ``gate_prompts``, else the champion's validation captions, else the first captions of
    the retraining data (a champion trained without a validation split)."""
    from finetune.evaluation.inputs import default_prompts
    from sdloop.runfolder import RunFolder

    if c.cfg.gate_prompts:
        return list(c.cfg.gate_prompts)
    try:
        return default_prompts(RunFolder(c.champion_run))
    except UserError:
        listed = data_dir / "metadata.jsonl"
        listed = listed if listed.is_file() else data_dir / "preferences.jsonl"  # a kto/dpo retraining's data
        rows = [json.loads(line) for line in listed.read_text(encoding="utf-8").splitlines() if line.strip()]
        return list(dict.fromkeys(r.get("text") or r.get("prompt") for r in rows
                                  if r.get("text") or r.get("prompt")))[:8]


def gate_reference(data: dict[str, Any], challenger_run: Path) -> dict[str, Any]:
    """The images KID compares against: the held-out generations, when there are at least two and none of them is
    (byte for byte) an image the challenger's trainer saw; else the retraining data itself, with ``not_held_out``
    saying why KID then does not count (the challenger trained on that reference)."""
    import hashlib

    from finetune.data.check import DataReport, DatasetError
    from sdloop.runfolder import RunFolder

    gate = data.get("gate_dir")
    files = sorted(p for p in Path(gate).iterdir() if p.is_file()) if gate and Path(gate).is_dir() else []
    hashes = {hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    try:  # what the trainer saw, byte for byte (the held-out folder is apart by construction; this checks it)
        trained = {it.sha256 for it in DataReport.load(RunFolder(challenger_run).data_report).items}
    except DatasetError:
        trained = set()
    overlap = len(hashes & trained)
    out = {"dir": str(gate) if gate else None, "images": len(files), "overlap_with_training": overlap,
           "hashes": sorted(hashes), "not_held_out": None}
    if len(files) < 2:
        out.update(dir=str(data["dir"]), not_held_out=(
            f"fewer than 2 well-rated generations held out for the gate ({len(files)}; gate_holdout_share holds out "
            "a share once 4 or more are kept), so KID was measured against the challenger's own training data"))
    elif overlap:
        out.update(dir=str(data["dir"]), not_held_out=(
            f"{overlap} held-out image(s) are also in the challenger's training data, so KID was measured against "
            "the retraining data instead"))
    return out


def _compare(c: _Ctx, run_dir: Path, data_dir: Path, reference: dict[str, Any]) -> Any:
    from finetune.evaluation.evaluate import compare_runs

    prompts = _prompts(c, data_dir)
    against = (f"the {reference['images']} held-out rated generations" if not reference["not_held_out"]
               else "the retraining data (KID not counted: no held-out reference)")
    c.say(f"[3/6] compare: champion against challenger, {c.cfg.gate_images} images each on {len(prompts)} fixed "
          f"prompts and seeds, KID against {against}")
    comparison = compare_runs(c.champion_run, run_dir, prompts=prompts, n=c.cfg.gate_images, seed=c.cfg.gate_seed,
                              reference=reference["dir"], steps=c.cfg.gate_steps, progress=c.progress)
    for line in comparison.lines():
        c.say(f"      {line}")
    return comparison


def _export(c: _Ctx, run_dir: Path) -> Path:
    from export.build import ExportConfig, build_export
    from sdloop.workspace import exports_dir

    c.say("[4/6] export: fuse, ONNX, parity")
    result = build_export(run_dir, exports_dir() / f"retrain-{c.rid}", ExportConfig.from_dict(c.cfg.export_settings),
                          progress=c.progress)
    c.say("[5/6] publish: a candidate version in the model store")
    return Path(result.export_dir)
