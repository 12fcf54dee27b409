"""The README is executed: every command of every ```bash block runs as written, in order, in a fresh copy of the
repository, as a new user follows it from the first line to the last.

Lines that need what CI lacks (a GPU, a hub download, a docker daemon, the user's own data) say so in their comment and
are skipped here with that reason; `pip install` and the test command are what CI ran to get here. Servers are started
in the background (a user's second terminal) and run on until the next server on their port starts. Every command
must exit 0 (or what its comment says), print no traceback, and show what its section says it shows; the first,
`sdloop demo`, is also the suite's full-size demo run (it replaces the separate demo tests: the LoRA must teach the new
colour).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from readme_runner import Command, Result, Shell, read_commands  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COMMANDS = read_commands(REPO / "README.md")

# exit codes other than 0 that a command's README comment promises
EXIT_CODES = {"sdloop monitor check": {0, 1}}


@pytest.fixture(scope="module")
def shell(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shell]:
    """A fresh clone's working tree (the tracked files, as `git clone` gives them) and a clean environment."""
    root = tmp_path_factory.mktemp("readme")
    clone = root / "sdloop"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SDLOOP_", "BENTOML_", "PYTEST_"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", BENTOML_DO_NOT_TRACK="true", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    session = Shell.fresh(clone, env)
    yield session
    session.stop_servers()


def _no_traceback(result: Result) -> None:
    assert "Traceback (most recent call last)" not in result.output, result.output[-4000:]


def _demo(sh: Shell, out: str) -> None:
    """What the demo's section promises: the colour learned, the loop turned once, every follow-up ready; a bad value
    afterwards is one line and changes nothing."""
    from PIL import Image

    from sdloop.runfolder import RunFolder

    home = sh.cwd / "sdloop-home"
    assert "run folder:" in out and "best step:" in out and "data report:" in out
    assert "Caption following decides" in out, "the demo's evaluation leads with what decides it"
    assert "'brown' drawn when asked" in out and "before/after grid:" in out and "verdict:" in out
    assert "PROMOTED" in out or "REJECTED" in out
    if "PROMOTED" in out:
        assert "the running service now serves" in out
    runs = [p for p in (home / "runs").iterdir() if not p.name.startswith("retrain-")]
    assert len(runs) == 1
    check = json.loads((runs[0] / "concept_check.json").read_text())
    before, after = check["before"]["shares"]["colour"], check["after"]["shares"]["colour"]
    assert check["attribute"] == "colour" and after >= before + 0.25, (before, after)
    with Image.open(runs[0] / "concept_before_after.png") as grid:
        assert grid.size[0] >= 6 * 128
    manifest = RunFolder(runs[0]).manifest().to_dict()
    assert Path(manifest["base_model"]).is_relative_to(home.resolve())
    recorded = RunFolder(runs[0]).read_eval_defaults()   # what `sdloop eval RUN` and `review` use with no flags
    assert recorded and recorded["reference"].is_dir() and "brown" in " ".join(recorded["prompts"])
    report = Path(out.split("      report: ")[-1].split()[0])
    assert report.is_file() and report.is_relative_to(home.resolve() / "monitor" / "reports")
    refused = subprocess.run(["sdloop", "demo", "--n", "1", "--quiet"], cwd=sh.cwd, env=sh.env, capture_output=True,
                             text=True)
    assert refused.returncode == 2 and refused.stderr.startswith("error: --n 1"), refused.stderr
    record = json.loads((home / "datasets" / "demo-brown" / ".sdloop-demo.json").read_text())
    assert record["n"] == 64, "the refused run left the demo's dataset as it was"


def _json_ok(out: str) -> None:
    body = json.loads(out)
    assert "error" not in body, body


