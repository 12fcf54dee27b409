"""The pixel checker of caption following: it reads real `data synth` images back, it is not fooled by wrong
captions, and it degrades gracefully on blurred, noisy images like a small model's samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from finetune.evaluation.shapecheck import (ATTRIBUTES, caption_scores, chance_levels, eval_captions, parse_caption,
                                 read_attributes)
from finetune.data.synth import CONCEPTS, draw_samples, make_synthetic_dataset
from sdloop_cli.main import main


def _pairs_from_folder(folder: Path) -> list[tuple[Image.Image, str]]:
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    return [(Image.open(folder / r["file_name"]).convert("RGB"), r["text"]) for r in rows]


def test_reads_back_every_attribute_of_real_synth_images(tmp_path: Path) -> None:
    """Measured on 800 images while writing it: 100% on every attribute. The PNGs go through the front door."""
    assert main(["data", "synth", str(tmp_path / "d"), "--n", "160", "--seed", "11"]) == 0
    scores = caption_scores(_pairs_from_folder(tmp_path / "d"))
    assert all(scores.judged[a] == 160 for a in ATTRIBUTES)
    for attribute, share in scores.shares.items():
        assert share >= 0.97, f"{attribute}: {share:.2f} ({scores.line()})"


def test_reads_the_concept_colour(tmp_path: Path) -> None:
    out = make_synthetic_dataset(tmp_path / "pink", n=40, seed=2, concept="pink", concept_share=0.5)
    pairs = _pairs_from_folder(out)
    pink = [(im, c) for im, c in pairs if parse_caption(c)["colour"] == "pink"]
    assert 8 <= len(pink) <= 32, "about half the images show the concept"
    assert caption_scores(pink).shares["colour"] == 1.0
    assert caption_scores(pairs).shares["colour"] >= 0.97


def test_wrong_captions_score_near_chance() -> None:
    pairs = list(draw_samples(200, seed=31))
    captions = [c for _, c in pairs]
    shifted = caption_scores([(im, captions[(i + 1) % len(captions)]) for i, (im, _) in enumerate(pairs)])
    chance = chance_levels()
    for attribute in ATTRIBUTES:
        assert shifted.shares[attribute] < chance[attribute] + 0.15, (attribute, shifted.line())


def test_blurred_noisy_images_still_read() -> None:
    """A small model's samples are soft and speckled: blur 1.5 px plus noise of std 25 keeps >= 90%."""
    rng = np.random.default_rng(0)
    pairs = []
    for img, caption in draw_samples(120, seed=5):
        arr = np.asarray(img.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float64)
        arr = np.clip(arr + rng.normal(0, 25, arr.shape), 0, 255).astype(np.uint8)
        pairs.append((Image.fromarray(arr), caption))
    scores = caption_scores(pairs)
    assert min(scores.shares.values()) >= 0.9, scores.line()


def test_nothing_to_read_is_a_miss_and_other_captions_are_not_judged() -> None:
    blank = Image.new("RGB", (64, 64), (128, 128, 128))
    read = read_attributes(blank)
    assert read["background"] == "grey" and read["colour"] is None and read["shape"] is None
    scores = caption_scores([(blank, "a large red circle in the centre, grey background"),
                             (blank, "a photo of a cat")])
    assert scores.judged["colour"] == 1 and scores.matched["colour"] == 0 and scores.shares["background"] == 1.0
    hexagon = next(iter(draw_samples(1, seed=0)))[0]
    unknown = caption_scores([(hexagon, "a large red hexagon in the centre, grey background")])
    assert unknown.matched["shape"] == 0, "a shape word the checker does not know is a miss, never a pass"


def test_other_sizes_and_fixed_caption_sets() -> None:
    img, caption = next(iter(draw_samples(1, seed=4, size=128)))
    assert read_attributes(img) == parse_caption(caption), "a 128 px image is read like a 64 px one"
    assert eval_captions(8, 1) == eval_captions(8, 1)
    assert all(parse_caption(c)["colour"] == CONCEPTS[0] for c in eval_captions(8, 1, concept=CONCEPTS[0]))
    with pytest.raises(Exception, match="unknown"):
        eval_captions(2, 1, concept="mauve")
