"""`sdloop retrain [run]` and `sdloop retrain history`: one retraining now, or the retraining log.

Part of the command line (``sdloop_cli.main`` assembles the parser): it parses and calls the stage; the stage's
``UserError`` becomes one line in ``sdloop_cli.main.main``. A retraining asked for by hand first says, in one line,
the verdict `sdloop monitor check` gives now and that it runs anyway (``--respect-policy``: only on RETRAIN).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from sdloop.errors import UserError
from sdloop_cli.monitor import _config, _help_config, _settings


def cmd_retrain(args: argparse.Namespace) -> int:
    from monitor.retrain import retrain
    from monitor.retrain_policy import current_verdict, override_line

    if _help_config(args):
        return 0
    if args.action == "history":  # `sdloop retrain history` reaches cmd_retrain_history through main; kept for API
        return cmd_retrain_history(args)
    if getattr(args, "objective", None):  # the same as --set objective=..., after the file's and the --set values
        args.set = list(args.set or []) + [f"objective={args.objective}"]
    cfg = _config(args)
    verdict = current_verdict(cfg)
    print(override_line(verdict, args.respect_policy), flush=True)
    if args.respect_policy and not verdict.retrain:
        return 0
    outcome = retrain(cfg, trigger="manual", progress=not args.quiet)
    for line in outcome.lines():
        print(line)
    return 0 if outcome.status in ("promoted", "rejected") else 1


def cmd_retrain_history(args: argparse.Namespace) -> int:
    from monitor.retrain_log import RetrainLog, format_history
    from monitor.store import open_store

    limit = getattr(args, "limit", 20)
    if limit < 1:
        raise UserError(f"--limit {limit} must be at least 1.")
    rows = RetrainLog(open_store()).history(limit=limit)
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2, default=str))
    else:
        print(format_history(rows))
    return 0


def history_parser() -> argparse.ArgumentParser:
    """`sdloop retrain history`'s own parser, so its --help shows its own usage (``sdloop_cli.main`` routes to it)."""
    p = argparse.ArgumentParser(prog="sdloop retrain history",
                                description="the newest retrainings: trigger, outcome, champion, challenger, why")
    p.add_argument("--limit", type=int, default=20, help="the newest N retrainings (default 20)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_retrain_history)
    return p


def add_parsers(sub: Any, parser: argparse.ArgumentParser) -> None:
    """Add this module's commands to the top-level subparsers."""
    p = sub.add_parser("retrain", help="train a challenger on new evidence, compare, export, gate, promote or reject",
                       description="One retraining now: train a challenger on the new evidence, compare it with the "
                       "champion, export, gate, promote or reject. It first says what `sdloop monitor check` says "
                       "now, and runs anyway unless --respect-policy. `sdloop retrain history --help`: the log.")
    p.add_argument("action", nargs="?", choices=("run", "history"), default="run",
                   help="run (default) one retraining now, or show the retraining history (see `sdloop retrain "
                   "history --help`)")
    p.add_argument("--respect-policy", dest="respect_policy", action="store_true",
                   help="retrain only when `sdloop monitor check` says RETRAIN (default: run anyway, saying which "
                   "verdict it overrides)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--objective", choices=("sft", "kto", "dpo"),
                   help="what the challenger learns (default: the objective setting, sft): sft the well-rated "
                   "generations, kto the thumbs and ratings (desirable or not), dpo the two-candidate choices and "
                   "review votes; kto and dpo train against the champion as the frozen reference")
    _settings(p)
    p.set_defaults(func=cmd_retrain, limit=20, json=False)
