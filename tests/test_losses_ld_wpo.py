"""LD-DPO's token weights and WPO's per-sequence means in the log-prob path, against hand-computed values and the
plain definition on every layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import conversational_rows
from dpokit import attention
from dpokit.data.collate import collate
from dpokit.data.encode import encode_pairs
from dpokit.data.rows import as_text_pair
from dpokit.logprobs import SequenceLogps, ld_token_weights, sequence_logps_reference
from tiny import build_model, build_tokenizer

LAYOUTS = [(False, False), (True, False), (False, True), (True, True)]


@pytest.fixture(scope="module")
def setup():
    tokenizer = build_tokenizer()
    rows = conversational_rows(6, seed=7)
    pairs = encode_pairs(tokenizer, [as_text_pair(r["prompt"], r["chosen"], r["rejected"]) for r in rows])
    assert any(len(p.chosen_ids) > len(p.rejected_ids) for p in pairs)  # tails on both sides, so weights matter
    assert any(len(p.chosen_ids) < len(p.rejected_ids) for p in pairs)
    return tokenizer, pairs


def test_ld_token_weights_by_hand() -> None:
    """Two pairs: chosen 0 has 3 tokens, rejected 0 has 2, chosen 1 has 1, rejected 1 has 2; interleaved as a
    packed row may hold them. Shared lengths 2 and 1: only chosen 0's third and rejected 1's second token get alpha."""
    target_seq = torch.tensor([0, 2, 0, 1, 3, 2, 0, 3])
    got = ld_token_weights(target_seq, num_pairs=2, ld_alpha=0.25)
    assert got.tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.25, 0.25]


def test_plain_ld_and_wpo_by_hand(setup) -> None:
    """The plain path with LD-DPO and WPO equals sums written out from the full log-softmax of one pair."""
    tokenizer, pairs = setup
    model = build_model(len(tokenizer))
    pair, alpha = next(p for p in pairs if len(p.chosen_ids) > len(p.rejected_ids)), 0.3  # chosen has a tail
    shared = min(len(pair.chosen_ids), len(pair.rejected_ids))
    with torch.no_grad():
        got = sequence_logps_reference(model, collate([pair], tokenizer.pad_token_id), ld_alpha=alpha, wpo=True)
    for response, ld, wpo in ((pair.chosen_ids, got.chosen, got.chosen_wpo), (pair.rejected_ids, got.rejected, None)):
        ids = torch.tensor([pair.prompt_ids + response])
        with torch.no_grad():
            logp = F.log_softmax(model(ids).logits[0].float(), -1)
        p = len(pair.prompt_ids)
        tokens = [logp[p + j - 1, tok] for j, tok in enumerate(response)]
        want = sum(float(t) * (1.0 if j < shared else alpha) for j, t in enumerate(tokens))
        assert float(ld[0]) == pytest.approx(want, abs=1e-4)
        if wpo is not None:
            aligned = [float(t - torch.logsumexp(2 * logp[p + j - 1], -1)) for j, t in enumerate(tokens)]
            assert float(wpo[0]) == pytest.approx(sum(aligned) / len(aligned), abs=1e-5)
    assert float(got.chosen_plain[0]) != pytest.approx(float(got.chosen[0]), abs=1e-3)


@pytest.mark.parametrize(("padding_free", "prefix_sharing"), LAYOUTS)
def test_ld_and_wpo_match_the_plain_path(setup, padding_free: bool, prefix_sharing: bool) -> None:
    """The weights and means act on token log-probs after the backbone, so the layouts are what can go wrong
    (segment attention against a dense mask is test_logprobs.py's)."""
    tokenizer, pairs = setup
    model = build_model(len(tokenizer))
    assert attention.enable(model)  # as training runs packed layouts
    with torch.no_grad():
        want = sequence_logps_reference(model, collate(pairs, tokenizer.pad_token_id), ld_alpha=0.4, wpo=True)
        batch = collate(
            pairs, tokenizer.pad_token_id, padding_free=padding_free, prefix_sharing=prefix_sharing, one_row=True
        )
        got = SequenceLogps(model, chunk_size=7, ld_alpha=0.4, wpo=True)(batch)
    for key in ("chosen", "rejected", "chosen_plain", "chosen_wpo", "rejected_wpo"):
        assert torch.allclose(getattr(got, key), getattr(want, key), atol=1e-4), key


def test_ld_alpha_one_is_plain_and_wpo_leaves_the_sums_and_gradients_alone(setup) -> None:
    tokenizer, pairs = setup
    model = build_model(len(tokenizer))
    batch = collate(pairs, tokenizer.pad_token_id, padding_free=True, prefix_sharing=True)
    plain = SequenceLogps(model)(batch)
    weighted = SequenceLogps(model, ld_alpha=1.0, wpo=True)(batch)
    assert torch.allclose(plain.chosen, weighted.chosen, atol=1e-6)
    assert not weighted.chosen_wpo.requires_grad and bool((weighted.chosen_wpo <= 0).all())
    grads = []
    for out in (plain, weighted):
        model.zero_grad()
        (out.chosen - out.rejected).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
