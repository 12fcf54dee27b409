"""`sdloop base pretrain --resume` says where it continues: from a phase's checkpoint, or, when the run was stopped
before that phase's first checkpoint, that the phase starts over and why, with the run's recorded step total."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.pretraining.pretrain import PretrainConfig, pretrain
from sdloop_cli.main import main

TINY = dict(images=24, vae_steps=4, unet_steps=6, vae_batch=4, unet_batch=4, eval_prompts=4, threads=1,
            checkpoint_seconds=0.0)


def test_a_resume_says_where_each_phase_continues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    import finetune.pretraining.pretrain as pt

    out = tmp_path / "p"
    real = pt.save_checkpoint

    def killed_in_the_unet_phase(root, *args, **kwargs):  # Ctrl-C before the UNet's first checkpoint
        if Path(root).name == "unet":
            raise KeyboardInterrupt
        return real(root, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(pt, "save_checkpoint", killed_in_the_unet_phase)
        with pytest.raises(KeyboardInterrupt):
            pretrain(out, PretrainConfig(**TINY), progress=False)
    capsys.readouterr()
    assert main(["base", "pretrain", str(out), "--resume", "--quiet"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    said = [line for line in err if "UNet" in line or "VAE" in line or "resum" in line]
    assert said == [f"no UNet checkpoint in {out / 'pretrain' / 'checkpoints' / 'unet'} yet (the run stopped before "
                    "its first; one is written every 0 s): the UNet phase starts over at step 0 of 6 steps"], err
    record = json.loads((out / "sdloop_base.json").read_text())
    assert record["phases"]["unet"]["steps"] == 6 and record["phases"]["vae"]["steps"] == 4, "the totals stay"

    # stopped inside the VAE phase, after a checkpoint: it says the step it continues from, and of what total
    assert "stopped" in pretrain(tmp_path / "q", PretrainConfig(**TINY), progress=False, stop_after=("vae", 2))
    capsys.readouterr()
    assert "stopped" in pretrain(tmp_path / "q", resume=True, progress=False, stop_after=("vae", 3))
    err = capsys.readouterr().err
    assert "resuming the VAE phase from its checkpoint at step 2 of 4 steps" in err and "starts over" not in err
