"""Rendering conversations with a model's chat template, and what a template's refusal of one becomes.

Many templates raise on conversations they do not support: Gemma's `raise_exception('System role not supported')`,
the user/assistant alternation check of Mistral-Instruct and Llama-2. Such a refusal is the template's verdict on
one conversation, like a malformed row: `render_chat` turns it into `TemplateRefused` (a `UserError` holding the
template's message), and the callers make it a bad row, counted, written to the side file and held to
`max_bad_rows`. `refusal_error` is the one line when every conversation is refused for the same reason, with the fix.

`system_message` decides what system turns become before rendering, for templates without a system role:
`keep` them, `merge` each into the user turn after it (system text, a blank line, then the user text, which is
what users of such templates do by hand), or `drop` them. Merged and dropped turns are counted.

Every command that renders a conversation (training, `data inspect` / `prepare`, `generate`, `compare`, `vibe`,
`chat`) goes through `render_chat`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

from dpokit.data import BadRow, Message
from dpokit.errors import UserError

SYSTEM_MESSAGE_POLICIES = ("keep", "merge", "drop")
TEMPLATE_REFUSED = "chat template refused"  # the kind of the bad rows a template refuses
MERGED = "system messages merged into the user turn"
DROPPED = "system messages dropped"
REFUSAL_REASON = "the chat template refused this conversation: "


class TemplateRefused(UserError):
    """The chat template raised on this conversation; `template_message` is what it said."""

    def __init__(self, template_message: str) -> None:
        self.template_message = " ".join(template_message.split()) or "(no message)"
        super().__init__(REFUSAL_REASON + self.template_message)


def render_chat(tokenizer: Any, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> str:
    """The conversation as the template writes it. Raises `TemplateRefused` where the template raises."""
    import jinja2

    try:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except jinja2.TemplateError as e:  # raise_exception(...) in the template, or a template that cannot run
        raise TemplateRefused(str(e) or type(e).__name__) from None


def apply_system_message(messages: Sequence[Message], policy: str, counts: Counter[str] | None = None) -> list[Message]:
    """The conversation with its system turns kept, merged into the next user turn, or dropped (counted in
    `counts`). A system turn with no user turn after it is kept, for the template to accept or refuse."""
    if policy not in SYSTEM_MESSAGE_POLICIES:
        raise UserError(f"system_message `{policy}`: must be one of {', '.join(SYSTEM_MESSAGE_POLICIES)}")
    if policy == "keep" or not any(m["role"] == "system" for m in messages):
        return list(messages)
    result: list[Message] = []
    pending: list[Message] = []  # system turns waiting for the user turn they merge into
    for message in messages:
        if message["role"] != "system":
            if pending and message["role"] == "user":
                texts = [m["content"] for m in pending if m["content"].strip()] + [message["content"]]
                message = {**message, "content": "\n\n".join(texts)}
                _count(counts, MERGED, len(pending))
                pending = []
            result.extend(pending)  # system turns before an assistant turn stay where they were
            pending = []
            result.append(message)
        elif policy == "drop":
            _count(counts, DROPPED, 1)
        else:
            pending.append(message)
    return result + pending


def _count(counts: Counter[str] | None, reason: str, n: int) -> None:
    if counts is not None:
        counts[reason] += n


def has_system_turn(row: Any) -> bool:
    """Whether a refused row (a pair's or a prompt's dict) holds a system turn: then `merge` is the likely fix."""
    values = row.values() if isinstance(row, dict) else [row]
    return any(
        isinstance(v, list) and any(isinstance(m, dict) and m.get("role") == "system" for m in v) for v in values
    )


def refused_row(origin: str, error: TemplateRefused, row: Any) -> BadRow:
    return BadRow(origin, str(error), row, TEMPLATE_REFUSED)


def refusal_error(
    refused: Sequence[BadRow], total: int, source: str, merge_setting: str = "system_message=merge"
) -> UserError | None:
    """One line when the template refused every one of `total` conversations with the same message, naming the
    fix: `merge_setting` (how the user sets system_message=merge where they are) for refused system turns."""
    if not refused or len(refused) < total:
        return None
    messages = Counter(row.reason for row in refused)
    if len(messages) > 1:
        return None
    reason = next(iter(messages)).removeprefix(REFUSAL_REASON)
    fix = refusal_fix(refused, merge_setting)
    return UserError(f"{source}: the chat template refused every conversation ({total}): {reason}; {fix}")


def refusal_fix(refused: Sequence[BadRow], merge_setting: str = "system_message=merge") -> str:
    if all(has_system_turn(row.row) for row in refused):
        return (
            f"set {merge_setting} to fold the system text into the first user turn (or drop it), or use a chat "
            "template that accepts system turns"
        )
    return "use a chat template that accepts these conversations (chat_template=FILE), or change the rows to fit it"


def bad_rows_error(
    refused: Sequence[BadRow],
    bad_rows: Sequence[BadRow],
    total: int,
    source: str,
    rejected_file: str | None,
    max_bad_rows: int,
    merge_setting: str = "system_message=merge",
) -> UserError | None:
    """The one line of `refusal_error`, else the error for more than `max_bad_rows` bad rows, with the fix for
    refusals when the first bad row is one; None when neither applies."""
    from dpokit.data.load import too_many_bad_rows

    error = refusal_error(refused, total, source, merge_setting)
    if error is None:
        error = too_many_bad_rows(list(bad_rows), rejected_file, max_bad_rows)
        if error is not None and refused and bad_rows[0].kind == TEMPLATE_REFUSED:
            error = UserError(f"{error}; or {refusal_fix(refused, merge_setting)}")
    return error


def check_refusals(
    refused: Sequence[BadRow],
    bad_rows: Sequence[BadRow],
    total: int,
    source: str,
    *,
    max_bad_rows: int,
    rejected_dir: str | os.PathLike | None,
    merge_setting: str = "system_message=merge",
    notes: Sequence[BadRow] = (),
) -> str | None:
    """Write every bad row (the refused among them) and the rows kept with a note to the side file and return its
    path; raise `bad_rows_error`."""
    from dpokit.data.load import write_rejected

    if not bad_rows:
        return None
    rejected_file = str(write_rejected([*bad_rows, *notes], source, rejected_dir))
    error = bad_rows_error(refused, bad_rows, total, source, rejected_file, max_bad_rows, merge_setting)
    if error is not None:
        raise error
    return rejected_file


def check_conversations(
    tokenizer: Any,
    conversations: Sequence[tuple[str, Sequence[Message]]],
    source: str,
    *,
    system_message: str = "keep",
    max_bad_rows: int = 0,
    rejected_dir: str | os.PathLike | None = None,
    merge_setting: str = "--system-message merge",
) -> set[str]:
    """The origins of the `(origin, messages)` prompts the template refuses, found before any model loads; they
    are written to the side file, and more than `max_bad_rows` of them (or all, for one reason) stop the run."""
    refused = []
    for origin, messages in conversations:
        try:
            render_chat(tokenizer, apply_system_message(messages, system_message), add_generation_prompt=True)
        except TemplateRefused as e:
            refused.append(refused_row(origin, e, {"messages": list(messages)}))
    check_refusals(
        refused,
        refused,
        len(conversations),
        source,
        max_bad_rows=max_bad_rows,
        rejected_dir=rejected_dir,
        merge_setting=merge_setting,
    )
    return {row.origin for row in refused}
