"""sdloop models: publish exports into the BentoML store, list them with their stage, promote and roll back the
champion with a history, prune without losing the champion or the previous one, and stay consistent when two
processes promote at once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from export import registry as reg
from export.build import ExportConfig, build_export
from export.errors import RegistryError
from sdloop_cli.main import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def export_dir(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real export of the tiny run, made once; tests copy it to make more versions."""
    out = tmp_path_factory.mktemp("exports") / "tiny"
    build_export(tiny_run, out, ExportConfig(prompts=["a circle"], steps=2, threads=1, reps=1, latency_images=1),
                 progress=False)
    return out


@pytest.fixture()
def store(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh workspace whose BentoML home is its own (BENTOML_HOME is unset again after the test)."""
    monkeypatch.delenv("BENTOML_HOME", raising=False)
    return workspace / "bentoml"


def _copy(export_dir: Path, dest: Path, run_name: str) -> Path:
    """Another export: the same graphs under a new export id (what a new `sdloop export` would make)."""
    shutil.copytree(export_dir, dest)
    m = json.loads((dest / "manifest.json").read_text())
    m["export_id"] = uuid.uuid4().hex
    m["source_run"]["name"] = run_name
    (dest / "manifest.json").write_text(json.dumps(m))
    return dest


def _publish_n(export_dir: Path, tmp_path: Path, n: int) -> list[str]:
    tags = []
    for i in range(n):
        tag, created = reg.publish(_copy(export_dir, tmp_path / f"e{i}", f"run-{i}"))
        assert created
        tags.append(tag)
        time.sleep(0.01)  # distinct creation times, so "newest" is well defined
    return tags


def test_publish_list_show_and_load_from_the_store(export_dir: Path, store: Path, tmp_path: Path) -> None:
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    tag, created = reg.publish(export_dir)
    assert created and tag.startswith("sdloop:")
    assert reg.publish(export_dir) == (tag, False), "the same export is not stored twice"
    [v] = reg.list_versions()
    assert v.tag == tag and v.stage == "candidate" and v.labels["precision"] == "fp32"
    assert v.labels["source_run"] == "tiny-run" and v.labels["target"] == "cpu"
    assert v.metadata["parity"]["passed"] and v.metadata["latency"]["export_s"] > 0
    assert "PSNR" in v.key_metrics() and "val loss" in v.key_metrics()
    assert Path(v.path).is_relative_to(store / "models"), "the workspace's store, not ~/bentoml"
    assert os.stat(v.path).st_mode & 0o005 == 0o005 & ~_umask(), "readable by the service's user"
    pipe = ORTStableDiffusionPipeline.from_pretrained(str(v.path))   # what the service will do with the champion
    assert pipe.unet is not None
    assert reg.show(tag.split(":")[1]).tag == tag, "a version alone is enough"
    with pytest.raises(RegistryError, match="no version"):
        reg.show("sdloop:nope")
    with pytest.raises(RegistryError, match="not an sdloop export"):
        reg.publish(tmp_path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_promote_rollback_and_history(export_dir: Path, store: Path, tmp_path: Path) -> None:
    a, b, c = _publish_n(export_dir, tmp_path, 3)
    with pytest.raises(RegistryError, match="no champion to roll back"):
        reg.rollback()
    for tag in (a, b, c):
        reg.promote(tag, reason=f"better than before: {tag}")
    with pytest.raises(RegistryError, match="already the champion"):
        reg.promote(c)
    stages = {v.tag: v.stage for v in reg.list_versions()}
    assert stages == {a: "retired", b: "retired", c: "champion"}
    assert reg.champion().tag == c
    assert reg.rollback("c draws worse")["tag"] == b
    assert reg.rollback()["tag"] == a, "a second rollback goes further back, not to c again"
    with pytest.raises(RegistryError, match="no earlier champion"):
        reg.rollback()
    h = reg.history()
    assert [(e["action"], e["tag"]) for e in h] == [("promote", a), ("promote", b), ("promote", c),
                                                   ("rollback", b), ("rollback", a)]
    assert all(e["previous"] == p["tag"] for p, e in zip(h, h[1:])), "each change starts from the last one"
    assert h[3]["reason"] == "c draws worse" and all(e["when"].endswith("Z") for e in h)
    state = json.loads((store / "sdloop" / "sdloop.champion.json").read_text())
    assert state["champion"] == a and state["stack"] == [a]


def test_prune_never_deletes_the_champion_or_the_previous_one(export_dir: Path, store: Path,
                                                              tmp_path: Path) -> None:
    tags = _publish_n(export_dir, tmp_path, 5)                 # oldest first
    reg.promote(tags[0])
    reg.promote(tags[1])                                        # champion: tags[1]; previous: tags[0]
    gone = reg.prune(1)
    assert sorted(gone) == sorted(tags[2:4])
    left = {v.tag: v.stage for v in reg.list_versions()}
    assert left == {tags[4]: "candidate", tags[1]: "champion", tags[0]: "retired"}
    assert reg.rollback()["tag"] == tags[0], "the previous champion is still there to roll back to"
    assert reg.prune(0) == [tags[4]], "after a rollback the version rolled back from is kept too"
    assert {v.tag for v in reg.list_versions()} == {tags[0], tags[1]}


RACER = """
import sys, time
from pathlib import Path
from export.registry import promote
start, tags, n = Path(sys.argv[1]), sys.argv[2].split(","), int(sys.argv[3])
while not start.exists():
    time.sleep(0.005)
for i in range(n):
    promote(tags[i % 2], reason=f"racer {sys.argv[4]} #{i}")
"""


def test_two_promotions_at_once_leave_one_champion_and_a_consistent_history(export_dir: Path, store: Path,
                                                                            tmp_path: Path) -> None:
    a, b, c, d = _publish_n(export_dir, tmp_path, 4)
    start, n = tmp_path / "go", 12
    env = {**os.environ, "SDLOOP_HOME": str(store.parent), "PYTHONPATH": str(ROOT)}
    env.pop("BENTOML_HOME", None)
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(start), f"{x},{y}", str(n), name], env=env,
                               stderr=subprocess.PIPE, text=True)
              for name, (x, y) in (("one", (a, b)), ("two", (c, d)))]
    time.sleep(3)  # both import bentoml and wait at the start line
    start.touch()
    for p in racers:
        assert p.wait(timeout=120) == 0, p.stderr.read()[-2000:]
    h = reg.history()
    assert len(h) == 2 * n, "no promotion was lost"
    assert all(e["previous"] == p["tag"] for p, e in zip(h, h[1:])), "every change saw the one before it"
    assert {e["pid"] for e in h} == {p.pid for p in racers}
    state = reg.read_state()
    assert state["champion"] == h[-1]["tag"] and state["stack"] == [e["tag"] for e in h]
    assert [v.stage for v in reg.list_versions()].count("champion") == 1


def test_models_cli(export_dir: Path, store: Path, tmp_path: Path, capsys) -> None:
    e1 = _copy(export_dir, tmp_path / "e1", "first")
    e2 = _copy(export_dir, tmp_path / "e2", "second")
    assert main(["models", "list"]) == 0 and "no versions" in capsys.readouterr().out
    assert main(["models", "publish", str(e1)]) == 0
    t1 = capsys.readouterr().out.split()[1]
    assert main(["models", "publish", str(e2)]) == 0
    t2 = capsys.readouterr().out.split()[1]
    assert main(["models", "promote", t1, "--reason", "first one"]) == 0
    assert main(["models", "promote", t2]) == 0 and f"was {t1}" in capsys.readouterr().out
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert f"{t2}" in out and "champion" in out and "retired" in out and "second" in out
    assert main(["models", "show", t1]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["stage"] == "retired" and shown["labels"]["source_run"] == "first"
    assert [e["action"] for e in shown["champion_history"]] == ["promote", "promote"]
    assert main(["models", "rollback", "--reason", "regression"]) == 0 and t1 in capsys.readouterr().out
    assert main(["models", "history"]) == 0 and "regression" in capsys.readouterr().out
    assert main(["models", "prune", "--keep", "0"]) == 0 and "deleted 0" in capsys.readouterr().out
    assert main(["models", "list", "--json"]) == 0
    assert {v["stage"] for v in json.loads(capsys.readouterr().out)} == {"champion", "retired"}
    mistakes = [(["models", "show", "sdloop:nope"], "no version"),
                (["models", "publish", str(tmp_path)], "not an sdloop export"),
                (["models", "prune", "--keep", "-1"], "--keep must be"),
                (["models", "list", "--name", "Bad Name"], "not a valid model name"),
                (["models", "promote", t1], "already the champion")]
    for argv, message in mistakes:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert main(["models"]) == 2 and "publish" in capsys.readouterr().err


def test_demo_step_exports_publishes_and_promotes(tiny_run: Path, store: Path, tmp_path: Path) -> None:
    from export import demo_step

    tag, result = demo_step(tiny_run, tmp_path / "demo-export", progress=False, prompts=["a circle"], steps=2,
                            threads=1, reps=1, latency_images=1)
    assert reg.champion().tag == tag and (result.export_dir / "manifest.json").is_file()
    assert reg.history()[-1]["reason"].startswith("sdloop demo")
    again, _ = demo_step(tiny_run, tmp_path / "demo-export-2", progress=False, prompts=["a circle"], steps=2,
                         threads=1, reps=1, latency_images=1)
    assert again != tag and reg.champion().tag == again and reg.read_state()["stack"] == [tag, again]
