"""Preference-data layouts: detection and normalization to `Pair`s.

This module holds the registry, TRL's layouts and detection; what every layout shares (the checks, the pair
builders) is in `rows`, the public datasets' layouts in `dataset_layouts`, other training tools' in `tool_layouts`.

Each layout is a `Format`: a name, a test on a row's columns, and a function from one row to a `Pair`.
A normalizer raises `RowError` with the reason when a row is malformed, returns `Dropped` for a row that is
well-formed but makes no pair (a tie, say), which is counted rather than reported as bad, or `Adjusted` for a
pair it made after a change that is counted too (a multi-turn row trimmed).

Layouts whose columns name a question and its answers (Orca, Stack Exchange, UltraFeedback, rated responses)
become conversational pairs: the question is a user message, the answers assistant messages. TRL's explicit and
implicit layouts keep TRL's meaning: three texts are a standard (template-free) pair, message lists are
conversational. `to_conversational` turns a standard pair into the conversational triplet `dpokit data prepare`
writes, so every layout ends in the same triplet for the same content.

Implicit prompt (only `chosen` and `rejected`, as conversations or texts), defined precisely:
- Conversations: the prompt is the longest run of leading messages both share. The first messages after it must
  both be assistant turns: those are the responses. If either conversation goes on after its response, the row
  is rejected (`multi_turn: reject`), or with `multi_turn: trim` both are cut back to the shared prompt plus that
  first differing assistant turn (later turns are dropped; counted as "trimmed: ..."). Conversations that differ
  at a user turn, from their first message, or where one ends inside the shared part, are rejected either way.
- Texts: the prompt is the longest common prefix, backed off to the start of its last run of whitespace, so no
  word is split and the responses start with that whitespace (as tokenizers expect); no shared prefix is an error.
"""

from __future__ import annotations

from typing import Any

from dpokit.data import Text, dataset_layouts, tool_layouts
from dpokit.data.rows import GENERAL, Format, _columns, _explicit_prompt, _implicit_prompt, kept_as_given
from dpokit.errors import UserError

FORMATS: dict[str, Format] = {}


def register(fmt: Format, group: int = GENERAL) -> Format:
    """Add a layout (its normalizer under the shared empty-response policy) at the end of its group."""
    from dataclasses import replace

    fmt = fmt if fmt.refusal else replace(fmt, normalize=kept_as_given(fmt.normalize))
    _GROUPS[fmt.name] = group
    entries = sorted({**FORMATS, fmt.name: fmt}.items(), key=lambda item: _GROUPS[item[0]])  # a stable sort
    FORMATS.clear()
    FORMATS.update(entries)
    return fmt


_GROUPS: dict[str, int] = {}


# Registration order is detection order: specific layouts first, the general TRL ones last.
register(
    Format(
        "trl",
        "TRL's explicit-prompt layout: `prompt`, `chosen`, `rejected` as texts (standard) or message lists "
        "(conversational).",
        lambda row: {"prompt", "chosen", "rejected"} <= set(row),
        _explicit_prompt,
        "prompt, chosen, rejected",
        reads=("prompt", "chosen", "rejected"),
    )
)
register(
    Format(
        "implicit",
        "TRL's implicit-prompt layout: whole `chosen` and `rejected` conversations or texts; the prompt is their "
        "shared start and only the last assistant turn may differ (multi_turn=trim cuts longer ones back).",
        lambda row: {"chosen", "rejected"} <= set(row) and "prompt" not in row,
        _implicit_prompt,
        "chosen, rejected",
        reads=("chosen", "rejected"),
    )
)
register(
    Format(
        "columns",
        "Any other layout, through `columns: {prompt: ..., chosen: ..., rejected: ...}` (without prompt: implicit).",
        lambda row: False,  # chosen only when a mapping is given
        _columns,
        "the columns you map",
    )
)


def detect_format(row: dict[str, Any], source: str) -> Format:
    """The layout `find_format` picks for `row`, or the error naming its columns."""
    fmt = find_format(row)
    if fmt is None:
        raise unknown_format(row, source)
    return fmt


def find_format(row: dict[str, Any]) -> Format | None:
    """The layout that recognizes `row` by the most of its columns: where two could read it, the more specific
    wins (`sharegpt` over `implicit` for conversations, chosen, rejected); on a tie, the one listed first."""
    candidates = [fmt for fmt in FORMATS.values() if fmt.detect(row)]
    return max(candidates, key=lambda fmt: len(fmt.matched(row)), default=None)


def refused(fmt: Format, row: dict[str, Any], source: str) -> UserError:
    """The error for a layout that holds no pairs, detected in `source`."""
    return UserError(f"{source}: format {fmt.name} ({fmt.evidence(row)}): {fmt.refusal}")


def unknown_format(row: dict[str, Any], source: str) -> UserError:
    columns = ", ".join(sorted(map(str, row))) or "none"
    return UserError(
        f"{source}: unknown format (columns: {columns}); set data_format to one of {', '.join(FORMATS)} or map "
        "your columns with columns={prompt: ..., chosen: ..., rejected: ...}"
    )


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise UserError(
            f"data format {name!r} (data_format, --data-format): must be auto or one of {', '.join(FORMATS)}"
        )
    return FORMATS[name]


def text_of(value: Text) -> str:
    """The plain text of a response or prompt, for statistics and judges."""
    if isinstance(value, str):
        return value
    return "\n".join(m["content"] for m in value)


# The public datasets' layouts, then other training tools' (and the non-pair ones refused).
for _fmt, _group in (*dataset_layouts.LAYOUTS, *tool_layouts.LAYOUTS):
    register(_fmt, _group)
