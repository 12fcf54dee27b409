"""The gate a challenger must pass to replace the champion: pure functions from measured figures to a verdict.

Two halves, because they are known at different times: the quality half (KID from the evaluation stage's paired
comparison, and the validation loss) right after the comparison, so a worse challenger is rejected before an export
is spent on it; the export half (parity, latency) after the export, latency as measured in back-to-back pairs
(``monitor.gate_latency``: a difference inside the noise is no difference). A check whose figures are missing is
reported as skipped, never silently passed as a number it does not have; a failed check names both figures and the
margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from monitor.config import MonitorConfig


@dataclass(frozen=True)
class GateCheck:
    """One check: ``passed`` True, False, or None (skipped, with the reason in ``text``)."""

    name: str
    passed: Optional[bool]
    text: str
    values: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GateResult:
    checks: tuple[GateCheck, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed is not False for c in self.checks)

    @property
    def reasons(self) -> list[str]:
        """The failed checks' lines (empty when it passed)."""
        return [c.text for c in self.checks if c.passed is False]

    def lines(self) -> list[str]:
        mark = {True: "pass", False: "FAIL", None: "skip"}
        return [f"{mark[c.passed]:4s} {c.name}: {c.text}" for c in self.checks]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "checks": [c.__dict__ for c in self.checks]}


def _num(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) else None


def kid_check(champion_kid: Optional[float], challenger_kid: Optional[float], cfg: MonitorConfig,
              not_held_out: Optional[str] = None, difference: Optional[dict[str, Any]] = None) -> GateCheck:
    """KID (lower is better) of both on the same prompts, seeds and reference: not worse beyond ``kid_margin``.

    The reference must be images the challenger did not train on (the held-out rated generations): KID against its
    own training data rewards a challenger for copying that data, whoever put it there. ``not_held_out`` says why the
    reference was not held out; the check is then skipped with that reason, never passed.

    ``difference``: the comparison's paired challenger-minus-champion difference with its 95% interval. A held-out
    reference is small (a share of the well-rated generations), so a difference beyond the margin fails only when
    its interval excludes 0: worse beyond noise. Without an interval the point estimates decide."""
    a, b = _num(champion_kid), _num(challenger_kid)
    if not_held_out:
        return GateCheck("kid", None, f"KID not counted: {not_held_out}",
                         {"champion": a, "challenger": b, "held_out": False})
    if a is None or b is None:
        return GateCheck("kid", None, "KID was not computed for both models (see the comparison report)")
    low = _num((difference or {}).get("low"))
    beyond = b > a + cfg.kid_margin
    noise = beyond and low is not None and low <= 0
    ok = not beyond or noise
    m = f"{cfg.kid_margin:g}"
    verb = (f"worse than the margin {m} but within noise (the difference's 95% interval includes 0)" if noise else
            f"within the margin {m}" if ok else
            f"worse than the margin {m}" + (" beyond noise" if low is not None else ""))
    return GateCheck("kid", ok, f"challenger KID {b:.4f} vs champion {a:.4f} on held-out images: {verb}",
                     {"champion": a, "challenger": b, "margin": cfg.kid_margin, "difference_low": low,
                      "held_out": True})


def val_loss_check(champion_loss: Optional[float], challenger_loss: Optional[float], cfg: MonitorConfig,
                   same_split: bool) -> GateCheck:
    """The challenger's best validation loss against the champion's, not worse beyond ``val_loss_margin``.

    ``same_split``: both were measured on the challenger's validation split (the champion's weights at step 0 of a
    run that starts from them), the fair comparison; otherwise each on its own split, said in the line."""
    a, b = _num(champion_loss), _num(challenger_loss)
    if a is None or b is None:
        return GateCheck("val_loss", None, "no validation loss for both models (a run without a validation split)")
    ok = b <= a + cfg.val_loss_margin
    where = "on the same validation split" if same_split else "each on its own validation split"
    verb = "within" if ok else "worse than"
    return GateCheck("val_loss", ok, f"challenger validation loss {b:.4f} vs champion {a:.4f} {where}: {verb} the "
                                     f"margin {cfg.val_loss_margin:g}",
                     {"champion": a, "challenger": b, "margin": cfg.val_loss_margin, "same_split": same_split})


def parity_failed(message: str) -> GateResult:
    """The export stage refused the export because it does not match PyTorch: a rejection, with its figures."""
    return GateResult((GateCheck("parity", False, f"the ONNX export does not draw what the trained model draws: "
                                                  f"{message}"),))


def parity_check(challenger_md: dict[str, Any]) -> GateCheck:
    parity = challenger_md.get("parity") or {}
    if parity.get("passed") is True:
        return GateCheck("parity", True, "the ONNX export matches PyTorch (parity check passed)", parity)
    return GateCheck("parity", False, "the export's parity check did not pass; the ONNX model does not draw what "
                                      "the trained one draws", parity)


