"""SFT examples: rows in TRL's layouts in, token ids with the positions that carry loss out.

Layouts, detected from the first readable row (the name is printed):

- `messages`: a conversation, `[{role, content}, ...]` (TRL's conversational language modelling);
- `conversations`: ShareGPT, `[{from, value}, ...]`, `human`/`gpt` read as `user`/`assistant`;
- `prompt_completion`: `prompt` and `completion`, both strings or both message lists;
- `alpaca`: `instruction`, optional `input`, `output`, read as a one-turn conversation (user, then assistant);
- `text`: a plain string in `dataset_text_field`.

With `sft_on: chosen`, preference pairs in any layout `dpokit train` reads become prompt/completion examples
(prompt + chosen response). Tokenization follows TRL 1.16's `SFTTrainer`: conversations through the chat template,
plain text with the tokenizer's special tokens and EOS appended; the completion starts where the tokenized prompt
and prompt + completion diverge. Over-long examples are cut to `max_length` (`keep_start` or `keep_end`) or
dropped, and an example left with no trained token is dropped; every change is counted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dpokit.data import BadRow, Message
from dpokit.data.chat_template import TemplateRefused, apply_system_message, check_refusals, refused_row
from dpokit.data.collate import Batch, TokenSegment, lay_out, pack
from dpokit.data.encode import common_prefix_length
from dpokit.data.load import check_bad_rows, load_pairs, options_of
from dpokit.data.sources import iter_rows
from dpokit.errors import UserError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
LAYOUTS = ("messages", "conversations", "prompt_completion", "alpaca", "text")


@dataclass(frozen=True)
class Example:
    """One SFT example: a conversation, a prompt with its completion, or a text. Prompt and completion are both
    strings or both message lists."""

    messages: list[Message] | None = None
    prompt: str | list[Message] | None = None
    completion: str | list[Message] | None = None
    text: str | None = None
    origin: str = ""


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    trained: list[bool]  # per token: whether the loss predicts it (TRL's labels != -100); token 0 never is

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(self.trained[1:])


@dataclass
class SFTData:
    """Encoded examples fitted to the length limits, and what happened on the way."""

    examples: list[EncodedExample]
    origins: list[str]
    layout: str
    counts: dict[str, int] = field(default_factory=dict)
    rows: int = 0
    bad_rows: list[BadRow] = field(default_factory=list)
    rejected_file: str | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def fingerprint(self) -> str:
        """A hash of every token id and loss flag; equal fingerprints train identically."""
        digest = hashlib.sha256()
        for ex in self.examples:
            digest.update(len(ex.input_ids).to_bytes(4, "little"))
            digest.update(b"".join(i.to_bytes(4, "little") for i in ex.input_ids))
            digest.update(bytes(ex.trained))
        return digest.hexdigest()


# --- rows to examples -----------------------------------------------------------------------------------------------


class RowProblem(ValueError):
    """A row that cannot become an example; the message is the reason."""


def detect_layout(row: dict[str, Any], text_field: str) -> str | None:
    if "chosen" in row and "rejected" in row:
        raise UserError(
            "train_data holds preference pairs (chosen and rejected); set sft_on=chosen to fine-tune on the chosen "
            "responses"
        )
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "conversations"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if text_field in row:
        return "text"
    return None


def _messages(value: Any, key: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise RowProblem(f"`{key}` must be a non-empty list of messages")
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RowProblem(f"every message in `{key}` needs a string `role` and `content`")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _sharegpt(value: Any) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise RowProblem("`conversations` must be a non-empty list of turns")
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("value"), str) or m.get("from") not in SHAREGPT_ROLES:
            raise RowProblem(f"every turn needs `from` (one of {', '.join(SHAREGPT_ROLES)}) and a string `value`")
        out.append({"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]})
    return out


def _string(row: dict[str, Any], key: str, optional: bool = False) -> str:
    value = row.get(key, "" if optional else None)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise RowProblem(f"`{key}` must be a string")
    return value


def normalize(layout: str, row: dict[str, Any], text_field: str, origin: str) -> Example:
    """The example a row of `layout` holds, or `RowProblem`."""
    if layout == "messages":
        return Example(messages=_messages(row.get("messages"), "messages"), origin=origin)
    if layout == "conversations":
        return Example(messages=_sharegpt(row.get("conversations")), origin=origin)
    if layout == "alpaca":
        instruction, extra = _string(row, "instruction"), _string(row, "input", optional=True)
        user = instruction + ("\n\n" + extra if extra else "")
        prompt = [{"role": "user", "content": user}]
        return Example(
            prompt=prompt, completion=[{"role": "assistant", "content": _string(row, "output")}], origin=origin
        )
    if layout == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, str) and isinstance(completion, str):
            return Example(prompt=prompt, completion=completion, origin=origin)
        if isinstance(prompt, list) and isinstance(completion, list):
            return Example(
                prompt=_messages(prompt, "prompt"), completion=_messages(completion, "completion"), origin=origin
            )
        raise RowProblem("`prompt` and `completion` must both be strings or both be lists of messages")
    return Example(text=_string(row, text_field), origin=origin)


def read_rows(
    source: str, *, split: str, data_config: str | None, text_field: str
) -> tuple[list[Example], str, int, list[BadRow]]:
    """Examples of a source of SFT rows, with the layout, the rows read and the rows that are not examples."""
    examples: list[Example] = []
    bad: list[BadRow] = []
    layout: str | None = None
    rows = 0
    for origin, row in iter_rows(source, split=split, data_config=data_config):
        rows += 1
        if isinstance(row, BadRow):
            bad.append(row)
            continue
        if layout is None:
            layout = detect_layout(row, text_field)
            if layout is None:
                raise UserError(
                    f"{origin}: no SFT layout fits columns {', '.join(sorted(row))}; give messages, conversations, "
                    f"prompt+completion, instruction+output, `{text_field}` (dataset_text_field), or preference "
                    "pairs with sft_on=chosen"
                )
        try:
            examples.append(normalize(layout, row, text_field, origin))
        except RowProblem as e:
            bad.append(BadRow(origin, str(e), row, "not an SFT example"))
    return examples, layout or "none", rows, bad


def chosen_examples(source: str, cfg: Any) -> tuple[list[Example], str, int, list[BadRow], str | None]:
    """Prompt + chosen response of every preference pair, read by `dpokit train`'s loader; with the layout, the
    rows read, the bad rows and the file they were written to."""
    loaded = load_pairs(
        source,
        split=cfg.train_split,
        data_config=cfg.train_data_config,
        data_format=cfg.data_format,
        options=options_of(cfg),
        max_bad_rows=cfg.max_bad_rows,
        rejected_dir=cfg.output_dir,
    )
    examples = [Example(prompt=p.prompt, completion=p.chosen, origin=p.origin) for p in loaded.pairs]
    return examples, f"{loaded.format} (chosen)", loaded.rows, loaded.bad_rows, loaded.rejected_file


# --- examples to token ids ------------------------------------------------------------------------------------------


def _chat_ids(tokenizer: Any, messages: list[Message], **kwargs: Any) -> dict[str, Any]:
    """The rendered conversation's ids; `TemplateRefused` where the chat template raises on it."""
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    except jinja2.TemplateError as e:
        raise TemplateRefused(str(e)) from e


