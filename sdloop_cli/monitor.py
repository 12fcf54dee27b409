"""`sdloop monitor report|check`, `sdloop scheduler start|status`, `sdloop retrain [history]`: the loop's commands.

Part of the command line (``sdloop_cli.main`` assembles the parser): it parses and calls the monitor stage; the stage's
``UserError`` becomes one line in ``sdloop_cli.main.main``. Settings come from ``$SDLOOP_HOME/monitor.yaml`` (or
``--config FILE``) and ``--set key=value`` (``sdloop monitor check --help-config`` lists every key).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
from typing import Any, Optional

from sdloop.errors import UserError


def _config(args: argparse.Namespace) -> Any:
    """The monitor settings in force: the file, then ``--set`` (read by ``sdloop.overrides``, like every command's)."""
    from monitor.config import MonitorConfig

    return MonitorConfig.load(args.config, sets=args.set or [])


def parse_when(text: Optional[str], flag: str, now: dt.datetime) -> Optional[dt.datetime]:
    """``2026-11-28``, ``2026-11-28T12:00`` (UTC unless it says otherwise) or ``36h`` / ``7d`` / ``90m`` ago."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([mhd])\s*", text)
    if m:
        unit = {"m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        try:
            return now - dt.timedelta(**{unit: float(m.group(1))})
        except (OverflowError, ValueError):
            raise UserError(f"{flag} {text!r} reaches before year 1; give a shorter age or a date.") from None
    from monitor.windows import parse_time

    try:
        return parse_time(text, flag)
    except UserError:
        raise UserError(f"{flag} {text!r} is not a time: write an ISO date or time (2026-11-28, 2026-11-28T12:00Z; "
                        "UTC unless it says otherwise) or an age like 36h, 7d or 90m.") from None


def _windows(args: argparse.Namespace) -> dict[str, Any]:
    now = dt.datetime.now(dt.timezone.utc)
    since, until = parse_when(args.since, "--since", now), parse_when(args.until, "--until", now)
    if since and until and since >= until:
        raise UserError(f"--since ({since:%Y-%m-%d %H:%M}) must be before --until ({until:%Y-%m-%d %H:%M}).")
    reference = None
    if args.reference:
        a, sep, b = args.reference.partition("..")
        if not sep:
            raise UserError(f"--reference {args.reference!r} must look like SINCE..UNTIL, e.g. 14d..7d or "
                            "2026-11-01..2026-11-08.")
        from monitor.windows import explicit_window

        reference = explicit_window(parse_when(a, "--reference", now), parse_when(b, "--reference", now))
    out = {"since": since, "until": until, "reference": reference, "now": now}
    if getattr(args, "output", None):
        from pathlib import Path

        out["out_dir"] = Path(args.output).expanduser()
    return out


def _help_config(args: argparse.Namespace) -> bool:
    if getattr(args, "help_config", False):
        from monitor.config import MonitorConfig
        from sdloop.overrides import config_help

        print(config_help(MonitorConfig))
        return True
    return False


def cmd_monitor_report(args: argparse.Namespace) -> int:
    from monitor.report import build_report
    from monitor.store import open_store

    if _help_config(args):
        return 0
    from monitor.report_files import prune_reports

    cfg, w = _config(args), _windows(args)
    report = build_report(open_store(), cfg, **w)
    if "out_dir" not in w:
        prune_reports(cfg.keep_reports)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        for line in report.lines():
            print(line)
    return 0


def cmd_monitor_check(args: argparse.Namespace) -> int:
    from monitor.check import run_check

    if _help_config(args):
        return 0
    cfg, w = _config(args), _windows(args)
    result = run_check(cfg, **w)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        for line in result.lines():
            print(line)
    if result.decision.retrain and args.pull_forward:
        from monitor.scheduler import pull_forward_retrain

        when = pull_forward_retrain()
        print(f"the scheduler's retraining job is now due at {when:%Y-%m-%d %H:%M:%S %Z} (a running scheduler "
              "starts it within 30 s, a stopped one when it starts)" if when else "no scheduler job is stored yet: "
              "start one with `sdloop scheduler start`, or run `sdloop retrain` now")
    return 1 if result.decision.retrain else 0


def cmd_scheduler_start(args: argparse.Namespace) -> int:
    from monitor.scheduler import run_scheduler

    if _help_config(args):
        return 0
    return run_scheduler(_config(args)) or 0


def cmd_scheduler_status(args: argparse.Namespace) -> int:
    from monitor.scheduler import format_status, scheduler_status

    rows = scheduler_status(_config(args))
    print(json.dumps(rows, indent=2, default=str) if args.json else format_status(rows))
    return 0


def _settings(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a YAML file of monitor settings (default: $SDLOOP_HOME/monitor.yaml if present)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any monitor setting, e.g. --set min_feedback=20 --set train_overrides.max_steps=50")
    p.add_argument("--help-config", action="store_true", help="list every monitor setting with its default and help")


def _window_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", help="start of the current window (ISO time, UTC, or an age: 24h, 7d; default: "
                   "current_hours ago)")
    p.add_argument("--until", help="end of the current window (default: now)")
    p.add_argument("--reference", metavar="SINCE..UNTIL", help="the reference window (default: the one frozen when "
                   "the champion was promoted), e.g. 14d..7d")
    p.add_argument("--output", help="folder for report.html/report.json (default $SDLOOP_HOME/monitor/reports/TIME)")
    p.add_argument("--json", action="store_true", help="print JSON")


def add_parsers(sub: Any, parser: argparse.ArgumentParser) -> None:
    """Add this module's commands to the top-level subparsers."""
    p_mon = sub.add_parser("monitor", help="Evidently reports on generations and feedback; a retraining verdict")
    msub = p_mon.add_subparsers(dest="monitor_command", metavar="ACTION")
    p = msub.add_parser("report", help="drift of prompts and images, feedback, volume, latency, errors: HTML + JSON")
    _window_flags(p)
    _settings(p)
    p.set_defaults(func=cmd_monitor_report)
    p = msub.add_parser("check", help="print a verdict with its reasons; exit 0 healthy, 1 retraining recommended")
    _window_flags(p)
    _settings(p)
    p.add_argument("--pull-forward", action="store_true",
                   help="on a retrain verdict, move the scheduler's retraining job to now")
    p.set_defaults(func=cmd_monitor_check)

    p_sched = sub.add_parser("scheduler", help="the one process that monitors and retrains on a schedule")
    ssub = p_sched.add_subparsers(dest="scheduler_command", metavar="ACTION")
    p = ssub.add_parser("start", help="run the scheduler in the foreground (jobs persist in its own "
                        "database, $SDLOOP_SCHEDULER_URL or $SDLOOP_HOME/scheduler.db)")
    _settings(p)
    p.set_defaults(func=cmd_scheduler_start)
    p = ssub.add_parser("status", help="the jobs, their last result and next run, and whether a scheduler runs")
    _settings(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_scheduler_status)

    for name, group in (("monitor", p_mon), ("scheduler", p_sched)):
        group.set_defaults(group_parsers={name: group})
