"""Prompts to answer, from the files users keep them in: for `generate`, `compare`, `vibe` and the demo.

`load_prompts` reads plain text (one prompt per line) or whatever the data loader reads (JSONL, JSON, CSV, Parquet,
a folder of them, a hub dataset) and returns `PromptItem`s. The prompt column is given or detected (`prompt`,
`question`, `instruction`, `messages`, `turns`, in that order). A cell may hold

- text: one user turn (an Alpaca `instruction` gets its non-empty `input` appended after a blank line);
- a list of `{role, content}` messages: a conversation; one that ends with assistant turns is cut after its last
  user turn, since the answer is what the model is asked to write;
- a list of texts (MT-Bench's `turns`): the first is asked at once, the later ones after the model's answer.

MT-Bench's `question.jsonl` (`question_id`, `category`, `turns`) reads as it is. Every item has a stable `key`, the
source's own id (`question_id`, `id`, `prompt_id`) or else a hash of its text, so a rerun can tell done prompts
from new ones. Any prompt that is not text stops loading with one line naming the file, the row and the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpokit.data import BadRow, Message
from dpokit.data.rows import ROLES
from dpokit.data.sources import iter_rows
from dpokit.errors import UserError

log = logging.getLogger(__name__)

PROMPT_COLUMNS = ("prompt", "question", "instruction", "messages", "turns")
ID_COLUMNS = ("question_id", "id", "prompt_id")
TEXT_SUFFIXES = (".txt", ".text", ".md")


@dataclass(frozen=True)
class PromptItem:
    """One prompt: the conversation to answer first, and any user turns to ask after the model's answer."""

    key: str  # stable identity: the source's id, or "sha256:<hex>" of the conversation
    messages: list[Message]  # ends with a user turn; may start with a system turn and hold earlier exchanges
    later_turns: tuple[str, ...] = ()  # MT-Bench second turns, asked after the model answered `messages`
    category: str | None = None
    source_id: str | int | None = None  # the id as the source wrote it (MT-Bench's integer question_id)
    origin: str = ""  # "file:row", for messages about this prompt

    @property
    def text(self) -> str:
        """The last user message: what a rule judge sees as the prompt."""
        return self.messages[-1]["content"]

    @property
    def turns(self) -> list[str]:
        """Every user turn in order, as MT-Bench's `turns` (earlier exchanges in `messages` included)."""
        return [m["content"] for m in self.messages if m["role"] == "user"] + list(self.later_turns)


class PromptError(ValueError):
    """A cell that is not a prompt; the message is the reason shown with its file and row."""


def load_prompts(
    source: str, *, column: str | None = None, split: str = "train", data_config: str | None = None
) -> list[PromptItem]:
    """Every prompt of `source`, in order. Raises `UserError` for a missing, empty or malformed source."""
    items: list[PromptItem] = []
    found_column: str | None = column
    seen: dict[str, PromptItem] = {}
    for origin, row in _iter_source(source, split, data_config):
        if found_column is None:
            found_column = _detect_column(row, source)
        try:
            item = _item_from_row(row, found_column, origin)
        except PromptError as e:
            raise UserError(f"{origin}: {e}") from None
        earlier = seen.get(item.key)
        if earlier is not None and item.source_id is not None and earlier.messages != item.messages:
            raise UserError(f"{origin}: id {item.source_id!r} is used by {earlier.origin} too; ids must be unique")
        seen.setdefault(item.key, item)
        items.append(item)
    if not items:
        raise UserError(f"prompts {source}: no prompts found (the source is empty); give at least one prompt")
    return items


# --- sources ----------------------------------------------------------------------------------------------------------


def _iter_source(source: str, split: str, data_config: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows of a text file (one prompt per line), or of anything the data loader reads: JSONL, JSON, CSV,
    Parquet, a folder of them, or a hub dataset."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in TEXT_SUFFIXES:
        yield from _iter_text(path)
        return
    for origin, row in iter_rows(source, split=split, data_config=data_config):
        if isinstance(row, BadRow):
            raise UserError(f'{origin}: {row.reason}; each row must be an object such as {{"prompt": "..."}}')
        yield origin, row


def _iter_text(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{number}: undecodable bytes (not UTF-8) at byte {e.start}") from None
            if line.strip():
                yield f"{path}:{number}", {"prompt": line}


# --- rows to prompts --------------------------------------------------------------------------------------------------


def _detect_column(row: dict[str, Any], source: str) -> str:
    for name in PROMPT_COLUMNS:
        if name in row:
            return name
    columns = ", ".join(sorted(row)) or "none"
    raise UserError(
        f"prompts {source}: no prompt column (columns: {columns}); name one with --prompt-column, or call it "
        f"{', '.join(PROMPT_COLUMNS)}"
    )


def _item_from_row(row: dict[str, Any], column: str, origin: str) -> PromptItem:
    if column not in row:
        raise PromptError(f"missing column {column!r}")
    value = row[column]
    later: tuple[str, ...] = ()
    if isinstance(value, str):
        messages = [{"role": "user", "content": _with_input(_check_text(value, column), row, column)}]
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        turns = [_check_text(v, f"{column}[{i}]") for i, v in enumerate(value)]
        messages, later = [{"role": "user", "content": turns[0]}], tuple(turns[1:])
    elif isinstance(value, list) and value:
        messages = _conversation(value, column)
    else:
        shown = "an empty list" if value == [] else type(value).__name__
        raise PromptError(f"column {column!r} must be text, a list of texts or a list of messages, got {shown}")
    source_id = next((row[c] for c in ID_COLUMNS if isinstance(row.get(c), str | int)), None)
    category = row.get("category")
    return PromptItem(
        key=str(source_id) if source_id is not None else content_key(messages, later),
        messages=messages,
        later_turns=later,
        category=category if isinstance(category, str) and category else None,
        source_id=source_id,
        origin=origin,
    )


def _check_text(value: str, column: str) -> str:
    if not value.strip():
        raise PromptError(f"column {column!r} is empty")
    return value


def _with_input(text: str, row: dict[str, Any], column: str) -> str:
    """Alpaca rows keep the instruction's material in `input`; the model needs both."""
    extra = row.get("input")
    if column == "instruction" and isinstance(extra, str) and extra.strip():
        return f"{text}\n\n{extra}"
    return text


def _conversation(value: list[Any], column: str) -> list[Message]:
    messages: list[Message] = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise PromptError(f"column {column!r} message {i} must be an object with role and text content")
        if message.get("role") not in ROLES:
            raise PromptError(f"column {column!r} message {i} has unknown role {message.get('role')!r}")
        messages.append({"role": message["role"], "content": message["content"]})
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
        raise PromptError(f"column {column!r} has no user message to answer")
    if not messages[last_user]["content"].strip():
        raise PromptError(f"column {column!r} message {last_user} (the user turn to answer) is empty")
    return messages[: last_user + 1]


def content_key(messages: list[Message], later_turns: tuple[str, ...] = ()) -> str:
    """A stable key for a prompt without an id: the same conversation always gets the same key."""
    canonical = json.dumps([messages, list(later_turns)], ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:24]