def with_system_policy(ex: Example, policy: str, counts: Counter[str]) -> Example:
    """The example with its system turns kept, merged into the first user turn or dropped (`system_message`)."""
    if ex.messages is not None:
        return dataclasses.replace(ex, messages=apply_system_message(ex.messages, policy, counts))
    if isinstance(ex.prompt, list):
        return dataclasses.replace(ex, prompt=apply_system_message(ex.prompt, policy, counts))
    return ex


def has_generation_tags(tokenizer: Any) -> bool:
    """Whether the chat template marks assistant text (`{% generation %}`), from which transformers builds the mask."""
    return GENERATION_TAG.search(getattr(tokenizer, "chat_template", None) or "") is not None


def assistant_mask(tokenizer: Any, messages: list[Message], ids: list[int]) -> list[bool]:
    """Which tokens of the rendered conversation `ids` belong to assistant turns.

    With a template that marks them (`{% generation %}`) this is transformers' mask, as TRL uses. Otherwise each
    assistant turn spans from the end of the conversation before it, rendered with the generation prompt, to the end
    of the conversation up to it; so any template works, not only marked ones.
    """
    if has_generation_tags(tokenizer):
        return [bool(b) for b in _chat_ids(tokenizer, messages, return_assistant_tokens_mask=True)["assistant_masks"]]
    mask = [False] * len(ids)
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _chat_ids(tokenizer, messages[:k], add_generation_prompt=True)["input_ids"] if k else []
        upto = _chat_ids(tokenizer, messages[: k + 1])["input_ids"]
        start, end = common_prefix_length(before, ids), common_prefix_length(upto, ids)
        mask[start:end] = [True] * (end - start)
    return mask


