"""Reading rows from where users keep preference data.

A source yields `(origin, row)` items: `origin` is "file:N" and `row` is a dict, or a `BadRow` when the bytes
cannot be read as a row. N counts from 1: the line number in a JSONL file, the row number (header not counted)
in a CSV or Parquet file, the list position in a JSON file, the row index + 1 in a hub split.

Files are read lazily, row by row (Parquet in record batches, CSV through the csv module), so inspecting a large
file does not hold it in memory. A `.json` file holding one JSON array is the exception: a JSON array has no row
boundaries, so it is parsed whole; JSONL or Parquet are the shapes for large data.

Sources:
- a `.jsonl`, `.json`, `.csv`, `.parquet` or `.arrow` file (Arrow files read memory-mapped, batch by batch);
- a folder written by `datasets`' `save_to_disk` (a `Dataset`, or a `DatasetDict` with one folder per split),
  known by its `state.json` or `dataset_dict.json` and loaded memory-mapped with `datasets.load_from_disk`;
- a folder of such files (searched recursively): when some file names carry a split (`train.jsonl`,
  `test-00000-of-00001.parquet`, `train_prefs-*.parquet`, `pairs.test.jsonl`, or a `train/` subfolder), only
  the requested split's files are read, files without a split name counting as `train`; otherwise all of them.
  `datasets`' metadata files (`dataset_info.json`, `state.json`, ...) are never read as data;
- anything else is taken as a Hugging Face hub dataset id, loaded through `datasets.load_dataset` (which also
  reads its local cache when there is no network).
"""

from __future__ import annotations

import csv
import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dpokit.data import BadRow
from dpokit.errors import UserError

log = logging.getLogger(__name__)

Row = tuple[str, "dict[str, Any] | BadRow"]

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow")
# what `datasets` writes beside the data (save_to_disk, the hub's older layout): metadata, never rows
DATASETS_METADATA = ("dataset_info.json", "dataset_infos.json", "state.json", "dataset_dict.json")
KNOWN_SPLITS = ("train", "test", "validation", "valid", "val", "dev", "eval")
REJECTED_SUFFIX = ".rejected.jsonl"  # our own side files of bad rows, never read back as data
PARQUET_BATCH_ROWS = 256
ARROW_BATCH_ROWS = 256

# Kinds of bad rows that the source itself finds (formats add theirs).
INVALID_JSON = "invalid JSON"
UNDECODABLE = "undecodable bytes"
NOT_AN_OBJECT = "wrong type"
WRONG_FIELD_COUNT = "wrong number of fields"


def iter_rows(source: str, split: str = "train", data_config: str | None = None) -> Iterator[Row]:
    """Rows of a local file, a folder of files, or a hub dataset; `split` and `data_config` pick a part of it."""
    path = Path(source).expanduser()
    if path.is_dir() and is_saved_dataset(path):
        yield from _iter_saved(path, split)
    elif path.is_dir():
        for file in folder_files(path, split):
            yield from _iter_file(file)
    elif path.exists():
        yield from _iter_file(path)
    elif _looks_local(source):
        raise UserError(f"data file {source} does not exist")
    else:
        yield from _iter_hub(source, split, data_config)


def _looks_local(source: str) -> bool:
    """A path the user meant as a file: it has a data suffix, starts like a path, or has more than owner/name."""
    return (
        Path(source).suffix.lower() in FILE_SUFFIXES
        or source.startswith((".", "/", "~"))
        or source.count("/") > 1
        or "\\" in source
    )


def _iter_file(path: Path) -> Iterator[Row]:
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise UserError(
            f"data file {path}: unknown file type `{suffix or '(none)'}`; use .jsonl, .json, .csv, .parquet or .arrow"
        )
    if path.name in DATASETS_METADATA:
        raise UserError(f"data file {path} is `datasets` metadata, not rows; give the folder {path.parent} instead")
    readers = {
        ".jsonl": _iter_jsonl,
        ".json": _iter_json,
        ".csv": _iter_csv,
        ".parquet": _iter_parquet,
        ".arrow": _iter_arrow,
    }
    count = 0
    for item in readers[suffix](path):
        count += 1
        yield item
    if count == 0:
        raise UserError(f"data file {path} is empty: it holds no rows")


# --- folders ----------------------------------------------------------------------------------------------------------


def folder_files(folder: Path, split: str) -> list[Path]:
    """The data files of `split` in `folder`, or all of its data files when none is named after a split."""
    candidates = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in FILE_SUFFIXES
        and not p.name.endswith(REJECTED_SUFFIX)
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    files = [p for p in candidates if p.name not in DATASETS_METADATA]
    if not files:
        raise UserError(f"data folder {folder} holds no .jsonl, .json, .csv, .parquet or .arrow files")
    chosen = _split_files(folder, files, split)
    metadata = [p for p in candidates if p.name in DATASETS_METADATA]
    if metadata:  # a folder mixing data with `datasets` metadata: say what was read, so nothing is a guess
        log.warning(
            "%s: read %s as data; left out `datasets` metadata %s",
            folder,
            ", ".join(str(f.relative_to(folder)) for f in chosen),
            ", ".join(str(f.relative_to(folder)) for f in metadata),
        )
    return chosen


