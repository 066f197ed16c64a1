"""Each loss on hand-picked log-probs, with the arithmetic written out, plus the properties every loss must keep."""

from __future__ import annotations

import math

import pytest
import torch

from dpokit.losses import LOSSES, REFERENCE_FREE, preference_loss, wpo_weights

# One pair: policy chosen -10, rejected -12; reference chosen -11, rejected -11; 4 and 2 response tokens.
PC, PR, RC, RR = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.0))
LC, LR = torch.tensor([4]), torch.tensor([2])


# settings a loss needs to be defined (EXO's epsilon must be above 0)
NEEDS = {"exo_pair": {"label_smoothing": 1e-3}}


def softplus(x: float) -> float:
    """-log sigmoid(-x)."""
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def run(loss_type: str | list[str], beta: float = 0.1, **kw: object) -> tuple[float, float, float]:
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
    assert run("bco_pair")[0] == pytest.approx(2 * softplus(-0.1), abs=1e-6)
    assert run("nca_pair")[0] == pytest.approx(softplus(-0.1) + 0.5 * softplus(0.1) + 0.5 * softplus(-0.1), abs=1e-6)


def test_apo() -> None:
    """zero: 1 - s(0.1) + s(-0.1) = 2 s(-0.1); down: s(0.1) + 1 - s(0.2)."""
    assert run("apo_zero")[0] == pytest.approx(2 * sigmoid(-0.1), abs=1e-6)
    assert run("apo_down")[0] == pytest.approx(sigmoid(0.1) + 1 - sigmoid(0.2), abs=1e-6)


@pytest.mark.parametrize("loss_type", sorted(set(LOSSES) - REFERENCE_FREE))
def test_rewards_are_zero_and_sigmoid_is_log2_when_policy_is_reference(loss_type: str) -> None:
    logps = torch.tensor([-5.0, -17.0, -3.5])
    lengths = torch.tensor([3, 9, 2])
    losses, chosen, rejected = preference_loss(
        loss_type,
        logps,
        logps + 1,
        logps,
        logps + 1,
        beta=0.3,
        chosen_lengths=lengths,
        rejected_lengths=lengths,
        **NEEDS.get(loss_type, {}),
    )
    assert torch.all(chosen == 0) and torch.all(rejected == 0)
    if loss_type == "sigmoid":
        assert torch.allclose(losses, torch.full_like(losses, math.log(2)))


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_rewards_carry_no_gradient_and_losses_do(loss_type: str) -> None:
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    losses, chosen, rejected = preference_loss(
        loss_type, pc, pr, RC, RR, beta=0.1, chosen_lengths=LC, rejected_lengths=LR, **NEEDS.get(loss_type, {})
    )
    assert not chosen.requires_grad and not rejected.requires_grad
    losses.sum().backward()
    assert pc.grad is not None and float(pc.grad.abs().sum()) > 0


@pytest.mark.parametrize(
    "loss_type", ["sigmoid", "hinge", "ipo", "robust", "simpo", "sigmoid_norm", "exo_pair", "discopop", "orpo"]
)
def test_gradient_prefers_chosen(loss_type: str) -> None:
    """Descending any preference loss raises the chosen log-prob and lowers the rejected one."""
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    losses = preference_loss(
        loss_type, pc, pr, RC, RR, beta=0.1, chosen_lengths=LC, rejected_lengths=LR, label_smoothing=0.1
    )[0]
    losses.sum().backward()
    assert float(pc.grad[0]) < 0 < float(pr.grad[0])


def test_sigmoid_norm() -> None:
    """Per-token log-ratios as in IPO: h = 1/4 + 1/2 = 0.75; -log sigmoid(0.1 * 0.75) = log(1 + e^-0.075)."""
    assert run("sigmoid_norm")[0] == pytest.approx(softplus(-0.075), abs=1e-6)


def test_exo_pair() -> None:
    """z = 0.2, eps = 1e-3: s(z) (log s(z) - log(1 - eps)) + s(-z) (log s(-z) - log eps)
    = 0.549834 * (-0.598139 + 0.001001) + 0.450166 * (-0.798139 + 6.907755) = -0.328327 + 2.750342 = 2.422015."""
    z, eps = 0.2, 1e-3
    want = sigmoid(z) * (-softplus(-z) - math.log1p(-eps)) + sigmoid(-z) * (-softplus(z) - math.log(eps))
    assert run("exo_pair", label_smoothing=eps)[0] == pytest.approx(want, abs=1e-6)
    assert want == pytest.approx(2.422015, abs=1e-6)


def test_discopop() -> None:
    """z = 0.2, tau 0.05: blend s(4) = 0.982014; 0.598139 (1 - 0.982014) + e^-0.2 * 0.982014 = 0.814763."""
    blend = sigmoid(0.2 / 0.05)
    want = softplus(-0.2) * (1 - blend) + math.exp(-0.2) * blend
    assert run("discopop", discopop_tau=0.05)[0] == pytest.approx(want, abs=1e-6)
    assert want == pytest.approx(0.814763, abs=1e-6)


