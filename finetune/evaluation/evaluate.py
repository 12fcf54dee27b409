"""``sdloop eval``: how much better is the fine-tuned model than its base, and is a challenger better than the champion.

``evaluate_run`` generates images with the base model and with the fine-tuned model (same prompts, seeds, scheduler,
steps and guidance), compares both with reference images (FID, KID, image statistics, optional IS and CLIP score,
and extra blocks such as caption following for synthetic shapes), puts a bootstrap 95% interval on every number and
on every difference, and writes ``RUN_DIR/eval/eval.json`` and ``RUN_DIR/eval/report.html``. ``compare_runs`` does
the same for two fine-tuned runs; the retraining loop calls it with a fixed prompt set and seeds as its gate.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from finetune.evaluation.inputs import (EvalError, FeatureCache, Generation, Model, Reference, default_n, default_prompts,
                                  generate, make_seeds, open_images, read_prompts, reference_set, scheduler_name)
from sdloop.atomic import check_writable_dir, write_json_atomic, write_text_atomic
from sdloop.runfolder import RunFolder

EVAL_SCHEMA = "sdloop-eval"
EVAL_SCHEMA_VERSION = 1
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 7.5
DEFAULT_RESAMPLES = 1000
HEADLINE = "kid"
CLIP_REASON = ("not computed: pass --clip PATH_OR_ID (CLIP weights: a local CLIPModel folder or a hub id); no "
               "CLIP weights ship with sdloop and none are substituted")
IS_REASON = ("not computed: pass --is-classifier PATH (a TorchScript ImageNet classifier); the FID Inception file "
             "ends at its pool features and has no classification head")


@dataclass
class Evaluation:
    """What an evaluation found: eval.json's content, where it and the report are, and what was (re)generated."""

    data: dict[str, Any]
    json_path: Path
    report: Path
    generated: int
    reused: int

    @property
    def labels(self) -> tuple[str, str]:
        a, b = self.data["models"]
        return a, b

    def metric(self, key: str) -> dict[str, Any]:
        return self.data["metrics"][key]

    def better(self, key: str) -> Optional[str]:
        """The label of the model that is better on ``key`` (None: not computed, or a tie)."""
        verdict = self.metric(key).get("verdict") or {}
        return verdict.get("better")

    def decisive(self, key: str) -> bool:
        """Whether the paired difference's 95% interval excludes zero."""
        return bool((self.metric(key).get("verdict") or {}).get("decisive"))

    def lines(self) -> list[str]:
        """The report's headline and tables as text for the terminal: the decision first, then every metric and
        every extra block (caption following) with intervals and verdicts, as report.html shows them."""
        from finetune.evaluation import stats as eval_stats
        from finetune.evaluation.report_html import fmt

        a, b = self.labels
        titles = {k: v["title"] for k, v in self.data["models"].items()}
        decision = self.data.get("decision") or eval_stats.decision(self.data)
        out = list(decision["lines"]) + [""]

        def cells(values: dict[str, Any]) -> list[str]:
            return [f"{fmt(v['value'])} [{fmt(v['low'])}, {fmt(v['high'])}]" for v in (values[a], values[b])]

        out.append(f"{'metric':24s} {titles[a]:>24s} {titles[b]:>24s}   verdict")
        for key, m in self.data["metrics"].items():
            label = m["label"] + (" (decides)" if key == decision["by"] else "")
            if not m.get("computed"):
                out.append(f"{label:24s} {m['reason']}")
                continue
            c = cells(m["values"])
            out.append(f"{label:24s} {c[0]:>24s} {c[1]:>24s}   {m['verdict']['text']}")
        for block in self.data.get("extra", []):
            mark = " (decides)" if block.get("key") == decision["by"] else ""
            out += ["", f"{block['title']}{mark}: {block['better']} is better",
                    f"{'':24s} {titles[a]:>24s} {titles[b]:>24s}   verdict"]
            for col, row in block["rows"].items():
                c = cells(row["values"])
                out.append(f"{col:24s} {c[0]:>24s} {c[1]:>24s}   {row['verdict']['text']}")
        return out


