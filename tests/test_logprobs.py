"""Every batch layout and the chunked LM head against the plain definition of per-sequence log-probs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import conversational_rows
from dpokit import attention
from dpokit.data.collate import collate
from dpokit.data.encode import encode_pairs
from dpokit.data.rows import as_text_pair
from dpokit.logprobs import SequenceLogps, head_logps, selective_log_softmax, sequence_logps_reference
from dpokit.models import add_lora
from tiny import build_model, build_tokenizer

LAYOUTS = [(False, False), (True, False), (False, True), (True, True)]


def make_model(tokenizer, segment_attention: bool):
    """The tiny model, running packed layouts one segment at a time or through one dense masked pass."""
    model = build_model(len(tokenizer))
    assert attention.enable(model) if segment_attention else not attention.enabled(model)
    return model


@pytest.fixture(scope="module")
def setup():
    tokenizer = build_tokenizer()
    rows = conversational_rows(9, seed=5)
    pairs = encode_pairs(tokenizer, [as_text_pair(r["prompt"], r["chosen"], r["rejected"]) for r in rows])
    return tokenizer, pairs


def test_selective_log_softmax_matches_naive() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 7, 31) * 4
    index = torch.randint(0, 31, (5, 7))
    naive = torch.gather(logits.log_softmax(-1), -1, index.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(selective_log_softmax(logits, index), naive, atol=1e-5)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("head_is_trained", [False, True])
def test_head_logps_gradients_match_autograd(with_bias: bool, head_is_trained: bool) -> None:
    """Both hand-written backwards of the chunked head (frozen: the Jacobian kept from forward; trained: logits
    recomputed) against numerical gradients, and the values against the naive gather(log_softmax)."""
    torch.manual_seed(0)
    hidden = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=head_is_trained)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=head_is_trained) if with_bias else None
    targets = torch.randint(0, 11, (6,))
    assert torch.autograd.gradcheck(lambda h, w, b: head_logps(h, w, b, targets), (hidden, weight, bias))
    naive = F.linear(hidden, weight, bias).log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    assert torch.allclose(head_logps(hidden, weight, bias, targets), naive, atol=1e-12)


def test_reference_equals_hand_computed_sum(setup) -> None:
    """The plain path is itself checked: sum over response tokens of log_softmax(logits[t-1])[token t]."""
    tokenizer, pairs = setup
    model = build_model(len(tokenizer))
    pair = pairs[0]
    ids = torch.tensor([pair.prompt_ids + pair.chosen_ids])
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits[0].float(), -1)
    p = len(pair.prompt_ids)
    expected = sum(float(logp[p + j - 1, tok]) for j, tok in enumerate(pair.chosen_ids))
    with torch.no_grad():
        got = sequence_logps_reference(model, collate([pair], tokenizer.pad_token_id))
    assert float(got.chosen[0]) == pytest.approx(expected, abs=1e-4)
    assert int(got.chosen_lengths[0]) == len(pair.chosen_ids)


@pytest.mark.parametrize(("padding_free", "prefix_sharing"), LAYOUTS)
@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
@pytest.mark.parametrize("segment_attention", [False, True])
def test_layouts_match_the_plain_path(
    setup, padding_free: bool, prefix_sharing: bool, chunk_size: int, segment_attention: bool
) -> None:
    """Tolerance 1e-4 in fp32 (sums of ~50 token log-probs near -5 each)."""
    tokenizer, pairs = setup
    model = make_model(tokenizer, segment_attention)
    with torch.no_grad():
        expected = sequence_logps_reference(model, collate(pairs, tokenizer.pad_token_id))
        batch = collate(
            pairs,
            tokenizer.pad_token_id,
            padding_free=padding_free,
            prefix_sharing=prefix_sharing,
            one_row=segment_attention,  # what training runs with segment attention
        )
        got = SequenceLogps(model, chunk_size)(batch)
    assert torch.allclose(got.chosen, expected.chosen, atol=1e-4)
    assert torch.allclose(got.rejected, expected.rejected, atol=1e-4)
    assert torch.equal(got.chosen_lengths, expected.chosen_lengths)
    assert torch.equal(got.rejected_lengths, expected.rejected_lengths)


def test_packing_and_sharing_save_tokens(setup) -> None:
    tokenizer, pairs = setup
    padded = collate(pairs, tokenizer.pad_token_id)
    shared = collate(pairs, tokenizer.pad_token_id, padding_free=True, prefix_sharing=True)
    assert shared.num_tokens == sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    assert shared.input_ids.numel() < padded.input_ids.numel()
    one_row = collate(pairs, tokenizer.pad_token_id, padding_free=True, prefix_sharing=True, one_row=True)
    assert one_row.input_ids.shape == (1, shared.num_tokens)  # no padding at all


@pytest.mark.parametrize(("padding_free", "prefix_sharing"), LAYOUTS[1:])
@pytest.mark.parametrize("segment_attention", [False, True])
def test_lora_gradients_match_the_plain_path(
    setup, padding_free: bool, prefix_sharing: bool, segment_attention: bool
) -> None:
    """The loss gradient through packing, sharing, segment attention and the recomputed chunked head equals the
    plain one."""
    tokenizer, pairs = setup
    grads = []
    for fast in (False, True):
        model = add_lora(make_model(tokenizer, fast and segment_attention), 4, 8, 0.0, ["all-linear"], seed=0)
        with torch.no_grad():  # move LoRA off its zero init so its gradients flow through both factors
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        if fast:
            batch = collate(
                pairs,
                tokenizer.pad_token_id,
                padding_free=padding_free,
                prefix_sharing=prefix_sharing,
                one_row=segment_attention,
            )
            out = SequenceLogps(model, chunk_size=16)(batch)
        else:
            out = sequence_logps_reference(model, collate(pairs, tokenizer.pad_token_id))
        (out.chosen - 0.5 * out.rejected).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-4, rtol=1e-3)


def test_bf16_autocast_stays_close(setup) -> None:
    """bf16 rounds every matmul; per-sequence sums stay within 1% of fp32."""
    tokenizer, pairs = setup
    model = build_model(len(tokenizer))
    batch = collate(pairs, tokenizer.pad_token_id, padding_free=True, prefix_sharing=True)
    with torch.no_grad():
        fp32 = SequenceLogps(model)(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = SequenceLogps(model)(batch)
    assert bf16.chosen.dtype == torch.float32
    assert torch.allclose(bf16.chosen, fp32.chosen, rtol=1e-2)


def test_frozen_weights_stored_in_bf16_give_exactly_what_autocast_gives(setup) -> None:
    """Casting frozen LoRA-base linears (and the frozen head) once equals autocast casting them every time."""
    from dpokit.models import cast_frozen_linears

    tokenizer, pairs = setup
    batch = collate(pairs, tokenizer.pad_token_id, padding_free=True, prefix_sharing=True)
    outs = []
    for cast in (False, True):
        model = add_lora(build_model(len(tokenizer)), 4, 8, 0.0, ["all-linear"], seed=0)
        if cast:
            assert cast_frozen_linears(model, torch.bfloat16) == 2 * 7  # q k v o gate up down, in 2 layers
            assert model.get_output_embeddings().weight.dtype == torch.float32  # tied to the embeddings
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(SequenceLogps(model)(batch))
    assert torch.equal(outs[0].chosen, outs[1].chosen) and torch.equal(outs[0].rejected, outs[1].rejected)


def test_the_data_layer_imports_no_model_kernel() -> None:
    """Batches describe where sequences lie (`data.segments`); the attention kernels read that, never the reverse."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    kernels = "('dpokit.attention', 'dpokit.flex')"
    probe = f"import sys, dpokit.data.collate; print(sorted(m for m in sys.modules if m in {kernels}))"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env)
    assert done.stdout.strip() == "[]"
