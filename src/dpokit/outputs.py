"""Writing results so that nothing half-made is left behind: a write probe before any model loads, files that
appear whole or not at all, and JSON lines appended so that every committed row survives a kill."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpokit.errors import UserError


def ensure_writable(folder: Path, what: str) -> None:
    """Fail in a second, before any model loads, when `folder` (created if missing) cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(
            f"{what}: {folder} cannot be written ({e.strerror}); choose a folder you can write to"
        ) from None


def ensure_file_writable(path: Path, flag: str) -> None:
    """`ensure_writable` for an output file that runs append to: `path` must not be a folder, and an existing file
    must open for appending."""
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file such as {path / 'pairs.jsonl'}")
    ensure_writable(path.resolve().parent, flag)
    try:
        with path.open("a", encoding="utf-8"):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be written: {e.strerror or e}") from e


def write_atomic(path: Path, text: str) -> None:
    """Write `text` so that `path` holds either its old content or all of the new, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """`rows` as JSON lines, written atomically."""
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


class JsonlAppender:
    """Appends JSON rows to a file, opened on the first row; `commit` flushes and fsyncs, so committed rows survive
    a kill (a row cut short by one is the torn tail `jsonl.read_jsonl` sets aside)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Any = None

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        if self._file is None:
            self._file = self.path.open("a", encoding="utf-8")
        for row in rows:
            self._file.write(json.dumps(row, ensure_ascii=False) + "\n")

    def commit(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self.commit()
            self._file.close()
            self._file = None