def encode_example(
    tokenizer: Any, ex: Example, *, completion_only: bool | None, assistant_only: bool
) -> EncodedExample:
    """Token ids and loss flags of one example, as TRL 1.16's SFTTrainer builds `input_ids` and `labels`."""
    eos = tokenizer.eos_token
    if ex.messages is not None:
        ids = _chat_ids(tokenizer, ex.messages)["input_ids"]
        trained = assistant_mask(tokenizer, ex.messages, ids) if assistant_only else [True] * len(ids)
        return EncodedExample(list(ids), trained)
    if ex.text is not None:
        text = ex.text if ex.text.endswith(eos) else ex.text + eos
        ids = tokenizer(text=text)["input_ids"]
        return EncodedExample(list(ids), [True] * len(ids))
    if isinstance(ex.prompt, list):
        assert isinstance(ex.completion, list)
        prompt_ids = _chat_ids(tokenizer, ex.prompt, add_generation_prompt=True)["input_ids"]
        full = ex.prompt + ex.completion
        ids = _chat_ids(tokenizer, full)["input_ids"]
        mask = assistant_mask(tokenizer, full, ids) if assistant_only else [True] * len(ids)
    else:
        completion = str(ex.completion)
        completion = completion if completion.endswith(eos) else completion + eos
        prompt_ids = tokenizer(text=str(ex.prompt))["input_ids"]
        ids = tokenizer(text=str(ex.prompt) + completion)["input_ids"]
        mask = [True] * len(ids)
    prompt_len = common_prefix_length(prompt_ids, ids)
    in_completion = [i >= prompt_len for i in range(len(ids))] if completion_only is not False else [True] * len(ids)
    return EncodedExample(list(ids), [a and b for a, b in zip(mask, in_completion, strict=True)])


def fit_lengths(
    encoded: Sequence[EncodedExample],
    origins: Sequence[str],
    *,
    max_length: int | None,
    truncation_mode: str,
    length_policy: str,
) -> tuple[list[EncodedExample], list[str], dict[str, int]]:
    """Cut (or drop) examples over `max_length`; drop those left with nothing to learn. Every change is counted."""
    kept, kept_origins, counts = [], [], Counter()
    for ex, origin in zip(encoded, origins, strict=True):
        if max_length is not None and ex.num_tokens > max_length:
            if length_policy == "drop":
                counts["dropped: over max_length"] += 1
                continue
            cut = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
            ex = EncodedExample(ex.input_ids[cut], ex.trained[cut])
            counts["examples truncated"] += 1
        if ex.trained_tokens == 0:
            counts["dropped: no trained token"] += 1
            continue
        kept.append(ex)
        kept_origins.append(origin)
    return kept, kept_origins, dict(counts)


def load_sft_data(
    cfg: Any, tokenizer: Any, source: str, split: str, data_config: str | None
) -> tuple[SFTData, dict[str, Any]]:
    """Read, normalize, tokenize and fit a source of SFT examples as the config says; with its length statistics."""
    if cfg.sft_on == "chosen":
        examples, layout, rows, bad, rejected_file = chosen_examples(source, cfg)
    else:
        text_field = cfg.dataset_text_field
        examples, layout, rows, bad = read_rows(source, split=split, data_config=data_config, text_field=text_field)
        rejected_file = check_bad_rows(bad, source, cfg.max_bad_rows, cfg.output_dir)
    if not examples:
        raise UserError(f"{source}: no usable SFT examples in {rows} rows ({len(bad)} bad)")
    if cfg.completion_only_loss and examples[0].prompt is None:
        raise UserError(f"config key `completion_only_loss` = True: {source} ({layout}) has no prompt/completion rows")
    if cfg.assistant_only_loss is True and examples[0].messages is None and not isinstance(examples[0].prompt, list):
        raise UserError(f"config key `assistant_only_loss` = True: {source} ({layout}) is not conversational")
    flags = {"completion_only": cfg.completion_only_loss, "assistant_only": cfg.assistant_only_loss is not False}
    system_counts: Counter[str] = Counter()
    examples = [with_system_policy(ex, cfg.system_message, system_counts) for ex in examples]
    encoded, refused = [], []
    for ex in examples:
        try:
            encoded.append(encode_example(tokenizer, ex, **flags))
        except TemplateRefused as e:  # a bad row like any other, counted and written to the side file
            refused.append(refused_row(ex.origin, e, ex.messages or {"prompt": ex.prompt, "completion": ex.completion}))
    if refused:
        bad = [*bad, *refused]
        examples = [ex for ex in examples if ex.origin not in {row.origin for row in refused}]
        rejected_file = check_refusals(
            refused,
            bad,
            len(examples) + len(refused),
            source,
            max_bad_rows=cfg.max_bad_rows,
            rejected_dir=cfg.output_dir,
        )
    limits = {"max_length": cfg.max_length, "truncation_mode": cfg.truncation_mode, "length_policy": cfg.length_policy}
    kept, origins, counts = fit_lengths(encoded, [ex.origin for ex in examples], **limits)
    data = SFTData(kept, origins, layout, {**counts, **system_counts}, rows, bad, rejected_file)
    return data, length_stats(source, data, encoded, **limits)


