"""Per-sequence log-probabilities of responses: the hot path of DPO.

`sequence_logps_reference` is the plain definition (full logits, shift by one, mask, sum in fp32) and exists to
test against. `SequenceLogps` is the module training runs; both return a `PairLogps`, the per-pair result. It runs
the backbone once over any `Batch` layout, then the LM head and log-softmax only at response positions, in chunks,
so [batch, length, vocab] logits never exist; a chunk's logits live only inside `HeadLogps`, which keeps what its
backward needs instead of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dpokit import attention, flex
from dpokit.data.collate import Batch
from dpokit.models import base_model

IGNORE_INDEX = -100  # label of prompt and padding positions in the padded reference layout


@dataclass
class PairLogps:
    """Per-pair log-probs of one model over a batch of B pairs: its chosen and rejected responses, summed."""

    chosen: torch.Tensor  # (B,) summed log-probs of the chosen responses (LD-DPO weighted when ld_alpha is set)
    rejected: torch.Tensor  # (B,)
    chosen_lengths: torch.Tensor  # (B,) response tokens
    rejected_lengths: torch.Tensor  # (B,)
    chosen_plain: torch.Tensor | None = None  # (B,) unweighted sums, when ld_alpha weights `chosen`
    chosen_wpo: torch.Tensor | None = None  # (B,) WPO's mean of logp - log sum_v p_v^2, detached, when asked
    rejected_wpo: torch.Tensor | None = None  # (B,)


def split_sequences(per_sequence: torch.Tensor, lengths: torch.Tensor, num_pairs: int) -> PairLogps:
    return PairLogps(per_sequence[:num_pairs], per_sequence[num_pairs:], lengths[:num_pairs], lengths[num_pairs:])


def ld_token_weights(target_seq: torch.Tensor, num_pairs: int, ld_alpha: float) -> torch.Tensor:
    """LD-DPO (Liu et al. 2024, Eq. 9): each response token's weight, 1 within the first min(len_chosen,
    len_rejected) tokens of its response and ld_alpha past them, as TRL computes it. (N,) fp32.

    Targets of one sequence appear in token order, though sequences may interleave (a packed row holds several).
    """
    n = target_seq.shape[0]
    lengths = torch.bincount(target_seq, minlength=2 * num_pairs)
    order = torch.sort(target_seq, stable=True)[1]
    starts = torch.cumsum(lengths, 0) - lengths  # first slot of each sequence in `order`
    position = torch.empty(n, dtype=torch.long, device=target_seq.device)
    position[order] = torch.arange(n, device=target_seq.device) - starts[target_seq[order]]
    shared = torch.minimum(lengths[:num_pairs], lengths[num_pairs:]).repeat(2)  # (2B,)
    inside = position < shared[target_seq]
    return torch.where(inside, 1.0, float(ld_alpha)).to(torch.float32)


def sequence_sums(
    token_logps: torch.Tensor,
    target_seq: torch.Tensor,
    num_pairs: int,
    ld_alpha: float | None = None,
    token_wpo: torch.Tensor | None = None,
) -> PairLogps:
    """Per-sequence sums of (N,) token log-probs, with the LD-DPO weights and WPO's means where asked."""
    zeros = token_logps.new_zeros(2 * num_pairs)
    lengths = torch.bincount(target_seq, minlength=2 * num_pairs)
    plain = zeros.index_add(0, target_seq, token_logps)
    if ld_alpha is None:
        out = split_sequences(plain, lengths, num_pairs)
    else:
        weights = ld_token_weights(target_seq, num_pairs, ld_alpha)
        out = split_sequences(zeros.index_add(0, target_seq, token_logps * weights), lengths, num_pairs)
        out.chosen_plain = plain[:num_pairs]
    if token_wpo is not None:
        means = zeros.detach().index_add(0, target_seq, token_wpo.detach()) / lengths.clamp(min=1)
        out.chosen_wpo, out.rejected_wpo = means[:num_pairs], means[num_pairs:]
    return out


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., index] in fp32 without materialising the full log-softmax."""
    return _select(logits.float(), index)[0]


def sequence_logps_reference(model: Any, batch: Batch, ld_alpha: float | None = None, wpo: bool = False) -> PairLogps:
    """The plain definition: full logits, labels shifted by one, masked sum, with a dense mask (padded and packed
    layouts). In a prefix-shared row the last prompt position predicts the first token of both responses, which one
    label per position cannot hold: the prefix-shared paths are tested against the padded layout instead."""
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask if batch.segments is None else batch.dense_mask(),
        position_ids=batch.position_ids,
        use_cache=False,
    ).logits  # (R, T, V)
    r, t = batch.input_ids.shape
    labels = torch.full((r * t,), IGNORE_INDEX, dtype=torch.long, device=logits.device)
    seq = torch.full((r * t,), -1, dtype=torch.long, device=logits.device)
    labels[batch.target_index] = batch.target_ids  # labels already shifted: position i holds token i+1
    seq[batch.target_index] = batch.target_seq
    logps = F.log_softmax(logits.float(), dim=-1).reshape(r * t, -1)
    mask = labels != IGNORE_INDEX
    token_logps = logps[mask].gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1)
    token_wpo = token_logps - torch.logsumexp(2 * logps[mask], dim=-1) if wpo else None
    # seq[mask] lists each sequence's targets in token order, which is all the LD-DPO weights need
    return sequence_sums(token_logps, seq[mask], batch.num_pairs, ld_alpha, token_wpo)


class HeadLogps(torch.autograd.Function):
    """selective_log_softmax(hidden @ weight.T + bias, targets) for one chunk of positions, in `hidden`'s dtype.

    Each log-prob depends on its own position's hidden state only, so with a frozen head (LoRA) the forward pass
    also computes d logp / d hidden = W[target] - softmax @ W, (n, H), and keeps only that: backward is one multiply,
    and the (n, V) logits exist only inside the forward. A trainable head keeps hidden states and log-sum-exps
    instead, and its backward recomputes the logits and turns them into their gradient in place.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        wpo: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = _logits(hidden, weight, bias)  # (n, V)
        logps, lse = _select(logits, targets)
        aligned = _wpo_aligned(logits, logps, lse) if wpo else logps.new_zeros(0)  # before logits are overwritten
        ctx.mark_non_differentiable(aligned)
        ctx.head_is_trained = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        if ctx.head_is_trained:
            ctx.save_for_backward(hidden, weight, bias, targets, lse)
        else:
            ctx.save_for_backward(_minus_dlogits(logits, lse, targets).to(hidden.dtype) @ weight.to(hidden.dtype))
        return logps, aligned

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _aligned: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if not ctx.head_is_trained:
            (minus_jacobian,) = ctx.saved_tensors
            return -grad[:, None].to(minus_jacobian.dtype) * minus_jacobian, None, None, None, None
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dlogits = _minus_dlogits(_logits(hidden, weight, bias), lse, targets).mul_(-grad[:, None]).to(hidden.dtype)
        need = ctx.needs_input_grad
        grad_hidden = dlogits @ weight.to(hidden.dtype) if need[0] else None
        grad_weight = (dlogits.T @ hidden).to(weight.dtype) if need[1] else None
        grad_bias = dlogits.sum(0).to(bias.dtype) if bias is not None and need[2] else None
        return grad_hidden, grad_weight, grad_bias, None, None


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(n, V) logits, the matmul in `hidden`'s dtype, returned in fp32 (fp64 stays fp64, for gradcheck)."""
    dtype = hidden.dtype
    logits = F.linear(hidden, weight.to(dtype), None if bias is None else bias.to(dtype))
    return logits if logits.dtype == torch.float64 else logits.float()