def _split_files(folder: Path, files: list[Path], split: str) -> list[Path]:
    labels = {file: split_of(file, folder, split) for file in files}
    if all(label is None for label in labels.values()):
        return files
    wanted = split.lower()
    chosen = [f for f, label in labels.items() if label == wanted]
    if not chosen:  # `train` also finds train_data.jsonl, if no other train_* name competes
        chosen = [f for f, label in labels.items() if label is not None and label.split("_")[0] == wanted]
        names = sorted({labels[f] for f in chosen})
        if len(names) > 1:
            raise UserError(f"data folder {folder}: splits {', '.join(names)} all match split `{split}`; pick one")
    if wanted == "train":  # files that name no split go with train
        chosen = sorted(chosen + [f for f, label in labels.items() if label is None])
    if not chosen:
        found = ", ".join(sorted({label for label in labels.values() if label is not None}))
        raise UserError(f"data folder {folder} has files for splits {found} but none for split `{split}`; pick one")
    log.info("%s: reading split %s from %s", folder, split, ", ".join(str(f.relative_to(folder)) for f in chosen))
    return chosen


def split_of(file: Path, folder: Path, requested: str) -> str | None:
    """The split a file's name (or its first subfolder) names, or None.

    A name counts as a split when it is a usual one (train, test, validation, ...), one of those followed by
    `_` (train_prefs, test_data), or the requested split. It sits first or last in the file name, between `-`
    and `.` (train.jsonl, test-00000-of-00001.parquet, pairs.test.jsonl), or names the first subfolder, or the
    split folder of a saved `DatasetDict` (`saved/test/data-00000-of-00001.arrow`).
    """
    tokens = re.split(r"[-.]", file.stem.lower())
    candidates = [tokens[0], tokens[-1]]
    relative = file.relative_to(folder)
    if len(relative.parts) > 1:
        candidates.append(relative.parts[0].lower())
    if file.parent != folder and (file.parent / "state.json").is_file():  # a split folder of a saved DatasetDict
        candidates.append(file.parent.name.lower())
    for name in candidates:
        if name == requested.lower() or name in KNOWN_SPLITS or name.split("_")[0] in KNOWN_SPLITS:
            return name
    return None


# --- file readers -----------------------------------------------------------------------------------------------------


def _iter_jsonl(path: Path) -> Iterator[Row]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            origin = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield origin, BadRow(origin, f"undecodable bytes (not UTF-8) at byte {e.start}", None, UNDECODABLE)
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                reason = f"invalid JSON ({e.msg} at column {e.colno})"
                yield origin, BadRow(origin, reason, line.rstrip("\n"), INVALID_JSON)
                continue
            yield origin, _as_row(origin, row)


