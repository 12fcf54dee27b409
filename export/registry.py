"""Model versions: every export published into the BentoML model store, and which one is the champion.

``publish`` checks an export folder completely (``ExportFolder.verify(cache=False)``: no symlink, nothing outside it,
every component, every file's SHA-256) and copies it, file by file without following links and hashing what it copies,
into a new version of a BentoML model (default name ``sdloop``) in the workspace's store (``sdloop.modelstore``,
BentoML's public API). The stored copy is read-only and checked again; its labels carry the export id and the
manifest's SHA-256, its metadata the manifest (source run, parity, latency). A published version never changes.

The champion pointer and its history are ``sdloop.champion``'s. A version becomes the champion (``promote``, and
``rollback`` to an earlier one) only after it passes the check the service would need: its files verify, it loads with
the serving loader (``sdloop.exportload.open_export``) and draws a non-constant, finite image at its native size
(``smoke_test``); otherwise the champion is untouched (one line, exit 1). Every change decides under the model's lock
with the state read inside it: a version deleted or changed meanwhile is refused there, and ``prune`` never removes the
champion or the version a rollback would return to. A damaged store entry never stops a command: ``list`` shows it
with a ``damaged: <reason>`` note, and a command that needs it says why in one line.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from export.errors import RegistryError
from sdloop import champion as ch
from sdloop import modelstore
from sdloop.champion import MODEL_NAME
from sdloop.errors import one_line
from export.store_copy import clean_metadata, filler, read_nofollow
from sdloop.exportfolder import MARKER, ExportFolder, ExportFolderError

MANIFEST_LABEL = "manifest_sha256"


@dataclass
class Version:
    """One published export: its tag, stage, when it was published, its labels, metadata and folder; ``damaged``
    says why it cannot be served (None when it verifies)."""

    tag: str
    stage: str
    created: str
    labels: dict[str, str]
    metadata: dict[str, Any]
    path: Path
    damaged: Optional[str] = None

    def key_metrics(self) -> str:
        """Quality, parity and latency in one line, each labelled for what it is (``sdloop models list --json``)."""
        parts = [f"quality: {self.quality_text()}" if self.quality_text() else "",
                 f"parity vs PyTorch fp32: {self.parity_text()}" if self.parity_text() else "",
                 f"latency: {self.latency_text()}" if self.latency_text() else ""]
        return "; ".join(p for p in parts if p)

    def quality_text(self) -> str:
        """What the run scored: its best validation loss and its evaluation's metrics (how well it draws)."""
        md, parts = self.metadata, []
        if isinstance(md.get("best_val_loss"), (int, float)):
            parts.append(f"val loss {md['best_val_loss']:.4f}")
        for k, v in ((md.get("evaluation") or {}).get("metrics") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                parts.append(f"eval {k} {v:.4g}")
        return ", ".join(parts)

    def parity_text(self) -> str:
        """How closely the export draws what the fused fp32 PyTorch pipeline draws (not a quality score: an int8
        KID here is int8 against fp32 on the same prompts and seeds, around 0 by construction)."""
        parity, parts = self.metadata.get("parity") or {}, []
        if isinstance(parity.get("psnr"), (int, float)):
            parts.append(f"PSNR {parity['psnr']:.1f} dB")
        if isinstance(parity.get("max_pixel_difference"), (int, float)):
            parts.append(f"max diff {parity['max_pixel_difference']:.3g}/255")
        if isinstance(parity.get("kid"), (int, float)):
            parts.append(f"KID {parity['kid']:.4f}")
        return ", ".join(parts)

    def latency_runs(self) -> Optional[int]:
        """Timed images behind each of the export's latency medians: the recorded count, else what the export's
        config implies (every check image, topped up to ``latency_images``)."""
        lat, md = self.metadata.get("latency") or {}, self.metadata
        for key in ("runs", "repeats", "images"):
            if isinstance(lat.get(key), int) and not isinstance(lat.get(key), bool):
                return lat[key]
        cfg, checks = md.get("config") or {}, md.get("checks") or {}
        cases = len(checks.get("prompts") or []) * len(checks.get("seeds") or [])
        extra = (md.get("parity") or {}).get("kid_images") or 0
        if not cases and not isinstance(cfg.get("latency_images"), int):
            return None
        return max(int(cfg.get("latency_images") or 1), cases, int(extra))

    def latency_text(self) -> str:
        """Seconds per image of the export, and its speed-up over PyTorch said as it was measured: a paired
        figure (both timed back to back, several repeats, with its interval) when the export recorded one; else the
        two medians timed minutes apart, marked unpaired and noisy (load between them shows up as a speed-up)."""
        lat = self.metadata.get("latency") or {}
        export_s = lat.get("export_s")
        if not isinstance(export_s, (int, float)):
            return ""
        runs = self.latency_runs()
        text = f"{export_s:.3f} s/img" + (f" (median of {runs})" if runs and runs > 1 else " (1 run)" if runs else "")
        paired = lat.get("paired") if isinstance(lat.get("paired"), dict) else {}
        ratio, low, high = (paired.get(k) for k in ("speedup", "low", "high"))
        if all(isinstance(v, (int, float)) for v in (ratio, low, high)):
            n = paired.get("repeats")
            return text + f", {ratio:.2f}x vs PyTorch (95% {low:.2f}-{high:.2f}x, {n} paired runs)"
        if isinstance(lat.get("speedup"), (int, float)):
            each = f"{runs} run{'s' if runs != 1 else ''}" + (" each" if runs != 1 else "") if runs else "?"
            text += f", {lat['speedup']:.1f}x vs PyTorch ({each}, unpaired, noisy)"
        return text


def check_name(name: str) -> str:
    """A model name BentoML accepts: lowercase letters, digits, '-', '_', '.', at most 63 characters."""
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?", name):
        raise RegistryError(f"--name {name!r} is not a valid model name: lowercase letters, digits, '-', '_' or '.', "
                            "starting and ending with a letter or digit, at most 63 characters.")
    return name


def read_state(name: str = MODEL_NAME) -> dict[str, Any]:
    """The champion state: {"champion": tag or None, "stack": [earlier champions..., champion], "history": [...]}."""
    return ch.read_state(check_name(name))


def _full_tag(tag: str, name: str) -> str:
    return tag if ":" in tag else f"{name}:{tag}"


def _stage(tag: str, state: dict[str, Any]) -> str:
    if tag == state.get("champion"):
        return "champion"
    if any(e.get("tag") == tag for e in state["history"]):
        return "retired"
    return "candidate"


def _damage(sv: modelstore.StoredVersion) -> Optional[str]:
    """Why a stored version cannot be served, or None: BentoML cannot read it, its files do not verify (cached per
    file state), or its manifest is not the one that was published."""
    if sv.problem:
        return sv.problem
    if not sv.path.is_dir():
        return "its folder is gone from the store"
    folder = ExportFolder(sv.path)
    try:
        manifest = folder.verify()
    except ExportFolderError as e:
        try:
            problems = folder.problems()
        except (ExportFolderError, OSError):
            problems = []
        return problems[0] if problems else one_line(e).replace(str(sv.path), "its folder")
    except OSError as e:  # a file removed while it was read (a prune, a hand): the entry is not servable now
        return f"its files changed while they were checked ({e.strerror or e})"
    try:
        digest = hashlib.sha256(folder.manifest_path.read_bytes()).hexdigest()
    except OSError as e:
        return f"manifest.json cannot be read ({e.strerror or e})"
    if sv.labels.get(MANIFEST_LABEL) != digest:
        return "manifest.json is not the one that was published (replaced after publishing)"
    if sv.labels.get("export_id") != manifest.export_id:
        return "its manifest names another export than the one that was published"
    return None


def _version(sv: modelstore.StoredVersion, state: dict[str, Any]) -> Version:
    created = sv.created.strftime("%Y-%m-%d %H:%M:%S") if sv.created else "?"
    return Version(sv.tag, _stage(sv.tag, state), created, sv.labels, sv.metadata, sv.path, _damage(sv))


def list_versions(name: str = MODEL_NAME) -> list[Version]:
    """Every version of the model, newest first, with its stage and, for a damaged one, why; a champion whose folder
    was deleted outside sdloop is listed too, so nobody overlooks it."""
    state = read_state(name)
    stored = sorted(modelstore.list_versions(name), key=lambda v: v.created.timestamp() if v.created else 0,
                    reverse=True)
    versions = [_version(sv, state) for sv in stored]
    champ = state.get("champion")
    if champ and champ not in {v.tag for v in versions}:
        versions.insert(0, Version(champ, "champion", "?", {}, {}, Path(),
                                   "its folder is gone from the store (deleted outside sdloop)"))
    return versions


def show(tag: str, name: str = MODEL_NAME) -> Version:
    """One version with its stage (and ``damaged`` note); RegistryError when the store has no such version."""
    full = _full_tag(tag, check_name(name))
    try:
        sv = modelstore.get_version(full)
    except modelstore.StoreError as e:
        for v in list_versions(name):  # an entry BentoML cannot read is still shown, with why
            if v.tag == full:
                return v
        raise RegistryError(one_line(e)) from None
    return _version(sv, read_state(name))


def champion(name: str = MODEL_NAME) -> Optional[Version]:
    """The champion version (what the service serves), or None before the first promotion."""
    tag = read_state(name).get("champion")
    return show(tag, name) if tag else None


def history(name: str = MODEL_NAME) -> list[dict[str, Any]]:
    return list(read_state(name)["history"])


# -- publish -----------------------------------------------------------------------------------------------------------

def publish(export_dir: Path, name: str = MODEL_NAME) -> tuple[str, bool]:
    """Save an export folder as a new, read-only version; return (tag, created). An export already published (and
    intact) is not copied again: its tag comes back with created=False.

    Refused in one line (exit 2): not an sdloop export or unfinished, a symlink or special file anywhere, a path that
    leaves the folder, a missing component, a file that does not match its SHA-256, no passed parity check.
    """
    check_name(name)
    given = Path(export_dir).expanduser()
    if not given.is_dir():
        raise RegistryError(f"{given} is not a folder; pass a folder made by `sdloop export RUN_DIR --output DIR`.")
    src = given.resolve()
    folder = ExportFolder(src)
    if not folder.is_export():
        raise RegistryError(f"{src} is not an sdloop export (no {MARKER}); make one with "
                            "`sdloop export RUN_DIR --output DIR`.")
    if not folder.is_finished():
        raise RegistryError(f"{src} is an unfinished export (stopped or still running); export the run again.")
    try:
        manifest_bytes, marker_bytes = read_nofollow(folder.manifest_path), read_nofollow(folder.marker_path)
    except OSError as e:
        raise RegistryError(f"{src}: its manifest or marker cannot be read without following a link "
                            f"({e.strerror or e}); an export holds regular files only.") from None
    manifest = folder.verify(cache=False)
    if folder.manifest_path.read_bytes() != manifest_bytes:   # the stored copy is checked again below anyway
        raise RegistryError(f"{src}/manifest.json changed while it was published; publish it again.")
    if not manifest.parity.get("passed"):
        raise RegistryError(f"{src} has no passed parity check; export the run again.")
    for v in list_versions(name):
        if v.labels.get("export_id") == manifest.export_id and not v.damaged:
            return v.tag, False
    run = manifest.source_run
    labels = {"kind": "sdloop-export", "export_id": manifest.export_id, "source_run": str(run.get("name", "")),
              "target": manifest.target, "precision": manifest.precision,
              MANIFEST_LABEL: hashlib.sha256(manifest_bytes).hexdigest()}
    metadata = clean_metadata({k: v for k, v in manifest.to_dict().items() if k not in ("source_run", "files")})
    metadata["source_run"] = clean_metadata({"name": run.get("name"), "path": run.get("path")})
    metadata["export_dir"] = str(src)
    with contextlib.ExitStack() as held:  # the lock from the end of the copy until the version is in the store
        tag, path = modelstore.create(name, labels, metadata, filler(
            src, manifest, manifest_bytes, marker_bytes, lambda: held.enter_context(ch.lock(name))))
    damage = _damage(modelstore.StoredVersion(tag, path, None, labels))  # hashes the stored copy: caches the check
    if damage:
        modelstore.delete(tag, path)
        raise RegistryError(f"the stored copy of {src} does not verify ({damage}); nothing was published.")
    return tag, True


# -- the champion ------------------------------------------------------------------------------------------------------

def _servable(full: str) -> tuple[str, dict[str, Any]]:
    """Check that ``full`` can serve, as the service would load it: (export id, smoke-test figures).

    Raises SmokeTestError (exit 1) naming the reason: damaged, does not load, draws a flat or non-finite image.
    """
    from sdloop.exportload import SmokeTestError, open_export, smoke_test

    try:
        sv = modelstore.get_version(full)
    except modelstore.StoreError as e:
        raise RegistryError(one_line(e)) from None
    damage = _damage(sv)
    if damage and not sv.path.is_dir():
        raise RegistryError(f"{full} was deleted from the store while it was checked (a prune?); the champion is "
                            "unchanged.")
    if damage:
        raise SmokeTestError(f"{full} cannot become the champion: it is damaged ({damage}); the champion is "
                             "unchanged. Publish a fresh export of its run.")
    try:
        opened = open_export(sv.path)
        try:
            figures = smoke_test(opened)
        finally:
            export_id = opened.manifest.export_id
            del opened
            gc.collect()
    except (ExportFolderError, OSError) as e:
        why = one_line(e).replace(str(sv.path), "it").rstrip(".")
        raise SmokeTestError(f"{full} cannot become the champion: {why}; the champion is unchanged.") from None
    except SmokeTestError as e:
        raise SmokeTestError(one_line(e).replace(str(sv.path), full)) from None
    return export_id, figures


def _still(full: str, export_id: str) -> None:
    """Inside the lock: the version checked before is still in the store, intact and the same export."""
    try:
        sv = modelstore.get_version(full)
    except modelstore.StoreError:
        raise RegistryError(f"{full} was deleted from the store while it was checked (a prune?); the champion is "
                            "unchanged.") from None
    damage = _damage(sv)
    if damage or sv.labels.get("export_id") != export_id:
        raise RegistryError(f"{full} changed while it was checked ({damage or 'another export'}); the champion is "
                            "unchanged.")


def promote(tag: str, reason: str = "", name: str = MODEL_NAME) -> dict[str, Any]:
    """Make ``tag`` the champion after its smoke test; the old one becomes the rollback target. Returns the history
    entry (with the smoke test's figures)."""
    try:
        full = modelstore.version_path(_full_tag(tag, check_name(name)))[0]
    except modelstore.StoreError as e:
        raise RegistryError(one_line(e)) from None
    if read_state(name).get("champion") == full:
        raise RegistryError(f"{full} is already the champion.")
    export_id, figures = _servable(full)
    with ch.locked(name) as state:
        if state.get("champion") == full:
            raise RegistryError(f"{full} is already the champion.")
        _still(full, export_id)
        entry = ch.set_champion(state, "promote", full, reason or "promoted")
        entry["smoke_test"] = figures
    return entry


def _present(name: str) -> set[str]:
    """Tags in the store, readable or not (a deleted folder is not present; a damaged one is)."""
    return {v.tag for v in modelstore.list_versions(name)}


def _rollback_plan(state: dict[str, Any], present: set[str], name: str) -> tuple[list[str], str]:
    """(new stack, version to return to): the last earlier champion still in the store."""
    current = state.get("champion")
    if current is None:
        raise RegistryError(f"model {name!r} has no champion to roll back; promote one with "
                            "`sdloop models promote TAG`.")
    stack = list(state["stack"][:-1])
    while stack and stack[-1] not in present:  # earlier champions that were pruned
        stack.pop()
    if not stack:
        raise RegistryError(f"{current} has no earlier champion left in the store to roll back to.")
    return stack, stack[-1]


def rollback(reason: str = "", name: str = MODEL_NAME) -> dict[str, Any]:
    """Make the previous champion that is still in the store the champion again, after its smoke test. Returns the
    history entry."""
    check_name(name)
    _, target = _rollback_plan(read_state(name), _present(name), name)
    export_id, figures = _servable(target)
    with ch.locked(name) as state:
        stack, again = _rollback_plan(state, _present(name), name)
        if again != target:
            raise RegistryError(f"the champion changed while {target} was checked; run `sdloop models rollback` "
                                "again.")
        _still(target, export_id)
        entry = ch.set_champion(state, "rollback", target, reason or "rolled back", stack=stack)
        entry["smoke_test"] = figures
    return entry


def protected(state: dict[str, Any], present: Optional[set[str]] = None) -> set[str]:
    """Never pruned: the champion, the version a rollback would return to (the last earlier champion still in the
    store), and the champion before the last change (after a rollback, the version rolled back from: it may be
    promoted again once fixed)."""
    last = state["history"][-1].get("previous") if state["history"] else None
    earlier = [t for t in state["stack"][:-1] if present is None or t in present]
    return {t for t in (state.get("champion"), *earlier[-1:], last) if t}


def prune(keep: int, name: str = MODEL_NAME) -> list[str]:
    """Delete all but the ``keep`` newest versions, never the champion or the one a rollback returns to; return what
    went. The champion state and the versions are read under the lock, so a promotion cannot slip in between."""
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 0:
        raise RegistryError(f"--keep must be an integer >= 0, got {keep!r}.")
    check_name(name)
    with ch.locked(name) as state:
        stored = sorted(modelstore.list_versions(name), key=lambda v: v.created.timestamp() if v.created else 0,
                        reverse=True)
        safe = protected(state, {v.tag for v in stored})
        doomed = [v for v in stored[keep:] if v.tag not in safe]
        for v in doomed:
            modelstore.delete(v.tag, v.path)
    return [v.tag for v in doomed]
