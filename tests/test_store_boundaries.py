"""What the monitoring store keeps to itself: its queries (only ``monitor/store*.py`` touch its tables, SQLAlchemy or
its private helpers) and its files (0600 whatever the umask: they hold prompts, comments and client ids).

The boundary is checked on the source (AST), like tests/test_spine.py checks the layers; the file modes on a real
sqlite store created under umask 022.
"""

from __future__ import annotations

import ast
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from monitor.store import Store
from monitor.store_schema import metadata

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("monitor", "bento", "sdloop", "sdloop_cli", "export", "finetune", "benchmarks")
DRIVERS = {"sqlalchemy", "sqlite3", "psycopg", "psycopg2"}
# Modules outside monitor/store*.py that may import a database driver, each for a database of its own:
ALLOWED_DRIVERS = {
    # the scheduler's own database: APScheduler's SQLAlchemy job store and the plain rows describing its jobs
    "monitor/scheduler_db.py": {"sqlalchemy"},
    # Optuna's study database (its storage errors), not the monitoring store
    "finetune/training/tune.py": {"sqlalchemy"},
    # the review page's own votes database
    "finetune/evaluation/review.py": {"sqlite3"},
}
TABLES = set(metadata.tables) | {"schema_version"}
PRIVATE_NAMES = TABLES | {"metadata"}
SQL_ON_TABLES = re.compile(r"\b(from|into|update|join|table)\s+\"?(" + "|".join(sorted(TABLES)) + r")\b", re.I)


def _modules() -> Iterator[tuple[str, ast.AST]]:
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if re.fullmatch(r"monitor/store(_\w+)?\.py", rel):
                continue
            yield rel, ast.parse(path.read_text(encoding="utf-8"), filename=rel)


def _names_store(node: ast.AST) -> bool:
    """``store``, ``self.store``, ``self._store``, ``monitoring_store``: something holding a Store."""
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return name.lower().lstrip("_").endswith("store")


def _problems(rel: str, tree: ast.AST) -> list[str]:
    """Every way module ``rel`` reaches past Store into the monitoring database, one line each."""
    problems: list[str] = []
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for module in modules:
                top = module.split(".")[0]
                if top in DRIVERS and top not in ALLOWED_DRIVERS.get(rel, set()):
                    problems.append(f"{where} imports {module}: move the query into monitor/store.py")
                if re.fullmatch(r"monitor\.store_\w+", module):
                    problems.append(f"{where} imports {module}: the store's helpers are reached through Store")
                if top in ("pickle", "dill"):
                    problems.append(f"{where} imports {module}: nothing outside APScheduler unpickles")
            if isinstance(node, ast.ImportFrom) and node.module == "monitor.store":
                bad = [a.name for a in node.names if a.name in PRIVATE_NAMES or a.name.startswith("_")]
                if bad:
                    problems.append(f"{where} imports {bad} from monitor.store: use Store's named methods")
        elif isinstance(node, ast.Attribute) and _names_store(node.value):
            if node.attr in ("engine", "dialect") or node.attr.startswith("_"):
                problems.append(f"{where} reaches into the store ({ast.unparse(node)}): add a Store method")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL_ON_TABLES.search(node.value):
            problems.append(f"{where} has SQL on the store's tables: {node.value[:60]!r}")
    return problems