@dataclass
class Comparison(Evaluation):
    """``compare_runs``' answer: run ``a`` (the champion) against run ``b`` (the challenger)."""

    def challenger_better(self, key: str = HEADLINE) -> bool:
        """The gate: b is better on ``key`` and the difference is outside its 95% interval."""
        return self.better(key) == "b" and self.decisive(key)


@dataclass
class Options:
    """Everything an evaluation can be told; ``sdloop eval`` flags map onto it one to one."""

    prompts: Optional[Sequence[str] | str | Path] = None   # a list, or a file with one prompt a line
    n: Optional[int] = None
    seeds: Optional[Sequence[int]] = None
    reference: Optional[str | Path] = None
    features: Optional[str | Path] = None
    clip: Optional[str] = None
    is_classifier: Optional[str | Path] = None
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    seed: int = 0
    resamples: int = DEFAULT_RESAMPLES
    progress: bool = True
    extras: Optional[list[Callable[[], Any]]] = None       # extra metric factories (default: EXTRA_METRICS)

    def check(self) -> None:
        if self.n is not None and (not isinstance(self.n, int) or self.n < 2):
            raise EvalError(f"--n must be an integer >= 2 (images per model), got {self.n!r}.")
        if not isinstance(self.steps, int) or not 1 <= self.steps <= 1000:
            raise EvalError(f"--steps must be an integer in [1, 1000], got {self.steps!r}.")
        if not (isinstance(self.guidance, (int, float)) and math.isfinite(self.guidance) and 0 <= self.guidance <= 50):
            raise EvalError(f"--guidance must be a number in [0, 50], got {self.guidance!r}.")
        if not isinstance(self.resamples, int) or not 20 <= self.resamples <= 100_000:
            raise EvalError(f"bootstrap resamples must be an integer in [20, 100000], got {self.resamples!r}.")


def _generation(run: RunFolder, opts: Options) -> Generation:
    if opts.prompts is None:
        prompts, source = default_prompts(run), f"validation captions of {run.path}"
    elif isinstance(opts.prompts, (str, Path)):
        prompts, source = read_prompts(opts.prompts), str(opts.prompts)
    else:
        prompts, source = [str(p) for p in opts.prompts], "given"
        if not prompts or not all(p.strip() for p in prompts):
            raise EvalError("the prompt list is empty or holds an empty prompt; pass at least one prompt.")
    if opts.seeds is not None:
        seeds = [int(s) for s in opts.seeds]
        if opts.n is not None and opts.n != len(seeds):
            raise EvalError(f"{len(seeds)} seeds were given for n={opts.n} images; give one seed per image.")
        if len(seeds) < 2:
            raise EvalError("give at least 2 seeds (one per image).")
    else:
        seeds = make_seeds(opts.n or default_n(prompts), opts.seed)
    if len(seeds) < len(prompts):  # every prompt shown gets at least one image
        source += f" (the first {len(seeds)} of {len(prompts)} prompts: n is smaller)"
        prompts = prompts[:len(seeds)]
    return Generation(prompts, seeds, opts.steps, float(opts.guidance), run.manifest().resolution, source)


