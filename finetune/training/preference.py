"""Preference objectives for diffusion models, as pure functions of denoising errors: Diffusion-DPO and Diffusion-KTO.

Both compare the trained model (the challenger) with a frozen reference (the champion) through the per-sample
denoising error ``e = mean((pred - target)^2)`` over the latent's pixels, at the same noisy latent, timestep and noise
for both models. A lower error than the reference's on an image means the model now gives it higher likelihood (the
diffusion ELBO is a weighted sum of these errors), which is what the implicit rewards measure.

What was chosen, and why:

- **Diffusion-DPO** (Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference Optimization",
  Section 4, Eq. 14): ``L = -log sigmoid(-beta*T*w(lambda_t) * ((e_w - e_w_ref) - (e_l - e_l_ref)))`` for a pair
  (winner w, loser l) sharing noise and timestep. We follow the authors' code (SalesforceAIResearch/DiffusionDPO,
  also diffusers' ``examples/research_projects/diffusion_dpo``): ``inside = -0.5 * beta * (model_diff - ref_diff)``
  with per-sample mean squared errors, i.e. T*w(lambda_t) is constant and folded with 1/2 into beta; beta = 5000 for
  SD 1.5 (Section 5.1). The implicit reward accuracy is the share of pairs with ``inside > 0``.
- **Diffusion-KTO** (Li et al. 2024, "Aligning Diffusion Models by Optimizing Human Utility", Section 3, Eq. 7-8,
  after KTO, Ethayarajh et al. 2024): per image the implicit reward ``r = beta * (e_ref - e_model)``; the reference
  point ``z0`` is the KL estimate, the batch mean of ``e_ref - e_model`` clipped at 0 and not differentiated (Eq. 8,
  as in the authors' code, jacklishufan/diffusion-kto); the value is ``lambda_D * sigmoid(r - beta*z0)`` for a
  desirable image and ``lambda_U * sigmoid(beta*z0 - r)`` for an undesirable one, and the loss ``lambda_y - value``
  (the sigmoid "halo" the paper uses).
- **Timesteps**: uniform t in [0, T) as both papers train (w(lambda_t) constant); no min-SNR weighting, which
  neither paper uses and which would change what beta means.
- **Weights**: each record's ``weight`` (e.g. a rater cap from the loop) scales its loss; the mean is weighted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["PreferenceLoss", "denoising_error", "dpo_loss", "kl_reference_point", "kto_loss"]

LOG2 = math.log(2.0)


@dataclass
class PreferenceLoss:
    """A preference loss (differentiable, weighted mean) and what to log beside it."""

    loss: torch.Tensor
    accuracy: float           # implicit reward accuracy: share of pairs (dpo) / images (kto) ranked the right way
    reward: float             # mean implicit reward (dpo: margin beta/2*((e_l-e_l_ref)-(e_w-e_w_ref)); kto: r)
    per_sample: torch.Tensor  # the unweighted losses, detached


def denoising_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over every non-batch dimension, in fp32: the e of both papers."""
    err = F.mse_loss(pred.float(), target.float(), reduction="none")
    return err.mean(dim=tuple(range(1, err.ndim)))


def _weighted_mean(x: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    if weight is None:
        return x.mean()
    w = weight.to(x.device, x.dtype)
    return (x * w).sum() / w.sum().clamp_min(1e-12)


def dpo_loss(model_w: torch.Tensor, model_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, beta: float,
             weight: Optional[torch.Tensor] = None) -> PreferenceLoss:
    """Diffusion-DPO (Wallace et al. 2023, Eq. 14, in the authors' code's form): -log sigmoid(-beta/2 * delta).

    ``delta = (model_w - model_l) - (ref_w - ref_l)``: the winner's error must fall relative to the reference more
    than the loser's. Inputs are per-sample denoising errors of shape [B]; the reference ones carry no gradient.
    With model == reference ``delta = 0`` and the loss is exactly log 2.
    """
    inside = -0.5 * beta * ((model_w - model_l) - (ref_w - ref_l).detach())
    per = -F.logsigmoid(inside)
    return PreferenceLoss(loss=_weighted_mean(per, weight), accuracy=float((inside > 0).float().mean()),
                          reward=float(inside.detach().mean()), per_sample=per.detach())


def kl_reference_point(model_err: torch.Tensor, ref_err: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 (Li et al. 2024, Eq. 8): mean(e_ref - e_model) over the batch, clipped at 0, detached.

    Ethayarajh et al. estimate KL(model || reference) from mismatched pairs; the Diffusion-KTO code takes the batch
    mean of the per-image log-likelihood ratio, which is what is done here (a single-process batch; under data
    parallelism the authors average it over processes, which ``reduce`` does when given).
    """
    return (ref_err - model_err).mean().clamp(min=0).detach()


def kto_loss(model_err: torch.Tensor, ref_err: torch.Tensor, desirable: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             weight: Optional[torch.Tensor] = None, z0: Optional[torch.Tensor] = None) -> PreferenceLoss:
    """Diffusion-KTO (Li et al. 2024, Eq. 7-8) with the sigmoid value function: lambda_y * (1 - sigmoid(s*beta*(g-z0))).

    ``g = e_ref - e_model`` (so the implicit reward is ``r = beta * g``), ``s = +1`` for a desirable image and -1 for
    an undesirable one, ``z0`` the KL reference point (``kl_reference_point`` of this batch unless given). With model
    == reference r = 0, z0 = 0 and each loss is lambda_y / 2.
    """
    g = ref_err.detach() - model_err
    if z0 is None:
        z0 = kl_reference_point(model_err.detach(), ref_err.detach())
    sign = desirable.to(g.device, g.dtype) * 2.0 - 1.0
    logits = sign * beta * (g - z0)
    lam = torch.where(desirable.to(g.device).bool(), torch.full_like(g, desirable_weight),
                      torch.full_like(g, undesirable_weight))
    per = lam * (1.0 - torch.sigmoid(logits))
    return PreferenceLoss(loss=_weighted_mean(per, weight), accuracy=float((logits > 0).float().mean()),
                          reward=float((beta * g).detach().mean()), per_sample=per.detach())
