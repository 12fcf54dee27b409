"""Benchmark: sft vs kto vs dpo on the drawing base, from the same simulated feedback, side by side.

    nice python benchmarks/preference.py --out DIR [--prompts 96] [--candidates 2] [--steps 120] [--seeds 0 1 2]
                                         [--lrs 1e-3 3e-3 1e-2] [--select-prompts 32] [--test-prompts 64] [--quick]
                                         [--json PATH]

The loop's situation, simulated: the champion (the shipped drawing base, no LoRA) serves ``--candidates`` images
for each of ``--prompts`` prompts; simulated users with the pixel checker's eyes (``sdloop_cli.demo_loop``'s:
finetune/evaluation/shapecheck.py) give a thumbs up when the image shows the colour they asked for, a thumbs down
otherwise. That one set of judged generations becomes the three objectives' data:

- sft: fine-tuning on the liked images (what the loop's retraining does today);
- kto: every image with its thumb (desirable / undesirable), Diffusion-KTO (Li et al. 2024);
- dpo: for each prompt whose two candidates got different thumbs, the pair (liked over disliked), Diffusion-DPO
  (Wallace et al. 2023).

Each objective gets the same steps, batch (in records), LoRA recipe (``tiny_overrides``), no validation split (the
last step's LoRA, as the demo) and the same learning-rate search: every rate in ``--lrs`` at seed 0, scored by
caption following (colour) on ``--select-prompts`` selection prompts; the chosen rate then trains ``--seeds``. Every
seed's LoRA is scored on ``--test-prompts`` held-out prompts (disjoint from the feedback and selection prompts):
the checker's colour share and the mean share over its five attributes, pooled over seeds with a bootstrap
interval over prompts, and KID against real drawings of the same test captions (Inception features, the interval
from resampling both sets). The champion's row is the same test without a LoRA.

Progress goes to stderr; stdout gets the table; ``--json`` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FEEDBACK_SEED, SELECT_SEED, TEST_SEED = 4242, 5353, 6464   # caption draws: three disjoint prompt sets
GEN_STEPS = 20


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pipeline(base: Path, lora: Optional[Path] = None) -> Any:
    import torch

    from sdloop.pipelines import load_pipeline, quiet_diffusers

    with quiet_diffusers():
        pipe = load_pipeline(str(base), torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        if lora is not None:
            pipe.load_lora_weights(str(lora), weight_name="pytorch_lora_weights.safetensors")
    return pipe


def liked(image: Any, prompt: str) -> bool:
    """The simulated user's thumb: up when the checker reads the colour the prompt asked for."""
    from finetune.evaluation.shapecheck import parse_caption, read_attributes

    return read_attributes(image).get("colour") == parse_caption(prompt).get("colour")


def make_feedback(base: Path, out: Path, n_prompts: int, k: int) -> dict[str, Any]:
    """Serve k candidates per prompt from the champion, judge them, write the thumbs and the pairs datasets."""
    from finetune.evaluation.shapecheck import eval_captions, pipeline_images

    thumbs, pairs = out / "feedback-thumbs", out / "feedback-pairs"
    if (thumbs / "preferences.jsonl").is_file() and (pairs / "preferences.jsonl").is_file():
        return json.loads((out / "feedback.json").read_text())
    prompts = eval_captions(n_prompts, FEEDBACK_SEED)
    pipe = pipeline(base)
    rows, pair_rows, ups = [], [], 0
    for d in (thumbs, pairs):
        (d / "img").mkdir(parents=True, exist_ok=True)
    for i, prompt in enumerate(prompts):
        images = pipeline_images(pipe, [prompt] * k, [i * k + j for j in range(k)], steps=GEN_STEPS)
        votes = []
        for j, im in enumerate(images):
            name = f"img/p{i:03d}_c{j}.png"
            for d in (thumbs, pairs):
                im.save(d / name)
            up = liked(im, prompt)
            ups += up
            votes.append((name, up))
            rows.append({"prompt": prompt, "image": name, "label": "desirable" if up else "undesirable",
                         "rater": f"user{i % 8}"})
        good = [n for n, up in votes if up]
        bad = [n for n, up in votes if not up]
        for g, b in ((g, b) for g in good for b in bad):  # every liked-over-disliked pair of the prompt
            pair_rows.append({"prompt": prompt, "chosen": g, "rejected": b, "rater": f"user{i % 8}"})
    for d, lines in ((thumbs, rows), (pairs, pair_rows)):
        (d / "preferences.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    info = {"prompts": n_prompts, "candidates": k, "images": len(rows), "thumbs_up": ups,
            "thumbs_down": len(rows) - ups, "pairs": len(pair_rows)}
    (out / "feedback.json").write_text(json.dumps(info))
    return info


