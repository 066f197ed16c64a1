"""FlexAttention block masks against dense reference masks, and FlexAttention against the plain path.

torch 2.13 runs FlexAttention on CPU forward only (its backward raises there), so on CPU the kernel is checked on
per-sequence log-probs without gradients; the gradient check runs where CUDA is present (and in bench/gpu_check.py).
"""

from __future__ import annotations

import random

import pytest
import torch

from conftest import conversational_rows
from dpokit import flex
from dpokit.data.collate import collate
from dpokit.data.encode import EncodedPair, encode_pairs
from dpokit.data.rows import as_text_pair
from dpokit.logprobs import SequenceLogps, sequence_logps_reference
from dpokit.models import add_lora
from tiny import build_model, build_tokenizer

LAYOUTS = {
    "padded": (False, False),
    "packed": (True, False),
    "prefix-shared": (False, True),
    "mixed": (True, True),  # packed rows of prefix-shared segments
}
PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3


def small_pairs(n: int, seed: int) -> list[EncodedPair]:
    rng = random.Random(seed)

    def ids(k: int) -> list[int]:
        return [rng.randrange(3, 50) for _ in range(k)]

    return [EncodedPair(ids(rng.randint(1, 7)), ids(rng.randint(1, 6)), ids(rng.randint(1, 6))) for _ in range(n)]


def reference_mask(batch) -> torch.Tensor:
    """(R, T, T) from the meaning of the layout: a token sees the earlier tokens of its own prompt+responses, except
    that a rejected token never sees a chosen one; padding sees only itself."""
    rows, width = batch.input_ids.shape
    segment = torch.full((rows, width), -1)
    kind = torch.full((rows, width), PAD)
    for i, s in enumerate(flex.row_segments(batch)):
        segment[s.row, s.start : s.end] = i
        shared = s.tail > 0  # prompt, chosen, rejected; an unshared segment is one prompt and one response
        kind[s.row, s.start : s.start + s.head] = CHOSEN
        if shared:
            kind[s.row, s.start : s.start + s.prefix] = PROMPT
            kind[s.row, s.start + s.head : s.end] = REJECTED
    q, k = torch.arange(width)[:, None], torch.arange(width)[None, :]
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    rejected_sees_chosen = (kind[:, :, None] == REJECTED) & (kind[:, None, :] == CHOSEN)
    return (same & (k <= q) & ~rejected_sees_chosen) | (q == k)