def test_only_the_store_modules_query_the_monitoring_store() -> None:
    problems = [p for rel, tree in _modules() for p in _problems(rel, tree)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("source,expected", [
    ("import sqlalchemy as sa", "imports sqlalchemy"),
    ("from sqlite3 import connect", "imports sqlite3"),
    ("from monitor.store import Store, generations", "['generations'] from monitor.store"),
    ("from monitor.store import _utc", "['_utc'] from monitor.store"),
    ("from monitor.store_schema import job_runs", "the store's helpers"),
    ("def f(store):\n    return store.engine.begin()", "(store.engine)"),
    ("def f(self):\n    return self.store._row", "(self.store._row)"),
    ("Q = 'SELECT count(*) FROM feedback'", "SQL on the store's tables"),
    ("import pickle", "imports pickle"),
])
def test_the_boundary_check_catches_what_it_forbids(source: str, expected: str) -> None:
    """The check is only as good as what it finds: each forbidden form, planted in a module, is reported."""
    assert expected in "\n".join(_problems("monitor/planted.py", ast.parse(source)))
    assert not _problems("monitor/planted.py", ast.parse("from monitor.store import Store, open_store"))


# -- file modes -------------------------------------------------------------------------------------------------------

@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_sqlite_store_and_its_wal_files_are_0600(tmp_path: Path, umask_022: None) -> None:
    db = tmp_path / "ws" / "monitor.db"
    store = Store(f"sqlite:///{db}")
    store.log_generation(prompt="a private prompt", negative_prompt="", params={}, model_version="v", latency_s=0.1,
                         descriptors={})
    assert {p.name for p in db.parent.iterdir()} >= {"monitor.db", "monitor.db-wal", "monitor.db-shm"}
    assert {p.name: _mode(p) for p in db.parent.iterdir()} == {
        "monitor.db": 0o600, "monitor.db-wal": 0o600, "monitor.db-shm": 0o600}
    assert _mode(db.parent) == 0o755  # the folder keeps honouring the umask
    store.close()


def test_a_world_readable_store_is_tightened_when_opened(tmp_path: Path, umask_022: None) -> None:
    """As an older sdloop left it: monitor.db and its -wal 0644. Opening the store chmods them to 0600."""
    db = tmp_path / "monitor.db"
    Store(f"sqlite:///{db}").close()
    wal = tmp_path / "monitor.db-wal"
    wal.touch()
    for p in (db, wal):
        os.chmod(p, 0o644)
    store = Store(f"sqlite:///{db}")
    assert _mode(db) == 0o600 and _mode(wal) == 0o600
    store.close()


def test_the_scheduler_database_is_0600(workspace: Path, umask_022: None) -> None:
    from monitor.config import MonitorConfig
    from monitor.scheduler import _store_scheduler, ensure_jobs

    with _store_scheduler() as s:
        ensure_jobs(s, MonitorConfig.from_dict({}))
    assert _mode(workspace / "scheduler.db") == 0o600
    assert all(_mode(p) == 0o600 for p in workspace.glob("scheduler.db*"))


def test_opening_the_store_again_in_a_process_keeps_its_locks(tmp_path: Path) -> None:
    """Closing any descriptor of an sqlite file drops the POSIX locks the process holds on it. If opening a second
    Store on the same file did that (say, to chmod it), another process closing its connection would believe it was
    the last one, delete the WAL, and this process would never see later commits: the file mode is set by path."""
    url = f"sqlite:///{tmp_path / 'monitor.db'}"
    first = Store(url)
    first.count("generations")  # a connection of this process holds the file open
    Store(url).close()  # a second engine on the same file in this process
    script = ("import sys; from monitor.store import Store; s = Store(sys.argv[1]); "
              "s.log_generation(prompt=sys.argv[2], negative_prompt='', params={}, model_version='v', latency_s=0.1, "
              "descriptors={}); s.close()")
    for prompt in ("one", "two"):
        subprocess.run([sys.executable, "-c", script, url, prompt], cwd=ROOT, check=True, timeout=120)
    assert sorted(r["prompt"] for r in first.generations()) == ["one", "two"]
    first.close()


def test_the_service_is_never_given_the_scheduler_database() -> None:
    """The service's code never names the scheduler's database, its setting or its module: a serving replica holds
    write access to the monitoring store only, and the job store (which holds pickles) is out of its reach."""
    found = []
    for path in sorted((ROOT / "bento").rglob("*.py")) + [ROOT / "bentofile.yaml"]:
        text = path.read_text(encoding="utf-8")
        found += [f"{path.relative_to(ROOT)}: {w}" for w in ("SDLOOP_SCHEDULER_URL", "scheduler_url", "scheduler_db",
                                                            "monitor.scheduler", "scheduler.db") if w in text]
    assert not found, found
