"""Preference losses: pure functions of per-sequence log-probs.

Every loss takes the four per-sequence log-prob tensors `policy_chosen_logps`, `policy_rejected_logps`,
`reference_chosen_logps` and `reference_rejected_logps`, each (B,) (summed over response tokens), then its settings
by keyword, and returns unreduced `(losses, chosen_rewards, rejected_rewards)`, each (B,). Rewards are the implicit
DPO rewards beta * (log pi - log pi_ref), detached: they are for logging and never carry gradient. Formulas follow
TRL 1.16's DPOTrainer so that losses and metrics compare one to one; each cites its paper.

`preference_loss` combines several of them with weights, as TRL's `loss_type` list with `loss_weights` does (RPO
is `[sigmoid, sft]`, MPO `[sigmoid, bco_pair, sft]`); every term is averaged over the pairs, so a per-pair sum of
weighted terms has the same mean as TRL's weighted sum of means.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dpokit.f_divergences import Divergence, divergence, reverse_kl

LossOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _rewards(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """The implicit DPO rewards beta * (log pi - log pi_ref), detached."""
    return beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def _preference_logits(chosen_logratios: Tensor, rejected_logratios: Tensor, f: Divergence = reverse_kl) -> Tensor:
    """The DPO log-ratio difference (log pi_c - log ref_c) - (log pi_r - log ref_r); under an f-divergence each
    log-ratio u becomes the score f'(e^u) (f-DPO, Wang et al. 2023, Theorem 1)."""
    return f(chosen_logratios) - f(rejected_logratios)


def _length_averaged_logits(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    f: Divergence,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
) -> Tensor:
    """`_preference_logits` on per-token average log-ratios."""
    return f(chosen_logratios) / chosen_lengths.clamp(min=1) - f(rejected_logratios) / rejected_lengths.clamp(min=1)


# --- the losses --------------------------------------------------------------------------------------------------


def sigmoid_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    f: Divergence = reverse_kl,
    **_: object,
) -> LossOutput:
    """DPO (Rafailov et al. 2023, Eq. 7): -log sigmoid(beta * logits)."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    losses = -F.logsigmoid(beta * _preference_logits(chosen_logratios, rejected_logratios, f))
    return (losses, *_rewards(chosen_logratios, rejected_logratios, beta))


def robust_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float,
    f: Divergence = reverse_kl,
    **_: object,
) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, Eq. 21): unbiased under a label-flip rate `label_smoothing`."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    z = beta * _preference_logits(chosen_logratios, rejected_logratios, f)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return (losses, *_rewards(chosen_logratios, rejected_logratios, beta))


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    f: Divergence = reverse_kl,
    **_: object,
) -> LossOutput:
    """RSO's hinge loss (Liu et al. 2023, Eq. 9): relu(1 - beta * logits)."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    losses = torch.relu(1 - beta * _preference_logits(chosen_logratios, rejected_logratios, f))
    return (losses, *_rewards(chosen_logratios, rejected_logratios, beta))


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    f: Divergence = reverse_kl,
    **_: object,
) -> LossOutput:
    """IPO (Azar et al. 2023, Eq. 17) on per-token average log-ratios, as TRL does: (h - 1/(2 tau))^2, tau = beta,
    h the difference of the chosen and rejected per-token average log-ratios."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    logits = _length_averaged_logits(chosen_logratios, rejected_logratios, f, chosen_lengths, rejected_lengths)
    losses = (logits - 1 / (2 * beta)) ** 2
    return (losses, *_rewards(chosen_logratios, rejected_logratios, beta))


def sigmoid_norm_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    f: Divergence = reverse_kl,
    **_: object,
) -> LossOutput:
    """DPO on per-token average log-ratios (TRL's `sigmoid_norm`): -log sigmoid(beta * h), h as in IPO."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    logits = _length_averaged_logits(chosen_logratios, rejected_logratios, f, chosen_lengths, rejected_lengths)
    losses = -F.logsigmoid(beta * logits)
    return (losses, *_rewards(chosen_logratios, rejected_logratios, beta))


def exo_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float,
    f: Divergence = reverse_kl,
    **_: object,
) -> LossOutput:
    """EXO-pref (Ji et al. 2024, Eq. 16) for two responses: KL(p_theta || p_label), p_theta = softmax of the two
    rewards = (sigmoid(z), sigmoid(-z)), p_label = (1 - eps, eps) with eps = `label_smoothing` > 0."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    z = beta * _preference_logits(chosen_logratios, rejected_logratios, f)
    eps = label_smoothing
    chosen_term = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
    rejected_term = torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))
    return (chosen_term + rejected_term, *_rewards(chosen_logratios, rejected_logratios, beta))


def discopop_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    discopop_tau: float,
    f: Divergence = reverse_kl,
    **_: object,
) -> LossOutput:
    """DiscoPOP's log-ratio modulated loss (Chris Lu et al. 2024, Eq. 5): a sigmoid(z / tau) blend of the logistic
    loss -log sigmoid(z) and the exponential loss e^-z, z = beta * logits."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    z = beta * _preference_logits(chosen_logratios, rejected_logratios, f)
    blend = torch.sigmoid(z / discopop_tau)
    losses = -F.logsigmoid(z) * (1 - blend) + torch.exp(-z) * blend
    return (losses, *_rewards(chosen_logratios, rejected_logratios, beta))


