"""Losses of the DPO family for diffusion models, as pure functions of per-sample denoising errors.

Every loss here takes per-sample mean squared errors `err = mean_{C,H,W} (prediction - target)^2` of
the policy and of the reference model at the *same* noisy input, timestep and prompt; the target is
whatever the model predicts (noise, v, or the flow velocity eps - x0, see
`diffalign.diffusion.schedules.training_target`). A lower error than the reference's means the policy
gives the image a higher (ELBO-approximated) likelihood than the reference does.

Diffusion-DPO (Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference Optimization",
arXiv:2311.12908, eq. 14; SalesforceAIResearch/DiffusionDPO train.py):

    inside = -0.5 * beta * ((err_w - err_l) - (ref_w - ref_l))
    loss   = mean_pairs( -logsigmoid(inside) )

The beta convention: `beta` multiplies 0.5 * (squared-error difference), as in the paper's code, where
Stable Diffusion uses beta = 5000 (diffusers' research script writes beta = 2500 without the 0.5: the
same loss). Flow-matching DPO (flow_grpo train_sd3_dpo.py) uses the same form with velocity errors and
beta ~ 100 (FLUX needed ~2000): velocity errors are on a different scale from noise errors, so betas do
not transfer between parameterisations. The per-pair -logsigmoid comes first and the mean second;
`-logsigmoid(mean(inside))` is a different (wrong) loss (diffusers issue #6702).

Soft labels: with p_i the probability that pair i's first image is preferred, the per-pair loss is the
Bradley-Terry cross-entropy

    loss_i = -(p_i * logsigmoid(inside_i) + (1 - p_i) * logsigmoid(-inside_i))

which is the paper's loss at p_i = 1. p_i = 1/2 trains a tie as PickScore trains on Pick-a-Pic's ties
(its gradient, (sigmoid(inside) - 1/2) d inside, holds the policy's preference between the two images
at the reference's: a tie teaches "neither", not nothing); p_i = 1 - eps is conservative DPO's label
smoothing for labels flipped with probability eps (Mitchell 2023, "A note on DPO with noisy
preferences"; the `label_smoothing` of common DPO trainers).

Diffusion-KTO (Li et al. 2024, "Aligning Diffusion Models by Optimizing Human Utility",
arXiv:2404.04465, eq. 8; jacklishufan/diffusion-kto): per image, with a like (y = +1) or dislike (-1),

    g = -(err - ref_err)                      the implicit reward (log-ratio proxy)
    z = max(0, mean_batch(g)), detached       the reference point (a KL estimate)
    loss = mean( lambda_y * (1 - sigmoid(y * beta * (g - z))) )
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def per_sample_mse(prediction: Tensor, target: Tensor) -> Tensor:
    """[B] mean over every non-batch dimension of (prediction - target)^2, in float32."""
    diff = prediction.float() - target.float()
    return diff.pow(2).mean(dim=tuple(range(1, diff.ndim)))


@dataclass
class DPOLossOutput:
    """The Diffusion-DPO loss and what to log about it.

    Attributes:
        loss: the scalar loss (mean over pairs of -logsigmoid(inside)).
        losses: [B] per-pair losses.
        inside: [B] the logit -0.5 beta ((err_w - err_l) - (ref_w - ref_l)); > 0 means the policy
            prefers the winner more than the reference does.
        reward_w: [B] implicit reward of the winner, -0.5 beta (err_w - ref_w).
        reward_l: [B] implicit reward of the loser, -0.5 beta (err_l - ref_l); inside = reward_w - reward_l.
        labels: [B] the soft labels the loss was computed with (probability that the first image is
            preferred), or None for the paper's hard labels (every first image preferred).
    """

    loss: Tensor
    losses: Tensor
    inside: Tensor
    reward_w: Tensor
    reward_l: Tensor
    labels: Tensor | None = None

    @property
    def decisive(self) -> Tensor:
        """[B] bool: pairs with a preferred image (every pair with hard labels; not the ties)."""
        if self.labels is None:
            return torch.ones_like(self.inside, dtype=torch.bool)
        return self.labels != 0.5

    @property
    def signed_inside(self) -> Tensor:
        """[B] inside signed towards each pair's preferred image (inside itself with hard labels)."""
        if self.labels is None:
            return self.inside
        return torch.where(self.labels < 0.5, -self.inside, self.inside)

    @property
    def implicit_acc(self) -> Tensor:
        """Share of the decisive pairs the policy ranks right relative to the reference (signed
        inside > 0); NaN when no pair is decisive."""
        if self.labels is None:
            return (self.inside > 0).float().mean()
        decisive = self.decisive.float()
        return ((self.signed_inside > 0).float() * decisive).sum() / decisive.sum()

    @property
    def reward_margin(self) -> Tensor:
        """Mean signed inside (reward of the preferred image minus the other's) over the decisive
        pairs; NaN when no pair is decisive."""
        if self.labels is None:
            return self.inside.mean()
        decisive = self.decisive.float()
        return (self.signed_inside * decisive).sum() / decisive.sum()