def length_stats(
    source: str,
    data: SFTData,
    encoded: Sequence[EncodedExample],
    *,
    max_length: int | None,
    truncation_mode: str,
    length_policy: str,
) -> dict[str, Any]:
    """What `dpokit data inspect` reports for pairs, for examples: token-length percentiles (`total` and `trained`
    tokens, before the length limits), what the limits did, and the warnings to print."""
    import numpy as np

    from dpokit.data.inspection import _distribution

    total = np.array([ex.num_tokens for ex in encoded])
    trained = np.array([ex.trained_tokens for ex in encoded])
    over = int((total > max_length).sum()) if max_length is not None else 0
    warnings = []
    if data.bad_rows:
        warnings.append(f"{len(data.bad_rows)} bad rows left out; reasons in {data.rejected_file}")
    if over:
        effects = ", ".join(f"{reason} {n}" for reason, n in data.counts.items())
        warnings.append(f"{over} examples over max_length={max_length} ({effects})")
    return {
        "source": source,
        "format": data.layout,
        "rows": data.rows,
        "examples": len(data),
        "bad_rows": len(data.bad_rows),
        "rejected_file": data.rejected_file,
        "tokens": {"total": _distribution(total), "trained": _distribution(trained)},
        "length_limits": {
            "max_length": max_length,
            "truncation_mode": truncation_mode,
            "length_policy": length_policy,
            "rows_over_limits": over,
            "effects": data.counts,
        },
        "warnings": warnings,
    }


# --- forward passes ---------------------------------------------------------------------------------------------------


def pack_examples(data: SFTData, max_length: int) -> list[list[int]]:
    """Training rows of packed examples, each of at most `max_length` tokens (best-fit decreasing, TRL's `bfd`)."""
    return pack([ex.num_tokens for ex in data.examples], max_length)


def collate_examples(
    examples: Sequence[EncodedExample], samples: Sequence[int], pad_token_id: int, *, padding_free: bool, one_row: bool
) -> Batch:
    """Examples laid out for one forward pass, through the layout code DPO's pairs go through.

    Sequence i is example i, as the chosen side of a pair without a rejected one, so `SequenceLogps` returns each
    example's summed log-probs of its trained tokens as `chosen`, and their count as `chosen_lengths`. `samples[i]`
    is the training sample example i belongs to: a sample is one row when rows are padded, so packed examples
    share a row; with `padding_free` every sample is packed as DPO's pairs are.
    """
    segments = [
        TokenSegment(
            ex.input_ids,
            list(range(ex.num_tokens)),
            [(j - 1, ex.input_ids[j], i) for j in range(1, ex.num_tokens) if ex.trained[j]],
            head=ex.num_tokens,
            prefix=0,
        )
        for i, ex in enumerate(examples)
    ]
    lengths = [ex.num_tokens for ex in examples]
    if padding_free:
        rows = [list(range(len(examples)))] if one_row else pack(lengths, max(lengths))
    else:
        rows = []
        for i, sample in enumerate(samples):
            if i and sample == samples[i - 1]:
                rows[-1].append(i)
            else:
                rows.append([i])
    return lay_out(segments, rows, pad_token_id, len(examples), with_segments=any(len(row) > 1 for row in rows))
