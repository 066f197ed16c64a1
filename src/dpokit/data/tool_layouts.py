"""The preference layouts other training tools write, and the non-pair layouts that are refused with a reason.

Every layout here becomes the same triplet as `trl`'s: prompt messages (a system text first as a system message,
earlier turns as they were), and the chosen and rejected assistant turns. Messages are read under any of the usual
field names (`role`/`from`/`speaker`, `content`/`value`/`text`, typed content parts; see `dpokit.data.messages`).

- `sharegpt` (LLaMA-Factory's ranking data, MedicalGPT): `conversations` of `{from, value}` turns, with `chosen`
  and `rejected` as single turns or as texts; an optional `system` text and `tools` (not used: the chat template
  is not given tool definitions).
- `openai` (OpenAI's preference fine-tuning): `input.messages`, and `preferred_output` / `non_preferred_output` as
  lists of assistant messages; `input.tools` is not used.
- `messages` (axolotl's chat-template DPO): `messages` is the prompt, `chosen` / `rejected` single messages.
- `chosen-messages` (LLaMA-Factory v1): two whole conversations whose shared leading turns are the prompt.
- `medicalgpt`: `question`, `response_chosen`, `response_rejected`, an optional `system` and `history`, a list of
  `[user, assistant]` pairs that become the earlier turns.
- `nemo-aligner`: `prompt`, `chosen_response`, `rejected_response` texts, often rendered with a chat template
  already; they stay texts (a standard pair), and `dpokit data inspect` and `train` warn about the markers.
- `colossalchat`: `context`, `chosen`, `rejected` as lists of `{from, content}` turns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dpokit.data import Message, Pair
from dpokit.data.rows import (
    REFUSED,
    TOOLS,
    WRONG_TYPE,
    Adjusted,
    Format,
    Normalizer,
    Options,
    RowError,
    as_chat_pair,
    as_text_pair,
    check_messages,
    check_text,
    collect,
    need_columns,
    split_conversations,
    user,
)
from dpokit.errors import UserError

LAYOUTS: list[tuple[Format, int]] = []  # registered by `dpokit.data.formats`, in this order


def _system(row: dict[str, Any]) -> list[Message]:
    """A non-empty `system` column as the first message; an empty one (as MedicalGPT writes) is no message."""
    system = row.get("system")
    if system is None:
        return []
    return [{"role": "system", "content": system}] if check_text(system, "system", allow_empty=True).strip() else []


def _prompt_conversation(column: str) -> Normalizer:
    """`column` holds the prompt's messages; `chosen` and `rejected` a single turn, a text, or a list of turns."""

    def normalize(row: dict[str, Any], options: Options) -> Pair:
        need_columns(row, column, "chosen", "rejected")
        prompt = _system(row) + check_messages(row[column], column)
        return as_chat_pair(prompt, row["chosen"], row["rejected"], (column, "chosen", "rejected"))

    return normalize


def _openai(row: dict[str, Any], options: Options) -> Pair:
    need_columns(row, "input", "preferred_output", "non_preferred_output")
    request = row["input"]
    if not isinstance(request, dict) or "messages" not in request:
        raise RowError("column 'input' must be an object with `messages`", WRONG_TYPE)
    prompt = check_messages(request["messages"], "input.messages")
    labels = ("input.messages", "preferred_output", "non_preferred_output")
    return as_chat_pair(prompt, row["preferred_output"], row["non_preferred_output"], labels)


def _chosen_messages(row: dict[str, Any], options: Options) -> Pair | Adjusted:
    need_columns(row, "chosen_messages", "rejected_messages")
    chosen = check_messages(row["chosen_messages"], "chosen_messages")
    rejected = check_messages(row["rejected_messages"], "rejected_messages")
    return split_conversations(chosen, rejected, options)


