"""Laying pairs out as model inputs.

Every layout produces the same `Batch`: token rows for the model plus, for every response token, the flat
position whose output predicts it and the sequence it belongs to. Sequence `i` is the chosen response of pair
`i`, sequence `B + i` its rejected one. `logprobs.py` needs nothing else, so each layout is checked against the
plain one simply by comparing per-sequence log-probs.

- padded: one row per prompt+response, right-padded to the longest (TRL's layout).
- packed (`padding_free`): several prompt+response sequences per row, positions restarting at each.
- shared (`prefix_sharing`): prompt, chosen and rejected in one row; rejected tokens see the prompt but not
  the chosen tokens and take the positions the chosen ones had, so every token sees exactly what it would see in
  the padded layout. Packed too when both are on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dpokit.data.encode import EncodedPair

# Branch of each token inside a segment: the shared prompt, the chosen response or the rejected response.
PROMPT, CHOSEN, REJECTED = 0, 1, 2
NO_SEGMENT = -1  # padding


@dataclass
class Batch:
    input_ids: torch.Tensor  # (R, T)
    position_ids: torch.Tensor  # (R, T)
    attention_mask: torch.Tensor  # (R, T) padding mask, or (R, 1, T, T) bool (True = may attend)
    target_index: torch.Tensor  # (N,) flat index into R*T of the position whose output predicts each target
    target_ids: torch.Tensor  # (N,)
    target_seq: torch.Tensor  # (N,) sequence of each target: chosen i -> i, rejected i -> B + i
    num_pairs: int  # B
    num_tokens: int  # real tokens fed to the model

    @property
    def lengths(self) -> torch.Tensor:
        """Response tokens per sequence, (2B,)."""
        return torch.bincount(self.target_seq, minlength=2 * self.num_pairs)

    def to(self, device: torch.device) -> Batch:
        return Batch(
            *(t.to(device) for t in (self.input_ids, self.position_ids, self.attention_mask)),
            *(t.to(device) for t in (self.target_index, self.target_ids, self.target_seq)),
            self.num_pairs,
            self.num_tokens,
        )


@dataclass
class _Segment:
    """Tokens of one attention island: a prompt followed by one response, or by both (shared)."""

    ids: list[int]
    positions: list[int]
    branches: list[int]
    targets: list[tuple[int, int, int]]  # (offset of the predicting token in the segment, target id, sequence)


def _segments(pairs: Sequence[EncodedPair], shared: bool) -> list[_Segment]:
    b = len(pairs)
    segments = []
    for i, pair in enumerate(pairs):
        prompt, p = pair.prompt_ids, len(pair.prompt_ids)
        responses = [(pair.chosen_ids, i, CHOSEN), (pair.rejected_ids, b + i, REJECTED)]
        if shared:
            ids, positions, branches, targets = list(prompt), list(range(p)), [PROMPT] * p, []
            for response, seq, branch in responses:
                start = len(ids)
                # the first response token is predicted by the last prompt token, the rest by their predecessor
                targets += [(p - 1 if j == 0 else start + j - 1, tok, seq) for j, tok in enumerate(response)]
                ids += response
                positions += range(p, p + len(response))
                branches += [branch] * len(response)
            segments.append(_Segment(ids, positions, branches, targets))
        else:
            for response, seq, branch in responses:
                targets = [(p - 1 + j, tok, seq) for j, tok in enumerate(response)]
                n = p + len(response)
                segments.append(
                    _Segment(prompt + response, list(range(n)), [PROMPT] * p + [branch] * len(response), targets)
                )
    return segments


def _pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: segment indices grouped into rows of at most `capacity` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def collate(
    pairs: Sequence[EncodedPair],
    pad_token_id: int,
    *,
    padding_free: bool = False,
    prefix_sharing: bool = False,
) -> Batch:
    """Lay out `pairs` for one forward pass. With neither option this is TRL's padded layout."""
    segments = _segments(pairs, shared=prefix_sharing)
    lengths = [len(s.ids) for s in segments]
    if padding_free:
        # Rows as long as the longest segment: attention cost stays that of the padded layout, padding goes.
        rows = _pack(lengths, max(lengths))
    else:
        rows = [[i] for i in range(len(segments))]
    width = max(sum(lengths[i] for i in row) for row in rows)
    n_rows = len(rows)
    input_ids = torch.full((n_rows, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    segment_of = torch.full((n_rows, width), NO_SEGMENT, dtype=torch.long)
    branch_of = torch.zeros((n_rows, width), dtype=torch.long)
    target_index, target_ids, target_seq = [], [], []
    for r, row in enumerate(rows):
        offset = 0
        for s in row:
            seg = segments[s]
            n = len(seg.ids)
            input_ids[r, offset : offset + n] = torch.tensor(seg.ids)
            position_ids[r, offset : offset + n] = torch.tensor(seg.positions)
            segment_of[r, offset : offset + n] = s
            branch_of[r, offset : offset + n] = torch.tensor(seg.branches)
            for source, tok, seq in seg.targets:
                target_index.append(r * width + offset + source)
                target_ids.append(tok)
                target_seq.append(seq)
            offset += n
    plain = not padding_free and not prefix_sharing
    mask = (segment_of != NO_SEGMENT).long() if plain else _attention_mask(segment_of, branch_of)
    return Batch(
        input_ids,
        position_ids,
        mask,
        torch.tensor(target_index, dtype=torch.long),
        torch.tensor(target_ids, dtype=torch.long),
        torch.tensor(target_seq, dtype=torch.long),
        len(pairs),
        sum(lengths),
    )


def _attention_mask(segment_of: torch.Tensor, branch_of: torch.Tensor) -> torch.Tensor:
    """(R, 1, T, T) bool: causal, within a segment, and never across the chosen / rejected branches."""
    t = segment_of.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    same_segment = segment_of[:, :, None] == segment_of[:, None, :]  # (R, T, T) query x key
    q_branch, k_branch = branch_of[:, :, None], branch_of[:, None, :]
    visible_branch = (k_branch == PROMPT) | (k_branch == q_branch)
    mask = causal & same_segment & visible_branch & (segment_of[:, None, :] != NO_SEGMENT)
    # A padding query would attend to nothing, which makes softmax NaN; let it see itself.
    mask |= torch.eye(t, dtype=torch.bool)
    return mask[:, None]
