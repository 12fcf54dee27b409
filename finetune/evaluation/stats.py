"""The metric table of an evaluation: every metric for two models (``a`` then ``b``, e.g. base then fine-tuned), each
value with its bootstrap 95% interval, the paired difference b - a with its own interval, and a verdict.

A verdict names the better model and says whether the paired difference's interval excludes zero ("decisive"), and
whether the two models' own intervals overlap. Metrics that cannot be computed honestly (no CLIP weights, no
classifier) are entries with ``computed: false``, null values and the reason.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np

from finetune.evaluation.metrics import Draws, FeatureSets, bootstrap, bootstrap_difference, inception_score
from sdloop.descriptors import DESCRIPTOR_NAMES, describe_all

BETTER_TEXT = {"lower": "lower is better", "higher": "higher is better", "closer": "closer to the reference is better"}


def _slice(x: Any, idx: Optional[np.ndarray]) -> Any:
    return x if idx is None else x[idx]


def verdict(better: str, diff: dict[str, Any], vals: dict[str, dict[str, Any]], labels: Sequence[str]
            ) -> dict[str, Any]:
    """Which of ``labels`` (a, b) is better given the difference b - a (of distances, for ``closer``)."""
    a, b = labels
    d, lo, hi = diff["value"], diff["low"], diff["high"]
    if d is None:
        return {"better": None, "decisive": False, "overlap": None, "text": "no value"}
    sign = -1.0 if better in ("lower", "closer") else 1.0
    winner = None if d == 0 else (b if sign * d > 0 else a)
    decisive = lo is not None and hi is not None and (lo > 0 or hi < 0)
    va, vb = vals[a], vals[b]
    overlap = None
    if None not in (va["low"], va["high"], vb["low"], vb["high"]):
        overlap = not (va["high"] < vb["low"] or vb["high"] < va["low"])
    if winner is None:
        text = "equal"
    elif decisive:
        text = f"{winner} better; difference outside its 95% interval"
    else:
        text = f"{winner} better, but within noise (the difference's 95% interval includes 0)"
    return {"better": winner, "decisive": decisive, "overlap": overlap, "text": text}


def entry(label: str, better: str, stats: dict[str, Callable], draws: Draws, labels: Sequence[str],
          recentre: bool = False, note: str = "", n: Optional[dict[str, int]] = None,
          distance: Optional[dict[str, Callable]] = None, reference: Optional[Callable] = None) -> dict[str, Any]:
    """One computed metric: values with intervals, the paired difference, the verdict."""
    a, b = labels
    values = {k: bootstrap(stats[k], draws, recentre) for k in labels}
    judged = distance or stats
    diff = bootstrap_difference(judged[a], judged[b], draws, recentre)
    out: dict[str, Any] = {"label": label, "computed": True, "better": better, "better_text": BETTER_TEXT[better],
                           "note": note, "n": n or {}, "values": values, "difference": {**diff, "of": f"{b} - {a}"}}
    if reference is not None:
        out["values"]["reference"] = bootstrap(reference, draws, recentre)
    if distance is not None:
        out["distance_to_reference"] = {k: bootstrap(distance[k], draws, recentre) for k in labels}
    out["verdict"] = verdict(better, diff, out.get("distance_to_reference") or values, labels)
    return out


def not_computed(label: str, better: str, reason: str, labels: Sequence[str]) -> dict[str, Any]:
    return {"label": label, "computed": False, "better": better, "better_text": BETTER_TEXT[better],
            "reason": reason, "values": {k: None for k in labels}, "difference": None, "verdict": None}


def distances(feats: dict[str, Any], labels: Sequence[str], draws: Draws, n: int, n_ref: int) -> dict[str, Any]:
    """KID (the headline) and FID of each model's images against the reference images."""
    sets = FeatureSets({"reference": feats["reference"], **{k: feats[k] for k in labels}})
    counts = {"generated": n, "reference": n_ref}

    def kid_of(k: str) -> Callable:
        return lambda g, r: sets.mmd2("reference", k, r, g)

    def fid_of(k: str) -> Callable:
        return lambda g, r: sets.fid("reference", k, r, g)

    kid_note = ("kernel inception distance: unbiased at any n, so it is the headline for small sets; "
                "about 0 for the same distribution")
    fid_note = (f"biased upward with few images (here {n} generated, {n_ref} reference; FID needs thousands to "
                "settle): compare FID only between sets of the same size; KID is the headline")
    return {"kid": entry("KID", "lower", {k: kid_of(k) for k in labels}, draws, labels, note=kid_note, n=counts),
            "fid": entry("FID", "lower", {k: fid_of(k) for k in labels}, draws, labels, recentre=True,
                         note=fid_note, n=counts)}


