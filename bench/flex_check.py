"""The GPU check's correctness part: FlexAttention block masks against the plain log-prob path on a small random
model, per-sequence log-probs and LoRA gradients in fp32 (TF32 off), for packed, prefix-shared and mixed rows."""

from __future__ import annotations

from typing import Any

import synthetic


def check(device: str, tokenizer: Any, model_shape: dict[str, Any]) -> dict[str, Any]:
    """FlexAttention against the plain path on a small random model in fp32: log-probs, and LoRA gradients where
    FlexAttention has a backward (CUDA). `model_shape` is a `LlamaConfig`'s sizes."""
    import torch

    from dpokit import flex
    from dpokit.data.collate import collate
    from dpokit.data.encode import encode_pairs
    from dpokit.data.rows import as_text_pair
    from dpokit.logprobs import SequenceLogps, sequence_logps_reference
    from dpokit.models import add_lora

    precision = torch.backends.cuda.matmul.fp32_precision
    if device == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "ieee"  # the check compares fp32 with fp32
    rows = synthetic.generate(6, seed=1, max_length=1024)
    pairs = encode_pairs(tokenizer, [as_text_pair(r["prompt"], r["chosen"], r["rejected"]) for r in rows])
    if device == "cpu":  # torch's CPU FlexAttention is for checking, not speed: short pairs
        pairs = [type(p)(p.prompt_ids[-40:], p.chosen_ids[:30], p.rejected_ids[:30]) for p in pairs]
    gradients = device == "cuda"
    results: dict[str, Any] = {"gradients_checked": gradients}
    for name, (padding_free, prefix_sharing) in {"packed": (True, False), "prefix-shared": (False, True),
                                                 "mixed": (True, True)}.items():  # fmt: skip
        outs = []
        for fast in (False, True):
            model = small_lora_model(len(tokenizer), device, add_lora, model_shape)
            if fast:
                flex.enable(model.get_base_model())
            with torch.set_grad_enabled(gradients):
                if fast:
                    batch = collate(pairs, tokenizer.pad_token_id, padding_free=padding_free,
                                    prefix_sharing=prefix_sharing, one_row=True)  # fmt: skip
                    out = SequenceLogps(model, chunk_size=64)(batch.to(torch.device(device)))
                else:
                    out = sequence_logps_reference(
                        model, collate(pairs, tokenizer.pad_token_id).to(torch.device(device))
                    )
                logps = torch.cat([out.chosen, out.rejected]).detach()
                grad = None
                if gradients:
                    (out.chosen - 0.5 * out.rejected).sum().backward()
                    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
            outs.append((logps, grad))
        (ref_logps, ref_grad), (got_logps, got_grad) = outs
        entry = {
            "logps_max_abs_diff": float((got_logps - ref_logps).abs().max()),
            "logps_max_abs": float(ref_logps.abs().max()),
        }
        if gradients:
            entry["grad_max_abs_diff"] = float((got_grad - ref_grad).abs().max())
            entry["grad_max_abs"] = float(ref_grad.abs().max())
        entry["ok"] = entry["logps_max_abs_diff"] <= 1e-4 + 1e-6 * entry["logps_max_abs"] and (
            not gradients or entry["grad_max_abs_diff"] <= 1e-4 + 1e-3 * entry["grad_max_abs"]
        )
        results[name] = entry
    torch.backends.cuda.matmul.fp32_precision = precision
    return results


def small_lora_model(vocab: int, device: str, add_lora: Any, model_shape: dict[str, Any]) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, tie_word_embeddings=True, **model_shape)).to(device)
    model = add_lora(model, 4, 8, 0.0, ["all-linear"], seed=0)
    with torch.no_grad():  # LoRA off its zero init, so gradients flow through both factors
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model