def train_one(base: Path, data: Path, out: Path, objective: str, lr: float, seed: int, steps: int,
              extra: Optional[dict[str, Any]] = None) -> Path:
    from finetune.training.config import TrainConfig, tiny_overrides
    from finetune.training.train import train

    if (out / "manifest.json").is_file():
        return out
    cfg = TrainConfig.from_dict({
        **tiny_overrides(), "base": str(base), "data": str(data), "output": str(out), "objective": objective,
        "learning_rate": lr, "seed": seed, "max_steps": steps, "batch_size": 8, "noise_offset": 0.1,
        "early_stopping_patience": 0, "sample_every": steps, "sample_steps": 8, "sample_seeds": [0],
        "data_config": {"validation_split": 0.0}, "augment": {"bucket_step": 8, "variants": 1, "flip_p": 0.0},
        **(extra or {})})
    train(cfg, progress=False)
    return out


def generate(base: Path, lora: Optional[Path], prompts: list[str]) -> list[Any]:
    from finetune.evaluation.shapecheck import pipeline_images

    return pipeline_images(pipeline(base, lora), prompts, list(range(len(prompts))), steps=GEN_STEPS)


def follow(images: list[Any], prompts: list[str]) -> dict[str, list[int]]:
    """Per prompt: 1 when the checker reads the asked colour; and the number of the five attributes matched."""
    from finetune.evaluation.shapecheck import ATTRIBUTES, parse_caption, read_attributes

    colour, attrs = [], []
    for im, p in zip(images, prompts):
        read, asked = read_attributes(im), parse_caption(p)
        colour.append(int(read["colour"] == asked["colour"]))
        attrs.append(sum(int(read[a] == asked[a]) for a in ATTRIBUTES))
    return {"colour": colour, "attributes": attrs}


