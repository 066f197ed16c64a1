"""What every preference-data layout is built from: the row checks and their reasons, the pair builders, and
the groups that order the registry (`formats.FORMATS`). The layouts themselves are in `formats` (TRL's, and
detection), `dataset_layouts` and `tool_layouts`; see `formats` for how each layout reads a row.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dpokit.data import Message, Pair, Text
from dpokit.data.messages import MessageError, read_message, rename_fields

ROLES = ("system", "user", "assistant", "tool")

# Kinds of bad rows, as `BadRow.kind`; sources add "invalid JSON", "undecodable bytes", "wrong number of fields".
MISSING_COLUMN = "missing column"
WRONG_TYPE = "wrong type"
EMPTY_TEXT = "empty text"
EMPTY_RESPONSE = "empty response"
IDENTICAL = "identical chosen and rejected"
ROLES_OUT_OF_ORDER = "roles out of order"
LAST_TURN_NOT_ASSISTANT = "last turn not assistant"
DIFFER_EARLY = "responses differ before the last turn"
NO_SHARED_PROMPT = "no shared prompt"
CONTRADICTING_SCORES = "scores contradict the labels"

# Counters of rows that made no pair, or a changed one.
TIED = "dropped: tied scores"
UNDER_MARGIN = "dropped: score gap not above min_score_margin"
TOO_FEW_RESPONSES = "dropped: fewer than two responses"
TRIMMED = "trimmed: multi-turn rows cut back to the first differing assistant turn"
KEPT_AS_GIVEN = "kept as given"  # the start of the counters of pairs kept with an oddity
EMPTY_KEPT = f"{KEPT_AS_GIVEN}: an empty chosen or rejected response"


class RowError(ValueError):
    """A row that is malformed; the message is the reason shown to the user, `kind` its category."""

    def __init__(self, reason: str, kind: str = WRONG_TYPE) -> None:
        super().__init__(reason)
        self.kind = kind


@dataclass(frozen=True)
class Dropped:
    """A well-formed row that yields no pair; `reason` is the counter it adds to (e.g. "dropped: tied scores")."""

    reason: str


@dataclass(frozen=True)
class Adjusted:
    """A pair made after a change to its row, or kept with an oddity, that must not go unnoticed: `reason` is the
    counter it adds to; a `note` (with its bad-row kind) goes to the side file with the row."""

    pair: Pair
    reason: str
    note: str = ""
    note_kind: str = ""


@dataclass(frozen=True)
class Options:
    """The data keys of the config that change how rows normalize."""

    multi_turn: str = "reject"
    min_score_margin: float = 0.0
    columns: dict[str, str] | None = None


Normalized = Pair | Dropped | Adjusted
Normalizer = Callable[[dict[str, Any], Options], Normalized]


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    detect: Callable[[dict[str, Any]], bool]
    normalize: Normalizer
    columns: str = ""  # the columns it reads, for `dpokit data formats`
    reads: tuple[str, ...] = ()  # column names it reads: the evidence of a detection, and how specific it is
    unused: tuple[str, ...] = ()  # columns it recognizes but does not train on (said when detected)
    refusal: str = ""  # for layouts that hold no pairs: why, and what to do instead

    def matched(self, row: dict[str, Any]) -> list[str]:
        """The columns of `row` this layout reads: what detection printed as its evidence."""
        return [name for name in self.reads if name in row]

    def evidence(self, row: dict[str, Any]) -> str:
        """ "columns a, b, c", and the recognized columns that are not used."""
        text = "columns " + ", ".join(self.matched(row) or sorted(row))
        unused = [name for name in self.unused if _holds(row, name)]
        return text + (f"; not used: {', '.join(unused)}" if unused else "")


def _holds(row: dict[str, Any], path: str) -> bool:
    """Whether `row` has the (dotted, for nested objects) column `path`."""
    value: Any = row
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return False
        value = value[key]
    return True


# --- checks shared by every layout ------------------------------------------------------------------------------------


def need_columns(row: dict[str, Any], *names: str) -> None:
    missing = [n for n in names if n not in row]
    if missing:
        raise RowError(f"missing column {', '.join(repr(m) for m in missing)}", MISSING_COLUMN)


def check_text(value: Any, column: str, allow_empty: bool = False, empty_kind: str = EMPTY_TEXT) -> str:
    if not isinstance(value, str):
        raise RowError(f"column {column!r} must be text, got {type(value).__name__}", WRONG_TYPE)
    if not allow_empty and not value.strip():
        raise RowError(f"column {column!r} is empty", empty_kind)
    return value


def check_messages(value: Any, column: str) -> list[Message]:
    """A list of messages with known roles and text content (see `dpokit.data.messages` for the names read)."""
    if not isinstance(value, list):
        raise RowError(f"column {column!r} must be a list of messages, got {type(value).__name__}", WRONG_TYPE)
    if not value:
        raise RowError(f"column {column!r} has no messages", EMPTY_TEXT)
    return [check_message(message, f"column {column!r} message {i}") for i, message in enumerate(value)]


def check_message(value: Any, label: str) -> Message:
    """One message, with the role and content field names and role names of other tools read as ours."""
    try:
        return read_message(value, label)
    except MessageError as e:
        raise RowError(str(e), e.kind) from None


def check_conversation(prompt: list[Message], chosen: list[Message], rejected: list[Message]) -> None:
    """Roles in order: the prompt ends on a user (or tool) turn and each response is assistant turns (empty ones
    too: see `kept_as_given`)."""
    for name, messages in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        for i, message in enumerate(messages):
            if message["role"] == "system" and not (name == "prompt" and i == 0):
                raise RowError(f"roles out of order: {name} has a system message at position {i}", ROLES_OUT_OF_ORDER)
    if prompt[-1]["role"] not in ("user", "tool"):
        raise RowError(
            f"roles out of order: the prompt must end with a user turn, not {prompt[-1]['role']!r}", ROLES_OUT_OF_ORDER
        )
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise RowError(f"last turn of {name} is not an assistant turn", LAST_TURN_NOT_ASSISTANT)
        if messages[0]["role"] != "assistant":
            raise RowError(f"roles out of order: {name} must start with an assistant turn", ROLES_OUT_OF_ORDER)


def check_score(value: Any, column: str) -> float:
    """A finite number; CSV cells hold numbers as text, so numeric text counts too."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise RowError(f"column {column!r} must be a number, got {type(value).__name__}", WRONG_TYPE)
    try:
        score = float(value)
    except ValueError:
        raise RowError(f"column {column!r} must be a number, got {value!r}", WRONG_TYPE) from None
    if not math.isfinite(score):
        raise RowError(f"column {column!r} must be a finite number, got {value!r}", WRONG_TYPE)
    return score


