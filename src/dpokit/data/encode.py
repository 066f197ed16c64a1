"""Turning pairs into token ids exactly as TRL's DPOTrainer does, then applying the length policy.

Conversational pairs go through the model's chat template: the prompt is rendered with the generation prompt,
prompt+response without it, and the response is what follows their common prefix. Standard (text) pairs are
tokenized as plain text with the EOS token appended to each response. Only the last assistant turn differs
between chosen and rejected, so the prompt ids are shared by both.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dpokit.data import Pair


@dataclass(frozen=True)
class EncodedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    @property
    def num_tokens(self) -> int:
        """Tokens of the unshared layout: the prompt once with each response."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class EncodedDataset:
    pairs: list[EncodedPair]
    origins: list[str]
    counts: dict[str, int] = field(default_factory=dict)  # what the length policy did, e.g. {"responses truncated": 3}

    def __len__(self) -> int:
        return len(self.pairs)

    def fingerprint(self) -> str:
        """A hash of every token id; two datasets with the same fingerprint train identically."""
        digest = hashlib.sha256()
        for pair in self.pairs:
            for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
                digest.update(len(ids).to_bytes(4, "little"))
                digest.update(b"".join(i.to_bytes(4, "little") for i in ids))
        return digest.hexdigest()


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _render(tokenizer: Any, pair: Pair) -> tuple[str, str, str]:
    """The three texts to tokenize: prompt, prompt+chosen, prompt+rejected."""
    if pair.conversational:
        prompt = tokenizer.apply_chat_template(pair.prompt, tokenize=False, add_generation_prompt=True)
        chosen = tokenizer.apply_chat_template(pair.prompt + pair.chosen, tokenize=False)
        rejected = tokenizer.apply_chat_template(pair.prompt + pair.rejected, tokenize=False)
        return prompt, chosen, rejected
    eos = tokenizer.eos_token
    chosen, rejected = str(pair.chosen), str(pair.rejected)
    chosen = chosen if chosen.endswith(eos) else chosen + eos
    rejected = rejected if rejected.endswith(eos) else rejected + eos
    prompt = str(pair.prompt)
    return prompt, prompt + chosen, prompt + rejected


def encode_pairs(tokenizer: Any, pairs: Sequence[Pair], batch_size: int = 512) -> list[EncodedPair]:
    """Token ids of each pair, identical to TRL's tokenization; texts go to the fast tokenizer in batches."""
    encoded: list[EncodedPair] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        rendered = [_render(tokenizer, pair) for pair in chunk]
        texts = [text for triple in rendered for text in triple]
        # Chat-template text already holds its special tokens; plain text gets the tokenizer's own (as TRL does).
        specials = [not pair.conversational for pair in chunk for _ in range(3)]
        ids = _tokenize(tokenizer, texts, specials)
        for i in range(len(chunk)):
            prompt_ids, chosen_full, rejected_full = ids[3 * i : 3 * i + 3]
            # The response starts where prompt and prompt+response diverge, which is not always the prompt's end.
            prompt_len = min(
                common_prefix_length(prompt_ids, chosen_full), common_prefix_length(prompt_ids, rejected_full)
            )
            encoded.append(EncodedPair(prompt_ids[:prompt_len], chosen_full[prompt_len:], rejected_full[prompt_len:]))
    return encoded


def _tokenize(tokenizer: Any, texts: list[str], add_special_tokens: list[bool]) -> list[list[int]]:
    with_specials = [t for t, s in zip(texts, add_special_tokens, strict=True) if s]
    without = [t for t, s in zip(texts, add_special_tokens, strict=True) if not s]
    a = iter(tokenizer(with_specials, add_special_tokens=True)["input_ids"]) if with_specials else iter(())
    b = iter(tokenizer(without, add_special_tokens=False)["input_ids"]) if without else iter(())
    return [list(next(a)) if s else list(next(b)) for s in add_special_tokens]


def apply_length_policy(
    encoded: Sequence[EncodedPair],
    origins: Sequence[str],
    *,
    max_length: int | None,
    max_prompt_length: int | None,
    truncation_mode: str = "keep_start",
    length_policy: str = "truncate",
) -> EncodedDataset:
    """Truncate or drop over-long pairs; every change is counted, none is silent.

    - `max_prompt_length`: a longer prompt keeps its end (the part next to the response).
    - `max_length` with `keep_start`: responses are cut at their end so prompt+response fits (TRL's default);
      a prompt that alone fills `max_length` leaves nothing to learn from and its pair is dropped.
    - `max_length` with `keep_end`: the prompt loses its start so that it fits with the longer response; a pair
      whose response alone fills `max_length` is dropped.
    - `length_policy="drop"` drops every pair that would need any cut instead.
    """
    kept: list[EncodedPair] = []
    kept_origins: list[str] = []
    counts: Counter[str] = Counter()
    drop = length_policy == "drop"
    for pair, origin in zip(encoded, origins, strict=True):
        prompt, chosen, rejected = pair.prompt_ids, pair.chosen_ids, pair.rejected_ids
        if max_prompt_length is not None and len(prompt) > max_prompt_length:
            if drop:
                counts["dropped: prompt over max_prompt_length"] += 1
                continue
            prompt = prompt[-max_prompt_length:]
            counts["prompts truncated"] += 1
        if max_length is not None:
            longest = max(len(chosen), len(rejected))
            if len(prompt) + longest > max_length:
                if drop:
                    counts["dropped: over max_length"] += 1
                    continue
                if truncation_mode == "keep_start":
                    if len(prompt) >= max_length:
                        counts["dropped: prompt fills max_length"] += 1
                        continue
                    room = max_length - len(prompt)
                    counts["responses truncated"] += (len(chosen) > room) + (len(rejected) > room)
                    chosen, rejected = chosen[:room], rejected[:room]
                else:
                    if longest >= max_length:
                        counts["dropped: response fills max_length"] += 1
                        continue
                    prompt = prompt[len(prompt) + longest - max_length :]
                    counts["prompts truncated"] += 1
        kept.append(EncodedPair(prompt, chosen, rejected))
        kept_origins.append(origin)
    return EncodedDataset(kept, kept_origins, dict(counts))