def boot_mean(values: list[float], resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (resamples, len(v)))].mean(1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return {"value": float(v.mean()), "low": float(lo), "high": float(hi)}


def kid(features: dict[str, Any], real: str, fake: str, resamples: int = 300) -> dict[str, Any]:
    from finetune.evaluation.metrics import Draws, FeatureSets, bootstrap

    sets = FeatureSets({real: features[real], fake: features[fake]})
    draws = Draws.make(len(features[fake]), len(features[real]), resamples, seed=0)
    return bootstrap(lambda g, r: sets.mmd2(real, fake, r, g), draws)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--candidates", type=int, default=2)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    ap.add_argument("--objectives", nargs="+", default=["sft", "kto", "dpo"])
    ap.add_argument("--select-prompts", type=int, default=32)
    ap.add_argument("--test-prompts", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the script")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if a.quick:
        a.prompts, a.steps, a.seeds, a.lrs, a.select_prompts, a.test_prompts = 8, 4, [0, 1, 2], [3e-3, 1e-2], 4, 8
    import torch

    torch.set_num_threads(a.threads)
    from finetune.data.synth import draw_samples
    from finetune.evaluation.metrics import load_inception, run_network
    from finetune.evaluation.shapecheck import eval_captions
    from finetune.pretraining.base import write_drawing_base

    a.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SDLOOP_HOME", str(a.out / "home"))
    base = a.out / "base"
    if not (base / "model_index.json").is_file():
        write_drawing_base(base)
    t0 = time.time()
    fb = make_feedback(base, a.out, a.prompts, a.candidates)
    log(f"feedback: {fb}")
    data = {"sft": a.out / "feedback-thumbs", "kto": a.out / "feedback-thumbs", "dpo": a.out / "feedback-pairs"}
    # KTO (Ethayarajh et al. 2024, Section 4.2) advises lambda_D * n_D / (lambda_U * n_U) in [1, 4/3]: with fewer
    # thumbs down than up, the undesirable weight makes up the difference (ratio 1)
    extra = {"kto": {"undesirable_weight": round(max(1.0, fb["thumbs_up"] / max(1, fb["thumbs_down"])), 3)}}
    select = eval_captions(a.select_prompts, SELECT_SEED)
    samples = list(draw_samples(a.test_prompts, seed=TEST_SEED))
    test = [c for _, c in samples]
    net = load_inception()
    features = {"real": run_network(net, [im for im, _ in samples], desc="real")}
    results: dict[str, Any] = {"feedback": fb, "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                            for k, v in vars(a).items()}, "rows": {}}

    def test_scores(name: str, loras: list[Optional[Path]]) -> dict[str, Any]:
        colour, attrs, imgs = [], [], []
        for lora in loras:
            images = generate(base, lora, test)
            f = follow(images, test)
            colour += f["colour"]
            attrs += [x / 5 for x in f["attributes"]]
            imgs += images
        features[name] = run_network(net, imgs, desc=name)
        n = len(test)  # per prompt, the mean over seeds: paired with the champion's image of the same prompt and seed
        per_prompt = [sum(colour[i::n]) / len(loras) for i in range(n)]
        out = {"colour": boot_mean(colour), "attributes": boot_mean(attrs), "kid": kid(features, "real", name),
               "images": len(imgs), "per_prompt": per_prompt}
        if "champion" in results["rows"]:
            champ = results["rows"]["champion"]["per_prompt"]
            out["colour_vs_champion"] = boot_mean([a - b for a, b in zip(per_prompt, champ)])
        return out

    results["rows"]["champion"] = test_scores("champion", [None])
    results["champion_selection"] = sum(follow(generate(base, None, select), select)["colour"]) / len(select)
    log(f"champion selection colour {results['champion_selection']:.3f}")
    log(f"champion: {results['rows']['champion']['colour']}")
    for obj in a.objectives:
        search = {}
        for lr in a.lrs:
            run = train_one(base, data[obj], a.out / "runs" / f"{obj}-lr{lr:g}-s{a.seeds[0]}", obj, lr, a.seeds[0],
                            a.steps, extra.get(obj))
            search[lr] = sum(follow(generate(base, run / "lora", select), select)["colour"]) / len(select)
            log(f"{obj} lr {lr:g} seed {a.seeds[0]}: selection colour {search[lr]:.3f}")
        best = max(search, key=lambda lr: (search[lr], -lr))
        runs = [a.out / "runs" / f"{obj}-lr{best:g}-s{a.seeds[0]}"]
        for s in a.seeds[1:]:
            runs.append(train_one(base, data[obj], a.out / "runs" / f"{obj}-lr{best:g}-s{s}", obj, best, s, a.steps,
                                  extra.get(obj)))
        row = test_scores(obj, [r / "lora" for r in runs])
        row.update({"lr": best, "search": {f"{k:g}": v for k, v in search.items()}, "seeds": a.seeds,
                    "settings": extra.get(obj, {})})
        results["rows"][obj] = row
        log(f"{obj}: lr {best:g} colour {row['colour']}")
    results["wall_seconds"] = round(time.time() - t0, 1)
    print(table(results))
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return 0


def _ci(d: dict[str, Any], fmt: str = ".2f") -> str:
    if d.get("value") is None:
        return "n/a"
    lo, hi = d.get("low"), d.get("high")
    return f"{d['value']:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]" if lo is not None else f"{d['value']:{fmt}}"


def table(results: dict[str, Any]) -> str:
    """The markdown table: one row per objective (and the champion), intervals in brackets."""
    fb, s = results["feedback"], results["settings"]
    lines = [f"Feedback: {fb['images']} images of {fb['prompts']} prompts from the champion, {fb['thumbs_up']} thumbs "
             f"up / {fb['thumbs_down']} down, {fb['pairs']} pairs; {s['steps']} steps, batch 8 records, seeds "
             f"{s['seeds']}, learning rates {s['lrs']} (chosen on {s['select_prompts']} selection prompts); test: "
             f"{s['test_prompts']} held-out prompts x {len(s['seeds'])} seeds, 95% bootstrap intervals over prompts "
             f"(the champion: 1 image per prompt, same seeds); selection score of the champion "
             f"{results.get('champion_selection', float('nan')):.2f}.", "",
             "| objective | learning rate | colour followed | vs champion (paired) | all five attributes | KID x 1000 "
             "| selection (per lr) |",
             "|---|---|---|---|---|---|---|"]
    for name, row in results["rows"].items():
        k = {key: (v * 1000 if isinstance(v, float) else v) for key, v in row["kid"].items()}
        search = ", ".join(f"{lr}: {v:.2f}" for lr, v in row.get("search", {}).items()) or "-"
        vs = _ci(row["colour_vs_champion"], "+.2f") if "colour_vs_champion" in row else "-"
        lines.append(f"| {name} | {row.get('lr', '-')} | {_ci(row['colour'])} | {vs} | {_ci(row['attributes'])} | "
                     f"{_ci(k, '.1f')} | {search} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
