"""Preference losses: pure functions of per-sequence log-probs.

Every loss takes the four per-sequence log-prob tensors of shape (B,) (summed over response tokens) and returns
unreduced `(losses, chosen_rewards, rejected_rewards)`, each (B,). Rewards are the implicit DPO rewards
beta * (log pi - log pi_ref), detached: they are for logging and never carry gradient. Formulas follow TRL's
DPOTrainer so that metrics compare one to one; each cites its paper.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LossOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _rewards(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return chosen, rejected


def _logits(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> torch.Tensor:
    """The DPO log-ratio difference (log pi_c - log ref_c) - (log pi_r - log ref_r)."""
    return (pc - rc) - (pr - rr)


def sigmoid_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, **_: object) -> LossOutput:
    """DPO (Rafailov et al. 2023, Eq. 7): -log sigmoid(beta * logits)."""
    losses = -F.logsigmoid(beta * _logits(pc, pr, rc, rr))
    return (losses, *_rewards(pc, pr, rc, rr, beta))


def robust_loss(
    pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, label_smoothing: float, **_: object
) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, Eq. 21): unbiased under a label-flip rate `label_smoothing`."""
    z = beta * _logits(pc, pr, rc, rr)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return (losses, *_rewards(pc, pr, rc, rr, beta))


def hinge_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, **_: object) -> LossOutput:
    """RSO's hinge loss (Liu et al. 2023, Eq. 9): relu(1 - beta * logits)."""
    losses = torch.relu(1 - beta * _logits(pc, pr, rc, rr))
    return (losses, *_rewards(pc, pr, rc, rr, beta))


def ipo_loss(
    pc: Tensor,
    pr: Tensor,
    rc: Tensor,
    rr: Tensor,
    *,
    beta: float,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    **_: object,
) -> LossOutput:
    """IPO (Azar et al. 2023, Eq. 17) on per-token average log-ratios, as TRL does: (h - 1/(2 tau))^2, tau = beta."""
    h = (pc - rc) / chosen_lengths.clamp(min=1) - (pr - rr) / rejected_lengths.clamp(min=1)
    losses = (h - 1 / (2 * beta)) ** 2
    return (losses, *_rewards(pc, pr, rc, rr, beta))


def simpo_loss(
    pc: Tensor,
    pr: Tensor,
    rc: Tensor,
    rr: Tensor,
    *,
    beta: float,
    gamma: float,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    **_: object,
) -> LossOutput:
    """SimPO (Meng et al. 2024, Eq. 6): reference-free, length-averaged, with target margin gamma.

    -log sigmoid(beta * (avg log pi_c - avg log pi_r) - gamma); rewards are beta * avg log pi. The reference
    log-probs are ignored.
    """
    chosen = pc / chosen_lengths.clamp(min=1)
    rejected = pr / rejected_lengths.clamp(min=1)
    losses = -F.logsigmoid(beta * (chosen - rejected) - gamma)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def bco_pair_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, **_: object) -> LossOutput:
    """BCO on pairs (Jung et al. 2024), without the running reward shift, as TRL's `bco_pair`."""
    chosen, rejected = _rewards(pc, pr, rc, rr, beta)
    losses = -F.logsigmoid(beta * (pc - rc)) - F.logsigmoid(-beta * (pr - rr))
    return losses, chosen, rejected


def nca_pair_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, **_: object) -> LossOutput:
    """NCA (Chen et al. 2024, Eq. 11) on pairs."""
    zc, zr = beta * (pc - rc), beta * (pr - rr)
    losses = -F.logsigmoid(zc) - 0.5 * F.logsigmoid(-zc) - 0.5 * F.logsigmoid(-zr)
    return (losses, *_rewards(pc, pr, rc, rr, beta))


def sppo_hard_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, **_: object) -> LossOutput:
    """SPPO with hard win probabilities (Wu et al. 2024, Eq. 4.7 with P in {0, 1})."""
    losses = ((pc - rc) - 0.5 / beta) ** 2 + ((pr - rr) + 0.5 / beta) ** 2
    return (losses, *_rewards(pc, pr, rc, rr, beta))


def apo_zero_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, **_: object) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, Eq. 7): raise chosen, lower rejected likelihood."""
    losses = 1 - torch.sigmoid(beta * (pc - rc)) + torch.sigmoid(beta * (pr - rr))
    return (losses, *_rewards(pc, pr, rc, rr, beta))


def apo_down_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, **_: object) -> LossOutput:
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8): lower both, the rejected more."""
    losses = torch.sigmoid(beta * (pc - rc)) + 1 - torch.sigmoid(beta * _logits(pc, pr, rc, rr))
    return (losses, *_rewards(pc, pr, rc, rr, beta))


LOSSES: dict[str, Callable[..., LossOutput]] = {
    "sigmoid": sigmoid_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "robust": robust_loss,
    "simpo": simpo_loss,
    "bco_pair": bco_pair_loss,
    "nca_pair": nca_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
}

REFERENCE_FREE = {"simpo"}


def preference_loss(
    loss_type: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> LossOutput:
    """Dispatch to the loss named `loss_type`; all tensors are (B,)."""
    return LOSSES[loss_type](
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        beta=beta,
        label_smoothing=label_smoothing,
        gamma=simpo_gamma,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )


def rpo_nll(policy_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """RPO's NLL term (Pang et al. 2024) per pair: the chosen response's mean token negative log-likelihood."""
    return -policy_chosen_logps / chosen_lengths.clamp(min=1)


LOG2 = math.log(2)  # the sigmoid loss when policy equals reference
