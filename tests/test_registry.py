"""sdloop models: publish exports into the BentoML store, list them with their stage, promote and roll back the
champion with a history, prune without losing the champion or the previous one, and stay consistent when two
processes promote at once. Then the store as an attacker or a careless user meets it: exports written into the store,
NaN weights, random bytes, missing components, symlinks to private files, a promotion racing a prune, and damaged
store entries; each is refused in one line, never with a traceback, and the champion keeps serving."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from export import registry as reg
from export.build import ExportConfig, build_export
from export.errors import RegistryError
from sdloop.exportfolder import ExportFolder, ExportFolderError, file_table
from sdloop.modelstore import make_writable, version_path
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
    assert v.damaged is None and ExportFolder(v.path).verify().export_id == v.labels["export_id"]
    for f in Path(v.path).rglob("*"):   # immutable: read-only files and folders
        assert f.stat().st_mode & 0o777 == (0o555 if f.is_dir() else 0o444) & ~_umask(), f
    if os.geteuid() != 0:  # root writes through any mode
        with pytest.raises(PermissionError):
            (Path(v.path) / "unet" / "model.onnx").open("r+b")
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
import sdloop.exportload as el
from sdloop.exportfolder import ExportFolder
# this test is about the lock, not the model: the version is verified, not loaded
el.open_export = lambda path, **kw: type("Opened", (), {"manifest": ExportFolder(path).verify()})()
el.smoke_test = lambda opened, **kw: {"width": 64, "height": 64}
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


def test_models_list_and_show_say_what_each_figure_is(export_dir: Path, store: Path, tmp_path: Path,
                                                      capsys) -> None:
    """An int8 export's parity KID (int8 against fp32 PyTorch, around 0) is in the parity column, never where a
    quality score goes; a speed-up from two medians timed apart is marked unpaired and noisy, with its run count;
    `show` is a dozen readable lines, `show --json` everything."""
    e = _copy(export_dir, tmp_path / "int8", "int8-run")
    m = json.loads((e / "manifest.json").read_text())
    m["precision"] = "int8"
    m["parity"].update(kid=-0.026, kid_std=0.01, kid_images=1)
    m["latency"].update(pytorch_s=1.87, export_s=0.1, speedup=18.7)
    (e / "manifest.json").write_text(json.dumps(m))
    tag, _ = reg.publish(e)
    assert main(["models", "list"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    cols = {name: header.index(name) for name in ("QUALITY", "PARITY VS PYTORCH FP32", "LATENCY")}
    quality = row[cols["QUALITY"]:cols["PARITY VS PYTORCH FP32"]]
    parity = row[cols["PARITY VS PYTORCH FP32"]:cols["LATENCY"]]
    latency = row[cols["LATENCY"]:]
    assert "KID" not in quality and "val loss" in quality, row
    assert "KID -0.0260" in parity and "PSNR" in parity, row
    assert "18.7x vs PyTorch (1 run, unpaired, noisy)" in latency, row
    assert main(["models", "show", tag]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) <= 16, lines
    text = "\n".join(lines)
    for words in ("source run:   int8-run", "runtime:      cpu/int8, CPUExecutionProvider, 1 intra-op thread(s)",
                  "family:       sd1", "native size:", "limits:", "parity:       vs PyTorch fp32",
                  "(not a quality score)",
                  "unpaired, noisy", "steps, 1 thread(s)", "champion:     no (the champion is none yet",
                  "damaged:      no", f"sdloop models show {tag} --json"):
        assert words in text, (words, text)
    assert main(["models", "show", tag, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metadata"]["parity"]["kid"] == -0.026


def test_a_paired_latency_figure_is_shown_with_its_interval() -> None:
    v = reg.Version("sdloop:x", "candidate", "?", {}, {"latency": {
        "export_s": 0.1, "speedup": 18.7, "runs": 5,
        "paired": {"speedup": 1.42, "low": 1.3, "high": 1.55, "repeats": 5}}}, Path())
    assert v.latency_text() == "0.100 s/img (median of 5), 1.42x vs PyTorch (95% 1.30-1.55x, 5 paired runs)"
    assert "18.7" not in v.key_metrics()


def test_the_gate_times_two_exports_in_pairs(export_dir: Path, workspace: Path, tmp_path: Path) -> None:
    """The retraining's latency gate loads both exports side by side and times them in alternating pairs: the same
    graphs twice give a ratio whose interval holds 1, so the gate says there is no latency difference."""
    from monitor.config import MonitorConfig
    from monitor.gate import latency_check
    from monitor.gate_latency import measure_paired

    said: list[str] = []
    paired = measure_paired(export_dir, _copy(export_dir, tmp_path / "same", "same"), repeats=3, steps=2,
                            say=said.append).to_dict()
    assert paired["repeats"] == 3 and len(paired["champion_s"]) == 3 and min(paired["challenger_s"]) > 0
    assert paired["ratio_low"] <= paired["ratio"] <= paired["ratio_high"] and paired["size"] == 64
    assert "3 back-to-back pairs" in said[0]
    check = latency_check({}, {}, MonitorConfig(latency_margin=0.5), paired)
    assert check.passed and "3 paired runs" in check.text, check.text


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
    assert main(["models", "show", t1, "--json"]) == 0
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


# -- the store as an attacker or a careless user meets it -------------------------------------------------------------

def _user_error(capsys, code: int, argv: list[str], *needles: str) -> str:
    """Run a command as a user types it; it must exit ``code`` with one line naming every needle."""
    assert main(argv) == code, argv
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _retable(folder: Path) -> None:
    """Rewrite a copied export's file table after changing its files, as a careful forger would: only the checks
    that do not trust the table (components, symlinks, the smoke test) can catch it."""
    m = json.loads((folder / "manifest.json").read_text())
    m["files"] = file_table(folder)
    (folder / "manifest.json").write_text(json.dumps(m))


def _overwrite_random(path: Path) -> None:
    """Random bytes of the same size (so only the SHA-256 tells)."""
    os.chmod(path, 0o644)
    path.write_bytes(os.urandom(path.stat().st_size))


def test_export_output_into_the_store_is_refused_and_the_version_intact(export_dir: Path, store: Path,
                                                                       tiny_run: Path, tmp_path: Path,
                                                                       capsys) -> None:
    tag, _ = reg.publish(export_dir)
    reg.promote(tag)
    _, vpath = version_path(tag)
    before = file_table(vpath)
    link = tmp_path / "innocent"
    link.symlink_to(vpath)
    for out in (vpath, vpath.parent / "new-version", link, store):
        _user_error(capsys, 2, ["export", str(tiny_run), "--output", str(out), "--quiet"], "model store")
    assert file_table(vpath) == before and reg.list_versions()[0].damaged is None
    assert main(["models", "list"]) == 0 and "damaged" not in capsys.readouterr().out


def test_nan_weights_publish_but_never_become_the_champion(export_dir: Path, store: Path, tmp_path: Path,
                                                           capsys) -> None:
    import numpy as np
    import onnx
    from onnx import numpy_helper

    good, _ = reg.publish(export_dir)
    reg.promote(good)
    nan = _copy(export_dir, tmp_path / "nan", "nan-run")
    path = nan / "unet" / "model.onnx"
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind == "f" and arr.size > 64:   # the weights; NaN shape constants would not even load
            init.CopyFrom(numpy_helper.from_array(np.full_like(arr, np.nan), init.name))
    onnx.save_model(model, str(path))
    _retable(nan)
    assert main(["models", "publish", str(nan)]) == 0, "its files are what its manifest says"
    bad = capsys.readouterr().out.split()[1]
    _user_error(capsys, 1, ["models", "promote", bad], "smoke test", "non-finite", "champion is unchanged")
    assert reg.read_state()["champion"] == good and [e["tag"] for e in reg.history()] == [good]


def test_random_bytes_refused_at_publish_and_in_a_published_version(export_dir: Path, store: Path,
                                                                    tmp_path: Path, capsys) -> None:
    from sdloop.exportload import open_export

    forged = _copy(export_dir, tmp_path / "forged", "forged")
    _overwrite_random(forged / "unet" / "model.onnx")
    _user_error(capsys, 2, ["models", "publish", str(forged)], "unet/model.onnx", "SHA-256")
    assert reg.list_versions() == [], "nothing reached the store"

    a, b = _publish_n(export_dir, tmp_path, 2)
    reg.promote(a)
    reg.promote(b)
    _, apath = version_path(a)
    make_writable(apath)
    _overwrite_random(apath / "unet" / "model.onnx")        # written into a published version behind our back
    assert main(["models", "list"]) == 0
    listed = capsys.readouterr().out
    assert f"{a}" in listed and "damaged: unet/model.onnx does not match its SHA-256" in listed
    _user_error(capsys, 1, ["models", "rollback"], a, "damaged", "SHA-256", "champion is unchanged")
    assert reg.read_state()["champion"] == b
    with pytest.raises(ExportFolderError, match=r"damaged: unet/model.onnx does not match its SHA-256"):
        open_export(apath)                                   # what the service's loader says
    reg.promote(_publish_n(export_dir, tmp_path / "more", 1)[0])
    _user_error(capsys, 1, ["models", "promote", a], "damaged", "SHA-256")


@pytest.mark.parametrize("part", ["vae_decoder", "tokenizer"])
def test_missing_component_refused_at_publish(export_dir: Path, store: Path, tmp_path: Path, part: str,
                                              capsys) -> None:
    lacking = _copy(export_dir, tmp_path / "lacking", "lacking")
    shutil.rmtree(lacking / part)
    _retable(lacking)
    _user_error(capsys, 2, ["models", "publish", str(lacking)], f"lists no {part}")
    assert reg.list_versions() == []


def test_symlink_to_a_private_file_is_never_published(export_dir: Path, store: Path, tmp_path: Path,
                                                      capsys) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("the root password")
    os.chmod(secret, 0o600)
    for where in ("tokenizer/vocab.json", "notes.txt"):
        linked = _copy(export_dir, tmp_path / f"linked-{where.replace('/', '-')}", "linked")
        (linked / where).unlink(missing_ok=True)
        (linked / where).symlink_to(secret)
        _user_error(capsys, 2, ["models", "publish", str(linked)], "symlink")
    assert reg.list_versions() == []
    leaked = [f for f in store.rglob("*") if f.is_file() and b"root password" in f.read_bytes()]
    assert leaked == []


def test_promote_racing_prune_never_leaves_a_champion_outside_the_store(export_dir: Path, store: Path,
                                                                        tmp_path: Path, monkeypatch,
                                                                        capsys) -> None:
    import sdloop.exportload as el

    # the lock is under test, not the model: verify the version, skip loading it (NaN/flat images: tests above)
    monkeypatch.setattr(el, "open_export", lambda path, **kw: type("Opened", (), {
        "manifest": ExportFolder(path).verify()})())
    monkeypatch.setattr(el, "smoke_test", lambda opened, **kw: {"width": 64, "height": 64})
    first = _publish_n(export_dir, tmp_path / "first", 1)[0]
    reg.promote(first)
    for i in range(8):
        [v] = _publish_n(export_dir, tmp_path / f"round{i}", 1)
        codes: dict[str, int] = {}
        go = threading.Barrier(2)

        def run(key: str, argv: list[str]) -> None:
            go.wait()
            codes[key] = main(argv)

        threads = [threading.Thread(target=run, args=("promote", ["models", "promote", v])),
                   threading.Thread(target=run, args=("prune", ["models", "prune", "--keep", "0"]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        champ = reg.read_state()["champion"]
        version_path(champ)                         # raises if the champion is not in the store
        # promote either wins, or is refused (deleted before or while it was checked): never a traceback
        assert codes["prune"] == 0 and codes["promote"] in (0, 1, 2), codes
        assert reg.protected(reg.read_state()) <= {v.tag for v in reg.list_versions()}
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(line.startswith("error: ") for line in err.splitlines()), err


def test_damaged_store_entries_never_traceback(export_dir: Path, store: Path, tmp_path: Path, capsys) -> None:
    a, b, c, d = _publish_n(export_dir, tmp_path, 4)
    for t in (a, b, c):
        reg.promote(t)
    paths = {t: version_path(t)[1] for t in (a, b, c, d)}
    # b (the rollback target): its manifest replaced by one that says another native size
    make_writable(paths[b])
    m = json.loads((paths[b] / "manifest.json").read_text())
    m["native_width"] = m["native_height"] = 512
    (paths[b] / "manifest.json").write_text(json.dumps(m))
    # d: BentoML's model.yaml is garbage
    make_writable(paths[d])
    (paths[d] / "model.yaml").write_text("{{{ not yaml ::: [")
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "damaged: manifest.json is not the one that was published" in rows[b] and "retired" in rows[b]
    assert "damaged: BentoML cannot read" in rows[d] and "candidate" in rows[d]
    assert "damaged" not in rows[c] and "champion" in rows[c]
    for tag in (b, d):
        assert main(["models", "show", tag, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["damaged"]
    _user_error(capsys, 1, ["models", "rollback"], b, "damaged", "champion is unchanged")
    assert reg.read_state()["champion"] == c
    assert main(["models", "prune", "--keep", "0"]) == 0
    assert d in capsys.readouterr().out, "a damaged candidate is pruned like any other"
    # the champion's folder deleted behind our back
    make_writable(paths[c])
    shutil.rmtree(paths[c])
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert c in out and "damaged: its folder is gone from the store" in out
    assert main(["models", "show", c, "--json"]) == 0
    assert "folder is gone" in json.loads(capsys.readouterr().out)["damaged"]
    _user_error(capsys, 2, ["models", "promote", c], "no version")
    _user_error(capsys, 1, ["models", "rollback"], b, "damaged")
    assert main(["models", "prune", "--keep", "0"]) == 0 and main(["models", "history"]) == 0
    # the pointer file itself damaged: one line, and nothing writes over it
    (store / "sdloop" / "sdloop.champion.json").write_text("garbage")
    for argv in (["models", "list"], ["models", "rollback"], ["models", "promote", b], ["models", "prune",
                                                                                       "--keep", "0"]):
        _user_error(capsys, 2, argv, "is damaged")
    assert (store / "sdloop" / "sdloop.champion.json").read_text() == "garbage"
