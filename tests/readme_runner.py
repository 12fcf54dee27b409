"""Reading the README's shell blocks into commands, and running them in order as a user would.

Why a module of its own: `tests/test_readme_commands.py` runs every command of every ```bash block, top to bottom,
in one fresh copy of the repository (what a user has after cloning), so that a README line that fails, needs a flag
it leaves out or misleads fails CI. Three kinds of command need more than "run it and look at the exit code":

- lines a CI machine cannot run say so in a trailing comment (`# needs a GPU`, `# needs a hub download`,
  `# needs a docker daemon`, `# needs your own images`); they are skipped with that reason;
- `pip install` and the test command itself are what CI ran to get here, so they are skipped with that reason;
- a server (`sdloop serve`, `sdloop review A B`, `sdloop scheduler start`, `evidently ui`) runs until Ctrl-C. The
  README says so next to it (its comment says "Ctrl-C", or the line ends with `&`); it is started in the background,
  as a user starts it in a second terminal, waited for, and left running for the sections after it until a server
  on the same port (or another scheduler) starts: the user's Ctrl-C in that terminal.

Shell state carries over between commands as in one terminal: every command runs in `bash` with `set -a`, so a
variable a line assigns (`KEY=$(sdloop keys create ...)`) is exported and kept for the lines after it.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from serve_support import stop_server

SKIP_MARKERS = ("needs a GPU", "needs a hub download", "needs a docker", "needs your own")
SERVER_PATTERNS = (
    (re.compile(r"^(?:\w+=\S+\s+)*sdloop serve\b"), 3000, "/readyz"),
    (re.compile(r"^sdloop review (?!summary)"), 8765, "/"),
    (re.compile(r"^evidently ui\b"), 8000, "/"),
    (re.compile(r"^sdloop scheduler start\b"), None, None),
)


@dataclass
class Command:
    """One command of the README: as written, where, and how the runner treats it."""

    text: str                      # the command as written, continuation lines joined by their backslash-newline
    comment: str                   # its trailing comment(s), without '#'
    line: int                      # README line of its first line
    block: int                     # index of its ```bash block
    kind: str = "run"              # run | server | skip
    reason: str = ""               # why skipped, or what the runner does with it
    port: Optional[int] = None     # a server's port
    ready_path: Optional[str] = None

    @property
    def id(self) -> str:
        words = re.sub(r"[^A-Za-z0-9_.:-]+", "-", self.text.replace("\\\n", " "))[:48].strip("-")
        return f"L{self.line}-{words}"


def split_comment(line: str) -> tuple[str, str]:
    """Split a shell line into code and trailing comment, honouring quotes (a '#' inside quotes is text)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def read_commands(readme: Path) -> list[Command]:
    """Every command of every ```bash block, in order, classified."""
    commands: list[Command] = []
    lines = readme.read_text(encoding="utf-8").splitlines()
    block, inside, pending = -1, False, None
    for number, raw in enumerate(lines, start=1):
        if raw.startswith("```"):
            inside = raw.strip() == "```bash" and not inside
            block += inside
            pending = None
            continue
        if not inside:
            continue
        code, comment = split_comment(raw)
        if not code.strip():
            if comment and commands and commands[-1].block == block:
                commands[-1].comment += " " + comment   # a comment line continues the command above's comment
            continue
        if pending is not None:
            pending.text += "\n" + code
            pending.comment = " ".join(c for c in (pending.comment, comment) if c)
        else:
            pending = Command(text=code.strip(), comment=comment, line=number, block=block)
            commands.append(pending)
        if not code.endswith("\\"):
            pending = None
    for command in commands:
        classify(command)
    return commands


