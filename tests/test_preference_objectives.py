"""Preference objectives (issue 20): Diffusion-DPO and Diffusion-KTO checked against hand computations, the frozen
reference equal to the champion's LoRA at step 0 (DPO loss log 2, KTO reward 0) and frozen after a step, and
`sdloop train --objective dpo|kto` through the front door on the tiny base."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from sdloop_cli.main import main


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# -- the losses by hand --------------------------------------------------------------------------------------------

def test_dpo_loss_matches_a_hand_computation() -> None:
    from finetune.training.preference import dpo_loss

    mw, ml = torch.tensor([0.10, 0.30], requires_grad=True), torch.tensor([0.20, 0.25], requires_grad=True)
    rw, rl = torch.tensor([0.15, 0.30], requires_grad=True), torch.tensor([0.15, 0.20])
    out = dpo_loss(mw, ml, rw, rl, beta=10.0, weight=torch.tensor([1.0, 3.0]))
    # pair 1: delta = (0.10 - 0.20) - (0.15 - 0.15) = -0.10, inside = -10/2 * -0.10 = 0.5
    # pair 2: delta = (0.30 - 0.25) - (0.30 - 0.20) = -0.05, inside = 0.25
    l1, l2 = -math.log(sig(0.5)), -math.log(sig(0.25))
    assert float(out.loss.detach()) == pytest.approx((1 * l1 + 3 * l2) / 4, abs=1e-6)
    assert out.accuracy == 1.0 and out.reward == pytest.approx((0.5 + 0.25) / 2, abs=1e-6)
    assert out.per_sample.tolist() == pytest.approx([l1, l2], abs=1e-6)
    out.loss.backward()
    assert rw.grad is None and mw.grad is not None  # the reference is a constant
    # d loss / d e_w of pair 1 = weight/sum * -(1 - sig(inside)) * -beta/2
    assert float(mw.grad[0]) == pytest.approx(1 / 4 * (1 - sig(0.5)) * 5.0, abs=1e-6)
    same = dpo_loss(torch.tensor([0.3]), torch.tensor([0.2]), torch.tensor([0.3]), torch.tensor([0.2]), 5000.0)
    assert float(same.loss) == pytest.approx(math.log(2), abs=1e-7)


def test_kto_loss_matches_a_hand_computation() -> None:
    from finetune.training.preference import kto_loss

    model = torch.tensor([0.10, 0.30, 0.20])
    ref = torch.tensor([0.12, 0.25, 0.20])
    out = kto_loss(model, ref, torch.tensor([True, False, True]), beta=10.0, desirable_weight=1.0,
                   undesirable_weight=2.0)
    # g = ref - model = [0.02, -0.05, 0]; z0 = max(0, mean g = -0.01) = 0
    # logits = s * beta * (g - z0) = [0.2, 0.5, 0]; loss = lambda * (1 - sig(logit))
    per = [1 * (1 - sig(0.2)), 2 * (1 - sig(0.5)), 1 * (1 - sig(0.0))]
    assert float(out.loss) == pytest.approx(sum(per) / 3, abs=1e-6)
    assert out.accuracy == pytest.approx(2 / 3) and out.reward == pytest.approx(10 * (-0.03) / 3, abs=1e-6)
    # a positive reference point: g = [0.10, 0.04], z0 = 0.07, logits = [0.3, 0.3]
    out = kto_loss(torch.tensor([0.10, 0.10]), torch.tensor([0.20, 0.14]), torch.tensor([True, False]), 10.0)
    assert float(out.loss) == pytest.approx(1 - sig(0.3), abs=1e-6)


def test_preference_settings_are_checked(capsys: pytest.CaptureFixture) -> None:
    from finetune.training.config import ConfigError, TrainConfig

    assert TrainConfig(objective="dpo").preference_beta() == 5000.0
    assert TrainConfig(objective="kto", beta=2.5).preference_beta() == 2.5
    for bad in ({"objective": "ppo"}, {"beta": -1.0}, {"desirable_weight": 0.0}, {"undesirable_weight": 1e9}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            TrainConfig(**bad)
    assert main(["train", "--help-config"]) == 0
    assert "undesirable_weight" in capsys.readouterr().out


# -- the reference is the champion, frozen -------------------------------------------------------------------------

def test_reference_is_the_champions_lora_frozen(tiny_base: Path, tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    from finetune.training.config import TrainConfig
    from finetune.training.lora import add_lora, lora_parameters, lora_state_dict
    from finetune.training.model import init_from
    from finetune.training.preference import denoising_error, dpo_loss, kto_loss
    from finetune.training.preference_run import add_reference, reference_mode
    from sdloop.atomic import save_safetensors

    cfg = TrainConfig(objective="dpo", rank=4, alpha=4.0, init_lora=str(tmp_path / "champion.safetensors"))

    def unet() -> UNet2DConditionModel:
        u = UNet2DConditionModel.from_pretrained(tiny_base / "unet")
        u.requires_grad_(False)
        add_lora(u, cfg.rank, cfg.alpha, 0.0, cfg.target_modules)
        return u

    torch.manual_seed(0)
    champion = unet()
    with torch.no_grad():
        for name, p in champion.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    save_safetensors(Path(cfg.init_lora), {f"unet.{k}": v for k, v in lora_state_dict(champion).items()}, {})
    torch.manual_seed(1)
    challenger = unet()
    init_from(cfg, challenger, None)
    add_reference(challenger, cfg)
    trainable = lora_parameters(challenger)
    assert trainable and all(".default." in n for n, p in challenger.named_parameters() if p.requires_grad)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g).repeat(2, 1, 1, 1)  # a pair shares its noise
    t = torch.tensor([100, 700]).repeat(2)
    cond = torch.randn(4, 77, challenger.config.cross_attention_dim, generator=g)

    def preds() -> tuple[torch.Tensor, torch.Tensor]:
        with reference_mode(challenger):
            ref = challenger(x + noise, t, cond).sample
        return challenger(x + noise, t, cond).sample, ref

    model, ref = preds()
    assert torch.equal(model, ref)
    challenger.disable_adapters()
    base = challenger(x + noise, t, cond).sample
    challenger.enable_adapters()
    assert (base - ref).abs().max() > 1e-3  # the reference is the champion's LoRA, not the base
    me, re = denoising_error(model, noise), denoising_error(ref, noise)
    step0 = dpo_loss(me[:2], me[2:], re[:2], re[2:], cfg.preference_beta())
    assert float(step0.loss.detach()) == pytest.approx(math.log(2), abs=1e-7) and step0.reward == 0.0
    kto = kto_loss(me, re, torch.tensor([True, False, True, False]), 5000.0)
    assert kto.reward == 0.0 and float(kto.loss) == pytest.approx(0.5, abs=1e-7)

    opt = torch.optim.SGD(trainable, lr=1.0)
    step0.loss.backward()
    opt.step()
    model2, ref2 = preds()
    assert torch.equal(ref2, ref) and not torch.equal(model2, model)
    me2 = denoising_error(model2, noise)
    assert float(dpo_loss(me2[:2], me2[2:], re[:2], re[2:], 5000.0).loss) != pytest.approx(math.log(2), abs=1e-4)


# -- the front door ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pref_data(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 prompts of the synthetic set: each its own image preferred over the next one's, and thumbs."""
    root = tmp_path_factory.mktemp("prefobj") / "prefs"
    (root / "img").mkdir(parents=True)
    rows = [json.loads(line) for line in (synth_data / "metadata.jsonl").read_text().splitlines()][:8]
    for r in rows:
        shutil.copy(synth_data / r["file_name"], root / "img" / Path(r["file_name"]).name)
    lines = []
    for i, r in enumerate(rows):
        mine, other = f"img/{Path(r['file_name']).name}", f"img/{Path(rows[(i + 1) % 8]['file_name']).name}"
        lines.append({"prompt": r["text"], "chosen": mine, "rejected": other, "rater": f"u{i % 3}"})
        lines.append({"prompt": r["text"], "image": other, "label": "undesirable"})
    (root / "preferences.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def run_config(tmp_path: Path, **extra: object) -> Path:
    from finetune.training.config import tiny_overrides

    cfg = {**tiny_overrides(), "max_steps": 1, "validation_every": 1, "validation_timesteps": 2,
           "batch_size": 2, "sample_every": 1, "sample_steps": 1, "sample_seeds": [0],
           "sample_prompts": ["a red circle"], "early_stopping_patience": 0,
           "data_config": {"validation_split": 0.25}, **extra}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def metric_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_dpo_from_the_champion_front_door(tiny_base: Path, tiny_run: Path, pref_data: Path, tmp_path: Path,
                                                workspace: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "dpo"
    rc = main(["train", "--config", str(run_config(tmp_path)), "--base", str(tiny_base), "--data", str(pref_data),
               "--output", str(out), "--objective", "dpo", "--init-lora", str(tiny_run), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    rows = metric_rows(out)
    first = rows[0]
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["val_reward"] == 0.0 and "val_reward_accuracy" in rows[-1]
    assert any(r.get("train_loss") is not None for r in rows)
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file() and (out / "manifest.json").is_file()
    from sdloop.atomic import load_safetensors

    keys = load_safetensors(out / "lora" / "pytorch_lora_weights.safetensors")[0]
    assert keys and not any("reference" in k for k in keys)  # only the challenger is saved


def test_train_kto_front_door_and_what_it_needs(tiny_base: Path, synth_data: Path, pref_data: Path, tmp_path: Path,
                                                workspace: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = str(run_config(tmp_path))
    out = tmp_path / "kto"
    rc = main(["train", "--config", cfg, "--base", str(tiny_base), "--data", str(pref_data), "--output", str(out),
               "--objective", "kto", "--undesirable-weight", "2", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    first = metric_rows(out)[0]
    # model == reference: every value sigmoid(0) = 1/2, so the loss is the weighted mean of lambda_y / 2
    assert first["val_reward"] == 0.0 and 0.5 <= first["val_loss"] <= 1.0
    for objective in ("kto", "dpo"):  # a plain dataset: one line saying what the objective needs
        rc = main(["train", "--config", cfg, "--base", str(tiny_base), "--data", str(synth_data), "--output",
                   str(tmp_path / f"plain-{objective}"), "--objective", objective, "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and "preferences.jsonl" in err and err.count("\n") == 1, err
    rc = main(["train", "--config", cfg, "--base", str(tiny_base), "--data", str(pref_data), "--output",
               str(tmp_path / "bad"), "--objective", "ppo", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "objective" in err and err.count("\n") == 1
