"""Shared fixtures: the tiny offline base and a synthetic dataset, built once per test session.

Tests run offline (HF_HUB_OFFLINE=1) and on 2 CPU cores; every model is the tiny base built here in code.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

from pathlib import Path
from typing import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> None:
    import torch

    torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _no_traceback_for_user_mistakes(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test that captured output, no traceback may have reached the user's terminal: a user mistake is
    one line. Tests that read stderr themselves keep doing so; this reads what they left."""
    capsys = request.getfixturevalue("capsys") if "capsys" in request.fixturenames else None
    yield
    if capsys is not None:
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" not in err, err[-2000:]


@pytest.fixture(autouse=True)
def _workspace_env_restored() -> Iterator[None]:
    """The workspace's variables as they were before each test. ``use_bentoml_home()`` sets BENTOML_HOME for the
    process (BentoML reads it at import); without this, the first test that reaches the model store would point every
    later test's store at its own workspace."""
    keys = ("SDLOOP_HOME", "BENTOML_HOME", "SDLOOP_STORE_URL", "SDLOOP_IMAGE_DIR")
    before = {k: os.environ.get(k) for k in keys}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def reset_bentoml_home() -> None:
    """Forget the BENTOML_HOME that BentoML cached in this process.

    Product code sets BENTOML_HOME once per process (``sdloop.workspace.use_bentoml_home``) and reaches the store
    only through ``bentoml.models`` (sdloop.modelstore). BentoML resolves the home and its model store once, in
    SingletonFactory providers of its DI container, and keeps them; a test session switches workspaces between tests,
    so the tests (only they) reset those caches, which are BentoML internals.
    """
    import sys

    if "bentoml" not in sys.modules:
        return
    from bentoml._internal.configuration.containers import BentoMLContainer
    from simple_di import providers

    for name in ("bentoml_home", "model_store_dir", "model_store", "bento_store_dir", "bento_store",
                 "tmp_bento_store_dir", "tmp_bento_store", "env_store_dir", "result_store_file"):
        provider = getattr(BentoMLContainer, name, None)
        if isinstance(provider, providers.SingletonFactory):
            provider._cache = providers.sentinel  # noqa: SLF001 - see the docstring


@pytest.fixture(autouse=True)
def _bentoml_home_follows_the_workspace() -> Iterator[None]:
    """Each test's store is its workspace's, whatever an earlier test used (see reset_bentoml_home)."""
    reset_bentoml_home()
    yield
    reset_bentoml_home()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD-1.x pipeline folder in diffusers format (random weights, seed 0)."""
    from finetune.pretraining.base import write_tiny_base

    return write_tiny_base(tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 24-image captioned synthetic dataset (imagefolder + metadata.jsonl), seed 0. Treat it as read-only."""
    from finetune.data.synth import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "synth", n=24, seed=0)


@pytest.fixture()
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh $SDLOOP_HOME for one test."""
    home = tmp_path / "home"
    monkeypatch.setenv("SDLOOP_HOME", str(home))
    for key in ("BENTOML_HOME", "SDLOOP_STORE_URL", "SDLOOP_IMAGE_DIR"):  # all of it follows SDLOOP_HOME
        monkeypatch.delenv(key, raising=False)
    return home


@pytest.fixture(scope="session")
def tiny_run(tiny_base: Path, synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run folder: 8 steps of the tiny recipe on the random tiny base (conv + attention LoRA).

    Read-only: copy it (shutil.copytree) in a test that changes it. Read it through sdloop.runfolder.RunFolder.
    """
    from finetune.training.config import TrainConfig, tiny_overrides
    from finetune.training.train import train

    out = tmp_path_factory.mktemp("runs") / "tiny-run"
    cfg = TrainConfig.from_dict({**tiny_overrides(), "base": str(tiny_base), "data": str(synth_data),
                                 "output": str(out), "max_steps": 8, "validation_every": 4, "sample_every": 8,
                                 "sample_steps": 2, "sample_seeds": [0], "early_stopping_patience": 0})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SDLOOP_HOME", str(tmp_path_factory.mktemp("run-home")))
        train(cfg, progress=False)
    return out


@pytest.fixture(scope="session")
def drawing_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped drawing base (the tiny SD-1.x pipeline pretrained on synthetic shapes), copied once per session.
    Use it where images must mean something; treat it as read-only."""
    from finetune.pretraining.base import write_drawing_base

    return write_drawing_base(tmp_path_factory.mktemp("drawing") / "tiny-drawing")


@pytest.fixture()
def postgres_db() -> Iterator[str]:
    """The URL of a fresh, empty PostgreSQL database on the server .ci/run starts (SDLOOP_TEST_POSTGRES_URL), dropped
    after the test; skipped, with the reason, where there is none."""
    import uuid

    import sqlalchemy as sa

    base = os.environ.get("SDLOOP_TEST_POSTGRES_URL", "")
    if not base:
        pytest.skip("no PostgreSQL for this session: SDLOOP_TEST_POSTGRES_URL is unset (.ci/run starts one)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed, so PostgreSQL cannot be reached")
    name = f"sdloop_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except Exception as e:  # noqa: BLE001 - any failure to connect means: not reachable here
        admin.dispose()
        pytest.skip(f"PostgreSQL at SDLOOP_TEST_POSTGRES_URL is not reachable: {str(e).splitlines()[0]}")
    try:
        yield sa.engine.make_url(base).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The README's commands first: they are the longest file (the demo at full size, then every section in order),
    so with several workers (`-n`) it starts at once beside the rest instead of running alone at the end."""
    items.sort(key=lambda item: not item.nodeid.startswith("tests/test_readme_commands.py"))
