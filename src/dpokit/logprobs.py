"""Per-sequence log-probabilities of responses: the hot path of DPO.

`sequence_logps_reference` is the plain definition (full logits, shift by one, mask, sum in fp32) and exists to
test against. `SequenceLogps` is what training runs: the backbone once over any `Batch` layout, then the LM head
and log-softmax only at response positions, in chunks, so [batch, length, vocab] logits never exist; a chunk's
logits live only inside `HeadLogps`, which keeps what its backward needs instead of them.
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
class SeqLogps:
    chosen: torch.Tensor  # (B,) summed log-probs of the chosen responses
    rejected: torch.Tensor  # (B,)
    chosen_lengths: torch.Tensor  # (B,) response tokens
    rejected_lengths: torch.Tensor  # (B,)


def split_sequences(per_sequence: torch.Tensor, lengths: torch.Tensor, num_pairs: int) -> SeqLogps:
    return SeqLogps(per_sequence[:num_pairs], per_sequence[num_pairs:], lengths[:num_pairs], lengths[num_pairs:])


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., index] in fp32 without materialising the full log-softmax."""
    return _select(logits.float(), index)[0]


def sequence_logps_reference(model: Any, batch: Batch) -> SeqLogps:
    """The plain definition: full logits, labels shifted by one, masked sum (any layout, with a dense mask)."""
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
    per_sequence = torch.zeros(2 * batch.num_pairs, dtype=torch.float32, device=logits.device)
    per_sequence = per_sequence.index_add(0, seq[mask], token_logps)
    return split_sequences(per_sequence, batch.lengths.to(logits.device), batch.num_pairs)


class HeadLogps(torch.autograd.Function):
    """selective_log_softmax(hidden @ weight.T + bias, targets) for one chunk of positions, in `hidden`'s dtype.

    Each log-prob depends on its own position's hidden state only, so with a frozen head (LoRA) the forward pass
    also computes d logp / d hidden = W[target] - softmax @ W, (n, H), and keeps only that: backward is one multiply,
    and the (n, V) logits exist only inside the forward. A trainable head keeps hidden states and log-sum-exps
    instead, and its backward recomputes the logits and turns them into their gradient in place.
    """

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
    ) -> torch.Tensor:
        logits = _logits(hidden, weight, bias)  # (n, V)
        logps, lse = _select(logits, targets)
        ctx.head_is_trained = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        if ctx.head_is_trained:
            ctx.save_for_backward(hidden, weight, bias, targets, lse)
        else:
            ctx.save_for_backward(_minus_dlogits(logits, lse, targets).to(hidden.dtype) @ weight.to(hidden.dtype))
        return logps

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if not ctx.head_is_trained:
            (minus_jacobian,) = ctx.saved_tensors
            return -grad[:, None].to(minus_jacobian.dtype) * minus_jacobian, None, None, None
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dlogits = _minus_dlogits(_logits(hidden, weight, bias), lse, targets).mul_(-grad[:, None]).to(hidden.dtype)
        need = ctx.needs_input_grad
        grad_hidden = dlogits @ weight.to(hidden.dtype) if need[0] else None
        grad_weight = (dlogits.T @ hidden).to(weight.dtype) if need[1] else None
        grad_bias = dlogits.sum(0).to(bias.dtype) if bias is not None and need[2] else None
        return grad_hidden, grad_weight, grad_bias, None


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(n, V) logits, the matmul in `hidden`'s dtype, returned in fp32 (fp64 stays fp64, for gradcheck)."""
    dtype = hidden.dtype
    logits = F.linear(hidden, weight.to(dtype), None if bias is None else bias.to(dtype))
    return logits if logits.dtype == torch.float64 else logits.float()


def _select(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_softmax(logits)[targets], logsumexp(logits)), as `selective_log_softmax` computes them."""
    lse = torch.logsumexp(logits, dim=-1)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse, lse


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
    params = (hidden, weight) if bias is None else (hidden, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in params):
        return HeadLogps.apply(hidden, weight, bias, targets)
    return _select(_logits(hidden, weight, bias), targets)[0]


class SequenceLogps(torch.nn.Module):
    """Wraps a causal LM (plain or PEFT) so that `forward(batch)` returns per-sequence log-probs.

    Distributed wrappers (DDP, FSDP) wrap this module, so the backbone and the head run inside their forward.
    """

    def __init__(self, model: Any, chunk_size: int = 1024) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
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

    def forward(self, batch: Batch) -> SeqLogps:
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
        chunks = [
            head_logps(
                hidden[start : start + self.chunk_size], weight, bias, batch.target_ids[start : start + self.chunk_size]
            )
            for start in range(0, hidden.shape[0], self.chunk_size)
        ]
        token_logps = torch.cat(chunks) if chunks else hidden.new_zeros(0, dtype=torch.float32)
        per_sequence = token_logps.new_zeros(2 * batch.num_pairs).index_add(0, batch.target_seq, token_logps)
        return split_sequences(per_sequence, batch.lengths.to(per_sequence.device), batch.num_pairs)
