"""The workspace: where every stage keeps what it makes, one function per place.

``$SDLOOP_HOME`` (default ``./sdloop-home``) holds ``models/`` (base pipelines), ``datasets/``, ``reports/``,
``runs/`` (training run folders), ``cache/`` (latents and text embeddings), ``exports/`` (ONNX exports),
``bentoml/`` (the BentoML home: the model store), ``review/`` and the sqlite stores. Paths are absolute, so a value
written into a manifest resolves from any working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_HOME = "SDLOOP_HOME"
ENV_STORE_URL = "SDLOOP_STORE_URL"
ENV_SCHEDULER_URL = "SDLOOP_SCHEDULER_URL"


def home() -> Path:
    """The workspace root: ``$SDLOOP_HOME`` or ``./sdloop-home``, absolute."""
    return Path(os.environ.get(ENV_HOME) or "sdloop-home").expanduser().resolve()


def models_dir() -> Path:
    """Base pipelines the workspace made or downloaded (``sdloop demo`` writes its tiny base here)."""
    return home() / "models"


def datasets_dir() -> Path:
    """Datasets the workspace made (``sdloop demo`` draws its synthetic set here)."""
    return home() / "datasets"


def reports_dir() -> Path:
    """Default place of data-check reports."""
    return home() / "reports"


def runs_dir() -> Path:
    """Training run folders."""
    return home() / "runs"


def cache_dir() -> Path:
    """Latent and text-embedding caches, keyed by content: safe to delete, rebuilt on demand."""
    return home() / "cache"


def exports_dir() -> Path:
    """ONNX export folders."""
    return home() / "exports"


def generations_dir() -> Path:
    """Images the service generated (``$SDLOOP_IMAGE_DIR`` overrides it): retraining learns from the well-rated."""
    env = os.environ.get("SDLOOP_IMAGE_DIR")
    return Path(env).expanduser().resolve() if env else home() / "generations"


def monitor_dir() -> Path:
    """Monitoring reports (HTML, JSON), the Evidently workspace and the retraining folders."""
    return home() / "monitor"


def bentoml_home() -> Path:
    """The BentoML home (its model store) inside the workspace, unless ``BENTOML_HOME`` says otherwise."""
    env = os.environ.get("BENTOML_HOME")
    return Path(env).expanduser().resolve() if env else home() / "bentoml"


def use_bentoml_home() -> Path:
    """Point BentoML at the workspace's store (only when the user has not chosen one); call before importing it."""
    path = bentoml_home()
    os.environ.setdefault("BENTOML_HOME", str(path))
    return path


def store_url() -> str:
    """The monitoring store's SQLAlchemy URL: ``$SDLOOP_STORE_URL`` (e.g. PostgreSQL) or the workspace's sqlite."""
    return os.environ.get(ENV_STORE_URL) or f"sqlite:///{home() / 'monitor.db'}"


def scheduler_url() -> str:
    """The scheduler's own database (APScheduler's job store, which holds pickles): ``$SDLOOP_SCHEDULER_URL`` or the
    workspace's ``scheduler.db``. Never the monitoring store, which every serving replica can write: a pickled row
    written there would run code in whoever loads it. Only the scheduler and the commands that talk to it read this."""
    return os.environ.get(ENV_SCHEDULER_URL) or f"sqlite:///{home() / 'scheduler.db'}"