# --- building pairs ---------------------------------------------------------------------------------------------------


def user(text: str) -> Message:
    return {"role": "user", "content": text}


def assistant(text: str) -> Message:
    return {"role": "assistant", "content": text}


def as_text_pair(prompt: Any, chosen: Any, rejected: Any, labels: tuple[str, str, str] | None = None) -> Pair:
    """TRL's explicit-prompt meaning: three texts make a standard pair; any message list makes the pair
    conversational (a text prompt becomes a user message, text responses assistant messages)."""
    if any(isinstance(value, list | dict) for value in (prompt, chosen, rejected)):
        return as_chat_pair(prompt, chosen, rejected, labels)
    p, c, r = labels or ("prompt", "chosen", "rejected")
    return Pair(
        check_text(prompt, p), check_text(chosen, c, allow_empty=True), check_text(rejected, r, allow_empty=True)
    )


def as_chat_pair(prompt: Any, chosen: Any, rejected: Any, labels: tuple[str, str, str] | None = None) -> Pair:
    """A conversational pair from texts or message lists: a text prompt is a user turn, a text response an
    assistant turn."""
    p, c, r = labels or ("prompt", "chosen", "rejected")
    prompt_messages = check_messages(prompt, p) if isinstance(prompt, list) else [user(check_text(prompt, p))]
    chosen_messages = _response_messages(chosen, c)
    rejected_messages = _response_messages(rejected, r)
    check_conversation(prompt_messages, chosen_messages, rejected_messages)
    return Pair(prompt_messages, chosen_messages, rejected_messages)


def _response_messages(value: Any, column: str) -> list[Message]:
    """A response as assistant messages: a text, one message object, or a list of messages."""
    if isinstance(value, str):
        return [assistant(value)]
    if isinstance(value, dict):
        return [check_message(value, f"column {column!r}")]
    return check_messages(value, column)


def split_conversations(chosen: list[Message], rejected: list[Message], options: Options) -> Pair | Adjusted:
    """The implicit prompt of two whole conversations (see the module docstring for the exact rule)."""
    d = 0
    while d < min(len(chosen), len(rejected)) and chosen[d] == rejected[d]:
        d += 1
    if d == len(chosen) and d == len(rejected):
        raise RowError("chosen and rejected are the same conversation: nothing to compare", IDENTICAL)
    if d == len(chosen) or d == len(rejected):
        short, long = ("chosen", "rejected") if d == len(chosen) else ("rejected", "chosen")
        raise RowError(f"{short} ends inside the part it shares with {long}: it has no response", NO_SHARED_PROMPT)
    if d == 0:
        raise RowError("chosen and rejected differ from their first message: they share no prompt", NO_SHARED_PROMPT)
    for name, message in (("chosen", chosen[d]), ("rejected", rejected[d])):
        if message["role"] != "assistant":
            raise RowError(
                f"chosen and rejected first differ at message {d}, where {name} has a {message['role']} turn, not "
                "an assistant turn",
                DIFFER_EARLY,
            )
    prompt, chosen_turn, rejected_turn = chosen[:d], [chosen[d]], [rejected[d]]
    check_conversation(prompt, chosen_turn, rejected_turn)
    pair = Pair(prompt, chosen_turn, rejected_turn)
    if d == len(chosen) - 1 and d == len(rejected) - 1:
        return pair
    if options.multi_turn == "trim":
        return Adjusted(pair, TRIMMED)
    raise RowError(
        f"chosen and rejected differ at message {d}, before their last turn; only the last assistant turn may "
        "differ (multi_turn=trim keeps the conversations up to their first differing turn)",
        DIFFER_EARLY,
    )


