"""The model-family seam (sdloop.families) and the tiny SDXL base: detection, conditioning as stock diffusers
computes it, the base loaded by stock StableDiffusionXLPipeline, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sdloop.errors import UserError
from sdloop.families import (SD1, SD2, SDXL, FamilyError, FamilyMismatchError, check_same_layout, family_by_name,
                             family_for_record, family_of)
from sdloop_cli.main import main


@pytest.fixture(scope="module")
def sdxl_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("families") / "tiny-sdxl"
    assert main(["base", "tiny", str(out), "--family", "sdxl", "--seed", "3"]) == 0
    return out


def test_stock_sdxl_pipeline_loads_the_tiny_base_and_draws_64px_fast(sdxl_base: Path) -> None:
    import time

    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_base, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe("warm-up", num_inference_steps=1, height=64, width=64)
    t0 = time.perf_counter()
    image = pipe("a red circle", num_inference_steps=10, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert time.perf_counter() - t0 < 5.0  # about 0.1 s on 2 CPU cores; generous for a busy machine
    assert json.loads((sdxl_base / "sdloop_base.json").read_text()) == {"kind": "tiny-sdxl", "seed": 3}


def test_family_detection(sdxl_base: Path, tiny_base: Path, tmp_path: Path) -> None:
    assert family_of(sdxl_base) is SDXL
    assert family_of(str(tiny_base)) is SD1
    assert family_of({"_class_name": "StableDiffusionXLPipeline"}) is SDXL
    assert family_of({"_class_name": "ORTStableDiffusionXLPipeline"}) is SDXL
    assert family_of({"_class_name": "DiffusionPipeline", "text_encoder_2": ["transformers", "X"]}) is SDXL
    assert family_of({"_class_name": "StableDiffusionPipeline", "text_encoder_2": [None, None]}) is SD1
    # SD 2.x: the same layout, told apart by v-prediction
    v = tmp_path / "v"
    (v / "scheduler").mkdir(parents=True)
    (v / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (v / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    assert family_of(v) is SD2
    for name in ("StableDiffusion3Pipeline", "FluxPipeline"):
        with pytest.raises(FamilyError, match="SD3 and Flux are not yet"):
            family_of({"_class_name": name})
    with pytest.raises(FamilyError, match="sd1, sd2, sdxl"):
        family_by_name("flux")
    # manifests written before families existed
    assert family_for_record("", "StableDiffusionPipeline", "v_prediction") is SD2
    assert family_for_record("", "StableDiffusionXLPipeline") is SDXL
    assert family_for_record("sdxl") is SDXL


def test_family_data() -> None:
    assert SDXL.components() == ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                                 "scheduler")
    assert SD1.components() == ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    assert dict(SDXL.kohya_prefixes) == {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    assert dict(SD1.kohya_prefixes) == {"unet": "lora_unet", "text_encoder": "lora_te"}
    assert SDXL.pipeline_class().__name__ == "StableDiffusionXLPipeline"
    assert SDXL.ort_pipeline_class().__name__ == "ORTStableDiffusionXLPipeline"
    assert SD1.ort_pipeline_class().__name__ == "ORTStableDiffusionPipeline"
    assert (SD1.native_resolution, SD2.native_resolution, SDXL.native_resolution) == (512, 768, 1024)
    check_same_layout(SD1, SD2, "x", "y")  # one layout: no error
    with pytest.raises(FamilyMismatchError) as e:
        check_same_layout(SD1, SDXL, "an SD LoRA on an SDXL base", "train on the SDXL base.")
    assert "sd1" in str(e.value) and "sdxl" in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, UserError)


def test_sdxl_conditioning_equals_stock_encode_prompt_and_time_ids(sdxl_base: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_base, local_files_only=True)
    captions = ["a red circle", "a small blue star on white"]
    cond = SDXL.encode_prompts(pipe, captions)
    embeds, _, pooled, _ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
    assert torch.equal(cond.hidden, embeds) and torch.equal(cond.pooled, pooled)
    stock = pipe._get_add_time_ids((64, 48), (8, 0), (32, 32), torch.float32,
                                   text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(SDXL.time_ids((64, 48), (8, 0), (32, 32)), stock[0])
    kwargs = SDXL.unet_kwargs(cond, torch.stack([SDXL.time_ids((64, 48), (8, 0), (32, 32))] * 2))
    noisy = torch.randn(2, 4, 4, 4)
    assert pipe.unet(noisy, torch.tensor([10, 10]), **kwargs).sample.shape == noisy.shape
    assert SD1.time_ids((1, 1), (0, 0), (1, 1)) is None and SD1.added_cond(cond, None) is None


def test_base_tiny_family_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["base", "tiny", str(tmp_path / "a"), "--family", "sdxl", "--weights", "drawing"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "SD 1.x only" in err and "--weights random" in err
    assert main(["base", "tiny", str(tmp_path / "b"), "--family", "sd3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "sd3" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