def _aot(delta: Tensor, beta: float, label_smoothing: float) -> Tensor:
    return -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing


def aot_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float,
    **_: object,
) -> LossOutput:
    """AOT (Melnyk et al. 2024, Eq. 8, paired): the sorted policy log-ratios log pi_c - log pi_r against the sorted
    reference ones, across the batch. Sorting makes each pair's loss depend on the whole batch."""
    policy_logratios = policy_chosen_logps - policy_rejected_logps
    reference_logratios = reference_chosen_logps - reference_rejected_logps
    delta = torch.sort(policy_logratios, dim=0)[0] - torch.sort(reference_logratios, dim=0)[0]
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    return (_aot(delta, beta, label_smoothing), *_rewards(chosen_logratios, rejected_logratios, beta))


def aot_unpaired_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float,
    **_: object,
) -> LossOutput:
    """AOT unpaired (Melnyk et al. 2024): sorted chosen log-ratios against sorted rejected ones."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    delta = torch.sort(chosen_logratios, dim=0)[0] - torch.sort(rejected_logratios, dim=0)[0]
    return (_aot(delta, beta, label_smoothing), *_rewards(chosen_logratios, rejected_logratios, beta))


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
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
    chosen_avg_logps = policy_chosen_logps / chosen_lengths.clamp(min=1)
    rejected_avg_logps = policy_rejected_logps / rejected_lengths.clamp(min=1)
    losses = -F.logsigmoid(beta * (chosen_avg_logps - rejected_avg_logps) - gamma)
    return losses, beta * chosen_avg_logps.detach(), beta * rejected_avg_logps.detach()


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x < 0, switching form at -log 2 to avoid cancellation (Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    orpo_alpha: float,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    **_: object,
) -> LossOutput:
    """ORPO (Hong et al. 2024, Eqs. 4-7), reference-free: the chosen responses' NLL per token plus
    -alpha * log sigmoid(log odds(y_w) - log odds(y_l)), odds(y) = P / (1 - P) with P the per-token average
    probability. Rewards are alpha * the average log-probs, as TRL's ORPOTrainer logs them."""
    chosen_avg_logps = policy_chosen_logps / chosen_lengths.clamp(min=1)
    rejected_avg_logps = policy_rejected_logps / rejected_lengths.clamp(min=1)
    log_odds = (chosen_avg_logps - rejected_avg_logps) - (log1mexp(chosen_avg_logps) - log1mexp(rejected_avg_logps))
    nll = -policy_chosen_logps.sum() / chosen_lengths.sum().clamp(min=1)
    losses = nll - orpo_alpha * F.logsigmoid(log_odds)
    return losses, orpo_alpha * chosen_avg_logps.detach(), orpo_alpha * rejected_avg_logps.detach()


def bco_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    **_: object,
) -> LossOutput:
    """BCO on pairs (Jung et al. 2024), without the running reward shift, as TRL's `bco_pair`."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    losses = -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
    return (losses, *_rewards(chosen_logratios, rejected_logratios, beta))


def nca_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    **_: object,
) -> LossOutput:
    """NCA (Chen et al. 2024, Eq. 11) on pairs."""
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps)
    losses = -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def sppo_hard_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    **_: object,
) -> LossOutput:
    """SPPO with hard win probabilities (Wu et al. 2024, Eq. 4.7 with P in {0, 1})."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    losses = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    return (losses, *_rewards(chosen_logratios, rejected_logratios, beta))


def apo_zero_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    **_: object,
) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, Eq. 7): raise chosen, lower rejected likelihood."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    losses = 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
    return (losses, *_rewards(chosen_logratios, rejected_logratios, beta))


def apo_down_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    **_: object,
) -> LossOutput:
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8): lower both, the rejected more."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    logits = _preference_logits(chosen_logratios, rejected_logratios)
    losses = torch.sigmoid(beta * chosen_logratios) + 1 - torch.sigmoid(beta * logits)
    return (losses, *_rewards(chosen_logratios, rejected_logratios, beta))


