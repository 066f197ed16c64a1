"""Each loss on hand-picked log-probs, with the arithmetic written out, plus the properties every loss must keep."""

from __future__ import annotations

import math

import pytest
import torch

from dpokit.losses import LOSSES, REFERENCE_FREE, preference_loss, rpo_nll

# One pair: policy chosen -10, rejected -12; reference chosen -11, rejected -11; 4 and 2 response tokens.
PC, PR, RC, RR = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.0))
LC, LR = torch.tensor([4]), torch.tensor([2])


def run(loss_type: str, beta: float = 0.1, **kw: float) -> tuple[float, float, float]:
    losses, chosen, rejected = preference_loss(
        loss_type, PC, PR, RC, RR, beta=beta, chosen_lengths=LC, rejected_lengths=LR, **kw
    )
    return float(losses[0]), float(chosen[0]), float(rejected[0])


def test_sigmoid() -> None:
    """logits = (-10 + 11) - (-12 + 11) = 2; loss = -log sigmoid(0.1 * 2) = log(1 + e^-0.2) = 0.598139."""
    loss, chosen, rejected = run("sigmoid")
    assert loss == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-6)
    assert loss == pytest.approx(0.598139, abs=1e-6)
    assert (chosen, rejected) == pytest.approx((0.1, -0.1), abs=1e-6)


def test_hinge() -> None:
    """relu(1 - 0.1 * 2) = 0.8."""
    assert run("hinge")[0] == pytest.approx(0.8, abs=1e-6)


def test_ipo() -> None:
    """Per-token log-ratios: chosen 1/4, rejected -1/2; h = 0.75; (0.75 - 1/(2*0.1))^2 = (-4.25)^2 = 18.0625."""
    assert run("ipo")[0] == pytest.approx(18.0625, abs=1e-4)


def test_robust() -> None:
    """eps 0.1: (0.9 * 0.598139 - 0.1 * 0.798139) / 0.8 = 0.573139 (log(1 + e^0.2) = 0.798139)."""
    assert run("robust", label_smoothing=0.1)[0] == pytest.approx(0.573139, abs=1e-6)


def test_robust_without_smoothing_is_sigmoid() -> None:
    assert run("robust", label_smoothing=0.0)[0] == pytest.approx(run("sigmoid")[0], abs=1e-7)


def test_simpo() -> None:
    """Averages -10/4 = -2.5 and -12/2 = -6; beta 2: 2 * 3.5 - 0.5 = 6.5; loss = log(1 + e^-6.5) = 0.001502."""
    loss, chosen, rejected = run("simpo", beta=2.0, simpo_gamma=0.5)
    assert loss == pytest.approx(math.log1p(math.exp(-6.5)), abs=1e-7)
    assert (chosen, rejected) == pytest.approx((-5.0, -12.0))


def test_simpo_ignores_the_reference() -> None:
    a = preference_loss("simpo", PC, PR, RC, RR, beta=2.0, chosen_lengths=LC, rejected_lengths=LR)[0]
    b = preference_loss("simpo", PC, PR, RC * 0 - 99, RR * 0 + 7, beta=2.0, chosen_lengths=LC, rejected_lengths=LR)[0]
    assert torch.equal(a, b)


def test_sppo_hard() -> None:
    """(1 - 0.5/0.1)^2 + (-1 + 0.5/0.1)^2 = 16 + 16 = 32."""
    assert run("sppo_hard")[0] == pytest.approx(32.0, abs=1e-5)


def test_bco_pair_and_nca_pair() -> None:
    """bco: -log s(0.1) - log s(0.1) = 2 * 0.644397; nca: -log s(0.1) - 0.5 log s(-0.1) - 0.5 log s(0.1)."""
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731  -log sigmoid(-x)
    assert run("bco_pair")[0] == pytest.approx(2 * softplus(-0.1), abs=1e-6)
    assert run("nca_pair")[0] == pytest.approx(softplus(-0.1) + 0.5 * softplus(0.1) + 0.5 * softplus(-0.1), abs=1e-6)


def test_apo() -> None:
    """zero: 1 - s(0.1) + s(-0.1) = 2 s(-0.1); down: s(0.1) + 1 - s(0.2)."""
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert run("apo_zero")[0] == pytest.approx(2 * s(-0.1), abs=1e-6)
    assert run("apo_down")[0] == pytest.approx(s(0.1) + 1 - s(0.2), abs=1e-6)


def test_rpo_nll_is_mean_token_nll() -> None:
    assert float(rpo_nll(PC, LC)[0]) == pytest.approx(2.5)


@pytest.mark.parametrize("loss_type", sorted(set(LOSSES) - REFERENCE_FREE))
def test_rewards_are_zero_and_sigmoid_is_log2_when_policy_is_reference(loss_type: str) -> None:
    logps = torch.tensor([-5.0, -17.0, -3.5])
    lengths = torch.tensor([3, 9, 2])
    losses, chosen, rejected = preference_loss(
        loss_type, logps, logps + 1, logps, logps + 1, beta=0.3, chosen_lengths=lengths, rejected_lengths=lengths
    )
    assert torch.all(chosen == 0) and torch.all(rejected == 0)
    if loss_type == "sigmoid":
        assert torch.allclose(losses, torch.full_like(losses, math.log(2)))


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_rewards_carry_no_gradient_and_losses_do(loss_type: str) -> None:
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    losses, chosen, rejected = preference_loss(
        loss_type, pc, pr, RC, RR, beta=0.1, chosen_lengths=LC, rejected_lengths=LR
    )
    assert not chosen.requires_grad and not rejected.requires_grad
    losses.sum().backward()
    assert pc.grad is not None and float(pc.grad.abs().sum()) > 0


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust", "simpo"])
def test_gradient_prefers_chosen(loss_type: str) -> None:
    """Descending any preference loss raises the chosen log-prob and lowers the rejected one."""
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    losses = preference_loss(
        loss_type, pc, pr, RC, RR, beta=0.1, chosen_lengths=LC, rejected_lengths=LR, label_smoothing=0.1
    )[0]
    losses.sum().backward()
    assert float(pc.grad[0]) < 0 < float(pr.grad[0])