def diffusion_dpo_loss(
    err_w: Tensor, err_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float, labels: Tensor | None = None
) -> DPOLossOutput:
    """Diffusion-DPO (Wallace et al. 2023, eq. 14), per pair then the mean; see the module doc.

    Args:
        err_w, err_l: [B] policy errors on the winners and the losers (with soft labels: on the
            first and the second image of each pair).
        ref_w, ref_l: [B] reference errors on the same inputs (no gradient needed).
        beta: the KL weight in the 0.5 * beta convention (module doc).
        labels: [B] probability in [0, 1] that the first image is preferred (the module doc's soft
            labels: 1/2 for a tie, 1 - eps with label smoothing); None is the paper's loss, every
            label 1.
    """
    for name, value in (("err_l", err_l), ("ref_w", ref_w), ("ref_l", ref_l), ("labels", labels)):
        if value is not None and value.shape != err_w.shape:
            raise ValueError(
                f"diffusion_dpo_loss: {name} has shape {tuple(value.shape)}, err_w {tuple(err_w.shape)}"
            )
    if labels is not None and not bool(((labels >= 0) & (labels <= 1)).all()):
        raise ValueError("diffusion_dpo_loss: labels are probabilities and must lie in [0, 1]")
    reward_w = -0.5 * beta * (err_w - ref_w)
    reward_l = -0.5 * beta * (err_l - ref_l)
    inside = -0.5 * beta * ((err_w - err_l) - (ref_w - ref_l))
    # logsigmoid, never log(sigmoid): no NaN for large |inside|
    if labels is None:
        losses = -F.logsigmoid(inside)
    else:
        labels = labels.to(inside.dtype)
        losses = -(labels * F.logsigmoid(inside) + (1 - labels) * F.logsigmoid(-inside))
    return DPOLossOutput(losses.mean(), losses, inside, reward_w.detach(), reward_l.detach(), labels)


@dataclass
class KTOLossOutput:
    """The Diffusion-KTO loss and what to log about it.

    Attributes:
        loss: the scalar loss (mean over images).
        losses: [B] per-image losses.
        implicit_reward: [B] g = -(err - ref_err).
        reference_point: the detached z = max(0, mean g).
    """

    loss: Tensor
    losses: Tensor
    implicit_reward: Tensor
    reference_point: Tensor

    def implicit_acc(self, liked: Tensor) -> Tensor:
        """Share of images on the right side of the reference point (liked: g > z; disliked: g < z)."""
        sign = torch.where(liked, 1.0, -1.0)
        return ((sign * (self.implicit_reward - self.reference_point)) > 0).float().mean()


def diffusion_kto_loss(
    err: Tensor,
    ref_err: Tensor,
    liked: Tensor,
    beta: float,
    lambda_desirable: float = 1.0,
    lambda_undesirable: float = 1.0,
) -> KTOLossOutput:
    """Diffusion-KTO (Li et al. 2024, eq. 8); see the module doc.

    Args:
        err, ref_err: [B] policy and reference errors per image.
        liked: [B] bool, True for a liked (desirable) image.
        beta: the sharpness of the utility (the paper uses 1000 for SD 1.5).
        lambda_desirable, lambda_undesirable: the weights lambda_y of liked and disliked images.
    """
    if ref_err.shape != err.shape or liked.shape != err.shape:
        raise ValueError(
            f"diffusion_kto_loss: err {tuple(err.shape)}, ref_err {tuple(ref_err.shape)} and liked "
            f"{tuple(liked.shape)} must have the same shape"
        )
    g = -(err - ref_err)
    z = g.detach().mean().clamp(min=0)
    sign = torch.where(liked, 1.0, -1.0).to(err.dtype)
    weight = torch.where(liked, lambda_desirable, lambda_undesirable).to(err.dtype)
    losses = weight * (1 - torch.sigmoid(sign * beta * (g - z)))
    return KTOLossOutput(losses.mean(), losses, g.detach(), z)