def test_aot_sorts_across_the_batch() -> None:
    """Two pairs. Paired: sorted pi_c - pi_r = [-1, 2] minus sorted ref_c - ref_r = [-4, 0] -> [3, 2]; unpaired:
    sorted chosen log-ratios [1, 2] minus sorted rejected [-1, -1] -> [2, 3]; loss softplus(-0.1 * delta)."""
    pc, pr, rc, rr = (torch.tensor(v) for v in ([-10.0, -5.0], [-12.0, -4.0], [-11.0, -7.0], [-11.0, -3.0]))
    lengths = torch.tensor([1, 1])

    def aot(name: str) -> list[float]:
        return preference_loss(name, pc, pr, rc, rr, beta=0.1, chosen_lengths=lengths, rejected_lengths=lengths)[
            0
        ].tolist()

    assert aot("aot") == pytest.approx([softplus(-0.3), softplus(-0.2)], abs=1e-6)
    assert aot("aot_unpaired") == pytest.approx([softplus(-0.2), softplus(-0.3)], abs=1e-6)


def test_sft_is_the_chosen_nll_per_token_over_the_batch() -> None:
    """Chosen log-probs -10 (4 tokens) and -6 (2 tokens): 16 / 6 for every pair, not the mean of 2.5 and 3."""
    pc, lc = torch.tensor([-10.0, -6.0]), torch.tensor([4, 2])
    losses = preference_loss("sft", pc, pc, pc, pc, beta=0.1, chosen_lengths=lc, rejected_lengths=lc)[0]
    assert losses.tolist() == pytest.approx([16 / 6, 16 / 6])
    unweighted = torch.tensor([-20.0, -6.0])  # LD-DPO weighted the log-probs; the NLL uses the plain ones
    losses = preference_loss(
        "sft", pc, pc, pc, pc, beta=0.1, chosen_lengths=lc, rejected_lengths=lc, sft_chosen_logps=unweighted
    )[0]
    assert losses.tolist() == pytest.approx([26 / 6, 26 / 6])


def test_orpo() -> None:
    """Averages -2.5 and -6; log odds = 3.5 - (log(1 - e^-2.5) - log(1 - e^-6)) = 3.583169; NLL 2.5;
    loss = 2.5 - 0.1 log sigmoid(3.583169) = 2.502741; rewards 0.1 * the averages."""
    log_odds = 3.5 - (math.log1p(-math.exp(-2.5)) - math.log1p(-math.exp(-6)))
    loss, chosen, rejected = run("orpo", orpo_alpha=0.1)
    assert loss == pytest.approx(2.5 + 0.1 * softplus(-log_odds), abs=1e-6)
    assert loss == pytest.approx(2.502741, abs=1e-6)
    assert (chosen, rejected) == pytest.approx((-0.25, -0.6))


@pytest.mark.parametrize(
    ("divergence", "logits"),
    [
        ("reverse_kl", 2.0),
        ("forward_kl", (1 - math.exp(-1)) - (1 - math.exp(1))),  # f'(t) = 1 - 1/t at log-ratios 1 and -1
        ("js_divergence", 1.0),  # log 2 + log s(1) - log 2 - log s(-1) = 1
        ("alpha_divergence", 2 * (math.exp(0.5) - math.exp(-0.5))),  # alpha 0.5: (t^-0.5 - 1) / -0.5
    ],
)
def test_f_divergences(divergence: str, logits: float) -> None:
    """Log-ratios 1 (chosen) and -1 (rejected) become f'(t) scores, then the sigmoid loss of beta * their gap."""
    assert run("sigmoid", f_divergence_type=divergence)[0] == pytest.approx(softplus(-0.1 * logits), abs=1e-6)


def test_alpha_divergence_near_one_is_reverse_kl() -> None:
    a = run("sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)[0]
    assert a == pytest.approx(run("sigmoid")[0], abs=1e-7)


def test_combination_is_the_weighted_sum() -> None:
    """RPO as TRL writes it: sigmoid 0.598139 + 0.5 * the chosen NLL per token 2.5 = 1.848139; MPO likewise."""
    assert run(["sigmoid", "sft"], loss_weights=[1.0, 0.5])[0] == pytest.approx(0.598139 + 1.25, abs=1e-6)
    mpo = run(["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])[0]
    assert mpo == pytest.approx(0.8 * 0.598139 + 0.2 * 2 * softplus(-0.1) + 2.5, abs=1e-6)
    assert run(["sigmoid", "hinge"])[0] == pytest.approx(0.598139 + 0.8, abs=1e-6)  # no weights: all 1


def test_wpo_weights_scale_every_term() -> None:
    """Aligned means -0.5 and -1: weight e^-1.5 = 0.223130 on each term of the pair."""
    w = wpo_weights(torch.tensor([-0.5]), torch.tensor([-1.0]))
    assert float(w[0]) == pytest.approx(math.exp(-1.5))
    weighted = run(["sigmoid", "sft"], pair_weights=w)[0]
    assert weighted == pytest.approx(math.exp(-1.5) * (0.598139 + 2.5), abs=1e-6)