# what a command shows, beyond exit 0 and no traceback: (a part of its text, a check of (shell, output))
CHECKS: list[tuple[str, Callable[[Shell, str], None]]] = [
    ("sdloop demo", _demo),
    ("sdloop base tiny ./tiny-sd", lambda sh, out: (sh.cwd / "tiny-sd" / "model_index.json").is_file() or _fail(out)),
    ("sdloop base pretrain", lambda sh, out: (sh.cwd / "my-base" / "sdloop_base.json").is_file() or _fail(out)),
    ("sdloop data check ./synth", lambda sh, out: json.loads((sh.cwd / "report.json").read_text())["items"]
     or _fail(out)),
    ("sdloop train --base", lambda sh, out: (sh.cwd / "runs/first/manifest.json").is_file() or _fail(out)),
    ("sdloop train --help-config", lambda sh, out: "learning_rate" in out or _fail(out)),
    ("sdloop tune", lambda sh, out: "trial" in out or _fail(out)),
    ("sdloop eval runs/first", lambda sh, out: ("decides" in out and (sh.cwd / "runs/first/eval/report.html")
                                                .is_file()) or _fail(out)),
    ("sdloop eval sdloop-home/runs/demo-*", lambda sh, out: "decides" in out or _fail(out)),
    ("sdloop eval --compare", lambda sh, out: "Caption following" in out or _fail(out)),
    ("sdloop review summary", lambda sh, out: "vote" in out or _fail(out)),
    ("sdloop export runs/first --output", lambda sh, out: (sh.cwd / "exports/first-int8/manifest.json").is_file()
     or _fail(out)),
    ("sdloop models show", lambda sh, out: "stage:" in out or _fail(out)),
    ("sdloop models promote", lambda sh, out: "champion" in out or _fail(out)),
    ("curl -s localhost:3000/info", lambda sh, out: json.loads(out)["model_version"].startswith("sdloop:")
     or _fail(out)),
    ("-D - -o image.png", lambda sh, out: ("HTTP/1.1 200" in out and (sh.cwd / "image.png").read_bytes()
                                           .startswith(b"\x89PNG")) or _fail(out)),
    ("/feedback", lambda sh, out: _json_ok(out)),
    ("/admin/reload", lambda sh, out: _json_ok(out)),
    ("bentoml build", lambda sh, out: "Successfully built" in out or _fail(out)),
    ("sdloop keys list", lambda sh, out: "mobile-app" in out or _fail(out)),
    ("-d '{\"prompt\": \"a red circle\"}'\n", lambda sh, out: "unauthorized" in out or _fail(out)),
    ("/jobs/$JOB/result", lambda sh, out: json.loads(out)["images"] or _fail(out)),
    ("DELETE localhost:3000/jobs", lambda sh, out: "cancel" in out or _fail(out)),
    ("sdloop monitor report --since", lambda sh, out: (sh.cwd / "weekly").is_dir() or _fail(out)),
    ("sdloop monitor check", lambda sh, out: "verdict" in out.lower() or _fail(out)),
    ("sdloop retrain\n", lambda sh, out: ("PROMOTED" in out or "REJECTED" in out) or _fail(out)),
    ("sdloop retrain --objective", lambda sh, out: ("PROMOTED" in out or "REJECTED" in out) or _fail(out)),
    ("sdloop export runs/sdxl", lambda sh, out: json.loads((sh.cwd / "sdloop-home/exports/sdxl-cpu-fp32/manifest.json")
                                                           .read_text())["family"] == "sdxl" or _fail(out)),
    ("/choose", lambda sh, out: _json_ok(out)),
    ("sdloop retrain history", lambda sh, out: "retrain" in out or _fail(out)),
    ("sdloop scheduler status", lambda sh, out: "monitor" in out and "retrain" in out or _fail(out)),
]


def _fail(out: str) -> bool:
    raise AssertionError(f"the command did not show what the README says:\n{out[-4000:]}")


@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_readme_command(command: Command, shell: Shell, tmp_path: Path) -> None:
    if command.kind == "skip":
        pytest.skip(f"README line {command.line}: {command.reason}")
    if command.kind == "server":
        assert getattr(command, "told", False), f"line {command.line} runs until stopped: say so in its comment"
        result = shell.start(command, tmp_path / "server.log", timeout=240)
        _no_traceback(result)
        assert result.returncode == 0, f"README line {command.line} did not come up:\n{result.output[-4000:]}"
        return
    load = os.getloadavg()[0]
    result = shell.run(command, timeout=840)
    with (shell.cwd.parent / "readme-times.jsonl").open("a") as times:  # what README figures are quoted from
        times.write(json.dumps({"line": command.line, "command": command.text[:80], "seconds": round(result.seconds, 1),
                                "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2),
                                "cores": os.cpu_count()}) + "\n")
    _no_traceback(result)
    allowed = next((codes for prefix, codes in EXIT_CODES.items() if command.text.startswith(prefix)), {0})
    assert result.returncode in allowed, \
        f"README line {command.line} exited {result.returncode}:\n{command.text}\n{result.output[-4000:]}"
    for part, check in CHECKS:
        if part in command.text + "\n":
            check(shell, result.output)


def test_every_block_is_covered() -> None:
    """Every ```bash block holds commands the runner read; the ones it skips say why."""
    blocks = {c.block for c in COMMANDS}
    assert blocks == set(range(max(blocks) + 1))
    assert all(c.reason for c in COMMANDS if c.kind == "skip")
    assert sum(c.kind == "run" for c in COMMANDS) > 3 * sum(c.kind == "skip" for c in COMMANDS)
