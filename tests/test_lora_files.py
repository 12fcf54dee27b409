"""The run's LoRA files load in stock diffusers and reproduce the trained model; the kohya file has kohya keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune.training.config import TrainConfig, tiny_overrides
from finetune.training.lora import add_lora, lora_state_dict, read_safetensors, save_diffusers_lora, save_kohya_lora, to_kohya
from finetune.training.train import train


@pytest.fixture(scope="module")
def te_run(tiny_base: Path, synth_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """A short run that trains the UNet (convs included) and the text encoder, with alpha != rank."""
    out = tmp_path_factory.mktemp("runs") / "te"
    values = {**tiny_overrides(), "base": str(tiny_base), "data": str(synth_data), "output": str(out),
              "max_steps": 6, "validation_every": 3, "rank": 4, "alpha": 8.0, "learning_rate": 2e-2,
              "train_text_encoder": True, "text_encoder_lr": 2e-2, "sample_steps": 1, "sample_seeds": [0],
              "ema": True, "ema_decay": 0.5}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SDLOOP_HOME", str(tmp_path_factory.mktemp("home")))
        return train(TrainConfig.from_dict(values), progress=False)


def _image(pipe, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return pipe("a large red circle on the left, blue background", num_inference_steps=3, height=64, width=64,
                generator=g, output_type="np").images[0]


def test_diffusers_load_lora_weights_changes_output_and_reproduces_training(te_run, tiny_base: Path,
                                                                           monkeypatch) -> None:
    import diffusers.loaders.lora_base as lora_base
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, local_files_only=True)
    before = _image(pipe)
    # stock diffusers, the run's folder as it is. With HF_HUB_OFFLINE=1 diffusers insists on weight_name even for
    # a local folder, so the folder-only call is made as a user with a network makes it (nothing is fetched).
    monkeypatch.setattr(lora_base, "HF_HUB_OFFLINE", False)
    pipe.load_lora_weights(te_run.run_dir / "lora")
    after = _image(pipe)
    offline = StableDiffusionPipeline.from_pretrained(tiny_base, local_files_only=True)
    monkeypatch.setattr(lora_base, "HF_HUB_OFFLINE", True)
    offline.load_lora_weights(te_run.run_dir / "lora", weight_name="pytorch_lora_weights.safetensors")
    assert abs(_image(offline) - after).max() < 1e-6
    assert abs(after - before).mean() > 1e-3, "the LoRA changes the images"

    # same weights attached by hand with peft at the configured alpha: identical UNet and text-encoder outputs
    ref = StableDiffusionPipeline.from_pretrained(tiny_base, local_files_only=True)
    cfg = TrainConfig.from_yaml(te_run.run_dir / "config.yaml")
    add_lora(ref.unet, cfg.rank, cfg.alpha, 0.0, cfg.target_modules)
    add_lora(ref.text_encoder, cfg.rank, cfg.alpha, 0.0, cfg.text_encoder_target_modules)
    best, _ = read_safetensors(te_run.run_dir / "checkpoints" / "best_lora.safetensors")
    from finetune.training.lora import load_lora_state_dict, split_prefixed

    unet_sd, te_sd = split_prefixed(best)
    load_lora_state_dict(ref.unet, unet_sd)
    load_lora_state_dict(ref.text_encoder, te_sd)
    np_ref = _image(ref)
    assert abs(np_ref - after).max() < 1e-4, "diffusers applies rank, alpha and both adapters as trained"


def test_lora_metadata(te_run) -> None:
    tensors, meta = read_safetensors(te_run.run_dir / "lora" / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("unet.") for k in tensors) and any(k.startswith("text_encoder.") for k in tensors)
    adapter = json.loads(meta["lora_adapter_metadata"])
    assert adapter["unet.r"] == 4 and adapter["unet.lora_alpha"] == 8.0
    assert json.loads(meta["sdloop.rank"]) == 4 and json.loads(meta["sdloop.alpha"]) == 8.0
    assert meta["sdloop.base_model"] and meta["sdloop.sdloop_version"]
    assert json.loads(meta["sdloop.steps"]) == te_run.best_step


def test_kohya_file_has_kohya_keys_and_loads_like_the_diffusers_file(te_run, tiny_base: Path) -> None:
    from diffusers import StableDiffusionPipeline

    tensors, meta = read_safetensors(te_run.run_dir / "lora" / "lora_kohya.safetensors")
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0"
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in tensors)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in tensors
    assert float(tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"]) == 8.0
    a = StableDiffusionPipeline.from_pretrained(tiny_base, local_files_only=True)
    a.load_lora_weights(te_run.run_dir / "lora", weight_name="lora_kohya.safetensors")
    b = StableDiffusionPipeline.from_pretrained(tiny_base, local_files_only=True)
    b.load_lora_weights(te_run.run_dir / "lora", weight_name="pytorch_lora_weights.safetensors")
    assert abs(_image(a) - _image(b)).max() < 1e-4, "kohya and diffusers files hold the same adapter"


def test_to_kohya_rejects_non_lora_keys() -> None:
    with pytest.raises(ValueError, match="unexpected LoRA key"):
        to_kohya({"down.weight": torch.zeros(1)}, None, 1.0)


def test_saves_are_safetensors_only_and_bad_targets_are_named(tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4)
    add_lora(unet, 2, 2.0, 0.0, ["to_q"])
    sd = lora_state_dict(unet)
    save_diffusers_lora(tmp_path / "l.safetensors", sd, None, 2, 2.0, ["to_q"], [], {"steps": 1})
    save_kohya_lora(tmp_path / "k.safetensors", sd, None, 2, 2.0, {"steps": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.safetensors", "l.safetensors"]
    with pytest.raises(ValueError, match="target_modules"):
        add_lora(unet, 2, 2.0, 0.0, ["no_such_module"])
