"""Per-sequence log-probabilities of responses: the hot path of DPO.

`sequence_logps_reference` is the plain definition (full logits, shift by one, mask, sum in fp32) and exists to
test against. `SequenceLogps` is what training runs: the backbone once over any `Batch` layout, then the LM head
and log-softmax only at response positions, in chunks, so [batch, length, vocab] logits never exist. In training
each chunk is recomputed in the backward pass instead of keeping its logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dpokit.data.collate import Batch

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
    logits = logits.float()
    return logits.gather(-1, index.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logps_reference(model: Any, batch: Batch) -> SeqLogps:
    """The plain definition, on the padded layout: full logits, labels shifted by one, masked sum."""
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
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


def _chunk_logps(head: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return selective_log_softmax(head(hidden), targets)  # (n, V) logits live only inside this call


class _FrozenHead:
    """A frozen output head under autocast, with its weight cast once instead of on every chunk.

    Autocast caches its casts only for weights that require grad; a frozen head (LoRA) would be cast anew for
    every chunk and again in every backward recompute. The values are the ones autocast would produce.
    """

    def __init__(self, head: torch.nn.Linear, dtype: torch.dtype) -> None:
        self.weight = head.weight.detach().to(dtype)
        self.bias = None if head.bias is None else head.bias.detach().to(dtype)
        self.dtype = dtype

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden.to(self.dtype), self.weight, self.bias)


class SequenceLogps(torch.nn.Module):
    """Wraps a causal LM (plain or PEFT) so that `forward(batch)` returns per-sequence log-probs.

    Distributed wrappers (DDP, FSDP) wrap this module, so the backbone and the head run inside their forward.
    """

    def __init__(self, model: Any, chunk_size: int = 1024) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self._frozen_head: _FrozenHead | None = None

    def _causal_lm(self) -> Any:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def _head(self, lm_head: torch.nn.Linear, device: torch.device) -> Any:
        if lm_head.weight.requires_grad or not torch.is_autocast_enabled(device.type):
            return lm_head
        dtype = torch.get_autocast_dtype(device.type)
        if self._frozen_head is None or self._frozen_head.dtype != dtype:
            self._frozen_head = _FrozenHead(lm_head, dtype)
        return self._frozen_head

    def forward(self, batch: Batch) -> SeqLogps:
        causal_lm = self._causal_lm()
        backbone = causal_lm.get_decoder()
        lm_head = self._head(causal_lm.get_output_embeddings(), batch.input_ids.device)
        hidden = backbone(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).last_hidden_state  # (R, T, H)
        hidden = hidden.reshape(-1, hidden.shape[-1])[batch.target_index]  # (N, H): response positions only
        chunks = []
        for start in range(0, hidden.shape[0], self.chunk_size):
            h = hidden[start : start + self.chunk_size]
            t = batch.target_ids[start : start + self.chunk_size]
            if torch.is_grad_enabled() and h.requires_grad:
                # recompute this chunk's logits in backward rather than keep (n, V) of them alive
                chunks.append(checkpoint(_chunk_logps, lm_head, h, t, use_reentrant=False))
            else:
                chunks.append(_chunk_logps(lm_head, h, t))
        token_logps = torch.cat(chunks) if chunks else hidden.new_zeros(0, dtype=torch.float32)
        per_sequence = token_logps.new_zeros(2 * batch.num_pairs).index_add(0, batch.target_seq, token_logps)
        return split_sequences(per_sequence, batch.lengths.to(per_sequence.device), batch.num_pairs)