def split_texts(chosen: str, rejected: str) -> Pair:
    """The implicit prompt of two texts: their common prefix, backed off to the start of its last whitespace run."""
    if chosen == rejected:
        raise RowError("chosen and rejected are the same text: nothing to compare", IDENTICAL)
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    cut = n
    while cut > 0 and not chosen[cut - 1].isspace():  # back off to the last whitespace, so no word is split
        cut -= 1
    while cut > 0 and chosen[cut - 1].isspace():  # and to the start of that whitespace run
        cut -= 1
    prompt, chosen_response, rejected_response = chosen[:cut], chosen[cut:], rejected[cut:]
    if not prompt.strip():
        raise RowError("chosen and rejected share no prompt text at their start", NO_SHARED_PROMPT)
    return Pair(prompt, chosen_response, rejected_response)


def to_conversational(pair: Pair) -> Pair:
    """A standard pair as the same content in messages: the prompt a user turn, each response an assistant turn."""
    if pair.conversational:
        return pair
    return Pair([user(str(pair.prompt))], [assistant(str(pair.chosen))], [assistant(str(pair.rejected))], pair.origin)


# --- the layouts ------------------------------------------------------------------------------------------------------


def _explicit_prompt(row: dict[str, Any], options: Options) -> Pair:
    need_columns(row, "prompt", "chosen", "rejected")
    return as_text_pair(row["prompt"], row["chosen"], row["rejected"])


def _implicit_prompt(
    row: dict[str, Any], options: Options, labels: tuple[str, str] = ("chosen", "rejected")
) -> Pair | Adjusted:
    need_columns(row, "chosen", "rejected")
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        return split_texts(chosen, rejected)
    return split_conversations(check_messages(chosen, labels[0]), check_messages(rejected, labels[1]), options)


def _columns(row: dict[str, Any], options: Options) -> Normalized:
    """Any layout, through the user's mapping of prompt/chosen/rejected to column names."""
    mapping = {key: column for key, column in (options.columns or {}).items() if key in PAIR_KEYS}
    missing = [f"{column!r} (mapped to {key})" for key, column in mapping.items() if column not in row]
    if missing:
        raise RowError(f"missing column {', '.join(missing)}", MISSING_COLUMN)
    fields = (options.columns or {}).get("role"), (options.columns or {}).get("content")
    values = {key: rename_fields(row[column], *fields) for key, column in mapping.items()}
    if "prompt" in values:
        labels = (mapping["prompt"], mapping["chosen"], mapping["rejected"])
        return as_text_pair(values["prompt"], values["chosen"], values["rejected"], labels)
    return _implicit_prompt(values, options, (mapping["chosen"], mapping["rejected"]))


PAIR_KEYS = ("prompt", "chosen", "rejected")  # what `columns:` maps to columns; `role`, `content` name message fields


def kept_as_given(normalize: Normalizer) -> Normalizer:
    """`normalize`, with the empty-response policy every layout shares.

    A pair with an empty (or blank) chosen or rejected response is kept as it is, as TRL trains on it: it is
    counted, warned about, and listed in the side file with its row. Both responses empty compare nothing, so
    such a row is bad (as identical chosen and rejected).
    """

    def checked(row: dict[str, Any], options: Options) -> Normalized:
        result = normalize(row, options)
        if isinstance(result, Dropped):
            return result
        pair = result.pair if isinstance(result, Adjusted) else result
        empty = [name for name, text in (("chosen", pair.chosen), ("rejected", pair.rejected)) if _blank(text)]
        if not empty:
            return result
        if len(empty) == 2:
            raise RowError("chosen and rejected responses are both empty: nothing to compare", IDENTICAL)
        note = f"{empty[0]} response is empty; kept as given"
        reason = result.reason if isinstance(result, Adjusted) else EMPTY_KEPT
        return Adjusted(pair, reason, note, EMPTY_RESPONSE)

    return checked


def _blank(response: Text) -> bool:
    return not (response if isinstance(response, str) else response[-1]["content"]).strip()


# The order of `FORMATS` (the listing, and the winner when two layouts read as many columns of a row), by group:
DATASETS, TOOLS, GENERAL, REFUSED = range(4)


def collect(layouts: list[tuple[Format, int]], fmt: Format, group: int) -> Format:
    """Add a layout to a module's list, which `formats` registers in order."""
    layouts.append((fmt, group))
    return fmt