def _select(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_softmax(logits)[targets], logsumexp(logits)), as `selective_log_softmax` computes them."""
    lse = torch.logsumexp(logits, dim=-1)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse, lse


def _wpo_aligned(logits: torch.Tensor, logps: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """WPO's aligned token log-prob, log p[target] - log sum_v p_v^2 (Zhou et al. 2024, Eq. 3)."""
    return logps - (torch.logsumexp(2 * logits, dim=-1) - 2 * lse)


def _minus_dlogits(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """softmax - one-hot = -(d logp[target] / d logits), written over `logits`."""
    probs = logits.sub_(lse[:, None]).exp_()
    probs[torch.arange(len(targets), device=probs.device), targets] -= 1.0
    return probs


def head_logps(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    """(n,) fp32 log-probs of `targets` under the output layer, computed in `hidden`'s dtype; through `HeadLogps`
    where a gradient is needed, so the chunk's (n, V) logits are never kept for backward."""
    return head_logps_wpo(hidden, weight, bias, targets, wpo=False)[0]


def head_logps_wpo(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, wpo: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`head_logps`, and with `wpo` WPO's aligned log-probs of the same positions (no gradient), from the same
    logits."""
    params = (hidden, weight) if bias is None else (hidden, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in params):
        logps, aligned = HeadLogps.apply(hidden, weight, bias, targets, wpo)
        return logps, aligned if wpo else None
    logits = _logits(hidden, weight, bias)
    logps, lse = _select(logits, targets)
    return logps, _wpo_aligned(logits, logps, lse) if wpo else None


class SequenceLogps(torch.nn.Module):
    """Wraps a causal LM (plain or PEFT) so that `forward(batch)` returns per-sequence log-probs.

    Distributed wrappers (DDP, FSDP) wrap this module, so the backbone and the head run inside their forward.
    """

    def __init__(self, model: Any, chunk_size: int = 1024, ld_alpha: float | None = None, wpo: bool = False) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.ld_alpha = ld_alpha  # LD-DPO weights in every sum (policy and reference alike)
        self.wpo = wpo  # also return WPO's per-sequence means
        self._frozen_head: tuple[Any, ...] | None = None
        self.segment_attention = attention.enabled(self._causal_lm())
        self.flex = flex.enabled(self._causal_lm())

    def _causal_lm(self) -> Any:
        return base_model(self.model)

    def _head(self, lm_head: torch.nn.Linear, device: torch.device) -> tuple[Any, ...]:
        """The head's weight, bias and the dtype its matmul runs in: autocast's if on, as autocast would run it."""
        if not torch.is_autocast_enabled(device.type):
            return lm_head.weight, lm_head.bias, lm_head.weight.dtype
        dtype = torch.get_autocast_dtype(device.type)
        if lm_head.weight.requires_grad:
            return lm_head.weight, lm_head.bias, dtype
        # Autocast caches its casts only for weights that require grad; cast a frozen head once, not per chunk.
        if self._frozen_head is None or self._frozen_head[2] != dtype:
            bias = None if lm_head.bias is None else lm_head.bias.detach().to(dtype)
            self._frozen_head = (lm_head.weight.detach().to(dtype), bias, dtype)
        return self._frozen_head

    def forward(self, batch: Batch) -> PairLogps:
        causal_lm = self._causal_lm()
        backbone = causal_lm.get_decoder()
        weight, bias, dtype = self._head(causal_lm.get_output_embeddings(), batch.input_ids.device)
        if self.flex:  # rows padded to a compiled width; the block mask holds the layout
            batch = flex.bucketed(batch)
            layout = {"attention_mask": flex.block_mask(batch)}
        elif batch.segments is None:
            layout = {"attention_mask": batch.attention_mask}
        elif self.segment_attention:
            layout = {"attention_mask": None, "segments": batch.segments}
        elif attention.is_varlen(self._causal_lm()):  # one packed row: varlen kernels from the restarting positions
            layout = {"attention_mask": None}
        else:
            layout = {"attention_mask": batch.dense_mask()}
        hidden = backbone(
            input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **layout
        ).last_hidden_state  # (R, T, H)
        hidden = hidden.reshape(-1, hidden.shape[-1])[batch.target_index].to(dtype)  # (N, H): response positions
        size = self.chunk_size
        chunks = [
            head_logps_wpo(hidden[start : start + size], weight, bias, batch.target_ids[start : start + size], self.wpo)
            for start in range(0, hidden.shape[0], size)
        ]
        empty = hidden.new_zeros(0, dtype=torch.float32)
        token_logps = torch.cat([c[0] for c in chunks]) if chunks else empty
        token_wpo = (torch.cat([c[1] for c in chunks]) if chunks else empty) if self.wpo else None
        return sequence_sums(token_logps, batch.target_seq, batch.num_pairs, self.ld_alpha, token_wpo)
