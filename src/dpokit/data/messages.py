"""Reading chat messages as other tools write them, into our `{role, content}` messages.

Tools name the two fields of a message differently: the role is `role` (OpenAI, TRL), `from` (ShareGPT,
LLaMA-Factory, ColossalChat) or `speaker`; the content is `content`, `value` or `text`. Roles go by other names too
(ShareGPT's `human` and `gpt`, LLaMA-Factory's `function_call` and `observation`). Content may be a list of typed
parts (`{"type": "text", "text": ...}` as OpenAI writes them, `{"type": "text", "value": ...}` as LLaMA-Factory
does); its text parts are joined with nothing between them, and any other part (an image) makes the row bad,
since dpokit trains on text. Other fields of a message (`loss_weight`, `name`, `weight`) are not read.
"""

from __future__ import annotations

from typing import Any

from dpokit.data import Message

ROLE_KEYS = ("role", "from", "speaker")
CONTENT_KEYS = ("content", "value", "text")

# Role names of other tools, as our roles. A function call is the assistant's turn, its result the tool's.
ROLE_NAMES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "agent": "assistant",
    "model": "assistant",
    "function_call": "assistant",
    "tool": "tool",
    "observation": "tool",
}


class MessageError(ValueError):
    """A message that cannot be read; `kind` is the bad-row kind the caller reports it under."""

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.kind = kind


def read_message(value: Any, label: str) -> Message:
    """One message, its role and content read under any of the usual field names."""
    role_field = next((k for k in ROLE_KEYS if isinstance(value, dict) and k in value), None)
    content_field = next((k for k in CONTENT_KEYS if isinstance(value, dict) and k in value), None)
    if role_field is None or content_field is None:
        raise MessageError(
            f"{label} must be an object with a role ({', '.join(ROLE_KEYS)}) and content ({', '.join(CONTENT_KEYS)})",
            "wrong type",
        )
    role = value[role_field]
    if not isinstance(role, str) or role.lower() not in ROLE_NAMES:
        raise MessageError(f"{label} has unknown role {role!r}", "roles out of order")
    return {"role": ROLE_NAMES[role.lower()], "content": content_text(value[content_field], label)}


def content_text(content: Any, label: str) -> str:
    """The text of a message's content: a string, or the text parts of a list of typed parts, joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_part_text(part, f"{label} content part {i}") for i, part in enumerate(content))
    raise MessageError(f"{label} content must be text, got {type(content).__name__}", "wrong type")


def _part_text(part: Any, label: str) -> str:
    if isinstance(part, str):
        return part
    if not isinstance(part, dict) or part.get("type", "text") != "text":
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        raise MessageError(f"{label} is {kind!r}, not text: dpokit trains on text only", "wrong type")
    text = next((part[k] for k in ("text", "value", "content") if k in part), None)
    if not isinstance(text, str):
        raise MessageError(f"{label} has no text (text or value)", "wrong type")
    return text


def rename_fields(value: Any, role_key: str | None, content_key: str | None) -> Any:
    """A message, or a list of them, with the user's mapped role and content fields read (for `columns:`)."""
    if isinstance(value, list):
        return [rename_fields(item, role_key, content_key) for item in value]
    if not isinstance(value, dict):
        return value
    renamed = dict(value)
    for ours, theirs in (("role", role_key), ("content", content_key)):
        if theirs and theirs in value:
            renamed[ours] = renamed.pop(theirs)
    return renamed