def _history(value: Any) -> list[Message]:
    """MedicalGPT's `history`: `[[user, assistant], ...]`, the turns before the question."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise RowError(f"column 'history' must be a list of [user, assistant] pairs, got {type(value).__name__}")
    turns: list[Message] = []
    for i, item in enumerate(value):
        if not (isinstance(item, list | tuple) and len(item) == 2):
            raise RowError(f"column 'history' item {i} must be a [user, assistant] pair of texts", WRONG_TYPE)
        turns.append(user(check_text(item[0], f"history[{i}][0]")))
        turns.append({"role": "assistant", "content": check_text(item[1], f"history[{i}][1]", allow_empty=True)})
    return turns


def _medicalgpt(row: dict[str, Any], options: Options) -> Pair:
    need_columns(row, "question", "response_chosen", "response_rejected")
    prompt = _system(row) + _history(row.get("history")) + [user(check_text(row["question"], "question"))]
    labels = ("question", "response_chosen", "response_rejected")
    return as_chat_pair(prompt, row["response_chosen"], row["response_rejected"], labels)


def _nemo(row: dict[str, Any], options: Options) -> Pair:
    need_columns(row, "prompt", "chosen_response", "rejected_response")
    labels = ("prompt", "chosen_response", "rejected_response")
    return as_text_pair(row["prompt"], row["chosen_response"], row["rejected_response"], labels)


def _colossalchat(row: dict[str, Any], options: Options) -> Pair:
    need_columns(row, "context", "chosen", "rejected")
    prompt = check_messages(row["context"], "context")
    return as_chat_pair(prompt, row["chosen"], row["rejected"], ("context", "chosen", "rejected"))


def _has(*names: str) -> Callable[[dict[str, Any]], bool]:
    """A detection test: the row has all these columns."""
    return lambda row: set(names) <= set(row)


PAIR_LAYOUTS = [
    Format(
        "sharegpt",
        "ShareGPT (LLaMA-Factory ranking data, MedicalGPT): `conversations` of {from, value} turns (human, gpt, "
        "system, function_call, observation); chosen and rejected single turns or texts.",
        _has("conversations", "chosen", "rejected"),
        _prompt_conversation("conversations"),
        "conversations, chosen, rejected ({from, value} turns or texts), system and tools (optional)",
        reads=("conversations", "chosen", "rejected", "system", "tools"),
        unused=("tools",),
    ),
    Format(
        "openai",
        "OpenAI preference fine-tuning: input.messages is the prompt, preferred_output and non_preferred_output "
        "lists of assistant messages.",
        _has("input", "preferred_output", "non_preferred_output"),
        _openai,
        "input.messages (input.tools not used), preferred_output, non_preferred_output",
        reads=("input", "preferred_output", "non_preferred_output"),
        unused=("input.tools",),
    ),
    Format(
        "messages",
        "Chat-template DPO (axolotl): `messages` is the prompt, chosen and rejected single assistant messages.",
        _has("messages", "chosen", "rejected"),
        _prompt_conversation("messages"),
        "messages, chosen, rejected (messages or texts), system (optional)",
        reads=("messages", "chosen", "rejected", "system"),
    ),
    Format(
        "chosen-messages",
        "Two whole conversations (LLaMA-Factory v1): their shared leading turns are the prompt; content may be "
        "a list of typed text parts.",
        _has("chosen_messages", "rejected_messages"),
        _chosen_messages,
        "chosen_messages, rejected_messages",
        reads=("chosen_messages", "rejected_messages"),
    ),
    Format(
        "medicalgpt",
        "MedicalGPT: a question with the preferred and the other response; system and [user, assistant] "
        "history pairs are earlier turns.",
        _has("question", "response_chosen", "response_rejected"),
        _medicalgpt,
        "question, response_chosen, response_rejected, system and history (optional)",
        reads=("question", "response_chosen", "response_rejected", "system", "history"),
    ),
    Format(
        "nemo-aligner",
        "NeMo-Aligner DPO: prompt, chosen_response, rejected_response texts, kept as written (often already "
        "rendered with a chat template: inspect and train warn about its markers).",
        _has("prompt", "chosen_response", "rejected_response"),
        _nemo,
        "prompt, chosen_response, rejected_response",
        reads=("prompt", "chosen_response", "rejected_response"),
    ),
    Format(
        "colossalchat",
        "ColossalChat DPO: context, chosen and rejected as lists of {from, content} turns.",
        _has("context", "chosen", "rejected"),
        _colossalchat,
        "context, chosen, rejected ({from, content} turns)",
        reads=("context", "chosen", "rejected"),
    ),
]

NOT_PAIRS = (
    "DPO needs two responses to the same prompt, one preferred. Put the responses of each prompt together with "
    "their scores in the `rated` layout ({prompt, responses, scores}; see `dpokit data formats`), or sample "
    "responses and let a judge pair them with `dpokit generate`"
)
UNPAIRED_COLUMNS = ("prompt", "completion", "messages", "conversations", "label")
SCORE_COLUMNS = ("helpfulness", "correctness", "coherence", "complexity", "verbosity", "score", "reward", "rating")


UNPAIRED = f"unpaired (KTO-style) data, one response per row labelled good or bad; {NOT_PAIRS}"
SCORED = f"per-response scores, one response per row with its ratings; {NOT_PAIRS}"


def _refuse(refusal: str) -> Normalizer:
    """For a layout named outright (`data_format: unpaired`): the same refusal as detection gives."""

    def normalize(row: dict[str, Any], options: Options) -> Pair:
        raise UserError(f"rows with columns {', '.join(sorted(map(str, row)))}: {refusal}")

    return normalize


def _looks_unpaired(row: dict[str, Any]) -> bool:
    return isinstance(row.get("label"), bool) and any(name in row for name in UNPAIRED_COLUMNS[:-1])


def _looks_scored(row: dict[str, Any]) -> bool:
    label = row.get("label")
    per_text = "text" in row and isinstance(label, list) and all(isinstance(x, int | float) for x in label)
    per_response = {"prompt", "response"} <= set(row) and any(name in row for name in SCORE_COLUMNS)
    return (per_text or per_response) and "chosen" not in row


REFUSED_LAYOUTS = [
    Format(
        "unpaired",
        "Not pairs, refused: one response per row with a good/bad label (KTO-style unpaired data).",
        _looks_unpaired,
        _refuse(UNPAIRED),
        "prompt or messages, completion, label (true/false)",
        reads=UNPAIRED_COLUMNS,
        refusal=UNPAIRED,
    ),
    Format(
        "scored",
        "Not pairs, refused: one response per row with its scores (SteerLM/HelpSteer attribute labels, a reward).",
        _looks_scored,
        _refuse(SCORED),
        "text, label (a list of scores); or prompt, response, helpfulness|score|reward|rating",
        reads=("text", "label", "prompt", "response", *SCORE_COLUMNS),
        refusal=SCORED,
    ),
]

for _layout in PAIR_LAYOUTS:
    collect(LAYOUTS, _layout, TOOLS)
for _layout in REFUSED_LAYOUTS:
    collect(LAYOUTS, _layout, REFUSED)
