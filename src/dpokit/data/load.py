"""From a data source to validated pairs, with every left-out row accounted for."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from dpokit.data import BadRow, LoadedPairs, Pair
from dpokit.data.formats import Dropped, Format, Options, RowError, detect_format, get_format
from dpokit.data.sources import iter_rows
from dpokit.errors import UserError


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
    options = options or Options()
    pairs: list[Pair] = []
    bad: list[BadRow] = []
    counts: Counter[str] = Counter()
    fmt: Format | None = (
        None if data_format == "auto" and options.columns is None else _fixed_format(data_format, options)
    )
    for origin, row in iter_rows(source, split=split, data_config=data_config):
        if isinstance(row, BadRow):
            bad.append(row)
            continue
        if fmt is None:
            fmt = detect_format(row, source)
        try:
            result = fmt.normalize(row, options)
        except RowError as e:
            bad.append(BadRow(origin, str(e), row))
            continue
        if isinstance(result, Dropped):
            counts[result.reason] += 1
            continue
        pairs.append(Pair(result.prompt, result.chosen, result.rejected, origin))
    loaded = LoadedPairs(pairs, fmt.name if fmt else data_format, source, bad, dict(counts))
    if bad:
        loaded.rejected_file = str(write_rejected(bad, source, rejected_dir))
    if len(bad) > max_bad_rows:
        first = bad[0]
        more = f" (and {len(bad) - 1} more bad rows)" if len(bad) > 1 else ""
        raise UserError(
            f"{first.origin}: {first.reason}{more}; all bad rows with reasons are in {loaded.rejected_file}; fix "
            f"them or raise max_bad_rows (now {max_bad_rows})"
        )
    if not pairs:
        raise UserError(f"{source}: no usable pairs (rows: {len(bad)} bad, {sum(counts.values())} dropped)")
    return loaded


def _fixed_format(name: str, options: Options) -> Format:
    if options.columns is not None:
        return get_format("columns")
    return get_format(name)


def write_rejected(bad: list[BadRow], source: str, folder: str | os.PathLike | None) -> Path:
    src = Path(source)
    name = (src.stem if src.suffix else src.name.replace("/", "_")) + ".rejected.jsonl"
    target = Path(folder) / name if folder is not None else (src.parent if src.exists() else Path(".")) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", encoding="utf-8") as f:
        for row in bad:
            f.write(json.dumps(row.to_dict(), ensure_ascii=False, default=repr) + "\n")
    return target
