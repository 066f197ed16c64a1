"""A trained model answering prompts, for `compare`, `chat` and `vibe` (and `eval`, which scores instead).

- which run folder an adapter belongs to, and which base model it was trained on;
- the model and tokenizer loaded for inference, with the chat template the adapter was trained with;
- questions: prompts read by `dpokit.prompts.load_prompts`, each with its user turns, answered one after another
  in one conversation as MT-Bench does.

A `dpokit train` run folder (RUN_DIR) holds config.yaml and its final adapter in RUN_DIR/adapter; the commands here
save what they make beside it by default, where `dpokit report RUN_DIR` finds it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpokit.data import Message
from dpokit.distributed import process_state
from dpokit.errors import UserError
from dpokit.models import autocast_for
from dpokit.prompts import PromptItem, load_prompts
from dpokit.sampling import SamplingSettings, generate_responses

if TYPE_CHECKING:
    from dpokit.quantization import Quantization

log = logging.getLogger(__name__)

ADAPTER_DIR_NAME = "adapter"  # a run's final adapter: RUN_DIR/adapter
RUN_CONFIG = "config.yaml"  # what marks a folder as a `dpokit train` run


# --- models ---------------------------------------------------------------------------------------------------------


def adapter_base_model(adapter_dir: str | os.PathLike) -> str:
    """The base an adapter belongs to: `dpokit.json`'s `base_model` (the name as the user gave it, e.g. a
    `builtin:` name) when dpokit trained it, else `base_model_name_or_path` from adapter_config.json."""
    from dpokit.models import base_model_of_adapter

    recorded = base_model_of_adapter(adapter_dir)  # also checks that this is an adapter folder
    dpokit_file = Path(adapter_dir) / "dpokit.json"
    if dpokit_file.is_file():
        try:
            base = json.loads(dpokit_file.read_text(encoding="utf-8")).get("base_model")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise UserError(f"{dpokit_file} is not a valid JSON object; delete it to use {recorded}") from e
        if isinstance(base, str) and base:
            return base
    return recorded


def run_folder_of(adapter_dir: str | os.PathLike | None) -> Path | None:
    """The `dpokit train` run an adapter belongs to: the nearest folder above it that holds config.yaml."""
    if adapter_dir is None:
        return None
    for folder in Path(adapter_dir).resolve().parents:
        if (folder / RUN_CONFIG).is_file():
            return folder
    return None


def load_for_inference(
    model_name: str | None, adapter: str | None, quantization: Quantization | None = None
) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode on this process's device, with the adapter attached when given, the base
    quantized as it loads with `quantization` (`--load-in-4bit` / `--load-in-8bit`).

    The tokenizer comes from the adapter folder when training saved one there (it holds the chat template the
    adapter was trained with), else from the base model with the chat template of the adapter's run, if any.
    """
    from dpokit.models import load_adapter, load_model

    model_name = _model_of(model_name, adapter)
    tokenizer = inference_tokenizer(model_name, adapter)
    device = process_state().device
    model = load_model(model_name, quantization=quantization, device=device)
    if adapter is not None:
        model = load_adapter(model, adapter)
    model.to(device)
    model.eval()
    return model, tokenizer


def inference_tokenizer(model_name: str | None, adapter: str | None) -> Any:
    """The tokenizer `load_for_inference` gives, without the model: to check prompts before weights load."""
    from dpokit.models import load_tokenizer

    if adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file():
        return load_tokenizer(str(adapter))
    return load_tokenizer(_model_of(model_name, adapter), chat_template=_run_chat_template(adapter))


def system_message_of(adapter: str | None, given: str | None) -> str:
    """How answers treat system turns: as `--system-message` says, else as the adapter's run was trained."""
    from dpokit.config import load_config

    if given is not None:
        return given
    run_dir = run_folder_of(adapter)
    return load_config(run_dir / RUN_CONFIG).system_message if run_dir is not None else "keep"


def check_questions(
    tokenizer: Any,
    questions: Sequence[Question],
    source: str,
    system_message: str,
    rejected_dir: str | os.PathLike | None = None,
) -> None:
    """Stop with one line, before any answer, when the chat template refuses a question's conversation (each
    later turn rendered after a stand-in answer); the refused are written beside the output."""
    from dpokit.data.chat_template import check_conversations

    conversations = []
    for q in questions:
        messages: list[Message] = list(q.context)
        for turn, text in enumerate(q.turns):
            if turn:
                messages.append({"role": "assistant", "content": "(answer)"})
            messages.append({"role": "user", "content": text})
        conversations.append((f"{source}: question {q.question_id}", messages))
    check_conversations(tokenizer, conversations, source, system_message=system_message, rejected_dir=rejected_dir)


