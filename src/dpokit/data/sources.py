"""Reading rows from where users keep preference data.

A source yields `(origin, row)` items: `origin` is "file:line" and `row` is a dict, or a `BadRow` when the bytes
cannot be read as a row. Files are read lazily, row by row, so inspecting a large file does not hold it in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dpokit.data import BadRow
from dpokit.errors import UserError

Row = tuple[str, "dict[str, Any] | BadRow"]

FILE_SUFFIXES = (".jsonl", ".json")


def iter_rows(source: str, split: str = "train", data_config: str | None = None) -> Iterator[Row]:
    """Rows of a local file; `split` and `data_config` are for sources that have them."""
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"data file {source} does not exist")
    if path.is_dir():
        raise UserError(f"{source} is a folder; give a .json or .jsonl file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _iter_jsonl(path)
    elif suffix == ".json":
        yield from _iter_json(path)
    else:
        raise UserError(f"data file {source}: unknown file type `{suffix}`; use .json or .jsonl")


def _iter_jsonl(path: Path) -> Iterator[Row]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            origin = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield origin, BadRow(origin, f"undecodable bytes (not UTF-8) at byte {e.start}", None)
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield origin, BadRow(origin, f"invalid JSON ({e.msg} at column {e.colno})", line.rstrip("\n"))
                continue
            if not isinstance(row, dict):
                yield origin, BadRow(origin, f"expected a JSON object, got {type(row).__name__}", row)
                continue
            yield origin, row


def _iter_json(path: Path) -> Iterator[Row]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"data file {path}: undecodable bytes (not UTF-8) at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"data file {path}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} / {"train": [...]}
    if not isinstance(data, list):
        raise UserError(f"data file {path}: expected a JSON list of rows, got {type(data).__name__}")
    for number, row in enumerate(data, start=1):
        origin = f"{path}:{number}"
        if not isinstance(row, dict):
            yield origin, BadRow(origin, f"expected a JSON object, got {type(row).__name__}", row)
        else:
            yield origin, row
