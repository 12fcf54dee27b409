"""The export folder: the one contract between the export stage and everything that runs an export (parity, the gate,
the benchmarks, the model store and the service), like ``RunFolder`` is for runs.

An export folder is what ``sdloop export RUN --output DIR`` writes::

    sdloop_export.json   marker: sdloop made this folder ({"kind", "export_id", "finished"}); written first while the
                         export is being built (finished: false) and last when it is done (finished: true)
    manifest.json        the typed ExportManifest below: every file with its size and SHA-256, how to run it
                         (``runtime``), its native size and limits, the source run, the parity and latency figures
    model_index.json  unet/  text_encoder/  vae_decoder/  vae_encoder/  tokenizer/  scheduler/   optimum's layout
                         (SDXL adds text_encoder_2/ and tokenizer_2/: what a folder must hold is its family's)

The stock ORT pipeline of the export's model family (``ORTStableDiffusionPipeline``, ``ORTStableDiffusionXLPipeline``:
``sdloop.families``) loads the folder as it is; ``sdloop.exportload`` loads it as the manifest says (the family's
class, providers, threads, no spinning, IO binding), the one loader every stage uses.

Why the family is checked, not only recorded: an export whose manifest names another family than its files would be
loaded by the wrong ORT class and fail at its first request (an SDXL UNet without its pooled text embeddings) or
serve without its second encoder; the manifest's family, the family its ``model_index.json`` names and the
components on disk must agree, or the folder is refused in one line naming both families.

Why hashes: a published version is immutable. ``ExportFolder.verify`` checks every file against the manifest (size and
SHA-256), refuses symlinks, anything that leaves the folder, missing components and files the manifest does not list,
and remembers a passed check per (export, file state) in the workspace cache, so a restart does not hash gigabytes
again but any change of a file (size, mtime, inode) checks it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from sdloop.errors import UserError

MARKER = "sdloop_export.json"
MANIFEST = "manifest.json"
SCHEMA = 2
# What every export must hold to be served: optimum's pipeline index, and per component of its family
# (``Family.components()``, ``required_for``) a graph for each model (the VAE's decoder: ``vae_decoder/``) and a folder
# for each tokenizer and the scheduler. vae_encoder is optional (img2img only). A folder whose family cannot be told
# is held to the parts every family has (``REQUIRED``).
REQUIRED = ("model_index.json", "vae_decoder/model.onnx", "scheduler/")
# Not part of the hashed content: the manifest (it holds the table), the marker, BentoML's record of a stored version
# (``model.yaml``, written by the store beside the export's files), and TensorRT's engine cache, which onnxruntime
# writes beside the graphs when a session starts.
BENTOML_RECORD = "model.yaml"
UNHASHED = (MANIFEST, MARKER, BENTOML_RECORD)
RUNTIME_DIRS = ("trt_cache",)


class ExportFolderError(UserError):
    """An export folder that is not ours, unfinished, damaged or tampered with: one line that says what to do."""


@dataclass
class ExportManifest:
    """``EXPORT_DIR/manifest.json``: what the export is, how to run it, and the figures that prove it.

    ``files`` maps every content file (relative POSIX path) to {"bytes", "sha256"}; ``runtime`` is how the export was
    measured and must be run (``providers``, ``intra_op_num_threads``, ``inter_op_num_threads``, ``execution_mode``,
    ``allow_spinning``, ``use_io_binding``, optional ``free_dimension_overrides``); ``native_width``/``native_height``
    is the size it was trained and checked at (the service's default); ``limits`` holds ``side_multiple`` (a side must
    be a multiple of it), ``min_side``, ``max_side`` and ``max_tokens``; ``family`` is the model family
    (``sdloop.families``: ``sd1``, ``sd2``, ``sdxl``), which picks the ORT pipeline class and the components the folder
    must hold (None in manifests written before families: then the folder's ``model_index.json`` says). Everything
    else the export stage records (checks, fusion, optimisations, checker, config, packages, base model, evaluation)
    stays in ``extra``.
    """

    export_id: str
    created: str
    target: str
    precision: str
    native_width: int
    native_height: int
    limits: dict[str, int]
    runtime: dict[str, Any]
    files: dict[str, dict[str, Any]]
    source_run: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    family: Optional[str] = None
    schema_version: int = SCHEMA
    kind: str = "sdloop-export"

    _TYPES = {"export_id": str, "created": str, "target": str, "precision": str, "native_width": int,
              "native_height": int, "limits": dict, "runtime": dict, "files": dict, "source_run": dict, "parity": dict,
              "latency": dict}

    def to_dict(self) -> dict[str, Any]:
        out = {"kind": self.kind, "schema_version": self.schema_version}
        for name in self._TYPES:
            out[name] = getattr(self, name)
        if self.family is not None:
            out["family"] = self.family
        return {**self.extra, **out}

    @classmethod
    def from_dict(cls, data: Any, where: str = "manifest.json") -> "ExportManifest":
        """Read a manifest dict, refusing a wrong kind, an older schema or a field of the wrong type (one line)."""
        if not isinstance(data, dict) or data.get("kind") != "sdloop-export":
            raise ExportFolderError(f"{where} is not an sdloop export manifest; make one with `sdloop export RUN_DIR`.")
        if data.get("schema_version") != SCHEMA:
            raise ExportFolderError(f"{where} has export schema {data.get('schema_version')!r}, this sdloop reads "
                                    f"{SCHEMA}: export the run again with `sdloop export RUN_DIR`.")
        for name, tp in cls._TYPES.items():
            value = data.get(name)
            if not isinstance(value, tp) or isinstance(value, bool):
                raise ExportFolderError(f"{where}: {name} is missing or not a {tp.__name__}; the export is damaged, "
                                        "export the run again.")
        for rel, entry in data["files"].items():
            if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
                    and isinstance(entry.get("sha256"), str)):
                raise ExportFolderError(f"{where}: the entry of {rel!r} has no bytes/sha256; export the run again.")
        family = data.get("family")
        if family is not None and not isinstance(family, str):
            raise ExportFolderError(f"{where}: family is not a string; the export is damaged, export the run again.")
        extra = {k: v for k, v in data.items()
                 if k not in cls._TYPES and k not in ("kind", "schema_version", "family")}
        return cls(**{k: data[k] for k in cls._TYPES}, extra=extra, family=family)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _walk(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """(content files by relative POSIX path, problems): symlinks and anything not a regular file are problems, never
    followed; the manifest, the marker and runtime caches are left out."""
    files: dict[str, Path] = {}
    problems: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        here = Path(dirpath)
        rel_dir = here.relative_to(folder)
        for d in list(dirnames):
            p = here / d
            if p.is_symlink():
                problems.append(f"{(rel_dir / d).as_posix()} is a symlink")
                dirnames.remove(d)
            elif rel_dir == Path(".") and d in RUNTIME_DIRS:
                dirnames.remove(d)
        for name in filenames:
            p = here / name
            rel = (rel_dir / name).as_posix()
            mode = os.lstat(p).st_mode
            if stat.S_ISLNK(mode):
                problems.append(f"{rel} is a symlink")
            elif not stat.S_ISREG(mode):
                problems.append(f"{rel} is not a regular file")
            elif rel not in UNHASHED:
                files[rel] = p
    return files, problems


def file_table(folder: Path) -> dict[str, dict[str, Any]]:
    """The ``files`` section for a finished export folder: every content file with its size and SHA-256.

    Raises on a symlink or a special file: an export never holds one, and a published copy must not follow it.
    """
    folder = Path(folder)
    files, problems = _walk(folder)
    if problems:
        raise ExportFolderError(f"{folder}: {problems[0]}; an export holds regular files only.")
    return {rel: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for rel, p in sorted(files.items())}


def _state_key(manifest_bytes: bytes, files: dict[str, Path]) -> str:
    """A key of the files' state: any change of the manifest's content or of a file's size, mtime, ctime or inode
    makes a new key (and a new check). The manifest is in the key because it holds the table the files are checked
    against: a manifest replaced after a passed check must be checked again."""
    h = hashlib.sha256(hashlib.sha256(manifest_bytes).digest())
    for rel, p in sorted(files.items()):
        st = p.stat()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\n".encode())
    return h.hexdigest()


_VERIFIED: set[str] = set()  # state keys checked in this process


class ExportFolder:
    """One export folder, read through this class only (the marker, the manifest, the check of its files)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path).expanduser()

    @property
    def marker_path(self) -> Path:
        return self.path / MARKER

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def marker(self) -> Optional[dict[str, Any]]:
        """The marker's content, or None when the folder has no (readable) marker: not ours."""
        try:
            data = json.loads(self.marker_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and data.get("kind") == "sdloop-export" else None

    def is_export(self) -> bool:
        """Whether sdloop made this folder (finished or not)."""
        return self.marker() is not None

    def is_finished(self) -> bool:
        m = self.marker()
        return bool(m and m.get("finished", True) and self.manifest_path.is_file())

    def manifest(self) -> ExportManifest:
        """The typed manifest; a missing or damaged one is one line naming the command that makes it."""
        if not self.is_export():
            raise ExportFolderError(f"{self.path} is not an sdloop export (no {MARKER}); make one with "
                                    "`sdloop export RUN_DIR --output DIR`.")
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise ExportFolderError(f"{self.manifest_path} is missing or damaged; export the run again with "
                                    "`sdloop export RUN_DIR`.") from None
        return ExportManifest.from_dict(data, str(self.manifest_path))

    def index_class(self) -> Optional[str]:
        """The pipeline class ``model_index.json`` names (optimum writes the PyTorch pipeline's), or None."""
        try:
            data = json.loads((self.path / "model_index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        name = data.get("_class_name") if isinstance(data, dict) else None
        return name if isinstance(name, str) else None

    def family(self, manifest: Optional[ExportManifest] = None) -> Any:
        """The export's model family (``sdloop.families``): the manifest's, or for a manifest written before families
        (or a folder still being built) the one its ``model_index.json`` names. One line when neither says."""
        from sdloop import families

        m = manifest
        if m is None and self.manifest_path.is_file():
            m = self.manifest()
        if m is not None and m.family is not None:
            try:
                return families.family_by_name(m.family)
            except families.FamilyError:
                raise ExportFolderError(f"{self.manifest_path}: family {m.family!r} is not one this sdloop knows "
                                        f"({', '.join(families.FAMILIES)}); export the run again.") from None
        try:
            return families.family_of(self.path)
        except (UserError, OSError):
            raise ExportFolderError(f"{self.path}: its model_index.json names no model family sdloop knows "
                                    f"({self.index_class() or 'no pipeline class'}); export the run again.") from None

    def family_problem(self, manifest: ExportManifest) -> Optional[str]:
        """Why the manifest's family and the folder disagree (one line naming both), or None.

        Three ways they can: the manifest names a family the folder's ``model_index.json`` does not (an SDXL export
        whose manifest was edited to say sd1, or the reverse); or it names one whose parts are missing or foreign (an
        SD-1.x export relabelled SDXL lacks ``text_encoder_2/``, an SDXL one relabelled SD-1.x holds it; the missing
        parts are ``problems``' to name, with the family that needs them). Families with the same layout and ORT
        class (sd1 and sd2) are not told apart by their files, so there the manifest rules.
        """
        from sdloop import families

        if manifest.family is None:
            return None
        try:
            named = self.family(manifest)
        except ExportFolderError as e:
            return str(e).split(": ", 1)[-1].rsplit("; ", 1)[0]
        try:
            found = families.family_of(self.path)
        except (UserError, OSError):
            found = None
        if found is not None and _layout(found) != _layout(named):
            return (f"its manifest says {named.name} but its files are an {found.name} export (model_index.json names "
                    f"{self.index_class()})")
        have = {rel.split("/", 1)[0] for rel in manifest.files}
        for fam in families.FAMILIES.values():
            for part in (*fam.text_encoders, *fam.tokenizers):
                if part in have and part not in (*named.text_encoders, *named.tokenizers):
                    return (f"its manifest says {named.name} but it holds {part}/, a part of {fam.name} exports, "
                            f"which {named.name} has not")
        return None

    def problems(self, manifest: Optional[ExportManifest] = None, hashes: bool = True) -> list[str]:
        """Everything wrong with the folder against its manifest, cheapest first; empty when it is intact."""
        m = manifest or self.manifest()
        files, problems = _walk(self.path)
        wrong = self.family_problem(m)
        if wrong:
            problems.append(wrong)
        try:
            family = self.family(m)
            needed, who = required_for(family), f"an {family.name} export"
        except ExportFolderError:  # an unknown family: named above
            needed, who = REQUIRED, "an export"
        for need in needed:
            if need.endswith("/"):
                if not any(rel.startswith(need) for rel in m.files):
                    problems.append(f"the manifest lists no {need} ({who} needs it to generate)")
            elif need not in m.files:
                problems.append(f"the manifest lists no {need} ({who} needs it to generate)")
        for rel in m.files:
            parts = Path(rel).parts
            if Path(rel).is_absolute() or ".." in parts or not parts:
                problems.append(f"the manifest lists {rel!r}, a path that leaves the export")
            elif rel not in files:
                problems.append(f"{rel} is missing")
        for rel in sorted(set(files) - set(m.files)):
            problems.append(f"{rel} is not in the manifest")
        for rel, entry in sorted(m.files.items()):
            p = files.get(rel)
            if p is not None and p.stat().st_size != entry["bytes"]:
                problems.append(f"{rel} has {p.stat().st_size} bytes, the manifest says {entry['bytes']}")
        if problems or not hashes:
            return problems
        for rel, entry in sorted(m.files.items()):
            if sha256_file(files[rel]) != entry["sha256"]:
                problems.append(f"{rel} does not match its SHA-256 in the manifest (changed after the export)")
        return problems

    def verify(self, cache: bool = True) -> ExportManifest:
        """The manifest of an intact export; raise ExportFolderError naming the first problem otherwise.

        A passed check is remembered (in this process and in ``$SDLOOP_HOME/cache/verified/``) under a key of the
        files' state, so it is paid once per version and file state.
        """
        m = self.manifest()
        wrong = self.family_problem(m)   # cheap, and never cached: the wrong class would load the graphs
        if wrong:
            raise ExportFolderError(f"{self.path}: {wrong}; export the run again with `sdloop export RUN_DIR` "
                                    "(a manifest is never edited by hand).")
        files, walk_problems = _walk(self.path)
        try:
            key = None if walk_problems else _state_key(self.manifest_path.read_bytes(), files)
        except OSError:  # a file removed meanwhile: the full check below names it
            key = None
        if cache and key and (key in _VERIFIED or _cache_file(key).is_file()):
            _VERIFIED.add(key)
            return m
        problems = self.problems(m)
        if problems:
            more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
            raise ExportFolderError(f"{self.path} is damaged: {problems[0]}{more}; publish a fresh export "
                                    "(`sdloop export RUN_DIR`, then `sdloop models publish DIR`).")
        if key:
            _VERIFIED.add(key)
            if cache:
                _remember(key)
        return m


def _cache_file(key: str) -> Path:
    from sdloop.workspace import cache_dir

    return cache_dir() / "verified" / key


def _remember(key: str) -> None:
    """Record a passed check; a workspace we cannot write to only costs a re-check next time."""
    try:
        path = _cache_file(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError:
        pass


def _layout(family: Any) -> tuple[Any, ...]:
    """What decides how an export of ``family`` loads: its text encoders, tokenizers and ORT pipeline class."""
    return (tuple(family.text_encoders), tuple(family.tokenizers), family.ort_pipeline_class_name)


def required_for(family: Any) -> tuple[str, ...]:
    """What an export of ``family`` must hold in optimum's layout: ``model_index.json``, and for each of the family's
    components its graph (the VAE by its decoder) or, for a tokenizer or the scheduler, its folder. Derived from the
    family alone, so the next family (a ``transformer/`` instead of a ``unet/``) needs nothing here."""
    folders = (*family.tokenizers, "scheduler")
    parts = ["vae_decoder/model.onnx" if c == "vae" else f"{c}/" if c in folders else f"{c}/model.onnx"
             for c in family.components()]
    return ("model_index.json", *parts)


def limits_for(native: int, side_multiple: int, max_tokens: int) -> dict[str, int]:
    """The sizes an export is served at: multiples of ``side_multiple`` from one multiple up to four times the native
    side (capped at 2048: past that, a UNet trained at ``native`` draws repeated tiles and memory grows with the
    square of the side)."""
    return {"side_multiple": side_multiple, "min_side": side_multiple,
            "max_side": max(native, min(2048, 4 * native)) // side_multiple * side_multiple, "max_tokens": max_tokens}
