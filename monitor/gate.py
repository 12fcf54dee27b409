"""The gate a challenger must pass to replace the champion: pure functions from measured figures to a verdict.

Two halves, because they are known at different times: the quality half (KID from the evaluation stage's paired
comparison, and the validation loss) right after the comparison, so a worse challenger is rejected before an export
is spent on it; the export half (parity, latency) after the export. A check whose figures are missing is reported
as skipped, never silently passed as a number it does not have; a failed check names both figures and the margin.
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


def latency_check(champion_md: dict[str, Any], challenger_md: dict[str, Any], cfg: MonitorConfig) -> GateCheck:
    """Seconds per image of the exported pipeline, both measured by the export stage on the machine that exported.
    Budget: ``latency_budget_s``, or the champion's times ``1 + latency_margin``."""
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
                                    f"({why})", {"challenger": b, "budget": budget})


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


def export_gate(champion_md: dict[str, Any], challenger_md: dict[str, Any], cfg: MonitorConfig) -> GateResult:
    """The half known after the export: parity and latency from both versions' metadata in the model store."""
    return GateResult((parity_check(challenger_md), latency_check(champion_md, challenger_md, cfg)))
