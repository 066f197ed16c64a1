"""Turning pairs into token ids exactly as TRL's DPOTrainer does, then applying the length policy.

Conversational pairs go through the model's chat template: the prompt is rendered with the generation prompt,
prompt+response without it, and the response is what follows their common prefix. Standard (text) pairs are
tokenized as plain text with the EOS token appended to each response. Only the last assistant turn differs
between chosen and rejected, so the prompt ids are shared by both.

`encode_loaded` is the entry for loaded data: system turns are kept, merged or dropped (`system_message`), a
pair the chat template refuses becomes a bad row (see `dpokit.data.chat_template`), and pairs whose prompt is not
a prefix of prompt+response are counted for a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dpokit.data import BadRow, LoadedPairs, Pair
from dpokit.data.chat_template import TemplateRefused, apply_system_message, check_refusals, refused_row, render_chat
from dpokit.errors import UserError


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
    """The three texts to tokenize: prompt, prompt+chosen, prompt+rejected. Raises `TemplateRefused`."""
    if pair.conversational:
        prompt = render_chat(tokenizer, pair.prompt, add_generation_prompt=True)
        chosen = render_chat(tokenizer, pair.prompt + pair.chosen)
        rejected = render_chat(tokenizer, pair.prompt + pair.rejected)
        return prompt, chosen, rejected
    eos = tokenizer.eos_token
    chosen, rejected = str(pair.chosen), str(pair.rejected)
    chosen = chosen if chosen.endswith(eos) else chosen + eos
    rejected = rejected if rejected.endswith(eos) else rejected + eos
    prompt = str(pair.prompt)
    return prompt, prompt + chosen, prompt + rejected


@dataclass
class PairEncoding:
    """Token ids of the pairs the chat template accepted, the bad rows of those it refused, and what changed."""

    pairs: list[Pair] = field(default_factory=list)  # the pairs encoded (after `system_message`), in input order
    encoded: list[EncodedPair] = field(default_factory=list)  # their ids, one per pair
    refused: list[BadRow] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # system turns merged or dropped
    not_prefix: int = 0  # pairs whose prompt ids are not a prefix of their prompt+response ids
    not_prefix_example: str = ""
    total: int = 0  # pairs encoded (kept when `add` sums chunks without keeping their pairs)

    def add(self, other: PairEncoding) -> None:
        """Count another chunk's refusals, changes and prefix mismatches in this one (its pairs are not kept)."""
        self.refused += other.refused
        self.counts = dict(Counter(self.counts) + Counter(other.counts))
        self.not_prefix += other.not_prefix
        self.not_prefix_example = self.not_prefix_example or other.not_prefix_example
        self.total += other.total

    def warnings(self) -> list[str]:
        if not self.not_prefix:
            return []
        return [
            f"in {self.not_prefix} of {self.total} pairs the tokenized prompt is not a prefix of the tokenized "
            "prompt+response (the chat template renders the prompt differently inside the conversation, or tokens "
            "merge across the boundary); their responses start where the two diverge, as in TRL, so they train on "
            f"a context unlike the one the model answers at inference; for example {self.not_prefix_example}"
        ]


def encode_checked(
    tokenizer: Any, pairs: Sequence[Pair], *, system_message: str = "keep", batch_size: int = 512
) -> PairEncoding:
    """Token ids of each pair, identical to TRL's tokenization; texts go to the fast tokenizer in batches. Pairs
    the template refuses are left out as bad rows, with the template's message."""
    result = PairEncoding()
    counts: Counter[str] = Counter()
    for start in range(0, len(pairs), batch_size):
        chunk: list[Pair] = []
        rendered: list[tuple[str, str, str]] = []
        for original in pairs[start : start + batch_size]:
            changes: Counter[str] = Counter()
            pair = original
            if pair.conversational:
                pair = dataclasses.replace(pair, prompt=apply_system_message(pair.prompt, system_message, changes))
            try:
                rendered.append(_render(tokenizer, pair))
            except TemplateRefused as e:
                result.refused.append(refused_row(original.origin, e, original.to_dict()))
                continue
            counts.update(changes)
            chunk.append(pair)
        texts = [text for triple in rendered for text in triple]
        # Chat-template text already holds its special tokens; plain text gets the tokenizer's own (as TRL does).
        specials = [not pair.conversational for pair in chunk for _ in range(3)]
        ids = _tokenize(tokenizer, texts, specials) if texts else []
        for i, pair in enumerate(chunk):
            prompt_ids, chosen_full, rejected_full = ids[3 * i : 3 * i + 3]
            # The response starts where prompt and prompt+response diverge, which is not always the prompt's end.
            prompt_len = min(
                common_prefix_length(prompt_ids, chosen_full), common_prefix_length(prompt_ids, rejected_full)
            )
            if prompt_len < len(prompt_ids):
                result.not_prefix += 1
                result.not_prefix_example = result.not_prefix_example or _divergence(
                    tokenizer, pair.origin, prompt_ids, chosen_full, prompt_len
                )
            result.pairs.append(pair)
            result.encoded.append(
                EncodedPair(prompt_ids[:prompt_len], chosen_full[prompt_len:], rejected_full[prompt_len:])
            )
    result.counts = dict(counts)
    result.total = len(result.encoded)
    return result


def _divergence(tokenizer: Any, origin: str, prompt_ids: list[int], full_ids: list[int], at: int) -> str:
    alone = tokenizer.decode(prompt_ids[at:])
    inside = tokenizer.decode(full_ids[at : at + len(prompt_ids) - at + 4])
    return f"{origin or 'a pair'}: the prompt alone ends {alone!r} where prompt+response has {inside!r}"


def encode_pairs(
    tokenizer: Any, pairs: Sequence[Pair], batch_size: int = 512, *, system_message: str = "keep"
) -> list[EncodedPair]:
    """Token ids of each pair, in order, identical to TRL's tokenization. A pair the chat template refuses stops
    with one line (use `encode_loaded` to keep such pairs as bad rows)."""
    result = encode_checked(tokenizer, pairs, system_message=system_message, batch_size=batch_size)
    if result.refused:
        first = result.refused[0]
        more = f" (and {len(result.refused) - 1} more pairs)" if len(result.refused) > 1 else ""
        raise UserError(f"{first.origin}: {first.reason}{more}")
    return result.encoded


def encode_loaded(
    tokenizer: Any,
    loaded: LoadedPairs,
    *,
    system_message: str = "keep",
    max_bad_rows: int = 0,
    rejected_dir: str | os.PathLike | None = None,
    merge_setting: str = "system_message=merge",
) -> tuple[LoadedPairs, PairEncoding]:
    """Encode loaded pairs; refused pairs join the bad rows (side file rewritten, `max_bad_rows` applied to all),
    merged or dropped system turns join the counts. Returns the loaded pairs as encoded, and the encoding."""
    result = encode_checked(tokenizer, loaded.pairs, system_message=system_message)
    bad_rows = loaded.bad_rows + result.refused
    rejected_file = loaded.rejected_file
    if result.refused:
        total = len(result.pairs) + len(result.refused)
        rejected_file = check_refusals(
            result.refused,
            bad_rows,
            total,
            loaded.source,
            max_bad_rows=max_bad_rows,
            rejected_dir=rejected_dir,
            merge_setting=merge_setting,
            notes=loaded.notes,
        )
    counts = dict(Counter(loaded.counts) + Counter(result.counts))
    encoded = dataclasses.replace(
        loaded, pairs=result.pairs, bad_rows=bad_rows, counts=counts, rejected_file=rejected_file
    )
    return encoded, result


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
