"""Preference data: rows in many layouts in, validated prompt / chosen / rejected pairs out.

A `Pair` is either *conversational* (prompt is a list of `{role, content}` messages, chosen and rejected are lists
of messages that continue it) or *standard* (three strings, tokenized without a chat template), the two shapes TRL
trains on. Every row that cannot become a pair becomes a `BadRow` naming its file, row number and reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]
Text = str | list[Message]


@dataclass(frozen=True)
class Pair:
    """One preference: `chosen` is better than `rejected` as a continuation of `prompt`."""

    prompt: Text
    chosen: Text
    rejected: Text
    origin: str = ""  # "file.jsonl:12", for messages about this pair

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}


@dataclass(frozen=True)
class BadRow:
    """A row that could not become a pair, kept with its reason so nothing disappears without a trace."""

    origin: str
    reason: str
    row: Any = None
    kind: str = ""  # the reason's category ("missing column", "invalid JSON", ...), for counts and tests

    def to_dict(self) -> dict[str, Any]:
        return {"origin": self.origin, "reason": self.reason, "kind": self.kind, "row": self.row}


@dataclass
class LoadedPairs:
    """What loading a data source produced, including what it left out and why."""

    pairs: list[Pair]
    format: str
    source: str
    bad_rows: list[BadRow] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # e.g. {"ties dropped": 3}
    rejected_file: str | None = None  # where the bad rows were written
    rows: int = 0  # rows read from the source, good and bad
    detected: bool = False  # the format was detected (data_format: auto), not named
    evidence: str = ""  # what detection went by: "columns conversations, chosen, rejected"
    notes: list[BadRow] = field(default_factory=list)  # rows kept as given with an oddity (an empty response)