def _evaluate(kind: str, models: list[Model], gen: Generation, ref: Reference, opts: Options, out_dir: Path,
              extra_info: dict[str, Any]) -> dict[str, Any]:
    """Generate, measure and write eval.json + report.html into ``out_dir``; return eval.json's content."""
    from finetune.evaluation import stats as eval_stats
    from finetune.evaluation.metrics import Draws, load_classifier, load_feature_extractor
    from finetune.evaluation.report_html import write_report

    t0 = time.time()
    # every network first: a wrong path fails in seconds, not after the images are made
    net = load_feature_extractor(opts.features)
    classifier = load_classifier(opts.is_classifier) if opts.is_classifier else None
    clip = (str(opts.clip), eval_stats.load_clip(str(opts.clip))) if opts.clip else None
    check_writable_dir(out_dir, "the evaluation folder")
    for m in models:
        check_writable_dir(m.images_dir, f"the image folder of {m.title}")
    clock = {"load": time.time() - t0}
    images = generate(models, gen, progress=opts.progress)
    clock["generate"] = time.time() - t0 - sum(clock.values())
    pils = {m.label: open_images([g.path for g in images[m.label]]) for m in models}
    prompts_of = [gen.prompts[gen.prompt_index(i)] for i in range(gen.n)]
    cache = FeatureCache(out_dir, net.sha1)
    feats = {m.label: cache.features(net, pils[m.label], f"features {m.title}", opts.progress) for m in models}
    feats["reference"] = cache.features(net, ref.images, "features reference", opts.progress)
    clock["features"] = time.time() - t0 - sum(clock.values())
    draws = Draws.make(gen.n, len(ref.images), opts.resamples, seed=opts.seed)
    labels = [m.label for m in models]
    metrics = eval_stats.distances(feats, labels, draws, gen.n, len(ref.images))
    metrics.update(eval_stats.optional_metrics(pils, prompts_of, labels, draws, classifier, clip, opts.progress))
    metrics.update(eval_stats.image_statistics(pils, ref.images, labels, draws))
    extras = eval_stats.extra_blocks(pils, prompts_of, ref, labels, draws, opts.extras)
    clock["metrics"] = time.time() - t0 - sum(clock.values())
    data = {
        "schema": EVAL_SCHEMA, "schema_version": EVAL_SCHEMA_VERSION, "kind": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "models": {m.label: {"title": m.title, "run": str(m.run.path.resolve()), **m.identity()} for m in models},
        "generation": {"prompts": gen.prompts, "prompt_source": gen.prompt_source, "n": gen.n, "seeds": gen.seeds,
                       "steps": gen.steps, "guidance": gen.guidance, "resolution": gen.resolution,
                       "scheduler": scheduler_name(models[0].run), "image_i_prompt": "prompts[i % len(prompts)]"},
        "images": {m.label: [{"prompt_index": g.prompt_index, "seed": g.seed, "file": str(g.path.resolve()),
                              "reused": g.reused} for g in images[m.label]] for m in models},
        "reference": {"source": ref.source, "root": str(ref.root), "n": len(ref.images), "files": ref.files,
                      "skipped": ref.skipped},
        "feature_extractor": net.describe(),
        "bootstrap": {"resamples": opts.resamples, "confidence": 0.95, "seed": opts.seed,
                      "method": "percentile over images, generated sets resampled as pairs (same prompt and "
                                "seed), reference resampled independently; FID and IS intervals recentred on "
                                "the point estimate (resampling repeats images, which inflates their bias)"},
        "headline": HEADLINE, "metrics": metrics, "extra": extras,
        "notes": eval_stats.notes(gen.n, len(ref.images)), **extra_info,
        "seconds": {**{k: round(v, 2) for k, v in clock.items()}, "total": round(time.time() - t0, 2)},
    }
    data["decision"] = eval_stats.decision(data)  # what the report and the command line lead with
    write_json_atomic(out_dir / "eval.json", data)
    write_text_atomic(out_dir / "report.html", write_report(data))
    data["_generated"] = sum(not g.reused for m in models for g in images[m.label])
    return data


def _result(cls: type, data: dict[str, Any], out_dir: Path) -> Any:
    generated = data.pop("_generated")
    total = sum(len(v) for v in data["images"].values())
    return cls(data, out_dir / "eval.json", out_dir / "report.html", generated, total - generated)


def evaluate_run(run_dir: str | Path, options: Optional[Options] = None, **kw: Any) -> Evaluation:
    """Evaluate a finished run against its base; write RUN_DIR/eval/eval.json and report.html.

    ``kw`` are Options fields (``n=8, quiet=True`` works for the demo: ``quiet`` turns the progress bars off).
    """
    opts = _options(options, kw)
    run = RunFolder(run_dir).require_finished()
    gen = _generation(run, opts)
    ref = reference_set(run, opts.reference)
    name = run.path.resolve().name
    models = [Model("base", "base", run, lora=False), Model("finetuned", f"fine-tuned ({name})", run, lora=True)]
    data = _evaluate("eval", models, gen, ref, opts, run.eval_dir, {"run": str(run.path.resolve()),
                                                                     "loss_curve": str(run.loss_curve.resolve())})
    return _result(Evaluation, data, run.eval_dir)


