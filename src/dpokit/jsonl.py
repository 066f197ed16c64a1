"""Reading JSON-lines files that dpokit or its users wrote, with each reader's policy for lines that are not rows.

Two things can be wrong with a line, and callers treat them differently:

- the unfinished tail: bytes after the last newline. Our writers end every row with a newline, so a tail is a row
  cut short by a kill. `tail="drop"` sets it aside (a resumable writer's file: `train`'s metrics, `generate`'s
  pairs), `tail="cut"` also truncates it from the file so that appending goes on after the last whole row, and
  `tail="read"` reads it as any other line (files a person may have written without a final newline).
- a bad line: not JSON, or not a row the caller accepts. `read_jsonl` never raises for one; it returns the line
  numbers in `JsonLines.bad_lines`, so that a report can note them and skip, and a resumable writer can refuse a
  file that is not its own (`JsonLines.require_clean`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dpokit.errors import UserError

log = logging.getLogger(__name__)

Tail = Literal["read", "drop", "cut"]


@dataclass
class JsonLines:
    """What `read_jsonl` found in a file."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    """the accepted rows, in file order"""
    lines: list[str] = field(default_factory=list)
    """the text of each accepted row, as it stands in the file (no newline)"""
    bad_lines: list[int] = field(default_factory=list)
    """1-based numbers of the non-blank lines that are not JSON objects the caller accepts"""
    torn_tail: bool = False
    """whether an unfinished last line was set aside (`tail="drop"` or `"cut"`)"""

    def require_clean(self, path: Path, what: str, fix: str) -> list[dict[str, Any]]:
        """The rows, or a one-line UserError at the first bad line: `PATH:N is not WHAT; FIX`."""
        if self.bad_lines:
            raise UserError(f"{path}:{self.bad_lines[0]} is not {what}; {fix}")
        return self.rows


def is_object(row: dict[str, Any]) -> bool:
    """Accept every JSON object (the default)."""
    return True


def read_jsonl(path: Path, keep: Callable[[dict[str, Any]], bool] = is_object, *, tail: Tail = "read") -> JsonLines:
    """The JSON-object lines of `path` that `keep` accepts (nothing when the file does not exist).

    Blank lines are ignored; undecodable bytes are replaced, so they make a bad line rather than an error.
    """
    found = JsonLines()
    if not path.is_file():
        return found
    data = path.read_bytes()
    end = len(data) if tail == "read" else data.rfind(b"\n") + 1
    if end < len(data):
        found.torn_tail = True
        log.warning("%s: dropping a half-written last row (an earlier run was killed while writing it)", path)
        if tail == "cut":
            with path.open("r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
    for number, line in enumerate(data[:end].decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        row = _parsed(line)
        if row is not None and keep(row):
            found.rows.append(row)
            found.lines.append(line)
        else:
            found.bad_lines.append(number)
    return found


def _parsed(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None
