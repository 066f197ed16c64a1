"""Preference-data layouts: detection and normalization to `Pair`s.

Each layout is a `Format`: a name, a test on the first row's columns, and a function from one row to a `Pair`.
A normalizer raises `RowError` with the reason when a row is malformed, or returns `Dropped` for a row that is
well-formed but makes no pair (a tie, say), which is counted rather than reported as bad.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dpokit.data import Message, Pair, Text
from dpokit.errors import UserError

ROLES = ("system", "user", "assistant", "tool")


class RowError(ValueError):
    """A row that is malformed; the message is the reason shown to the user."""


@dataclass(frozen=True)
class Dropped:
    """A well-formed row that yields no pair; `reason` is the counter it adds to (e.g. "ties dropped")."""

    reason: str


@dataclass(frozen=True)
class Options:
    """The data keys of the config that change how rows normalize."""

    multi_turn: str = "reject"
    min_score_margin: float = 0.0
    columns: dict[str, str] | None = None


Normalizer = Callable[[dict[str, Any], Options], "Pair | Dropped"]


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    detect: Callable[[dict[str, Any]], bool]
    normalize: Normalizer


# --- checks shared by every layout ------------------------------------------------------------------------------------


def need_columns(row: dict[str, Any], *names: str) -> None:
    missing = [n for n in names if n not in row]
    if missing:
        raise RowError(f"missing column {', '.join(repr(m) for m in missing)}")


def check_text(value: Any, column: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RowError(f"column {column!r} must be text, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError(f"column {column!r} is empty")
    return value


def check_messages(value: Any, column: str) -> list[Message]:
    """A list of `{role, content}` messages with known roles and text content."""
    if not isinstance(value, list):
        raise RowError(f"column {column!r} must be a list of messages, got {type(value).__name__}")
    if not value:
        raise RowError(f"column {column!r} has no messages")
    messages: list[Message] = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RowError(f"column {column!r} message {i} must be an object with role and content")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise RowError(f"column {column!r} message {i} has unknown role {role!r}")
        if not isinstance(content, str):
            raise RowError(f"column {column!r} message {i} content must be text, got {type(content).__name__}")
        messages.append({"role": role, "content": content})
    return messages


def check_conversation(prompt: list[Message], chosen: list[Message], rejected: list[Message]) -> None:
    """Roles in order: the prompt ends on a user (or tool) turn and each response ends on a non-empty assistant turn."""
    for name, messages in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        for i, message in enumerate(messages):
            if message["role"] == "system" and not (name == "prompt" and i == 0):
                raise RowError(f"roles out of order: {name} has a system message at position {i}")
    if prompt[-1]["role"] not in ("user", "tool"):
        raise RowError(f"roles out of order: the prompt must end with a user turn, not {prompt[-1]['role']!r}")
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[0]["role"] != "assistant":
            raise RowError(f"roles out of order: {name} must start with an assistant turn")
        if messages[-1]["role"] != "assistant":
            raise RowError(f"last turn of {name} is not an assistant turn")
        if not messages[-1]["content"].strip():
            raise RowError(f"{name} response is empty")


def as_text_pair(prompt: Any, chosen: Any, rejected: Any) -> Pair:
    """Validate and build a pair in either TRL shape; a conversational prompt with text responses is lifted."""
    if isinstance(prompt, list):
        prompt_messages = check_messages(prompt, "prompt")
        chosen_messages = _response_messages(chosen, "chosen")
        rejected_messages = _response_messages(rejected, "rejected")
        check_conversation(prompt_messages, chosen_messages, rejected_messages)
        return Pair(prompt_messages, chosen_messages, rejected_messages)
    check_text(prompt, "prompt")
    check_text(chosen, "chosen")
    check_text(rejected, "rejected")
    return Pair(prompt, chosen, rejected)


def _response_messages(value: Any, column: str) -> list[Message]:
    if isinstance(value, str):
        check_text(value, column)
        return [{"role": "assistant", "content": value}]
    return check_messages(value, column)


# --- the layouts ------------------------------------------------------------------------------------------------------


def _explicit_prompt(row: dict[str, Any], options: Options) -> Pair:
    need_columns(row, "prompt", "chosen", "rejected")
    return as_text_pair(row["prompt"], row["chosen"], row["rejected"])


FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    FORMATS[fmt.name] = fmt
    return fmt


register(
    Format(
        "trl",
        "TRL's explicit-prompt layout: `prompt`, `chosen`, `rejected` as texts (standard) or message lists "
        "(conversational).",
        lambda row: {"prompt", "chosen", "rejected"} <= set(row),
        _explicit_prompt,
    )
)


def detect_format(row: dict[str, Any], source: str) -> Format:
    """The first registered format whose test accepts `row` (registration order goes from specific to general)."""
    for fmt in FORMATS.values():
        if fmt.detect(row):
            return fmt
    columns = ", ".join(sorted(row)) or "none"
    raise UserError(
        f"{source}: unknown format (columns: {columns}); set data_format to one of {', '.join(FORMATS)} or map "
        "your columns with columns={prompt: ..., chosen: ..., rejected: ...}"
    )


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise UserError(f"config key `data_format` = {name!r}: must be auto or one of {', '.join(FORMATS)}")
    return FORMATS[name]


def text_of(value: Text) -> str:
    """The plain text of a response or prompt, for statistics and judges."""
    if isinstance(value, str):
        return value
    return "\n".join(m["content"] for m in value)