def compare_runs(run_a: str | Path, run_b: str | Path, prompts: Optional[Sequence[str] | str | Path] = None,
                 seeds: Optional[Sequence[int]] = None, out_dir: Optional[str | Path] = None,
                 options: Optional[Options] = None, **kw: Any) -> Comparison:
    """Run ``a`` (the champion) against run ``b`` (the challenger) on the same prompts and seeds.

    Defaults: run a's validation captions, run a's validation images as reference, and the output in
    ``RUN_B/eval/compare-<name of a>/``. ``Comparison.challenger_better("kid")`` is the retraining gate.
    """
    opts = _options(options, kw)
    if prompts is not None:
        opts.prompts = prompts
    if seeds is not None:
        opts.seeds = list(seeds)
    a, b = RunFolder(run_a).require_finished(), RunFolder(run_b).require_finished()
    if a.path.resolve() == b.path.resolve():
        raise EvalError(f"--compare needs two different runs; both are {a.path}.")
    if a.manifest().resolution != b.manifest().resolution:
        raise EvalError(f"{a.path} trained at {a.manifest().resolution} px and {b.path} at "
                        f"{b.manifest().resolution} px; compare runs made at the same resolution.")
    gen = _generation(a, opts)
    ref = reference_set(a, opts.reference)
    name_a, name_b = a.path.resolve().name, b.path.resolve().name
    out = Path(out_dir) if out_dir else b.eval_dir / f"compare-{name_a}"
    models = [Model("a", f"A: {name_a}", a, lora=True), Model("b", f"B: {name_b}", b, lora=True)]
    data = _evaluate("compare", models, gen, ref, opts, out, {"runs": {"a": str(a.path.resolve()),
                                                                       "b": str(b.path.resolve())}})
    return _result(Comparison, data, out)


def _options(options: Optional[Options], kw: dict[str, Any]) -> Options:
    kw = dict(kw)
    if "quiet" in kw:
        kw["progress"] = not kw.pop("quiet")
    unknown = set(kw) - set(Options.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown evaluation option(s): {', '.join(sorted(unknown))}")
    opts = Options(**{**(options.__dict__ if options else {}), **kw})
    opts.check()
    return opts


@dataclass
class ExtraMetric:
    """An optional block of per-image scores shown in the report beside FID and KID.

    ``score(images, prompts)`` returns, per column, one score per image (None where the image is not judged, e.g. a
    prompt the checker does not understand); the block shows each column's mean per model with a bootstrap interval,
    and ``reference_levels`` (e.g. chance) as an extra column. Return None from the factory when it does not apply.
    """

    key: str
    title: str
    columns: list[str]
    score: Callable[[list[Any], list[str]], dict[str, list[Optional[float]]]]
    better: str = "higher"
    note: str = ""
    reference_levels: dict[str, float] = field(default_factory=dict)
    reference_label: str = "chance"


def shapecheck_metric() -> Optional[ExtraMetric]:
    """Caption following for the synthetic-shapes domain (finetune.evaluation.shapecheck), when that module is present."""
    try:
        from finetune.evaluation import shapecheck
    except ImportError:
        return None

    def score(images: list[Any], prompts: list[str]) -> dict[str, list[Optional[float]]]:
        cols: dict[str, list[Optional[float]]] = {a: [] for a in shapecheck.ATTRIBUTES}
        for im, prompt in zip(images, prompts):
            named = shapecheck.parse_caption(prompt or "")
            read = shapecheck.read_attributes(im) if named else {}
            for a in shapecheck.ATTRIBUTES:
                cols[a].append(float(read.get(a) == named[a]) if named else None)
        return cols

    return ExtraMetric("caption_following", "Caption following (synthetic shapes, read from the pixels)",
                       list(shapecheck.ATTRIBUTES), score, note="share of images whose shape, colour, size, "
                       "position and background match the prompt; only prompts in the synthetic-caption grammar "
                       "are judged", reference_levels=shapecheck.chance_levels())


EXTRA_METRICS: list[Callable[[], Optional[ExtraMetric]]] = [shapecheck_metric]
