"""The files of a monitoring report: the folder it goes to, report.html / report.json / summary.json, the Evidently
workspace run, and pruning old report folders. Kept apart from the tests in monitor/report.py; only folders sdloop
wrote are ever replaced or deleted (a summary.json of ours says so)."""

from __future__ import annotations

import datetime as dt
import html as html_lib
import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from monitor.windows import iso
from sdloop.atomic import atomic_dir, check_writable_dir, write_json_atomic, write_text_atomic
from sdloop.errors import UserError

if TYPE_CHECKING:
    from monitor.report import MonitorReport

PROJECT = "sdloop"
FOLDER_NAME = re.compile(r"\d{8}T\d{6}Z(-\d+)?")


def is_report_folder(path: Path) -> bool:
    """Whether ``path`` holds a summary.json that sdloop wrote."""
    try:
        return {"current", "tests", "status"} <= set(json.loads((path / "summary.json").read_text("utf-8")))
    except (OSError, ValueError, TypeError):
        return False


def prune_reports(keep: int) -> list[Path]:
    """Delete the oldest report folders under monitor_dir()/reports beyond ``keep``: only folders whose name and
    summary.json say sdloop wrote them. Returns what went."""
    from sdloop.workspace import monitor_dir

    root = monitor_dir() / "reports"
    if not root.is_dir():
        return []
    ours = [f for f in sorted(root.iterdir()) if FOLDER_NAME.fullmatch(f.name) and f.is_dir() and is_report_folder(f)]
    doomed = ours[:-keep] if len(ours) > keep else []
    for folder in doomed:
        shutil.rmtree(folder, ignore_errors=True)
    return doomed


def add_to_workspace(snapshot: Any, name: Optional[str] = None, path: Optional[Path] = None) -> str:
    """Add ``snapshot`` (as run ``name``) to the Evidently workspace (project "sdloop", created once, with a dashboard
    of the verdict's tests over time); return the run id. ``evidently ui --workspace <monitor_dir()/evidently>``
    lists these runs and plots them."""
    from evidently.ui.workspace import Workspace

    from monitor.dashboard import ensure_dashboard
    from sdloop.workspace import monitor_dir

    path = Path(path) if path is not None else monitor_dir() / "evidently"
    try:
        path.mkdir(parents=True, exist_ok=True)
        ws = Workspace.create(str(path))
        found = ws.search_project(PROJECT)
        project = found[0] if found else ws.create_project(
            PROJECT, description="sdloop monitoring: current window against the champion's reference")
        ensure_dashboard(project)  # the UI's dashboard: the verdict's tests over time (monitor/dashboard.py)
        return str(ws.add_run(project.id, snapshot, name=name).id)
    except OSError as e:
        raise UserError(f"cannot write the Evidently workspace {path}: {e.strerror or e}; check the folder's "
                        "permissions and free space.") from None


def summary_html(rep: "MonitorReport") -> str:
    """Our verdict table, put above Evidently's widgets: a person sees the verdict before the charts."""
    colour = {"pass": "#1b7f3b", "fail": "#b3261e", "not_enough_data": "#8a6d00"}
    verdict = {"pass": "healthy: every test passed", "fail": "problems found",
               "not_enough_data": "not enough data for a verdict"}[rep.status]
    ref = (f"{iso(rep.reference.since)} .. {iso(rep.reference.until)} ({html_lib.escape(rep.reference.how)})"
           if rep.reference else "none yet")
    rows = "".join(
        f"<tr><td>{t.group}</td><td>{html_lib.escape(t.name)}</td>"
        f"<td style='color:{colour[t.status]};font-weight:bold'>{t.status}</td>"
        f"<td>{html_lib.escape(t.text)}</td></tr>" for t in rep.tests if t.decisive)
    counts = ", ".join(f"{w}: " + ", ".join(f"{v} {k}" for k, v in c.items()) for w, c in rep.counts.items())
    return (f"<div id='sdloop-summary' style='font-family:sans-serif;margin:16px 24px;padding:12px 16px;"
            f"border:2px solid {colour[rep.status]};border-radius:8px;background:#fff'>"
            f"<h2 style='margin:0 0 8px;color:{colour[rep.status]}'>sdloop monitor: {verdict}</h2>"
            f"<div>current window: {iso(rep.current.since)} .. {iso(rep.current.until)} "
            f"({html_lib.escape(rep.current.how)})</div><div>reference window: {ref}</div>"
            f"<div style='color:#555'>{html_lib.escape(counts)}</div>"
            f"<table style='border-collapse:collapse;margin-top:8px' cellpadding='4' border='1'>"
            f"<tr><th>group</th><th>test</th><th>status</th><th>detail</th></tr>{rows}</table></div>")


def out_dir_for(out_dir: Optional[Path], created: dt.datetime) -> tuple[Path, bool]:
    """Where the files go, and whether it is a new folder of ours (written as a whole, atomically)."""
    if out_dir is not None:
        path = check_writable_dir(Path(out_dir), "report folder")
        if not is_report_folder(path) and any(path.iterdir()):  # never write into a folder of the user's
            raise UserError(f"{path} is not empty and is not an sdloop report folder; choose a new or empty "
                            "--output folder (or leave it out for a new one under the workspace).")
        return path, False
    from sdloop.workspace import monitor_dir

    base = monitor_dir() / "reports" / created.strftime("%Y%m%dT%H%M%SZ")
    check_writable_dir(base.parent, "report folder")
    path, n = base, 1
    while True:  # claim the name (mkdir is atomic): two reports in one second never pick the same folder
        try:
            path.mkdir()
            return path, True  # the finished folder replaces this empty one in one rename
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")


def write_files(rep: "MonitorReport", snapshot: Any, target: Path, fresh: bool) -> None:
    """report.html (our summary above Evidently's page), Evidently's report.json and our summary.json; a fresh folder
    of ours is written whole and renamed into place."""
    summary = summary_html(rep)
    if snapshot is not None:
        page = snapshot.get_html_str(as_iframe=False)
        page = page.replace("<body>", "<body>" + summary, 1) if "<body>" in page else summary + page
        evidently_json = snapshot.json()
    else:
        page = f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>sdloop monitor</title></head><body>" \
               f"{summary}</body></html>"
        evidently_json = json.dumps({"metrics": [], "tests": [],
                                     "note": "no generations in the current window: nothing for Evidently"})

    def put(folder: Path) -> None:
        write_text_atomic(folder / "report.html", page)
        write_text_atomic(folder / "report.json", evidently_json)
        write_json_atomic(folder / "summary.json", rep.to_dict())

    if fresh:
        with atomic_dir(target, replace=False) as tmp:
            put(tmp)
    else:
        put(target)
