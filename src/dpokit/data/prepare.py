"""`dpokit data prepare`: any supported layout in, clean conversational train/test triplets out.

Every pair becomes a conversational triplet (a standard text pair becomes a user turn and assistant turns).
With --model, --chat-template or --system-message, each triplet is also rendered with that chat template: system
turns are merged or dropped as asked, and triplets the template refuses are left out as bad rows.
Exact duplicates and pairs whose chosen equals rejected are removed, over-long pairs too when a limit is given,
and a test split is held out whole prompts at a time, so no prompt is in both files. The training triplets go to
OUT.jsonl, the test ones to OUT.test.jsonl beside it, and one line accounts for every row read. Files that exist
already are replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from dpokit.config import DPOConfig
from dpokit.data import Pair
from dpokit.data.encode import apply_length_policy, encode_loaded, encode_pairs
from dpokit.data.inspection import tokenizer_of
from dpokit.data.load import load_pairs, options_of
from dpokit.data.markers import marker_warning
from dpokit.data.rows import KEPT_AS_GIVEN as KEPT
from dpokit.data.rows import to_conversational
from dpokit.errors import UserError
from dpokit.settings import DEFAULTS, Settings, resolve

DUPLICATE = "duplicate pairs"
IDENTICAL = "identical chosen and rejected"


def run(args: argparse.Namespace) -> int:
    view = resolve("data prepare", args, None)
    cfg = view.config
    train_path, test_path = output_paths(args.output, args.data, args.overwrite)
    _check_arguments(args, cfg)
    loaded = load_pairs(
        args.data,
        split=cfg.train_split,
        data_config=cfg.train_data_config,
        data_format=cfg.data_format,
        options=options_of(cfg),
        max_bad_rows=cfg.max_bad_rows,
        rejected_dir=train_path.parent,
    )
    removed: Counter[str] = Counter()
    pairs = deduplicate([to_conversational(pair) for pair in loaded.pairs], removed)
    if checks_template(view):
        loaded, _ = encode_loaded(
            tokenizer_of(cfg)[0],
            dataclasses.replace(loaded, pairs=pairs),
            system_message=cfg.system_message,
            max_bad_rows=cfg.max_bad_rows,
            rejected_dir=train_path.parent,
            merge_setting="--system-message merge",
        )
        pairs = loaded.pairs
    if cfg.max_length is not None or args.filter_percentile is not None:
        pairs = filter_lengths(pairs, cfg, args.filter_percentile, removed)
    train, test = split_by_prompt(pairs, args.test_size, args.split_seed)
    write_jsonl(train_path, train)
    if test:
        write_jsonl(test_path, test)
    else:
        test_path.unlink(missing_ok=True)  # an earlier split beside the new training file would pose as its test set
    fmt = f"{loaded.format}, detected from {loaded.evidence}" if loaded.detected else loaded.format
    print(_account(loaded.source, fmt, loaded.rows, train_path, len(train), test_path, len(test)))
    print("  left out: " + _left_out(loaded.bad_rows, loaded.rejected_file, loaded.counts, removed))
    for reason, count in loaded.counts.items():
        if reason.startswith(KEPT):
            print(f"  {KEPT}: {count} ({reason.removeprefix(KEPT + ': ')}; listed in {loaded.rejected_file})")
        elif not reason.startswith("dropped"):
            print(f"  kept after a change: {count} ({reason})")
    warning = marker_warning(loaded.pairs)
    if warning:
        print(f"  warning: {warning}")
    return 0


def output_paths(output: str, source: str, overwrite: bool = False) -> tuple[Path, Path]:
    """OUT.jsonl for training and OUT.test.jsonl beside it; never the source itself, and files that exist already
    (an earlier preparation, or anything else) only with `overwrite`."""
    train_path = Path(output).expanduser()
    if train_path.suffix.lower() != ".jsonl":
        raise UserError(f"--output {output}: give a .jsonl file name (the test split goes beside it as .test.jsonl)")
    if train_path.is_dir():
        raise UserError(f"--output {output} is a folder; give a .jsonl file name")
    if Path(source).exists() and train_path.resolve() == Path(source).resolve():
        raise UserError(f"--output {output} is the input file; write the prepared data somewhere else")
    test_path = train_path.with_name(train_path.stem + ".test.jsonl")
    existing = [str(path) for path in (train_path, test_path) if path.exists()]
    if existing and not overwrite:
        what = " and ".join(existing) + (" exist" if len(existing) > 1 else " exists")
        raise UserError(f"--output: {what} already; add --overwrite to replace, or choose another --output")
    return train_path, test_path


def checks_template(view: Settings) -> bool:
    """Whether the triplets are rendered with a chat template before writing: when a model or a template is named
    (by a flag or --config), or system turns are merged or dropped, so rows it refuses are bad rows here rather
    than at training."""
    named = any(view.sources[key] != DEFAULTS for key in ("model_name_or_path", "chat_template"))
    return named or view.config.system_message != "keep"


def _check_arguments(args: argparse.Namespace, cfg: DPOConfig) -> None:
    if args.test_size < 0 or (args.test_size >= 1 and not float(args.test_size).is_integer()):
        raise UserError(f"--test-size {args.test_size:g}: give a share in [0, 1) or a whole number of pairs")
    if cfg.max_length is not None and args.filter_percentile is not None:
        raise UserError("--filter-percentile: give it or a max_length (--max-length, --config), not both")
    if args.filter_percentile is not None and not 0 < args.filter_percentile <= 100:
        raise UserError(f"--filter-percentile {args.filter_percentile:g}: must be in (0, 100]")


def deduplicate(pairs: Sequence[Pair], removed: Counter[str]) -> list[Pair]:
    """The pairs without exact repeats (the first is kept) and without pairs whose chosen equals rejected."""
    seen: set[str] = set()
    kept = []
    for pair in pairs:
        if pair.chosen == pair.rejected:
            removed[IDENTICAL] += 1
            continue
        key = json.dumps(pair.to_dict(), sort_keys=True, ensure_ascii=False)
        if key in seen:
            removed[DUPLICATE] += 1
            continue
        seen.add(key)
        kept.append(pair)
    return kept


def filter_lengths(pairs: list[Pair], cfg: DPOConfig, percentile: float | None, removed: Counter[str]) -> list[Pair]:
    """Drop pairs whose prompt + longer response is over `max_length` tokens, or over the `percentile`
    (`--filter-percentile`) of those lengths, counted with the model's tokenizer exactly as training counts them."""
    import numpy as np

    tokenizer, _ = tokenizer_of(cfg)
    encoded = encode_pairs(tokenizer, pairs)
    if cfg.max_length is not None:
        limit, why = cfg.max_length, f"over {cfg.max_length} tokens"
    else:
        totals = [len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) for e in encoded]
        # lengths are whole tokens: at or below the percentile means at or below its floor
        limit = math.floor(float(np.percentile(totals, percentile)))
        why = f"over the {percentile:g}th length percentile ({limit} tokens)"
    kept = apply_length_policy(
        encoded, [str(i) for i in range(len(pairs))], max_length=limit, max_prompt_length=None, length_policy="drop"
    )
    dropped = sum(kept.counts.values())
    if dropped:
        removed[why] += dropped
    return [pairs[int(i)] for i in kept.origins]