def classify(command: Command) -> None:
    """Decide how a command is run: skipped (with the reason), served in the background, or run."""
    marker = next((m for m in SKIP_MARKERS if m in command.comment), None)
    if marker:
        command.kind, command.reason = "skip", command.comment[command.comment.index(marker):]
        return
    parts = [p.strip() for p in command.text.split("&&")]
    if any(p.startswith("python -m pytest") for p in parts):
        command.kind, command.reason = "skip", "the test command itself: CI runs it to get here"
        return
    kept = [p for p in parts if not p.startswith("pip install")]
    if not kept:
        command.kind, command.reason = "skip", "installation: .ci/run installs exactly this before the tests"
        return
    if len(kept) < len(parts):
        command.reason = "its `pip install` parts skipped: .ci/run installs exactly that before the tests"
        command.text = " && ".join(kept)
    background = command.text.rstrip().endswith("&")
    for pattern, port, path in SERVER_PATTERNS:
        if pattern.search(command.text):
            command.kind = "server"
            found = re.search(r"--port[ =](\d+)", command.text)
            command.port = int(found.group(1)) if found else port
            command.ready_path = path
            command.told = background or "Ctrl-C" in command.comment  # type: ignore[attr-defined]
            command.text = command.text.rstrip().rstrip("&").rstrip()
            return


@dataclass
class Result:
    """What one command did."""

    returncode: int
    output: str
    seconds: float


@dataclass
class Shell:
    """One terminal's worth of state: a working folder, exported variables, the servers it started."""

    cwd: Path
    env: dict
    state: Path
    servers: list = field(default_factory=list)

    @classmethod
    def fresh(cls, cwd: Path, env: dict) -> "Shell":
        state = cwd.parent / "readme-shell-state.sh"
        state.write_text("")
        return cls(cwd=cwd, env=env, state=state)

    def _script(self, text: str, keep_state: bool) -> str:
        save = f'\n__rc=$?\nexport -p > {shlex.quote(str(self.state))}.new && mv {shlex.quote(str(self.state))}.new ' \
               f'{shlex.quote(str(self.state))}\nexit $__rc\n' if keep_state else "\n"
        return f"set -a\nsource {shlex.quote(str(self.state))}\ncd {shlex.quote(str(self.cwd))}\n{text}{save}"

    def run(self, command: Command, timeout: float) -> Result:
        """Run a command to its end; its exported variables are kept for the next one."""
        began = time.monotonic()
        try:
            done = subprocess.run(["bash", "-c", self._script(command.text, keep_state=True)], cwd=self.cwd,
                                  env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as stopped:
            out = stopped.stdout.decode(errors="replace") if isinstance(stopped.stdout, bytes) else stopped.stdout
            return Result(-1, f"(still running after {timeout:.0f} s)\n{out or ''}", time.monotonic() - began)
        return Result(done.returncode, done.stdout, time.monotonic() - began)

    def start(self, command: Command, log: Path, timeout: float) -> Result:
        """Start a server in the background, as in a second terminal, and wait until it answers. A server started
        earlier on the same port (or an earlier scheduler) is stopped first, as a user presses Ctrl-C in that
        terminal before starting the next one; others keep running, as the README's later sections assume."""
        key = command.port if command.port is not None else command.text.split()[1]
        self.stop_servers(key)
        began = time.monotonic()
        handle = log.open("w")
        text = ("env " if re.match(r"^\w+=", command.text) else "") + command.text  # `exec VAR=x cmd` is no command
        process = subprocess.Popen(["bash", "-c", self._script("exec " + text, keep_state=False)],
                                   cwd=self.cwd, env=self.env, stdout=handle, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        self.servers.append((key, process, handle))
        while time.monotonic() - began < timeout:
            if process.poll() is not None:
                return Result(process.returncode, log.read_text(errors="replace"), time.monotonic() - began)
            if command.port is None:
                if "scheduler running" in log.read_text(errors="replace"):
                    return Result(0, log.read_text(errors="replace"), time.monotonic() - began)
            elif answers(command.port, command.ready_path or "/"):
                return Result(0, log.read_text(errors="replace"), time.monotonic() - began)
            time.sleep(0.5)
        return Result(-1, f"not ready after {timeout:.0f} s\n" + log.read_text(errors="replace"),
                      time.monotonic() - began)

    def stop_servers(self, key: object = None) -> list[int]:
        """Stop the servers this shell started (all, or the one under `key`) as the suite stops any; exit codes."""
        codes = []
        for entry in [e for e in self.servers if key is None or e[0] == key]:
            _, process, handle = entry
            self.servers.remove(entry)
            stop_server(process)  # each command exec'd into its server, so its PID is the server's
            handle.close()
            codes.append(process.returncode)
        return codes


def answers(port: int, path: str) -> bool:
    """Whether 127.0.0.1:port answers `path` with a 2xx."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as reply:
            return 200 <= reply.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False
