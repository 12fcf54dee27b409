"""The run folder: the one contract between training and every stage after it (evaluation, export, serving).

A run folder is what ``sdloop train --output RUN_DIR`` writes::

    sdloop_run.json      marker: this folder is an sdloop run (sdloop never writes into a folder without it)
    config.yaml          the fully resolved TrainConfig
    data_report.json     the dataset check the run trained on
    split.json           {"train": [paths], "validation": [paths]} relative to the dataset folder
    metrics.jsonl        one JSON object per line: step + train_loss (+ lr) or val_loss
    manifest.json        the typed Manifest below, written last: its presence means the run finished
    loss_curve.png  logs/ (TensorBoard)  samples/step_NNNNNN.png  checkpoints/step_NNNNNN/
    lora/pytorch_lora_weights.safetensors   diffusers/peft layout (stock ``pipe.load_lora_weights``)
    lora/lora_kohya.safetensors             kohya / A1111 / ComfyUI layout
    eval/                                   written by ``sdloop eval``

Every path a later stage needs resolves from the folder alone: the manifest records the base model and the dataset
as absolute paths and as paths relative to the run folder (tried in that order), so a run folder used from another
working directory, or a workspace moved as a whole, still finds them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from sdloop.atomic import write_json_atomic
from sdloop.errors import UserError

MANIFEST_SCHEMA = 2
MARKER = "sdloop_run.json"
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"


class RunFolderError(UserError):
    """A run folder is missing, unfinished or damaged; the message names the command that makes it."""


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


def portable_location(source: str, run_dir: Path) -> tuple[str, Optional[str]]:
    """(absolute path or hub id, path relative to ``run_dir`` or None) for a base model or a dataset."""
    path = Path(source).expanduser()
    if path.exists() or not _looks_like_hub_id(source):
        absolute = path.resolve()
        try:
            relative: Optional[str] = os.path.relpath(absolute, Path(run_dir).resolve())
        except ValueError:  # another drive on Windows
            relative = None
        return str(absolute), relative
    return source, None


@dataclass
class Manifest:
    """What a finished run is: where it came from, how it went, and what it produced (``manifest.json``)."""

    base_model: str                      # absolute path of a local diffusers folder, or a hub id
    base_fingerprint: str
    dataset: str                         # absolute path of the dataset folder
    dataset_fingerprint: str
    best_step: Optional[int]
    best_val_loss: Optional[float]
    final_step: int
    stopped: str                         # a sentence: why the run stopped
    stop_reason: str = ""                # the StopReason value (max_steps, early_stopping, pruned, ...)
    base_model_relative: Optional[str] = None
    dataset_relative: Optional[str] = None
    pipeline_class: str = "StableDiffusionPipeline"
    prediction_type: str = "epsilon"
    family: str = ""                     # sdloop.families name (sd1, sd2, sdxl); older manifests: see from_dict
    resolution: int = 512
    items: dict = field(default_factory=dict)       # usable, train, validation, skipped
    metrics: dict = field(default_factory=dict)     # first_val_loss, last_train_loss, ...
    lora: dict = field(default_factory=dict)        # files, rank, alpha, target modules, text encoder trained
    wall_seconds: float = 0.0
    startup_seconds: float = 0.0
    world_size: int = 1
    packages: dict = field(default_factory=dict)
    git_commit: Optional[str] = None
    sdloop_version: str = ""
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    schema_version: int = MANIFEST_SCHEMA
    extra: dict = field(default_factory=dict)       # keys this version does not know (kept on save)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        extra = d.pop("extra")
        return {**extra, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest") -> "Manifest":
        """Build from JSON; a schema newer than this sdloop, or a missing required key, is a RunFolderError."""
        if not isinstance(d, dict):
            raise RunFolderError(f"{where} is not a JSON object; the run is damaged: train it again.")
        version = d.get("schema_version", 1)
        if not isinstance(version, int) or version > MANIFEST_SCHEMA:
            raise RunFolderError(f"{where} has schema version {version!r}, newer than this sdloop understands "
                                 f"({MANIFEST_SCHEMA}); upgrade sdloop.")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        values = {k: v for k, v in d.items() if k in names}
        if version == 1:  # the first manifests: no stop_reason, dataset as given on the command line
            values.setdefault("stop_reason", "")
        if not values.get("family"):  # before families: told by the pipeline class, then the prediction type
            from sdloop.families import family_for_record

            values["family"] = family_for_record("", str(values.get("pipeline_class", "")),
                                                 str(values.get("prediction_type", "epsilon"))).name
        missing = [k for k in required if k not in values]
        if missing:
            raise RunFolderError(f"{where} lacks {', '.join(missing)}; the run is damaged: train it again.")
        values["schema_version"] = MANIFEST_SCHEMA
        return cls(**values, extra={k: v for k, v in d.items() if k not in names})


class RunFolder:
    """A run folder by name: its files, its manifest, and the base pipeline with its best LoRA."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # -- files by name ---------------------------------------------------------------------------------------------
    @property
    def marker(self) -> Path:
        return self.path / MARKER

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def data_report(self) -> Path:
        return self.path / "data_report.json"

    @property
    def split(self) -> Path:
        return self.path / "split.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def loss_curve(self) -> Path:
        return self.path / "loss_curve.png"

    @property
    def lora_dir(self) -> Path:
        return self.path / "lora"

    @property
    def diffusers_lora(self) -> Path:
        return self.lora_dir / DIFFUSERS_WEIGHT_NAME

    @property
    def kohya_lora(self) -> Path:
        return self.lora_dir / KOHYA_WEIGHT_NAME

    @property
    def samples_dir(self) -> Path:
        return self.path / "samples"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def best_lora_checkpoint(self) -> Path:
        return self.checkpoints_dir / "best_lora.safetensors"

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"

    @property
    def eval_dir(self) -> Path:
        return self.path / "eval"

    # -- state -----------------------------------------------------------------------------------------------------
    def is_ours(self) -> bool:
        """Whether sdloop made this folder (its marker, or the files of a run from before the marker existed)."""
        if self.marker.is_file():
            return True
        return self.config.is_file() and (self.manifest_path.is_file() or self.checkpoints_dir.is_dir())

    def has_progress(self) -> bool:
        """Whether the run got past its start: a checkpoint or a finished manifest exists."""
        return self.manifest_path.is_file() or any(self.checkpoints_dir.glob("step_*"))

    def is_finished(self) -> bool:
        return self.manifest_path.is_file() and self.diffusers_lora.is_file()

    def write_marker(self, info: dict[str, Any]) -> None:
        write_json_atomic(self.marker, {"kind": "sdloop-run", **info})

    @property
    def eval_defaults_path(self) -> Path:
        return self.path / "eval_defaults.json"

    def write_eval_defaults(self, prompts: list[str], reference: Path, why: str) -> None:
        """Record the prompts and reference images that evaluate this run when it has no validation split (the
        demo's: it trains on every image and judges with the pixel checker), so `sdloop eval RUN`, `sdloop review`
        and a retraining's comparison need no extra flags. Paths are stored absolute and relative, like the
        manifest's."""
        absolute, relative = portable_location(str(reference), self.path)
        write_json_atomic(self.eval_defaults_path, {"schema": 1, "prompts": list(prompts), "reference": absolute,
                                                    "reference_relative": relative, "why": why})

    def read_eval_defaults(self) -> Optional[dict[str, Any]]:
        """The recorded evaluation defaults ({prompts, reference: Path, why}), or None when the run has none."""
        if not self.eval_defaults_path.is_file():
            return None
        d = self._read_json(self.eval_defaults_path, "evaluation defaults")
        try:
            prompts = [str(p) for p in d["prompts"]]
            reference = Path(self._locate(str(d["reference"]), d.get("reference_relative"), "evaluation reference",
                                          "pass --reference DIR"))
        except (KeyError, TypeError):
            raise RunFolderError(f"{self.eval_defaults_path} is damaged; delete it and pass --prompts FILE and "
                                 "--reference DIR.") from None
        return {"prompts": prompts, "reference": reference, "why": str(d.get("why", ""))}

    def require_finished(self) -> "RunFolder":
        """Return self, or raise naming the command that makes a finished run."""
        if not self.path.is_dir():
            raise RunFolderError(f"{self.path} does not exist; make a run with `sdloop train --base BASE --data DATA "
                                 f"--output {self.path}`.")
        if not self.is_ours():
            raise RunFolderError(f"{self.path} is not an sdloop run folder (no {MARKER}); pass the --output folder "
                                 "of `sdloop train`.")
        if not self.is_finished():
            raise RunFolderError(f"{self.path} has not finished training (no manifest.json or LoRA file); finish it "
                                 f"with `sdloop train --output {self.path} --resume`.")
        return self

    # -- reading ---------------------------------------------------------------------------------------------------
    def _read_json(self, path: Path, what: str) -> Any:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunFolderError(f"{path} is missing; the run is incomplete: finish it with "
                                 f"`sdloop train --output {self.path} --resume`.") from None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise RunFolderError(f"{what} {path} is damaged ({type(e).__name__}); train the run again.") from None

    def manifest(self) -> Manifest:
        """The typed manifest of a finished run."""
        return Manifest.from_dict(self._read_json(self.manifest_path, "the manifest"), str(self.manifest_path))

    def save_manifest(self, manifest: Manifest) -> None:
        write_json_atomic(self.manifest_path, manifest.to_dict())

    def read_split(self) -> dict[str, list[str]]:
        """{"train": [...], "validation": [...]}: dataset-relative paths of the split the run trained on."""
        split = self._read_json(self.split, "the split")
        if not isinstance(split, dict) or not all(isinstance(split.get(k), list) for k in ("train", "validation")):
            raise RunFolderError(f"{self.split} is damaged (needs train and validation lists); train the run again.")
        return split

    def read_metrics(self) -> list[dict[str, Any]]:
        """Rows of metrics.jsonl; a torn last line (a killed run) is skipped, not fatal."""
        rows = []
        if self.metrics.is_file():
            for line in self.metrics.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict):
                    rows.append(row)
        return rows

    def _locate(self, absolute: str, relative: Optional[str], what: str, command: str) -> str:
        if Path(absolute).exists():
            return absolute
        if relative is not None and (self.path / relative).exists():
            return str((self.path / relative).resolve())
        if _looks_like_hub_id(absolute) and not absolute.startswith("/"):
            return absolute
        raise RunFolderError(f"the {what} of {self.path} was {absolute} and is gone; put it back, or {command}.")

    def base_model(self) -> str:
        """The base pipeline this run trained on: a local folder that exists, or a hub id."""
        m = self.manifest()
        return self._locate(m.base_model, m.base_model_relative, "base model",
                            "make one with `sdloop base tiny DIR` and train again")

    def family(self) -> Any:
        """The model family (``sdloop.families.Family``) this run was trained in, from its manifest."""
        from sdloop.families import family_by_name

        return family_by_name(self.manifest().family)

    def dataset(self) -> Path:
        """The dataset folder this run trained on."""
        m = self.manifest()
        return Path(self._locate(m.dataset, m.dataset_relative, "dataset", "pass the data explicitly"))

    # -- the model -------------------------------------------------------------------------------------------------
    def load_pipeline(self, lora: bool = True, torch_dtype: Any = None, device: Optional[str] = None) -> Any:
        """The base pipeline with this run's best LoRA loaded as a peft adapter (``lora=False``: the base alone).

        The adapter is not fused, so callers can compare with and without it (``pipe.disable_lora()``) or fuse it
        themselves (``pipe.fuse_lora(); pipe.unload_lora_weights()``) for export.
        """
        from sdloop.families import check_same_layout, family_of
        from sdloop.pipelines import load_pipeline, quiet_diffusers

        self.require_finished()
        base = self.base_model()
        check_same_layout(self.family(), family_of(base), f"the LoRA of {self.path} cannot go on the base {base} "
                          "(the run's family vs the base's)", "put the run's own base back, or train the run again "
                          "on this base.")
        pipe = load_pipeline(base, torch_dtype=torch_dtype)
        if lora:
            try:
                with quiet_diffusers():
                    pipe.load_lora_weights(str(self.lora_dir), weight_name=DIFFUSERS_WEIGHT_NAME)
            except Exception as e:  # noqa: BLE001 - a damaged or foreign LoRA file
                raise RunFolderError(f"cannot load the LoRA {self.diffusers_lora} onto {self.base_model()} "
                                     f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                     "is it this run's base? Train the run again.") from None
        if device:
            pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return pipe