def sft_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    chosen_lengths: Tensor,
    sft_chosen_logps: Tensor | None = None,
    **_: object,
) -> LossOutput:
    """The chosen responses' negative log-likelihood per token over the batch (RPO, Pang et al. 2024; TRL's `sft`),
    the same value for every pair. `sft_chosen_logps` are the chosen log-probs before any LD-DPO weighting."""
    chosen_logps = policy_chosen_logps if sft_chosen_logps is None else sft_chosen_logps
    nll = -chosen_logps.sum() / chosen_lengths.sum().clamp(min=1)
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    return (nll.expand(policy_chosen_logps.shape[0]), *_rewards(chosen_logratios, rejected_logratios, beta))


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
    "sigmoid_norm": sigmoid_norm_loss,
    "exo_pair": exo_pair_loss,
    "discopop": discopop_loss,
    "aot": aot_loss,
    "aot_unpaired": aot_unpaired_loss,
    "sft": sft_loss,
    "orpo": orpo_loss,
}

REFERENCE_FREE = {"simpo", "orpo"}  # they log their own rewards, so they stand alone
F_DIVERGENCE_LOSSES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
LABEL_SMOOTHING_LOSSES = {"robust", "exo_pair", "aot", "aot_unpaired"}
SORTING_LOSSES = {"aot", "aot_unpaired"}  # WPO's per-pair weights would not follow the sorted pairs


def loss_terms(loss_type: str | Sequence[str]) -> list[str]:
    """`"ipo"` -> `["ipo"]`: TRL's name-or-list form as a list."""
    return [loss_type] if isinstance(loss_type, str) else list(loss_type)


def needs_reference(loss_type: str | Sequence[str]) -> bool:
    return not set(loss_terms(loss_type)) & REFERENCE_FREE


def wpo_weights(chosen_weight_logps: Tensor, rejected_weight_logps: Tensor) -> Tensor:
    """WPO (Zhou et al. 2024, Eq. 2): each pair weighted by the policy's length-normalized probabilities of both
    responses, each token's log-prob aligned by log sum_v p_v^2; detached, a weight is no training signal."""
    return torch.exp(chosen_weight_logps + rejected_weight_logps).detach()


def preference_loss(
    loss_type: str | Sequence[str],
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    discopop_tau: float = 0.05,
    orpo_alpha: float = 0.1,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    pair_weights: torch.Tensor | None = None,
    sft_chosen_logps: torch.Tensor | None = None,
) -> LossOutput:
    """The weighted sum of the losses named by `loss_type` (a name or a list, TRL's form); all tensors are (B,).

    `pair_weights` (WPO) scale every term of each pair. Rewards come from the first term (every term but the
    reference-free ones logs the same DPO rewards).
    """
    terms = loss_terms(loss_type)
    weights = [1.0] * len(terms) if loss_weights is None else list(loss_weights)
    settings = {
        "beta": beta,
        "label_smoothing": label_smoothing,
        "gamma": simpo_gamma,
        "discopop_tau": discopop_tau,
        "orpo_alpha": orpo_alpha,
        "f": divergence(f_divergence_type, f_alpha_divergence_coef),
        "chosen_lengths": chosen_lengths,
        "rejected_lengths": rejected_lengths,
        "sft_chosen_logps": sft_chosen_logps,
    }
    total: torch.Tensor | None = None
    rewards: tuple[torch.Tensor, torch.Tensor] | None = None
    for term, weight in zip(terms, weights, strict=True):
        losses, chosen, rejected = LOSSES[term](
            policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, **settings
        )
        if pair_weights is not None:
            losses = losses * pair_weights
        total = weight * losses if total is None else total + weight * losses
        rewards = rewards or (chosen, rejected)
    assert total is not None and rewards is not None  # config validation forbids an empty loss_type
    return (total, *rewards)


def loss_settings(cfg: Any, logps: Any) -> dict[str, Any]:
    """`preference_loss`'s keyword arguments from a `DPOConfig` and the policy's `PairLogps`."""
    return {
        "beta": cfg.beta,
        "loss_weights": cfg.loss_weights,
        "label_smoothing": cfg.label_smoothing,
        "simpo_gamma": cfg.simpo_gamma,
        "discopop_tau": cfg.discopop_tau,
        "orpo_alpha": cfg.orpo_alpha,
        "f_divergence_type": cfg.f_divergence_type,
        "f_alpha_divergence_coef": cfg.f_alpha_divergence_coef,
        "pair_weights": wpo_weights(logps.chosen_wpo, logps.rejected_wpo) if cfg.use_weighting else None,
        "sft_chosen_logps": logps.chosen_plain,
    }


LOG2 = math.log(2)  # the sigmoid loss when policy equals reference