@pytest.mark.parametrize(
    ("layout", "one_row"),
    [(name, one_row) for name in LAYOUTS for one_row in (False, True) if one_row <= LAYOUTS[name][0]],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_mask_mod_allows_exactly_the_reference_pairs(layout: str, one_row: bool, seed: int) -> None:
    """Every (query, key) pair of small batches, against the reference above and `Batch.dense_mask`."""
    padding_free, prefix_sharing = LAYOUTS[layout]
    pairs = small_pairs(5, seed)
    batch = collate(pairs, 0, padding_free=padding_free, prefix_sharing=prefix_sharing, one_row=one_row)
    batch = flex.bucketed(batch)
    got = flex.dense_mask(batch)[:, 0]
    assert got.shape[-1] == flex.BLOCK
    assert torch.equal(got, reference_mask(batch))
    assert torch.equal(got, batch.dense_mask()[:, 0])
    if prefix_sharing:  # the rule that matters most, checked on its own: no rejected query sees a chosen key
        s = next(s for s in batch.segments if s.tail)
        assert not got[s.row, s.start + s.head : s.end, s.start + s.prefix : s.start + s.head].any()
        assert got[s.row, s.start + s.head : s.end, s.start : s.start + s.prefix].all()


@pytest.fixture(scope="module")
def setup():
    tokenizer = build_tokenizer()
    rows = conversational_rows(9, seed=5)
    pairs = encode_pairs(tokenizer, [as_text_pair(r["prompt"], r["chosen"], r["rejected"]) for r in rows])
    return tokenizer, pairs


@pytest.mark.parametrize("layout", LAYOUTS)
def test_block_mask_marks_exactly_the_blocks_with_visible_pairs(setup, layout: str) -> None:
    """Rows of several 128-token blocks: a block is computed iff some pair in it is visible, and is marked full
    iff every pair is, so no visible pair is skipped and no partial block goes unmasked."""
    tokenizer, pairs = setup
    padding_free, prefix_sharing = LAYOUTS[layout]
    batch = flex.bucketed(
        collate(pairs, tokenizer.pad_token_id, padding_free=padding_free, prefix_sharing=prefix_sharing, one_row=True)
    )
    rows, width = batch.input_ids.shape
    blocks = width // flex.BLOCK
    dense = reference_mask(batch).reshape(rows, blocks, flex.BLOCK, blocks, flex.BLOCK)
    any_visible, all_visible = dense.any(dim=(2, 4)), dense.all(dim=(2, 4))
    mask = flex.block_mask(batch)
    computed = mask.to_dense()[:, 0].bool()  # partial and full blocks
    assert torch.equal(computed, any_visible)
    assert torch.equal(_full_blocks(mask, rows, blocks), all_visible)
    if padding_free and blocks > 2:
        assert computed.float().mean() < 0.5  # a packed row skips most of its blocks


def _full_blocks(mask, rows: int, blocks: int) -> torch.Tensor:
    full = torch.zeros(rows, blocks, blocks, dtype=torch.bool)
    counts, indices = mask.full_kv_num_blocks, mask.full_kv_indices
    for r in range(rows):
        for qb in range(blocks):
            full[r, qb, indices[r, 0, qb, : counts[r, 0, qb]]] = True
    return full


def test_bucket_widths_bound_padding_and_shapes() -> None:
    widths = [flex.bucket_width(n) for n in range(1, 16385)]
    assert all(w % flex.BLOCK == 0 and w >= n for n, w in enumerate(widths, 1))
    assert all(w - n < max(flex.BLOCK, w / 4) for n, w in enumerate(widths, 1))
    assert len(set(widths)) == 24  # 7 up to 896 tokens, then 4 per doubling
    assert [flex.bucket_width(n) for n in (1, 128, 129, 1000, 1025, 1300)] == [128, 128, 256, 1024, 1280, 1536]


def test_widened_batch_keeps_every_target(setup) -> None:
    """Padding rows to a bucket moves no target: the plain path gives the same log-probs on both."""
    tokenizer, pairs = setup
    model = build_model(len(tokenizer))
    batch = collate(pairs[:4], tokenizer.pad_token_id, padding_free=True, prefix_sharing=True)
    with torch.no_grad():
        before = sequence_logps_reference(model, batch)
        after = sequence_logps_reference(model, flex.bucketed(batch))
    assert torch.allclose(before.chosen, after.chosen, atol=1e-5)
    assert torch.allclose(before.rejected, after.rejected, atol=1e-5)


@pytest.fixture
def eager_flex(monkeypatch):
    """FlexAttention without torch.compile: the same masks through torch's reference kernel, seconds faster to start
    on CPU (one test below runs the compiled kernel that CUDA runs)."""
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(flex, "_compiled_flex", lambda: flex_attention)


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_flex_attention_matches_the_plain_path_on_cpu(setup, eager_flex, layout: str) -> None:
    tokenizer, pairs = setup
    pairs = pairs[:5]  # torch's reference kernel is slow on CPU
    padding_free, prefix_sharing = LAYOUTS[layout]
    model = build_model(len(tokenizer))
    assert flex.enable(model)
    with torch.no_grad():
        expected = sequence_logps_reference(model, collate(pairs, tokenizer.pad_token_id))
        batch = collate(pairs, tokenizer.pad_token_id, padding_free=padding_free, prefix_sharing=prefix_sharing)
        got = SequenceLogps(model, chunk_size=7)(batch)
    assert torch.allclose(got.chosen, expected.chosen, atol=1e-4)
    assert torch.allclose(got.rejected, expected.rejected, atol=1e-4)
    assert torch.equal(got.chosen_lengths, expected.chosen_lengths)


def test_compiled_flex_attention_matches_the_plain_path_on_cpu(setup, caplog) -> None:
    """The kernel CUDA runs (torch.compile'd FlexAttention), here on CPU, forward, on packed prefix-shared rows of
    a LoRA model; the compile is logged with its shape count."""
    tokenizer, pairs = setup
    model = add_lora(build_model(len(tokenizer)), 4, 8, 0.0, ["all-linear"], seed=0)
    assert flex.enable(model.get_base_model())
    before = flex.compiled_shapes()
    with torch.no_grad(), caplog.at_level("INFO", logger="dpokit.flex"):
        expected = sequence_logps_reference(model, collate(pairs, tokenizer.pad_token_id))
        batch = collate(pairs, tokenizer.pad_token_id, padding_free=True, prefix_sharing=True, one_row=True)
        got = SequenceLogps(model)(batch)
        SequenceLogps(model)(batch)  # the same shape again: no second compile
    assert torch.allclose(got.chosen, expected.chosen, atol=1e-4)
    assert torch.allclose(got.rejected, expected.rejected, atol=1e-4)
    assert flex.compiled_shapes() == before + 1
    assert f"x {flex.bucket_width(batch.input_ids.shape[1])} tokens ({before + 1} shapes so far)" in caplog.text


def test_flex_attention_has_no_backward_on_cpu_in_this_torch(setup) -> None:
    """Why CPU training keeps segment attention: torch refuses FlexAttention gradients on CPU. When a torch lifts
    this, the CUDA gradient test below becomes possible here too."""
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.randn(1, 2, 128, 16, requires_grad=True)
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        flex_attention(q, q, q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention trains on CUDA only")
@pytest.mark.parametrize("layout", ["packed", "prefix-shared", "mixed"])
def test_flex_attention_lora_gradients_match_the_plain_path_on_cuda(setup, layout: str) -> None:
    tokenizer, pairs = setup
    padding_free, prefix_sharing = LAYOUTS[layout]
    grads = []
    for fast in (False, True):
        base = build_model(len(tokenizer)).cuda()
        if fast:
            assert flex.enable(base)
        model = add_lora(base, 4, 8, 0.0, ["all-linear"], seed=0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        if fast:
            batch = collate(pairs, tokenizer.pad_token_id, padding_free=padding_free, prefix_sharing=prefix_sharing)
            out = SequenceLogps(model, chunk_size=16)(batch.to(torch.device("cuda")))
        else:
            out = sequence_logps_reference(model, collate(pairs, tokenizer.pad_token_id).to(torch.device("cuda")))
        (out.chosen - 0.5 * out.rejected).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-4, rtol=1e-3)
