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

Packed and shared batches carry their `segments` (`data.segments.Segment`): segment attention runs them directly,
other attention kernels get the same rule as a dense mask (`Batch.dense_mask`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dpokit.data.encode import EncodedPair
from dpokit.data.segments import Segment


@dataclass
class Batch:
    input_ids: torch.Tensor  # (R, T)
    position_ids: torch.Tensor  # (R, T)
    attention_mask: torch.Tensor  # (R, T) 1 on real tokens, 0 on padding
    target_index: torch.Tensor  # (N,) flat index into R*T of the position whose output predicts each target
    target_ids: torch.Tensor  # (N,)
    target_seq: torch.Tensor  # (N,) sequence of each target: chosen i -> i, rejected i -> B + i
    num_pairs: int  # B
    num_tokens: int  # real tokens fed to the model
    segments: tuple[Segment, ...] | None = None  # attention islands of packed / shared rows; None: one per row

    def dense_mask(self) -> torch.Tensor:
        """(R, 1, T, T) bool (True = may attend) for attention kernels that take a mask instead of segments."""
        rows, width = self.input_ids.shape
        # A padding query would attend to nothing, which makes softmax NaN; let it see itself.
        mask = torch.eye(width, dtype=torch.bool).repeat(rows, 1, 1)
        for seg in self.segments or ():
            head, end = seg.start + seg.head, seg.end
            mask[seg.row, seg.start : head, seg.start : head] = torch.ones(seg.head, seg.head).tril().bool()
            mask[seg.row, head:end, seg.start : seg.start + seg.prefix] = True
            mask[seg.row, head:end, head:end] = torch.ones(seg.tail, seg.tail).tril().bool()
        return mask[:, None].to(self.input_ids.device)

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
            self.segments,
        )


@dataclass
class TokenSegment:
    """Tokens of one attention island: a prompt followed by one response, or by both (shared); for SFT, one
    example."""

    ids: list[int]
    positions: list[int]
    targets: list[tuple[int, int, int]]  # (offset of the predicting token in the segment, target id, sequence)
    head: int  # tokens attending causally; the rest (a shared rejected response) see the prompt and themselves
    prefix: int  # the prompt's length


def _segments(pairs: Sequence[EncodedPair], shared: bool) -> list[TokenSegment]:
    b = len(pairs)
    segments = []
    for i, pair in enumerate(pairs):
        prompt, p = pair.prompt_ids, len(pair.prompt_ids)
        responses = [(pair.chosen_ids, i), (pair.rejected_ids, b + i)]
        if shared:
            ids, positions, targets = list(prompt), list(range(p)), []
            for response, seq in responses:
                start = len(ids)
                # the first response token is predicted by the last prompt token, the rest by their predecessor
                targets += [(p - 1 if j == 0 else start + j - 1, tok, seq) for j, tok in enumerate(response)]
                ids += response
                positions += range(p, p + len(response))
            segments.append(TokenSegment(ids, positions, targets, head=p + len(pair.chosen_ids), prefix=p))
        else:
            for response, seq in responses:
                targets = [(p - 1 + j, tok, seq) for j, tok in enumerate(response)]
                n = p + len(response)
                segments.append(TokenSegment(prompt + response, list(range(n)), targets, head=n, prefix=p))
    return segments


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
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
    one_row: bool = False,
) -> Batch:
    """Lay out `pairs` for one forward pass. With neither option this is TRL's padded layout.

    Packed rows are as long as the longest segment, so a masked attention pass over a row costs what the padded
    layout's would; `one_row` packs everything into a single row, with no padding at all, for segment attention,
    whose cost does not grow with the row.
    """
    segments = _segments(pairs, shared=prefix_sharing)
    lengths = [len(s.ids) for s in segments]
    if padding_free:
        rows = [list(range(len(segments)))] if one_row else pack(lengths, max(lengths))
    else:
        rows = [[i] for i in range(len(segments))]
    return lay_out(segments, rows, pad_token_id, len(pairs), with_segments=padding_free or prefix_sharing)


def lay_out(
    segments: Sequence[TokenSegment], rows: list[list[int]], pad_token_id: int, num_pairs: int, with_segments: bool
) -> Batch:
    """`segments` placed in rows (`rows[r]` lists the segments of row r, in order), right-padded to the longest;
    `with_segments` keeps their attention islands for the model (needed when a row holds more than one)."""
    lengths = [len(s.ids) for s in segments]
    width = max(sum(lengths[i] for i in row) for row in rows)
    n_rows = len(rows)
    input_ids = torch.full((n_rows, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    attention_mask = torch.zeros((n_rows, width), dtype=torch.long)
    islands, target_index, target_ids, target_seq = [], [], [], []
    for r, row in enumerate(rows):
        offset = 0
        for s in row:
            seg = segments[s]
            n = len(seg.ids)
            input_ids[r, offset : offset + n] = torch.tensor(seg.ids)
            position_ids[r, offset : offset + n] = torch.tensor(seg.positions)
            attention_mask[r, offset : offset + n] = 1
            islands.append(Segment(r, offset, seg.head, n - seg.head, seg.prefix if n > seg.head else 0))
            for source, tok, seq in seg.targets:
                target_index.append(r * width + offset + source)
                target_ids.append(tok)
                target_seq.append(seq)
            offset += n
    return Batch(
        input_ids,
        position_ids,
        attention_mask,
        torch.tensor(target_index, dtype=torch.long),
        torch.tensor(target_ids, dtype=torch.long),
        torch.tensor(target_seq, dtype=torch.long),
        num_pairs,
        sum(lengths),
        tuple(islands) if with_segments else None,
    )