def latency_check(champion_md: dict[str, Any], challenger_md: dict[str, Any], cfg: MonitorConfig,
                  paired: Optional[dict[str, Any]] = None) -> GateCheck:
    """Seconds per image of the exported pipeline: not slower than the champion's times ``1 + latency_margin`` (or
    than ``latency_budget_s`` when it is set), beyond the measured noise.

    ``paired``: ``monitor.gate_latency.PairedLatency.to_dict()``, both exports timed here in back-to-back pairs.
    Then the 95% intervals decide: the check fails only when the whole interval is over the limit (slower beyond
    noise), and a ratio whose interval includes 1 is reported as no latency difference, whichever way its point
    estimate leans. Without it (the champion could not be loaded) only the figures each export recorded are left,
    timed apart under unknown load: their point estimates decide, and the line says they are unpaired."""
    if paired and paired.get("paired"):
        return _paired_latency_check(paired, cfg)
    b = _num((challenger_md.get("latency") or {}).get("export_s"))
    if b is None:
        return GateCheck("latency", None, "the challenger's export recorded no latency")
    if cfg.latency_budget_s > 0:
        budget, why = cfg.latency_budget_s, "the budget latency_budget_s"
    else:
        a = _num((champion_md.get("latency") or {}).get("export_s"))
        if a is None:
            return GateCheck("latency", None, "the champion's export recorded no latency and latency_budget_s is 0")
        budget, why = a * (1 + cfg.latency_margin), f"the champion's {a:.3f} s x {1 + cfg.latency_margin:g}"
    ok = b <= budget
    return GateCheck("latency", ok, f"challenger {b:.3f} s/image {'within' if ok else 'over'} {budget:.3f} s "
                                    f"({why}; unpaired figures the exports recorded, timed apart: noise unknown)",
                     {"challenger": b, "budget": budget, "paired": False})


def _paired_latency_check(m: dict[str, Any], cfg: MonitorConfig) -> GateCheck:
    n = m.get("repeats")
    how = f"{n} paired runs at {m.get('size')} px, {m.get('steps')} steps"
    values = {k: m.get(k) for k in ("ratio", "ratio_low", "ratio_high", "challenger", "challenger_low",
                                    "challenger_high", "champion", "repeats", "champion_s", "challenger_s")}
    if cfg.latency_budget_s > 0:
        budget = cfg.latency_budget_s
        c, low, high = m["challenger"], m["challenger_low"], m["challenger_high"]
        ok = not low > budget
        verb = ("within" if high <= budget else "within noise of (its interval includes)" if ok
                else "over, beyond noise,")
        return GateCheck("latency", ok, f"challenger {c:.3f} s/image (95% {low:.3f}-{high:.3f} s, {how}) {verb} the "
                                        f"budget latency_budget_s {budget:.3f} s",
                         {**values, "budget": budget, "paired": True})
    limit = 1 + cfg.latency_margin
    r, low, high = m["ratio"], m["ratio_low"], m["ratio_high"]
    ok = not low > limit
    if high < 1:
        verb = "faster than the champion beyond noise"
    elif low <= 1:
        verb = "no latency difference (the interval includes 1)"
    elif ok:
        verb = f"slower than the champion beyond noise, not beyond x{limit:g} (latency_margin)"
    else:
        verb = f"slower than the champion x{limit:g} (latency_margin) beyond noise"
    return GateCheck("latency", ok, f"challenger/champion time {r:.2f}x (95% {low:.2f}-{high:.2f}x, {how}): {verb}",
                     {**values, "limit": limit, "paired": True})


def quality_gate(comparison: dict[str, Any], val: tuple[Optional[float], Optional[float], bool],
                 cfg: MonitorConfig, not_held_out: Optional[str] = None) -> GateResult:
    """The half known after the comparison: KID from ``compare_runs``' eval.json data (models a = champion, b =
    challenger) and ``val`` = (champion loss, challenger loss, same split). ``not_held_out``: why the comparison's
    reference is not held-out data (KID is then skipped; see ``kid_check``)."""
    kid = (comparison.get("metrics") or {}).get("kid") or {}
    values = kid.get("values") or {} if kid.get("computed") else {}
    a = (values.get("a") or {}).get("value")
    b = (values.get("b") or {}).get("value")
    checks = (kid_check(a, b, cfg, not_held_out, kid.get("difference")), val_loss_check(val[0], val[1], cfg, val[2]))
    if all(c.passed is None for c in checks):  # no evidence the challenger is not worse: it does not replace anyone
        checks += (GateCheck("evidence", False, "neither KID nor a validation loss could be compared; raise "
                                                "gate_images (KID needs a dozen images or more) or train with a "
                                                "validation split"),)
    return GateResult(checks)


def export_gate(champion_md: dict[str, Any], challenger_md: dict[str, Any], cfg: MonitorConfig,
                paired: Optional[dict[str, Any]] = None) -> GateResult:
    """The half known after the export: parity from the challenger's metadata, latency from both exports timed in
    pairs (``paired``, see ``monitor.gate_latency``), else from the figures their exports recorded."""
    return GateResult((parity_check(challenger_md), latency_check(champion_md, challenger_md, cfg, paired)))