def optional_metrics(pils: dict[str, list[Any]], prompts: list[str], labels: Sequence[str], draws: Draws,
                     classifier: Any = None, clip: Optional[tuple[str, Any]] = None, progress: bool = True
                     ) -> dict[str, Any]:
    """Inception Score and CLIP score: computed only with weights the user passed, never with substitutes.

    ``classifier``: from ``metrics.load_classifier``; ``clip``: (what the user passed, ``load_clip(...)``).
    """
    from finetune.evaluation.evaluate import CLIP_REASON, IS_REASON
    from finetune.evaluation.metrics import run_network

    out: dict[str, Any] = {}
    n = {"generated": len(prompts)}
    if classifier is not None:
        logits = {k: run_network(classifier, pils[k], desc=f"classifier {k}", progress=progress) for k in labels}
        out["inception_score"] = entry(
            "Inception Score", "higher", {k: (lambda g, r, k=k: inception_score(_slice(logits[k], g)))
                                          for k in labels}, draws, labels, recentre=True, n=n,
            note=f"with {classifier.describe()['name']} (sha1 {classifier.sha1[:12]}); one split of "
                 f"{len(prompts)} images")
    else:
        out["inception_score"] = not_computed("Inception Score", "higher", IS_REASON, labels)
    if clip is not None:
        scores = clip_scores(clip[1], pils, prompts, labels, progress)
        out["clip_score"] = entry(
            "CLIP score", "higher", {k: (lambda g, r, k=k: float(_slice(scores[k], g).mean())) for k in labels},
            draws, labels, n=n, note=f"100 x cosine(image, prompt) with {clip[0]}")
    else:
        out["clip_score"] = not_computed("CLIP score", "higher", CLIP_REASON, labels)
    return out