def split_by_prompt(pairs: list[Pair], test_size: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, test): whole prompt groups, in shuffled order, go to test until it holds its share (a fraction below
    1) or count of pairs; both keep the input order."""
    if not pairs:
        raise UserError("no pairs left to write after removing duplicates and over-long pairs")
    target = math.ceil(len(pairs) * test_size) if test_size < 1 else int(test_size)
    if target == 0:
        return pairs, []
    if target >= len(pairs):
        raise UserError(f"--test-size {test_size:g} leaves no training pairs out of {len(pairs)}; give a smaller one")
    groups: dict[str, list[int]] = {}
    for i, pair in enumerate(pairs):
        groups.setdefault(json.dumps(pair.prompt, sort_keys=True, ensure_ascii=False), []).append(i)
    order = list(groups)
    random.Random(seed).shuffle(order)
    test: set[int] = set()
    for key in order:
        if len(test) >= target:
            break
        if len(test) + len(groups[key]) < len(pairs):  # training keeps at least one prompt
            test.update(groups[key])
    if not test:
        raise UserError("every pair has the same prompt, so no test split can keep prompts apart; use --test-size 0")
    return [p for i, p in enumerate(pairs) if i not in test], [p for i, p in enumerate(pairs) if i in test]


def write_jsonl(path: Path, pairs: Sequence[Pair]) -> None:
    """One `{prompt, chosen, rejected}` object a line, written whole or not at all."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for pair in pairs:
                f.write(json.dumps(pair.to_dict(), ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror}); give a writable --output") from None


def _account(source: str, fmt: str, rows: int, train_path: Path, train: int, test_path: Path, test: int) -> str:
    test_part = f", {test} to {test_path} (test)" if test else ", no test split"
    return f"{source}: {rows} rows (format {fmt}): {train} pairs to {train_path} (train){test_part}"


def _left_out(
    bad_rows: Sequence[object], rejected_file: str | None, counts: dict[str, int], removed: Counter[str]
) -> str:
    parts = []
    if bad_rows:
        parts.append(f"{len(bad_rows)} bad rows (reasons in {rejected_file})")
    parts += [f"{n} {reason.removeprefix('dropped: ')}" for reason, n in counts.items() if reason.startswith("dropped")]
    parts += [f"{n} {reason}" for reason, n in removed.items()]
    return ", ".join(parts) or "nothing"
