"""Answering conversations with a model: batched generation with left padding and the chat template.

Used by `generate` (several samples per prompt), `compare`, `chat` and `vibe` (one answer per prompt) and the demo,
which all read their sampling flags through `sampling_from_args`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dpokit.data import Message
from dpokit.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingSettings:
    num_samples: int = 1
    temperature: float = 0.7  # 0 means greedy decoding
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    batch_size: int = 16  # sequences per generate() call

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
        }


def sampling_from_args(args: argparse.Namespace, several: bool = False) -> SamplingSettings:
    """The sampling flags of a parsed command line: `--temperature`, `--max-new-tokens`, `--seed`, `--batch-size`,
    and with `several` (`generate`: several sampled answers per prompt) `--num-samples` and `--top-p`; without it
    one answer per prompt (`compare`, `chat`, `vibe`)."""
    checks = [
        ("--temperature", args.temperature >= 0, "0 (greedy) or more"),
        ("--max-new-tokens", args.max_new_tokens >= 1, "at least 1"),
        ("--batch-size", args.batch_size >= 1, "at least 1"),
    ]
    if several:  # only generate has these flags
        checks[:0] = [("--num-samples", args.num_samples >= 2, "at least 2 (a pair needs two answers)")]
        checks[2:2] = [("--top-p", 0 < args.top_p <= 1, "in (0, 1]")]
    for flag, ok, what in checks:
        if not ok:
            raise UserError(f"{flag} must be {what}, got {getattr(args, flag[2:].replace('-', '_'))}")
    if not several:
        return SamplingSettings(
            num_samples=1,
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
            seed=args.sampling_seed,
            batch_size=args.batch_size,
        )
    if args.temperature == 0:
        log.warning("generate: --temperature 0 is greedy, so all answers to a prompt will be the same")
    return SamplingSettings(
        num_samples=args.num_samples,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.sampling_seed,
        batch_size=args.batch_size,
    )


@torch.no_grad()
def generate_responses(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[list[Message]],
    settings: SamplingSettings,
    on_batch: Callable[[int], None] | None = None,
    answer_prefix: str = "",
    system_message: str = "keep",
) -> list[list[str]]:
    """`settings.num_samples` answers to each conversation, in order; `on_batch(n)` reports n answers done.

    Each generate() call is seeded from `settings.seed` and the index of its first prompt, so the same prompts
    with the same settings give the same answers. `answer_prefix` is written as the start of every answer (the
    model continues it; the returned answers leave it out), which is how an LLM judge is held to its reply format.
    `system_message` keeps, merges or drops system turns before the chat template renders them; a conversation the
    template refuses raises `TemplateRefused` (callers check their prompts first with `check_conversations`).
    """
    from dpokit.data.chat_template import apply_system_message, render_chat

    model.eval()
    device = next(model.parameters()).device
    rendered = [
        render_chat(tokenizer, apply_system_message(c, system_message), add_generation_prompt=True) + answer_prefix
        for c in conversations
    ]
    greedy = settings.temperature <= 0
    # one row per (prompt, sample); all samples of a prompt go in one generate() call with the prompt's own seed
    per_call = max(1, settings.batch_size // max(1, settings.num_samples))
    results: list[list[str]] = []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    try:
        for start in range(0, len(rendered), per_call):
            texts = rendered[start : start + per_call]
            rows = [t for t in texts for _ in range(settings.num_samples)]
            inputs = tokenizer(rows, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            torch.manual_seed(settings.seed * 1_000_003 + start)
            out = model.generate(
                **inputs,
                do_sample=not greedy,
                temperature=settings.temperature if not greedy else None,
                top_p=settings.top_p if not greedy else None,
                top_k=None,
                max_new_tokens=settings.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
            answers = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for i in range(len(texts)):
                chunk = answers[i * settings.num_samples : (i + 1) * settings.num_samples]
                results.append([a.strip() for a in chunk])
            if on_batch is not None:
                on_batch(len(rows))
    finally:
        tokenizer.padding_side = padding_side
    return results