def _iter_json(path: Path) -> Iterator[Row]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise UserError(f"data file {path}: undecodable bytes (not UTF-8) at byte {e.start}") from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and e.lineno > 1:  # JSON Lines saved as .json, as many tools do
            yield from _iter_jsonl(path)
            return
        if not e.doc.strip():
            raise UserError(f"data file {path} is empty: it holds no rows") from None
        raise UserError(f"data file {path}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} / {"train": [...]}
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise UserError(f"data file {path}: expected a JSON list of rows, got {type(data).__name__}")
    for number, row in enumerate(data, start=1):
        origin = f"{path}:{number}"
        yield origin, _as_row(origin, row)


def _as_row(origin: str, row: Any) -> dict[str, Any] | BadRow:
    if not isinstance(row, dict):
        return BadRow(origin, f"expected a JSON object, got {type(row).__name__}", row, NOT_AN_OBJECT)
    return row


def _iter_csv(path: Path) -> Iterator[Row]:
    """CSV rows; cells holding JSON lists or objects (message lists, score lists) are decoded."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long responses exceed the default 128 KiB cell limit
    # surrogateescape keeps undecodable bytes as lone surrogates, so one bad row does not end the file
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                return
            for number, cells in enumerate(reader, start=1):
                origin = f"{path}:{number}"
                if not cells:
                    continue
                yield origin, _csv_row(origin, header, cells)
        except csv.Error as e:
            raise UserError(f"data file {path}: not readable as CSV near line {reader.line_num} ({e})") from None


def _csv_row(origin: str, header: list[str], cells: list[str]) -> dict[str, Any] | BadRow:
    raw = dict(zip(header, cells, strict=False))
    if len(cells) != len(header):
        reason = f"row has {len(cells)} fields, the header has {len(header)}"
        return BadRow(origin, reason, _printable(raw), WRONG_FIELD_COUNT)
    for column, cell in raw.items():
        bad = next((i for i, ch in enumerate(cell) if "\udc80" <= ch <= "\udcff"), None)
        if bad is not None:
            reason = f"undecodable bytes (not UTF-8) in column {column!r} at character {bad}"
            return BadRow(origin, reason, _printable(raw), UNDECODABLE)
    return {column: decode_cell(cell) for column, cell in raw.items()}


def _printable(raw: dict[str, str]) -> dict[str, str]:
    return {k: v.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for k, v in raw.items()}


def decode_cell(cell: str) -> Any:
    """A cell that holds a JSON list or object becomes that value; any other cell stays text."""
    text = cell.strip()
    if text[:1] in ("[", "{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return cell
    return cell


def _iter_parquet(path: Path) -> Iterator[Row]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise UserError(f"data file {path} is not a readable Parquet file ({str(e).splitlines()[0]})") from None
    number = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for row in batch.to_pylist():
            number += 1
            yield f"{path}:{number}", row


def _iter_arrow(path: Path) -> Iterator[Row]:
    """An Arrow file: the streaming format `datasets` writes (`data-00000-of-00001.arrow`) or the random-access
    file format (Feather v2), memory-mapped and read batch by batch."""
    import pyarrow

    try:
        source = pyarrow.memory_map(str(path))
        try:
            batches: Any = pyarrow.ipc.open_stream(source)
        except pyarrow.ArrowInvalid:
            reader = pyarrow.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except (pyarrow.ArrowException, OSError) as e:
        raise UserError(f"data file {path} is not a readable Arrow file ({str(e).splitlines()[0]})") from None
    number = 0
    for batch in batches:
        for start in range(0, batch.num_rows, ARROW_BATCH_ROWS):
            for row in batch.slice(start, ARROW_BATCH_ROWS).to_pylist():
                number += 1
                yield f"{path}:{number}", row


# --- folders written by `datasets` ------------------------------------------------------------------------------------


def is_saved_dataset(folder: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` (state.json) or `DatasetDict.save_to_disk` (dataset_dict.json)."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def _iter_saved(folder: Path, split: str) -> Iterator[Row]:
    """Rows of a `save_to_disk` folder, memory-mapped by `datasets`; a `DatasetDict` gives the split asked for
    (a saved `Dataset` is one split, and is read whatever the split, as a file is)."""
    import datasets

    try:
        saved = datasets.load_from_disk(str(folder))
    except (OSError, ValueError, KeyError, datasets.exceptions.DatasetsError) as e:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"data folder {folder} looks saved by `datasets` but cannot be loaded ({reason})") from None
    where = str(folder)
    if isinstance(saved, datasets.DatasetDict):
        name = pick_split(list(saved), split, f"saved dataset {folder}")
        log.info("%s: reading split %s", folder, name)
        saved, where = saved[name], f"{folder}[{name}]"
    if len(saved) == 0:
        raise UserError(f"data {where} is empty: it holds no rows")
    saved = saved.with_format(None)  # plain Python values, whatever format (torch, numpy) it was saved with
    number = 0
    # batches of columns, turned into rows here: several times faster than iterating the dataset row by row
    for batch in saved.iter(batch_size=ARROW_BATCH_ROWS):
        columns = list(batch)
        for values in zip(*batch.values(), strict=True):
            number += 1
            yield f"{where}:{number}", dict(zip(columns, values, strict=True))


def pick_split(available: list[str], split: str, what: str) -> str:
    """The split named `split`, else the one split that starts with `split_` (`test` finds `test_prefs`)."""
    if split in available:
        return split
    prefixed = [name for name in available if name.split("_")[0] == split]
    if len(prefixed) == 1:
        return prefixed[0]
    if prefixed:
        raise UserError(f"{what}: splits {', '.join(prefixed)} all match split `{split}`; pick one")
    raise UserError(
        f"{what} has splits {', '.join(available)} but none named `{split}`; set train_split / eval_split "
        "(--split for the commands) to one of them"
    )


# --- the hub ----------------------------------------------------------------------------------------------------------


def _iter_hub(dataset_id: str, split: str, data_config: str | None) -> Iterator[Row]:
    """Rows of a hub dataset split, memory-mapped by `datasets` (from its cache when offline)."""
    import datasets

    try:
        dataset = datasets.load_dataset(dataset_id, data_config, split=split)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(
            f"data `{dataset_id}` is not a local file or folder, and the hub could not provide it ({reason}); "
            "check the path, or the dataset id, config and split"
        ) from None
    where = f"{dataset_id}[{split}]"
    for number, row in enumerate(dataset, start=1):
        yield f"{where}:{number}", row
