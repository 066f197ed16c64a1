"""`dpokit data inspect` and `dpokit data formats`: what preference data looks like before compute is spent on it.

The statistics are token lengths under the model's tokenizer (counted by `encode_pairs`, so they match training
exactly), what `max_length` / `max_prompt_length` would cut (through `apply_length_policy`, as training does),
and quality warnings. Pairs are read and tokenized in chunks and only a few numbers per pair are kept, so a
file larger than memory can be inspected.

`dataset_stats` gives the same dictionary for pairs already loaded and encoded, for `dpokit train` to save as
`data_stats.json` and for the report to show.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from dpokit.config import DPOConfig
from dpokit.data import BadRow, LoadedPairs, Pair
from dpokit.data.encode import EncodedPair, PairEncoding, apply_length_policy, encode_checked
from dpokit.data.formats import FORMATS
from dpokit.data.markers import KNOWN_MARKERS, MarkerCount, template_markers
from dpokit.data.rows import EMPTY_RESPONSE
from dpokit.errors import UserError
from dpokit.settings import resolve

PERCENTILES = (50, 90, 95, 99)
CHUNK_PAIRS = 512
LENGTH_BIAS_WARNING = 0.6  # share of pairs with the longer response chosen (or rejected) that earns a warning
PARTS = ("prompt", "chosen", "rejected", "total")  # total: prompt + the longer response, what max_length limits


class PairLengths:
    """Per-pair numbers of a stream of pairs: token lengths, a content hash, and what the length limits would do."""

    def __init__(
        self,
        max_length: int | None,
        max_prompt_length: int | None,
        truncation_mode: str = "keep_start",
        length_policy: str = "truncate",
        markers: tuple[str, ...] = KNOWN_MARKERS,
    ) -> None:
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.truncation_mode = truncation_mode
        self.length_policy = length_policy
        # compact arrays rather than lists of ints: a million pairs take a few megabytes
        self.lengths = {part: array("q") for part in PARTS}
        self.hashes = array("Q")
        self.identical = 0
        self.conversational = 0
        self.limit_counts: Counter[str] = Counter()
        self.rows_over_limits = 0
        self.templated = MarkerCount(markers)  # prompts already rendered with a chat template

    def add(self, pairs: Sequence[Pair], encoded: Sequence[EncodedPair]) -> None:
        for pair, ids in zip(pairs, encoded, strict=True):
            prompt, chosen, rejected = len(ids.prompt_ids), len(ids.chosen_ids), len(ids.rejected_ids)
            for part, n in zip(PARTS, (prompt, chosen, rejected, prompt + max(chosen, rejected)), strict=True):
                self.lengths[part].append(n)
            self.hashes.append(_content_hash(pair))
            self.identical += pair.chosen == pair.rejected
            self.conversational += pair.conversational
        self.templated.add(pairs)
        origins = [pair.origin for pair in pairs]
        limits = {"max_length": self.max_length, "max_prompt_length": self.max_prompt_length}
        policy = {"truncation_mode": self.truncation_mode, "length_policy": self.length_policy}
        self.limit_counts.update(apply_length_policy(encoded, origins, **limits, **policy).counts)
        # the drop policy drops every pair that any limit would touch: the number of rows cut, each counted once
        untouched = apply_length_policy(encoded, origins, **limits, length_policy="drop")
        self.rows_over_limits += len(encoded) - len(untouched)

    def __len__(self) -> int:
        return len(self.hashes)


def _content_hash(pair: Pair) -> int:
    text = json.dumps(pair.to_dict(), sort_keys=True, ensure_ascii=False)
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def summarize(
    lengths: PairLengths,
    *,
    source: str,
    data_format: str,
    detected: bool,
    rows: int,
    bad_rows: Sequence[BadRow],
    counts: dict[str, int],
    rejected_file: str | None,
    tokenizer_name: str,
    notes: Sequence[BadRow] = (),
    evidence: str = "",
) -> dict[str, Any]:
    """The statistics dictionary (see `dataset_stats` for its shape)."""
    import numpy as np

    n = len(lengths)
    columns = {part: np.frombuffer(lengths.lengths[part], dtype=np.int64) for part in PARTS}
    tokens = {part: _distribution(values) for part, values in columns.items()}
    chosen_longer = int((columns["chosen"] > columns["rejected"]).sum())
    rejected_longer = int((columns["chosen"] < columns["rejected"]).sum())
    quality = {
        "identical_pairs": lengths.identical,
        "empty_responses": sum(row.kind == EMPTY_RESPONSE for row in notes),  # kept as given, listed in the side file
        "templated_prompts": lengths.templated.marked,
        "duplicate_pairs": n - len(np.unique(np.frombuffer(lengths.hashes, dtype=np.uint64))),
        "chosen_longer": chosen_longer,
        "rejected_longer": rejected_longer,
        "chosen_longer_share": round(chosen_longer / n, 4) if n else None,
    }
    limits = {
        "max_length": lengths.max_length,
        "max_prompt_length": lengths.max_prompt_length,
        "truncation_mode": lengths.truncation_mode,
        "length_policy": lengths.length_policy,
        "rows_over_limits": lengths.rows_over_limits,
        "effects": dict(sorted(lengths.limit_counts.items())),
    }
    stats = {
        "source": source,
        "format": data_format,
        "format_detected": detected,
        "format_evidence": evidence,
        "tokenizer": tokenizer_name,
        "rows": rows,
        "pairs": n,
        "conversational_pairs": lengths.conversational,
        "bad_rows": len(bad_rows),
        "bad_row_kinds": dict(Counter(row.kind or "other" for row in bad_rows).most_common()),
        "rejected_file": rejected_file,
        "counts": dict(sorted(counts.items())),
        "tokens": tokens,
        "length_limits": limits,
        "quality": quality,
    }
    stats["warnings"] = _warnings(stats)
    templated = lengths.templated.warning()
    if templated:
        stats["warnings"].append(templated)
    return stats


def _distribution(values: Any) -> dict[str, float | int | None]:
    import numpy as np

    if len(values) == 0:
        return {**{f"p{p}": None for p in PERCENTILES}, "max": None, "mean": None}
    percentiles = np.percentile(values, PERCENTILES)  # linear interpolation, numpy's default
    return {
        **{f"p{p}": round(float(v), 1) for p, v in zip(PERCENTILES, percentiles, strict=True)},
        "max": int(values.max()),
        "mean": round(float(values.mean()), 1),
    }


def _warnings(stats: dict[str, Any]) -> list[str]:
    quality, limits, n = stats["quality"], stats["length_limits"], stats["pairs"]
    warnings = []
    if stats["bad_rows"]:
        warnings.append(f"{_count(stats['bad_rows'], 'bad row')} left out; reasons in {stats['rejected_file']}")
    if quality["identical_pairs"]:
        identical = _count(quality["identical_pairs"], "pair")
        warnings.append(f"{identical} with identical chosen and rejected: nothing to learn from them")
    if quality["empty_responses"]:
        empty = _count(quality["empty_responses"], "pair")
        warnings.append(
            f"{empty} with an empty chosen or rejected response, kept as given (TRL trains on them too); listed in "
            f"{stats['rejected_file']}"
        )
    if quality["duplicate_pairs"]:
        duplicates = _count(quality["duplicate_pairs"], "pair")
        warnings.append(f"{duplicates} repeating an earlier pair; `dpokit data prepare` removes them")
    for side, other, count in (("chosen", "rejected", "chosen_longer"), ("rejected", "chosen", "rejected_longer")):
        share = quality[count] / n if n else 0.0
        if share >= LENGTH_BIAS_WARNING:
            warnings.append(
                f"length bias: the {side} response is longer than the {other} in {share:.0%} of pairs; DPO may "
                f"learn to make answers {'longer' if side == 'chosen' else 'shorter'} instead of better"
            )
    if limits["rows_over_limits"]:
        effects = ", ".join(f"{reason} {count}" for reason, count in limits["effects"].items())
        warnings.append(
            f"{_count(limits['rows_over_limits'], 'pair')} over max_length={limits['max_length']} / max_prompt_length="
            f"{limits['max_prompt_length']} ({effects})"
        )
    return warnings


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def chunks(pairs: Iterable[Pair], size: int) -> Iterator[list[Pair]]:
    iterator = iter(pairs)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def dataset_stats(
    loaded: LoadedPairs,
    encoded: Sequence[EncodedPair],
    *,
    max_length: int | None,
    max_prompt_length: int | None,
    truncation_mode: str = "keep_start",
    length_policy: str = "truncate",
    tokenizer_name: str = "",
    markers: tuple[str, ...] = KNOWN_MARKERS,
) -> dict[str, Any]:
    """Statistics of loaded pairs and their token ids (`encode_pairs(tokenizer, loaded.pairs)`, before the length
    policy), as `dpokit data inspect --json` prints them. A JSON-ready dict:

    - `source`, `format`, `format_detected`, `format_evidence` (the columns detection went by), `tokenizer`: what
      was read and how;
    - `rows`, `pairs`, `conversational_pairs`, `bad_rows`, `bad_row_kinds` ({kind: n}), `rejected_file`,
      `counts` (rows dropped or trimmed by the format, {reason: n});
    - `tokens`: for `prompt`, `chosen`, `rejected` and `total` (prompt + longer response), `p50`, `p90`, `p95`,
      `p99` (linear interpolation), `max` and `mean`;
    - `length_limits`: `max_length`, `max_prompt_length`, `truncation_mode`, `length_policy`, `rows_over_limits`
      (pairs any limit touches), `effects` (`apply_length_policy` counts: {"prompts truncated": n, ...});
    - `quality`: `identical_pairs`, `empty_responses` (kept as given), `templated_prompts` (prompts holding chat
      template markers, see `dpokit.data.markers`), `duplicate_pairs`, `chosen_longer`, `rejected_longer`,
      `chosen_longer_share`;
    - `warnings`: the sentences inspect prints.
    """
    lengths = PairLengths(max_length, max_prompt_length, truncation_mode, length_policy, markers)
    for start in range(0, len(loaded.pairs), CHUNK_PAIRS):
        lengths.add(loaded.pairs[start : start + CHUNK_PAIRS], encoded[start : start + CHUNK_PAIRS])
    return summarize(
        lengths,
        source=loaded.source,
        data_format=loaded.format,
        detected=loaded.detected,
        rows=loaded.rows or len(loaded.pairs) + len(loaded.bad_rows) + sum(loaded.counts.values()),
        bad_rows=loaded.bad_rows,
        counts=loaded.counts,
        rejected_file=loaded.rejected_file,
        tokenizer_name=tokenizer_name,
        notes=loaded.notes,
        evidence=loaded.evidence,
    )


# --- the command ------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """`dpokit data inspect DATA`: print the statistics (or JSON), write the plot; exit 2 on too many bad rows."""
    from dpokit.data.chat_template import bad_rows_error
    from dpokit.data.load import PairReader, options_of, write_rejected

    view = resolve("data inspect", args, None)
    cfg = view.config
    reader = PairReader(
        args.data,
        split=cfg.train_split,
        data_config=cfg.train_data_config,
        data_format=cfg.data_format,
        options=options_of(cfg),
    )
    pair_chunks = chunks(reader, CHUNK_PAIRS)
    first = next(pair_chunks, [])  # a missing or unreadable source fails here, before the tokenizer loads
    tokenizer, tokenizer_name = tokenizer_of(cfg)
    limits = (cfg.max_length, cfg.max_prompt_length, cfg.truncation_mode, cfg.length_policy)
    lengths = PairLengths(*limits, markers=template_markers(tokenizer))
    encoding = PairEncoding()  # what the chat template refused or changed, summed over the chunks
    for chunk in itertools.chain([first], pair_chunks):
        chunk_encoding = encode_checked(tokenizer, chunk, system_message=cfg.system_message)
        lengths.add(chunk_encoding.pairs, chunk_encoding.encoded)
        encoding.add(chunk_encoding)
    bad_rows = reader.bad_rows + encoding.refused
    side = bad_rows + reader.notes
    rejected_file = str(write_rejected(side, args.data, None)) if side else None
    stats = summarize(
        lengths,
        source=args.data,
        data_format=reader.format or "unknown",
        detected=reader.detected,
        rows=reader.rows,
        bad_rows=bad_rows,
        counts=dict(reader.counts + Counter(encoding.counts)),
        rejected_file=rejected_file,
        tokenizer_name=tokenizer_name,
        notes=reader.notes,
        evidence=reader.evidence,
    )
    stats["warnings"] += encoding.warnings()
    if args.json:
        print(json.dumps(stats, indent=2, ensure_ascii=False))
    else:
        print_stats(stats, bad_rows)
    if args.plot:
        write_plot(lengths, args.plot, stats)
    total = encoding.total + len(encoding.refused)
    merge = "--system-message merge"
    error = bad_rows_error(encoding.refused, bad_rows, total, args.data, rejected_file, cfg.max_bad_rows, merge)
    if error:
        raise error
    if not stats["pairs"]:
        raise UserError(f"{args.data}: no usable pairs in {stats['rows']} rows")
    return 0


def print_stats(stats: dict[str, Any], bad_rows: Sequence[BadRow], shown_bad_rows: int = 5) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    how = f"detected from {stats['format_evidence']}" if stats["format_detected"] else "given"
    overview = Table(title=f"[bold]{stats['source']}[/]", show_header=False, title_justify="left")
    overview.add_row("format", f"{stats['format']} ({how})")
    overview.add_row("rows", str(stats["rows"]))
    overview.add_row("pairs", f"{stats['pairs']} ({stats['conversational_pairs']} conversational)")
    kinds = ", ".join(f"{kind} {n}" for kind, n in stats["bad_row_kinds"].items())
    overview.add_row("bad rows", f"{stats['bad_rows']} ({kinds})" if kinds else "0")
    for reason, count in stats["counts"].items():
        overview.add_row(reason, str(count))
    console.print(overview)

    lengths = Table(title=f"token lengths ({stats['tokenizer']})", title_justify="left")
    lengths.add_column("")
    for key in [f"p{p}" for p in PERCENTILES] + ["max", "mean"]:
        lengths.add_column(key, justify="right")
    names = {"total": "prompt + longer response"}
    for part, values in stats["tokens"].items():
        lengths.add_row(names.get(part, part), *("-" if v is None else f"{v:g}" for v in values.values()))
    console.print(lengths)

    limits, quality = stats["length_limits"], stats["quality"]
    checks = Table(show_header=False, title="length limits and quality", title_justify="left")
    checks.add_row(
        f"over max_length={limits['max_length']} / max_prompt_length={limits['max_prompt_length']}",
        f"{limits['rows_over_limits']} pairs",
    )
    for reason, count in limits["effects"].items():
        checks.add_row(f"  {reason}", str(count))
    checks.add_row("identical chosen and rejected", str(quality["identical_pairs"]))
    checks.add_row("empty responses (kept as given)", str(quality["empty_responses"]))
    checks.add_row("prompts holding chat-template markers", str(quality["templated_prompts"]))
    checks.add_row("duplicate pairs", str(quality["duplicate_pairs"]))
    share = quality["chosen_longer_share"]
    checks.add_row("chosen longer than rejected", "-" if share is None else f"{share:.1%}")
    console.print(checks)

    for origin, reason in [(row.origin, row.reason) for row in bad_rows[:shown_bad_rows]]:
        console.print(f"[red]bad row[/] {origin}: {reason}", highlight=False, soft_wrap=True)
    if len(bad_rows) > shown_bad_rows:
        console.print(f"... and {len(bad_rows) - shown_bad_rows} more in {stats['rejected_file']}", soft_wrap=True)
    for warning in stats["warnings"]:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)


def write_plot(lengths: PairLengths, path: str, stats: dict[str, Any]) -> None:
    """Length histograms: prompt, chosen against rejected, prompt + longer response against max_length, and the
    chosen - rejected difference (length bias shows as mass right of zero)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    column = {part: np.frombuffer(lengths.lengths[part], dtype=np.int64) for part in PARTS}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    axes[0, 0].hist(column["prompt"], bins=50, color="tab:gray")
    axes[0, 0].set_title("prompt")
    if lengths.max_prompt_length:
        axes[0, 0].axvline(lengths.max_prompt_length, color="tab:red", linestyle="--", label="max_prompt_length")
        axes[0, 0].legend()
    bins = np.histogram_bin_edges(np.concatenate([column["chosen"], column["rejected"]]), bins=50)
    for side in ("chosen", "rejected"):
        axes[0, 1].hist(column[side], bins=bins, histtype="step", linewidth=1.5, label=side)
    axes[0, 1].set_title("responses")
    axes[0, 1].legend()
    axes[1, 0].hist(column["total"], bins=50, color="tab:purple")
    axes[1, 0].set_title("prompt + longer response")
    if lengths.max_length:
        axes[1, 0].axvline(lengths.max_length, color="tab:red", linestyle="--", label="max_length")
        axes[1, 0].legend()
    axes[1, 1].hist(column["chosen"] - column["rejected"], bins=50, color="tab:olive")
    axes[1, 1].axvline(0, color="black", linewidth=0.8)
    axes[1, 1].set_title("chosen - rejected")
    for ax in axes.flat:
        ax.set_xlabel("tokens")
        ax.set_ylabel("pairs")
    fig.suptitle(f"{stats['source']} ({stats['pairs']} pairs, {stats['tokenizer']})")
    fig.tight_layout()
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(target, dpi=100)
    except (OSError, ValueError) as e:
        raise UserError(f"--plot {path}: cannot write the plot ({e}); give a writable .png path") from None
    finally:
        plt.close(fig)
    print(f"wrote length histograms to {target}")


def run_formats(args: argparse.Namespace) -> int:
    """`dpokit data formats`: every layout with the columns it reads; the non-pair layouts last."""
    from rich.console import Console
    from rich.table import Table

    title = "data formats: `data_format: auto` takes the one that reads the most columns of a row (the first on a tie)"
    table = Table(title=title, title_justify="left")
    table.add_column("name", style="bold")
    table.add_column("columns")
    table.add_column("meaning", overflow="fold")
    for fmt in FORMATS.values():
        table.add_row(fmt.name, fmt.columns, fmt.description)
    console = Console()
    console.print(table)
    refused = " and ".join(f"`{fmt.name}`" for fmt in FORMATS.values() if fmt.refusal)
    console.print(f"{refused} hold no pairs: they are recognized to be refused with what to do instead.")
    return 0


# --- settings shared with `dpokit data prepare` ----------------------------------------------------------------------


def tokenizer_of(cfg: DPOConfig) -> tuple[Any, str]:
    """The tokenizer lengths are counted with, and its name."""
    from dpokit.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.chat_template, cfg.trust_remote_code)
    return tokenizer, cfg.model_name_or_path