def check_loadable(model_name: str | None, adapter: str | None) -> None:
    """What `load_for_inference` would find wrong with the model and the adapter, found in a second without
    reading weights; for commands that load one model after another's work, such as `compare`."""
    from dpokit.models import check_adapter_fits, load_empty_model

    model_name = _model_of(model_name, adapter)
    if adapter is None:
        load_empty_model(model_name)
    else:
        check_adapter_fits(model_name, adapter)


def _model_of(model_name: str | None, adapter: str | None) -> str:
    """The model to load: the one named, else the adapter's own base."""
    if adapter is not None and not Path(adapter).is_dir():
        raise UserError(f"adapter folder {adapter} does not exist")
    if model_name is not None:
        return model_name
    if adapter is None:
        raise UserError("give --model, or an --adapter whose base model is then used")
    return adapter_base_model(adapter)


def _run_chat_template(adapter: str | None) -> str | None:
    """The `chat_template` override of the run the adapter was trained in, so answers use the training format."""
    from dpokit.config import load_config

    run_dir = run_folder_of(adapter)
    return load_config(run_dir / RUN_CONFIG).chat_template if run_dir is not None else None


# --- questions ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    """One prompt to answer: its user turns are answered one after another in the same conversation."""

    question_id: int | str
    turns: tuple[str, ...]
    category: str | None = None
    context: tuple[Message, ...] = ()  # messages before the first turn (a system prompt, an earlier exchange)

    def to_mt_bench(self) -> dict[str, Any]:
        row: dict[str, Any] = {"question_id": self.question_id, "category": self.category, "turns": list(self.turns)}
        if self.context:
            row["context"] = list(self.context)
        return row


def question_from_prompt(item: PromptItem) -> Question:
    """A prompt as a question: its last user message is the first turn, anything before it the context."""
    question_id = item.source_id if item.source_id is not None else item.key
    return Question(question_id, (item.text, *item.later_turns), item.category, tuple(item.messages[:-1]))


def load_questions(source: str, limit: int | None = None) -> list[Question]:
    """The first `limit` (default all) distinct questions of `source`: anything `load_prompts` reads, such as
    MT-Bench's question.jsonl, JSONL rows with a `prompt`, or a text file with one prompt per line. A prompt that
    appears twice is asked once, and the count of such repeats is logged."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    questions: dict[int | str, Question] = {}
    repeats = 0
    for item in load_prompts(source):
        question = question_from_prompt(item)
        if question.question_id in questions:
            repeats += 1  # load_prompts has checked that it is the same prompt
            continue
        questions[question.question_id] = question
    if repeats:
        log.warning("prompts %s: %d prompts appear more than once; each is asked once", source, repeats)
    return list(questions.values())[:limit]


def sampling_from_args(args: argparse.Namespace) -> SamplingSettings:
    """One greedy or sampled answer per prompt, from the `--temperature`, `--max-new-tokens`, `--seed` and
    `--batch-size` flags of compare, chat and vibe."""
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be 0 (greedy) or more, got {args.temperature}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    return SamplingSettings(
        num_samples=1,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        batch_size=args.batch_size,
    )


def answer_questions(
    model: Any,
    tokenizer: Any,
    questions: Sequence[Question],
    settings: SamplingSettings,
    bf16: bool | None = None,
    on_batch: Callable[[int], None] | None = None,
    system_message: str = "keep",
) -> list[list[str]]:
    """Each question's answers, one per turn; a later turn is asked in the conversation holding the earlier
    answers of the same model, as MT-Bench does. `on_batch(n)` reports n answers done."""
    device = next(model.parameters()).device
    conversations = [list(q.context) for q in questions]
    answers: list[list[str]] = [[] for _ in questions]
    for turn in range(max(len(q.turns) for q in questions)):
        active = [i for i, q in enumerate(questions) if len(q.turns) > turn]
        for i in active:
            conversations[i].append({"role": "user", "content": questions[i].turns[turn]})
        with autocast_for(device, bf16):
            outputs = generate_responses(
                model, tokenizer, [conversations[i] for i in active], settings, on_batch, system_message=system_message
            )
        for i, samples in zip(active, outputs, strict=True):
            answers[i].append(samples[0])
            conversations[i].append({"role": "assistant", "content": samples[0]})
    return answers
