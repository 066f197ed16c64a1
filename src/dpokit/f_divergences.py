"""f-divergences for f-DPO (Wang et al. 2023): the score f'(t) of a policy/reference log-ratio u = log t.

Under an f-divergence each log-ratio u in the DPO logits becomes f'(e^u) (Theorem 1); reverse KL, f'(t) = log t, is
plain DPO. The forms follow TRL 1.16's `f_divergence_type`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Divergence = Callable[[Tensor], Tensor]


def reverse_kl(u: Tensor) -> Tensor:
    """f'(t) = log t + 1 without the constant, as in DPO's logits and TRL's: the score is u itself."""
    return u


def forward_kl(u: Tensor) -> Tensor:
    """f'(t) = 1 - 1/t."""
    return 1 - torch.exp(-u)


def js_divergence(u: Tensor) -> Tensor:
    """f'(t) = log(2t / (t + 1)) = log 2 + log sigmoid(u)."""
    return math.log(2) + F.logsigmoid(u)


def alpha_divergence(u: Tensor, alpha: float) -> Tensor:
    """f'(t) = (t^(alpha-1) - 1) / (alpha - 1); alpha -> 1 is reverse KL. The exponent is clamped at 80, as TRL
    does, so exp stays finite in fp32."""
    if abs(alpha - 1.0) < 1e-6:
        return u
    t = torch.clamp((alpha - 1.0) * u.float(), max=80.0)
    return (torch.exp(t) - 1.0).to(u.dtype) / (alpha - 1.0)


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def divergence(name: str, alpha: float = 0.5) -> Divergence:
    """The score function of f-divergence `name` (one of F_DIVERGENCES); `alpha` is the alpha-divergence's."""
    table: dict[str, Divergence] = {
        "reverse_kl": reverse_kl,
        "forward_kl": forward_kl,
        "js_divergence": js_divergence,
        "alpha_divergence": lambda u: alpha_divergence(u, alpha),
    }
    return table[name]
