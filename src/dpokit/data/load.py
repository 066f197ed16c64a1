"""From a data source to validated pairs, with every left-out row accounted for.

`load_pairs` returns all pairs in memory, for training. `PairReader` yields them one at a time, for looking at
data too large to hold (`dpokit data inspect`); both detect the format the same way and count the same things.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dpokit.data import BadRow, LoadedPairs, Pair
from dpokit.data.formats import find_format, get_format, refused, unknown_format
from dpokit.data.rows import Adjusted, Dropped, Format, Options, RowError
from dpokit.data.sources import Row, iter_rows
from dpokit.errors import UserError

log = logging.getLogger(__name__)

DETECT_ROWS = 100  # rows looked at to find the format, so a malformed first row does not hide it


class PairReader:
    """The pairs of a source, read lazily. While iterating, it fills `format`, `rows`, `bad_rows` and `counts`.

    The format is the one named, or (for `auto`) the first one that recognizes one of the first readable rows;
    earlier rows are then normalized with it too and fail with their own reasons.
    """

    def __init__(
        self,
        source: str,
        *,
        split: str = "train",
        data_config: str | None = None,
        data_format: str = "auto",
        options: Options | None = None,
    ) -> None:
        self.source = source
        self.split = split
        self.data_config = data_config
        self.options = options or Options()
        self.fixed: Format | None = _fixed_format(data_format, self.options)
        self.format: str | None = self.fixed.name if self.fixed else None
        self.detected = self.fixed is None
        self.rows = 0
        self.bad_rows: list[BadRow] = []
        self.notes: list[BadRow] = []  # rows kept as given with an oddity (an empty response), for the side file
        self.counts: Counter[str] = Counter()
        self.evidence = ""  # the columns that made the detected format

    def __iter__(self) -> Iterator[Pair]:
        rows = iter_rows(self.source, split=self.split, data_config=self.data_config)
        fmt, rows = (self.fixed, rows) if self.fixed else self._detect(rows)
        for origin, row in rows:
            self.rows += 1
            if isinstance(row, BadRow):
                self.bad_rows.append(row)
                continue
            assert fmt is not None  # a good row means a format was found
            try:
                result = fmt.normalize(row, self.options)
            except RowError as e:
                self.bad_rows.append(BadRow(origin, str(e), row, e.kind))
                continue
            if isinstance(result, Dropped):
                self.counts[result.reason] += 1
                continue
            if isinstance(result, Adjusted):
                self.counts[result.reason] += 1
                if result.note:
                    self.notes.append(BadRow(origin, result.note, row, result.note_kind))
                result = result.pair
            yield Pair(result.prompt, result.chosen, result.rejected, origin)

    def _detect(self, rows: Iterator[Row]) -> tuple[Format | None, Iterator[Row]]:
        looked: list[Row] = []
        first_row: dict[str, Any] | None = None
        readable = 0
        for origin, row in rows:
            looked.append((origin, row))
            if isinstance(row, BadRow):
                continue
            readable += 1
            first_row = first_row if first_row is not None else row
            fmt = find_format(row)
            if fmt is not None:
                if fmt.refusal:
                    raise refused(fmt, row, self.source)
                self.format, self.evidence = fmt.name, fmt.evidence(row)
                log.info("%s: format %s (detected from %s)", self.source, fmt.name, self.evidence)
                return fmt, itertools.chain(looked, rows)
            if readable >= DETECT_ROWS:
                break
        if first_row is not None:
            raise unknown_format(first_row, self.source)
        return None, iter(looked)  # no readable row at all: every row is reported as bad

    def check(self, max_bad_rows: int, rejected_dir: str | os.PathLike | None = None) -> str | None:
        """Write the bad rows to a side file (returning its path) and fail if there are more than `max_bad_rows`."""
        return check_bad_rows(self.bad_rows, self.source, max_bad_rows, rejected_dir, self.notes)


def options_of(cfg: Any) -> Options:
    """How rows become pairs, from a config's `multi_turn`, `min_score_margin` and `columns`: the same for training,
    evaluation and the data commands."""
    return Options(multi_turn=cfg.multi_turn, min_score_margin=cfg.min_score_margin, columns=cfg.columns)


def load_pairs(
    source: str,
    *,
    split: str = "train",
    data_config: str | None = None,
    data_format: str = "auto",
    options: Options | None = None,
    max_bad_rows: int = 0,
    rejected_dir: str | os.PathLike | None = None,
) -> LoadedPairs:
    """Read, detect, normalize and validate. Raises `UserError` if more than `max_bad_rows` rows are bad.

    Bad rows are written with their reasons to `<rejected_dir>/<source name>.rejected.jsonl` (beside the source
    when no folder is given), so nothing the user gave disappears without a trace.
    """
    reader = PairReader(source, split=split, data_config=data_config, data_format=data_format, options=options)
    pairs = list(reader)
    loaded = LoadedPairs(pairs, reader.format or data_format, source, reader.bad_rows, dict(reader.counts))
    loaded.rows = reader.rows
    loaded.detected = reader.detected
    loaded.notes, loaded.evidence = reader.notes, reader.evidence
    loaded.rejected_file = reader.check(max_bad_rows, rejected_dir)
    if not pairs:
        dropped = ", ".join(f"{n} {reason}" for reason, n in reader.counts.items()) or "none dropped"
        raise UserError(f"{source}: no usable pairs in {reader.rows} rows ({len(reader.bad_rows)} bad; {dropped})")
    log.info("%s", describe_loaded(loaded))
    return loaded


def describe_loaded(loaded: LoadedPairs) -> str:
    """One line: how many rows became pairs, the format, and where the others went."""
    parts = [f"{loaded.source}: {len(loaded.pairs)} pairs from {loaded.rows} rows (format {loaded.format})"]
    parts += [f"{reason}: {n}" for reason, n in sorted(loaded.counts.items())]
    if loaded.bad_rows:
        parts.append(f"bad rows: {len(loaded.bad_rows)}, written to {loaded.rejected_file}")
    return "; ".join(parts)


def check_bad_rows(
    bad: list[BadRow],
    source: str,
    max_bad_rows: int,
    rejected_dir: str | os.PathLike | None = None,
    notes: list[BadRow] | None = None,
) -> str | None:
    """Write bad rows (and the `notes` on rows kept as given) beside the source (or into `rejected_dir`); more than
    `max_bad_rows` bad rows is an error."""
    if not bad and not notes:
        return None
    rejected_file = str(write_rejected(bad + (notes or []), source, rejected_dir))
    error = too_many_bad_rows(bad, rejected_file, max_bad_rows)
    if error is not None:
        raise error
    return rejected_file


def too_many_bad_rows(bad: list[BadRow], rejected_file: str | None, max_bad_rows: int) -> UserError | None:
    """The error for more than `max_bad_rows` bad rows: the first one, how many more, and where they all are."""
    if len(bad) <= max_bad_rows:
        return None
    first = bad[0]
    more = f" (and {len(bad) - 1} more bad rows)" if len(bad) > 1 else ""
    return UserError(
        f"{first.origin}: {first.reason}{more}; all bad rows with reasons are in {rejected_file}; fix "
        f"them or raise max_bad_rows (now {max_bad_rows})"
    )


def _fixed_format(name: str, options: Options) -> Format | None:
    if options.columns is not None:
        if name not in ("auto", "columns"):
            raise UserError(f"data_format `{name}` and a columns mapping exclude each other; give one of them")
        return get_format("columns")
    if name == "columns":
        raise UserError("data_format `columns` needs the mapping: columns={prompt: ..., chosen: ..., rejected: ...}")
    return None if name == "auto" else get_format(name)


def _json_line(value: dict[str, Any]) -> str:
    line = json.dumps(value, ensure_ascii=False, default=repr)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (from JSON escapes or undecodable CSV bytes) only fit escaped
        line = json.dumps(value, default=repr)
    return line + "\n"


def write_rejected(bad: list[BadRow], source: str, folder: str | os.PathLike | None) -> Path:
    """`<source name>.rejected.jsonl` in `folder`, or beside a local source, or here for a hub dataset."""
    src = Path(source)
    local = src.exists()
    stem = (src.stem if src.is_file() else src.name) if local else source.replace("/", "_")
    target = (Path(folder) if folder is not None else src.parent if local else Path(".")) / f"{stem}.rejected.jsonl"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("w", encoding="utf-8") as f:
            for row in bad:
                f.write(_json_line(row.to_dict()))
    except OSError as e:
        raise UserError(f"cannot write the bad rows of {source} to {target} ({e.strerror}); free that place") from None
    return target