def load_clip(clip: str) -> Any:
    """torchmetrics' CLIPScore on the weights ``clip`` names (a local folder, or a hub id already downloaded)."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    from finetune.evaluation.metrics import MetricError

    def load() -> Any:
        from transformers import CLIPModel, CLIPProcessor

        try:
            return CLIPModel.from_pretrained(clip).eval(), CLIPProcessor.from_pretrained(clip)
        except Exception as e:  # noqa: BLE001 - offline, missing, not a CLIP model
            raise MetricError(f"cannot load CLIP weights from {clip!r} ({type(e).__name__}); pass a local "
                              "CLIPModel folder (save_pretrained of a model and its processor).") from None

    return CLIPScore(model_name_or_path=load)


def clip_scores(metric: Any, pils: dict[str, list[Any]], prompts: list[str], labels: Sequence[str],
                progress: bool) -> dict[str, np.ndarray]:
    """Per-image CLIP scores (100 x cosine of image and prompt embeddings) with a ``load_clip`` metric."""
    import torch
    from tqdm import tqdm

    from finetune.evaluation.metrics import to_tensor

    out = {}
    with torch.inference_mode():
        for k in labels:
            vals = []
            for im, prompt in tqdm(list(zip(pils[k], prompts)), desc=f"CLIP score {k}", disable=not progress,
                                   leave=False):
                before = float(metric.score)
                metric.update(to_tensor(im)[None], [prompt])
                vals.append(float(metric.score) - before)
            out[k] = np.array(vals)
    return out


def _phash_near(images: list[Any], distance: int) -> np.ndarray:
    import imagehash

    hashes = [imagehash.phash(im) for im in images]
    near = np.array([[i != j and (hashes[i] - hashes[j]) <= distance for j in range(len(hashes))]
                     for i in range(len(hashes))], dtype=bool)
    return near


def _near_rate(near: np.ndarray, g: Optional[np.ndarray]) -> float:
    idx = np.arange(len(near)) if g is None else g
    return float(near[np.ix_(idx, idx)].any(axis=1).mean())


def image_statistics(pils: dict[str, list[Any]], ref_images: list[Any], labels: Sequence[str], draws: Draws
                     ) -> dict[str, Any]:
    """The shared descriptors per set (closer to the reference is better) and the near-duplicate rate."""
    from finetune.training.config import DataConfig

    desc = {k: {name: np.array(v) for name, v in describe_all(pils[k]).items()} for k in labels}
    ref = {name: np.array(v) for name, v in describe_all(ref_images).items()}
    out: dict[str, Any] = {}
    for name in DESCRIPTOR_NAMES:
        def mean_of(k: str, name: str = name) -> Callable:
            return lambda g, r: float(_slice(desc[k][name], g).mean())

        def dist_of(k: str, name: str = name) -> Callable:
            return lambda g, r: abs(float(_slice(desc[k][name], g).mean()) - float(_slice(ref[name], r).mean()))

        out[name] = entry(name, "closer", {k: mean_of(k) for k in labels}, draws, labels,
                          distance={k: dist_of(k) for k in labels},
                          reference=lambda g, r, name=name: float(_slice(ref[name], r).mean()),
                          n={"generated": len(pils[labels[0]]), "reference": len(ref_images)},
                          note="mean over images (sdloop.descriptors, as the service and the monitor compute it)")
    distance = DataConfig().near_duplicate_distance
    near = {k: _phash_near(pils[k], distance) for k in labels}
    out["near_duplicates"] = entry(
        "near-duplicate rate", "lower", {k: (lambda g, r, k=k: _near_rate(near[k], g)) for k in labels}, draws,
        labels, n={"generated": len(pils[labels[0]])},
        note=f"share of generated images with another image of the same model within perceptual-hash distance "
             f"{distance}: a diversity signal (copies of one image in a resample do not count)")
    return out


def extra_blocks(pils: dict[str, list[Any]], prompts: list[str], ref: Any, labels: Sequence[str], draws: Draws,
                 factories: Optional[list[Callable]] = None) -> list[dict[str, Any]]:
    """Optional per-image metric blocks (see ``finetune.evaluation.evaluate.ExtraMetric``), each column with intervals."""
    from finetune.evaluation.evaluate import EXTRA_METRICS

    blocks = []
    for factory in (EXTRA_METRICS if factories is None else factories):
        metric = factory()
        if metric is None:
            continue
        scores = {k: metric.score(pils[k], prompts) for k in labels}
        ref_scores = metric.score(ref.images, [c or "" for c in ref.captions])
        rows = {}
        for col in metric.columns:
            arrs = {k: np.array([np.nan if v is None else v for v in scores[k][col]], dtype=float) for k in labels}
            if not np.isfinite(arrs[labels[0]]).any():
                continue
            rarr = np.array([np.nan if v is None else v for v in ref_scores[col]], dtype=float)

            def mean(arr: np.ndarray, idx: Optional[np.ndarray]) -> float:
                sub = _slice(arr, idx)
                return float(np.nanmean(sub)) if np.isfinite(sub).any() else float("nan")

            row = entry(col, metric.better, {k: (lambda g, r, k=k, arrs=arrs: mean(arrs[k], g)) for k in labels},
                        draws, labels, n={"judged": int(np.isfinite(arrs[labels[0]]).sum())})
            row["reference_images"] = (bootstrap(lambda g, r, rarr=rarr: mean(rarr, r), draws)
                                       if np.isfinite(rarr).any() else None)
            row["level"] = metric.reference_levels.get(col)
            rows[col] = row
        if rows:
            blocks.append({"key": metric.key, "title": metric.title, "note": metric.note, "better": metric.better,
                           "level_label": metric.reference_label, "rows": rows})
    return blocks


def notes(n: int, n_ref: int) -> list[str]:
    out = [f"FID is biased upward with few images ({n} generated, {n_ref} reference here): compare FID only at "
           "equal set sizes; KID is unbiased and is the headline for small sets."]
    if n_ref < 10:
        out.append(f"Only {n_ref} reference images: every distance here is a rough guide. Pass --reference DIR "
                   "with more images of the target domain.")
    if n < 50:
        out.append(f"{n} images per model: intervals are wide; more images (--n) narrow them.")
    return out


CAPTION_FOLLOWING = "caption_following"


def _num(x: Optional[float]) -> str:
    from finetune.evaluation.report_html import fmt

    return fmt(x)


def _metric_sentence(m: dict[str, Any], titles: dict[str, str], labels: Sequence[str]) -> str:
    """One metric's finding: who scores better, both values, and whether it is beyond noise."""
    a, b = labels
    v = m.get("verdict") or {}
    vals = f"{_num(m['values'][a]['value'])} vs {_num(m['values'][b]['value'])}"
    if not v.get("better"):
        return f"{m['label']} ({m['better_text']}): no difference ({vals})."
    who = titles.get(v["better"], v["better"])
    if v.get("decisive"):
        return f"{m['label']} ({m['better_text']}): {who} is better ({vals}), outside its 95% interval."
    return (f"{m['label']} ({m['better_text']}): {who} scores better ({vals}), but within noise (the difference's 95% "
            "interval includes 0).")


def decision(data: dict[str, Any]) -> dict[str, Any]:
    """What decides the comparison, and what it says: the lines both the report and the command line lead with.

    Caption following decides when the base has the pixel checker (the prompts are synthetic-shape captions, read
    back from the images): it measures whether the model draws what it is asked. Otherwise KID decides. Every
    finding says whether the difference is beyond noise (its paired 95% interval excludes 0) or within it.
    Returns ``{"by": key, "label", "better": label or None, "decisive": bool, "lines": [...]}``.
    """
    labels = list(data["models"])
    a, b = labels
    titles = {k: v["title"] for k, v in data["models"].items()}
    kid = data["metrics"].get("kid") or {}
    block = next((blk for blk in data.get("extra", []) if blk.get("key") == CAPTION_FOLLOWING and blk.get("rows")),
                 None)
    kid_line = _metric_sentence(kid, titles, labels) if kid.get("computed") else ""
    if block is None:
        v = kid.get("verdict") or {}
        return {"by": "kid", "label": "KID", "better": v.get("better"), "decisive": bool(v.get("decisive")),
                "lines": [kid_line or "KID: not computed."]}
    wins = {k: [] for k in labels}
    noise = []
    for col, row in block["rows"].items():
        v = row.get("verdict") or {}
        cell = (f"{col} {_num(row['values'][a]['value'])} -> {_num(row['values'][b]['value'])}")
        if v.get("better") and v.get("decisive"):
            wins[v["better"]].append(cell)
        else:
            noise.append(col)
    if wins[b] and not wins[a]:
        better, text = b, f"{titles[b]} is better, outside the 95% interval on {', '.join(wins[b])}"
    elif wins[a] and not wins[b]:
        better, text = a, f"{titles[a]} is better, outside the 95% interval on {', '.join(wins[a])}"
    elif wins[a] and wins[b]:
        better, text = None, (f"mixed: {titles[b]} is better on {', '.join(wins[b])}; {titles[a]} on "
                              f"{', '.join(wins[a])} (each outside its 95% interval)")
    else:
        better, text = None, "no attribute differs beyond noise (every difference's 95% interval includes 0)"
    if noise and (wins[a] or wins[b]):
        text += f"; {', '.join(noise)} within noise"
    lines = [f"Caption following decides (the prompts are synthetic-shape captions, read back from the pixels; "
             f"{block['better']} is better): {text}."]
    if kid_line:
        lines.append(kid_line)
    return {"by": CAPTION_FOLLOWING, "label": "Caption following", "better": better,
            "decisive": better is not None, "lines": lines}
