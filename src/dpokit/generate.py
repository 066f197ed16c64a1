"""`dpokit generate`: sample several answers per prompt, let a judge rank them, write preference pairs.

The on-policy best-of-N recipe: each prompt gets `num_samples` answers from the model; identical and empty
answers are set aside; the judge scores the distinct ones; the best becomes `chosen` and the worst (or a random
lower-scored one) `rejected`. Ties never make a pair, nor do pairs closer than `--min-margin`.

Each row is TRL's conversational layout (`prompt`, `chosen`, `rejected` as message lists, trainable by `dpokit
train` as is) plus provenance: both scores, the margin, the judge, the model and adapter, the sampling settings.
Prompts that gave no pair go to `<output stem>.skipped.jsonl` with the reason.

Crash safety: rows are appended as each batch of prompts is done, flushed and fsynced; a rerun of the same command
reads both files and skips finished prompts (by `prompt_id`: the source's id, or a hash of the prompt), so a
killed run loses at most the batch in flight. Prompts the judge could not rank are tried again on the rerun.

Under `accelerate launch`, batches of prompts are dealt out to the processes in turn; each process appends to its
own part file, and the main process merges them into the output in the prompts' order.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpokit import quantization
from dpokit.config import DPOConfig
from dpokit.data import Message
from dpokit.distributed import process_state
from dpokit.errors import UserError
from dpokit.judges import Judge, JudgeOptions, judge_options_from_args, load_judge
from dpokit.prompts import PromptItem, load_prompts
from dpokit.sampling import SamplingSettings

log = logging.getLogger(__name__)

PAIRINGS = ("best-worst", "best-random")

# why a prompt gave no pair; the summary counts each
SKIP_IDENTICAL = "fewer than 2 distinct answers"
SKIP_TIED = "all answers tied"
SKIP_MARGIN = "margin below --min-margin"
SKIP_JUDGE = "judge scored fewer than 2 answers"  # not final: a rerun tries the prompt again


@dataclass(frozen=True)
class PairingSettings:
    pairing: str = "best-worst"
    """best-worst: the best answer against the worst; best-random: against a random lower-scored one."""
    min_margin: float = 0.0
    """least score gap between chosen and rejected; equal scores never make a pair."""

    def __post_init__(self) -> None:
        if self.pairing not in PAIRINGS:
            raise UserError(f"--pairing must be one of {', '.join(PAIRINGS)}, got {self.pairing!r}")
        if not self.min_margin >= 0:
            raise UserError(f"--min-margin must be zero or positive, got {self.min_margin}")


@dataclass(frozen=True)
class Choice:
    chosen: str
    rejected: str
    score_chosen: float
    score_rejected: float

    @property
    def margin(self) -> float:
        return self.score_chosen - self.score_rejected


def select_pair(scored: Sequence[tuple[str, float]], pairing: PairingSettings, rng: random.Random) -> Choice | str:
    """The pair to write from (answer, score) candidates, or the reason there is none.

    The best is the first answer with the top score; best-worst takes the first with the lowest score, best-random
    a random one among those scoring at least `min_margin` below the best (and strictly below it).
    """
    if len(scored) < 2:
        return SKIP_IDENTICAL
    best = max(scored, key=lambda item: item[1])
    lower = [item for item in scored if item[1] < best[1]]
    if not lower:
        return SKIP_TIED
    if pairing.pairing == "best-worst":
        worst = min(lower, key=lambda item: item[1])
        candidates = [worst] if best[1] - worst[1] >= pairing.min_margin else []
    else:
        candidates = [item for item in lower if best[1] - item[1] >= pairing.min_margin]
    if not candidates:
        return SKIP_MARGIN
    rejected = candidates[0] if len(candidates) == 1 else rng.choice(candidates)
    return Choice(best[0], rejected[0], best[1], rejected[1])


@dataclass
class Summary:
    """What a run did, for the final line: every prompt is in exactly one of these counts."""

    output: str
    prompts: int = 0
    already_done: int = 0
    duplicates: int = 0
    counts: Counter[str] = field(default_factory=Counter)  # "pairs written" and the SKIP_* reasons
    judge_failures: Counter[str] = field(default_factory=Counter)
    empty_answers: int = 0
    later_turns_unused: int = 0

    @property
    def pairs_written(self) -> int:
        return self.counts["pairs written"]

    def line(self) -> str:
        failures = sum(self.judge_failures.values())
        reasons = ", ".join(f"{n} {r}" for r, n in self.judge_failures.most_common())
        parts = [
            f"{self.pairs_written} pairs written to {self.output}",
            f"{self.counts[SKIP_TIED] + self.counts[SKIP_IDENTICAL]} prompts skipped because all answers tied "
            f"({self.counts[SKIP_IDENTICAL]} with identical answers)",
            f"{self.counts[SKIP_MARGIN]} below --min-margin",
            f"{self.counts[SKIP_JUDGE]} unranked (retried on rerun)",
            f"{failures} judge failures" + (f" ({reasons})" if reasons else ""),
            f"{self.already_done} already done",
        ]
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicate prompts")
        if self.empty_answers:
            parts.append(f"{self.empty_answers} empty answers set aside")
        return "generate: " + "; ".join(parts)

    def add(self, other: Summary) -> None:
        self.counts.update(other.counts)
        self.judge_failures.update(other.judge_failures)
        self.empty_answers += other.empty_answers


# --- one batch of prompts -----------------------------------------------------------------------------------------


def distinct_answers(answers: Sequence[str]) -> tuple[list[str], int]:
    """(the distinct non-empty answers in order of first appearance, how many empty answers were set aside)."""
    seen: dict[str, None] = {}
    empty = 0
    for answer in answers:
        if not answer.strip():
            empty += 1
        else:
            seen.setdefault(answer, None)
    return list(seen), empty


def judge_batch(
    items: Sequence[PromptItem],
    answers: Sequence[Sequence[str]],
    judge: Judge,
    pairing: PairingSettings,
    seed: int,
    provenance: dict[str, Any],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Summary]:
    """Pair rows and skipped rows for a batch of prompts and their sampled answers."""
    summary = Summary(output="")
    distinct: list[list[str]] = []
    for texts in answers:
        unique, empty = distinct_answers(texts)
        distinct.append(unique)
        summary.empty_answers += empty
    to_judge = [i for i, unique in enumerate(distinct) if len(unique) >= 2]
    failures_before = Counter(judge.failure_reasons)
    scores: dict[int, list[float | None]] = {}
    if to_judge:
        judged = judge.score_batch([items[i].messages for i in to_judge], [distinct[i] for i in to_judge])
        scores = dict(zip(to_judge, judged, strict=True))
    summary.judge_failures = Counter(judge.failure_reasons) - failures_before
    rows, skipped = [], []
    for i, item in enumerate(items):
        item_scores = scores.get(i, [])
        scored = [(a, s) for a, s in zip(distinct[i], item_scores, strict=False) if s is not None]
        rng = random.Random(f"{seed}:{item.key}")  # str seeds hash stably, so a rerun picks the same partner
        if len(distinct[i]) >= 2 and len(scored) < 2:
            result: Choice | str = SKIP_JUDGE
        else:
            result = select_pair(scored, pairing, rng)
        if isinstance(result, Choice):
            rows.append(pair_row(item, result, provenance))
            summary.counts["pairs written"] += 1
        else:
            skipped.append(skipped_row(item, result, distinct[i], item_scores, provenance))
            summary.counts[result] += 1
    return rows, skipped, summary


def _assistant(text: str) -> list[Message]:
    return [{"role": "assistant", "content": text}]


def pair_row(item: PromptItem, choice: Choice, provenance: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "prompt": item.messages,
        "chosen": _assistant(choice.chosen),
        "rejected": _assistant(choice.rejected),
        "prompt_id": item.key,
    }
    if item.category:
        row["category"] = item.category
    row.update(score_chosen=choice.score_chosen, score_rejected=choice.score_rejected, margin=choice.margin)
    row.update(provenance)
    return row


def skipped_row(
    item: PromptItem, reason: str, answers: list[str], scores: list[float | None], provenance: dict[str, Any]
) -> dict[str, Any]:
    return {
        "prompt_id": item.key,
        "reason": reason,
        "prompt": item.messages,
        "answers": answers,
        "scores": scores,
        **provenance,
    }


# --- the output files ---------------------------------------------------------------------------------------------


def skipped_path(output: Path) -> Path:
    return output.with_name(output.stem + ".skipped.jsonl")


def part_path(path: Path, rank: int) -> Path:
    return path.with_name(f"{path.name}.rank{rank}.part")


class RowWriter:
    """Appends JSON rows to a file; `commit` flushes and fsyncs, so committed rows survive a kill."""

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


def read_rows(path: Path, repair: bool) -> list[dict[str, Any]]:
    """The complete rows of an output file. A last line cut off by a kill is dropped (and cut from the file when
    `repair`); a broken line before it means the file is not ours."""
    if not path.exists():
        return []
    data = path.read_bytes()
    complete_end = data.rfind(b"\n") + 1
    if complete_end < len(data):
        log.warning("%s: dropping a half-written last row (an earlier run was killed while writing it)", path)
        if repair:
            with path.open("r+b") as f:
                f.truncate(complete_end)
                os.fsync(f.fileno())
    rows = []
    for number, line in enumerate(data[:complete_end].decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("prompt_id"), str):
            raise UserError(
                f"{path}:{number} is not a row written by dpokit generate; give a new --output or remove the file"
            )
        rows.append(row)
    return rows


PROVENANCE_KEYS = ("judge", "model", "adapter", "sampling", "pairing", "min_margin", "system_message")


def make_provenance(
    judge_spec: str, model_name: str | None, adapter: str | None, sampling: SamplingSettings, pairing: PairingSettings
) -> dict[str, Any]:
    """What every row records about how it was made; a rerun must match it to continue the same file."""
    return {
        "judge": judge_spec,
        "model": model_name,
        "adapter": adapter,
        "sampling": sampling.to_dict(),
        "pairing": pairing.pairing,
        "min_margin": pairing.min_margin,
    }


def check_provenance(path: Path, rows: Sequence[dict[str, Any]], provenance: dict[str, Any]) -> None:
    """Rows made with other settings must not mix with this run's; the first such row is named."""
    for row in rows[:1]:
        for key in PROVENANCE_KEYS:
            if row.get(key) != provenance.get(key):
                raise UserError(
                    f"{path} was made with {key} {json.dumps(row.get(key))}, this run has "
                    f"{json.dumps(provenance.get(key))}"
                    "; rerun with the same settings to continue it, or give a new --output"
                )


def finished_keys(output: Path, provenance: dict[str, Any], repair: bool) -> set[str]:
    """Prompt keys already done: written as pairs, or skipped for good (ties, margin, identical answers)."""
    done: set[str] = set()
    for target in (output, skipped_path(output)):
        for path in (target, *_parts_of(target)):  # parts: rows of a killed multi-process run, not merged yet
            rows = read_rows(path, repair and path == target)
            check_provenance(path, rows, provenance)
            done.update(row["prompt_id"] for row in rows if row.get("reason") != SKIP_JUDGE)
    return done


def _parts_of(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f"{target.name}.rank*.part"))


def merge_parts(output: Path, order: dict[str, int]) -> None:
    """Move the rows of every process's part files into the output files, in the prompts' order.

    A merge killed halfway is finished by the next run: rows already in the output are not written twice.
    """
    for target in (output, skipped_path(output)):
        parts = _parts_of(target)
        if not parts:
            continue
        merged = {(row["prompt_id"], row.get("reason")) for row in read_rows(target, repair=True)}
        rows = [row for part in parts for row in read_rows(part, repair=False)]
        rows = [row for row in rows if (row["prompt_id"], row.get("reason")) not in merged]
        rows.sort(key=lambda row: order.get(row["prompt_id"], len(order)))
        writer = RowWriter(target)
        writer.write(rows)
        writer.close()
        for part in parts:
            part.unlink()


# --- the run ------------------------------------------------------------------------------------------------------


@dataclass
class Distribution:
    """This process's place among the processes of an `accelerate launch` (one process without it)."""

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = lambda: None
    gather: Callable[[Any], list[Any]] = lambda obj: [obj]
    device: Any = "cpu"

    @classmethod
    def from_accelerate(cls) -> Distribution:
        from accelerate.utils import gather_object

        state = process_state()  # on a machine without GPUs this picks gloo, so torchrun's processes see each other
        if state.num_processes == 1:
            return cls(device=state.device)
        return cls(
            state.process_index,
            state.num_processes,
            state.wait_for_everyone,
            lambda obj: gather_object([obj]),
            state.device,
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def generate_pairs(
    items: Sequence[PromptItem],
    output: str | os.PathLike,
    model: Any,
    tokenizer: Any,
    judge: Judge,
    sampling: SamplingSettings,
    pairing: PairingSettings = PairingSettings(),
    *,
    model_name: str | None = None,
    adapter: str | None = None,
    distribution: Distribution | None = None,
    show_progress: bool = True,
    bf16: bool | None = None,
    system_message: str = "keep",
) -> Summary:
    """Make pairs for `items` into `output` (resuming it), and return the counts. The Python face of the command.

    `model_name` and `adapter` are the names recorded in each row (the loaded `model` cannot tell its own).
    `bf16` samples under bf16 autocast; None uses it where the hardware runs it fast (`devices.use_bf16`).
    `system_message` keeps, merges or drops system turns before the chat template renders them.
    """
    from dpokit.devices import use_bf16

    dist = distribution or Distribution()
    output = Path(output)
    provenance = make_provenance(judge.spec, model_name, adapter, sampling, pairing)
    # recorded, not required to match on resume: it changes numerics, not the recipe
    provenance["bf16"] = use_bf16(next(model.parameters()).device, bf16)
    if system_message != "keep":  # recorded only when it changes the prompts, so earlier files still match
        provenance["system_message"] = system_message
    order = {item.key: i for i, item in reversed(list(enumerate(items)))}
    if dist.is_main:
        output.parent.mkdir(parents=True, exist_ok=True)
        merge_parts(output, order)  # rows of a killed multi-process run
    dist.barrier()
    summary = Summary(output=str(output), prompts=len(items))
    done = finished_keys(output, provenance, repair=dist.is_main)
    todo = _prompts_to_do(items, done, summary)
    if dist.is_main and not (summary.already_done and not todo):
        log.info(
            "generate: %d prompts to do (%d already done), %d answers each, judge %s",
            len(todo),
            summary.already_done,
            sampling.num_samples,
            judge.spec,
        )
    own = _own_batches(todo, sampling, dist)
    local = _run_batches(own, output, model, tokenizer, judge, sampling, pairing, provenance, dist, show_progress)
    dist.barrier()
    for other in dist.gather(local):
        summary.add(other)
    if dist.is_main and dist.world_size > 1:
        merge_parts(output, order)
    return summary


def _prompts_to_do(items: Sequence[PromptItem], done: set[str], summary: Summary) -> list[PromptItem]:
    todo: list[PromptItem] = []
    seen: set[str] = set()
    for item in items:
        if item.key in seen:
            summary.duplicates += 1
            continue
        seen.add(item.key)
        if item.key in done:
            summary.already_done += 1
            continue
        summary.later_turns_unused += bool(item.later_turns)
        todo.append(item)
    if summary.later_turns_unused:
        log.info(
            "generate: %d prompts have later turns; pairs are made for their first turn", summary.later_turns_unused
        )
    return todo


def _own_batches(todo: list[PromptItem], sampling: SamplingSettings, dist: Distribution) -> list[list[PromptItem]]:
    """This process's batches of prompts: batch b goes to process b % world_size, so each batch is the same
    whatever the number of processes, and so are its answers (see `batch_seed`)."""
    per_batch = max(1, sampling.batch_size // sampling.num_samples)  # one generate() call: all samples of each
    starts = range(0, len(todo), per_batch)
    return [todo[s : s + per_batch] for b, s in enumerate(starts) if b % dist.world_size == dist.rank]


def batch_seed(seed: int, batch: Sequence[PromptItem]) -> int:
    """The sampling seed of a batch, from the run's seed and the batch's prompt keys: the same batch gets the same
    answers whichever process runs it and whatever was done before it (so a resumed run matches an unbroken one)."""
    digest = hashlib.sha256(json.dumps([seed, [item.key for item in batch]]).encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1  # < 2**31, as generate_responses scales it further


def _run_batches(
    batches: list[list[PromptItem]],
    output: Path,
    model: Any,
    tokenizer: Any,
    judge: Judge,
    sampling: SamplingSettings,
    pairing: PairingSettings,
    provenance: dict[str, Any],
    dist: Distribution,
    show_progress: bool,
) -> Summary:
    from dpokit.devices import autocast_for
    from dpokit.sampling import generate_responses

    device = next(model.parameters()).device
    policy = provenance.get("system_message", "keep")
    summary = Summary(output=str(output))
    if dist.world_size > 1:
        pairs, skipped = RowWriter(part_path(output, dist.rank)), RowWriter(part_path(skipped_path(output), dist.rank))
    else:
        pairs, skipped = RowWriter(output), RowWriter(skipped_path(output))
    total = sum(len(batch) for batch in batches) * sampling.num_samples
    with ProgressBar(total, show_progress and dist.is_main) as advance:
        try:
            for batch in batches:
                settings = dataclasses.replace(sampling, seed=batch_seed(sampling.seed, batch))
                conversations = [item.messages for item in batch]
                # bf16 autocast samples ~1.6x faster on an AMX CPU; greedy answers stay the same for dozens of tokens
                with autocast_for(device, provenance["bf16"]):
                    answers = generate_responses(
                        model, tokenizer, conversations, settings, advance, system_message=policy
                    )
                rows, skips, counts = judge_batch(batch, answers, judge, pairing, sampling.seed, provenance)
                pairs.write(rows)
                skipped.write(skips)
                pairs.commit()
                skipped.commit()
                summary.add(counts)
        finally:
            pairs.close()
            skipped.close()
    return summary


class ProgressBar:
    """A rich progress bar of answers sampled, with answers per second; a no-op when hidden."""

    def __init__(self, total: int, visible: bool, label: str = "sampling") -> None:
        self.total = total
        self.visible = visible and total > 0
        self.label = label
        self._progress: Any = None

    def __enter__(self) -> Callable[[int], None]:
        if not self.visible:
            return lambda n: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn(self.label),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("answers"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        )
        self._progress.start()
        task = self._progress.add_task(self.label, total=self.total, rate="")
        started = time.perf_counter()
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            rate = done[0] / max(time.perf_counter() - started, 1e-9)
            self._progress.update(task, advance=n, rate=f"{rate:.2f} responses/s")

        return advance

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def sampling_from_args(args: argparse.Namespace) -> SamplingSettings:
    checks = (
        ("--num-samples", args.num_samples >= 2, "at least 2 (a pair needs two answers)"),
        ("--temperature", args.temperature >= 0, "zero (greedy) or positive"),
        ("--top-p", 0 < args.top_p <= 1, "in (0, 1]"),
        ("--max-new-tokens", args.max_new_tokens >= 1, "at least 1"),
        ("--batch-size", args.batch_size >= 1, "at least 1"),
    )
    for flag, ok, what in checks:
        if not ok:
            raise UserError(f"{flag} must be {what}, got {getattr(args, flag[2:].replace('-', '_'))}")
    if args.temperature == 0:
        log.warning("generate: --temperature 0 is greedy, so all answers to a prompt will be the same")
    return SamplingSettings(
        num_samples=args.num_samples,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.sampling_seed,
        batch_size=args.batch_size,
    )


def run(args: argparse.Namespace) -> int:
    """`dpokit generate`: inputs are checked before any model loads, so mistakes answer at once."""
    from dpokit.inference import tokenizer_with_settings
    from dpokit.models import load_adapter, load_model
    from dpokit.settings import resolve

    sampling = sampling_from_args(args)
    pairing = PairingSettings(args.pairing, args.min_margin)
    judge_options = judge_options_from_args(args)
    JudgeOptions(**judge_options)  # validates the --judge-* flags now, not after the model loaded
    items = load_prompts(args.prompts, column=args.prompt_column, split=args.split, data_config=args.data_config)
    if args.limit is not None:
        if args.limit < 1:
            raise UserError(f"--limit must be at least 1, got {args.limit}")
        items = items[: args.limit]
    view = resolve("generate", args, args.adapter)  # the adapter's base, chat template, ... else the defaults
    cfg = view.config
    model_name = cfg.model_name_or_path
    output = Path(args.output)
    _probe_writable(output)
    # another run's file, or nothing left to do: known before loading anything
    done = finished_keys(output, make_provenance(args.judge, model_name, args.adapter, sampling, pairing), False)
    dist = Distribution.from_accelerate()
    quant = quantization.start(cfg, dist.device)
    if all(item.key in done for item in items):
        summary = Summary(output=str(output), prompts=len(items))
        _prompts_to_do(items, done, summary)
        if dist.is_main:
            print(summary.line())
        return 0
    judge = load_judge(args.judge, **judge_options)
    try:
        judge.check()  # an endpoint that cannot be reached fails now, before the model loads
        tokenizer = tokenizer_with_settings(cfg, args.adapter)
        items = _accepted_prompts(items, tokenizer, args.prompts, output, cfg)
        model = load_model(model_name, quantization=quant, device=dist.device, trust_remote_code=cfg.trust_remote_code)
        if args.adapter:
            model = load_adapter(model, args.adapter)
        model.to(dist.device)
        view.announce("generate")
        summary = generate_pairs(
            items,
            output,
            model,
            tokenizer,
            judge,
            sampling,
            pairing,
            model_name=model_name,
            adapter=args.adapter,
            distribution=dist,
            bf16=cfg.bf16,
            system_message=cfg.system_message,
        )
    finally:
        judge.close()
    if dist.is_main:
        print(summary.line())
        if summary.pairs_written == 0:
            log.warning("generate: no new pairs; the reason for each prompt is in %s", skipped_path(output))
    return 0


def _accepted_prompts(
    items: list[PromptItem], tokenizer: Any, source: str, output: Path, cfg: DPOConfig
) -> list[PromptItem]:
    """The prompts the chat template accepts; the refused are written beside the output, and more than
    --max-bad-rows of them stop the run before the model loads."""
    from dpokit.data.chat_template import check_conversations

    refused = check_conversations(
        tokenizer,
        [(item.origin, item.messages) for item in items],
        source,
        system_message=cfg.system_message,
        max_bad_rows=cfg.max_bad_rows,
        rejected_dir=output.parent,
    )
    if refused:
        log.warning(
            "generate: %d prompts the chat template refused are left out (reasons beside %s)", len(refused), output
        )
    return [item for item in items if item.origin not in refused]


def _probe_writable(output: Path) -> None:
    """Find an output that cannot be written before the model loads, not after an hour of sampling."""
    if output.is_dir():
        raise UserError(f"--output {output} is a folder; give a file such as {output / 'pairs.jsonl'}")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with output.open("a", encoding="utf-8"):
            pass
    except OSError as e:
        raise UserError(f"--output {output} cannot be written: {e.strerror or e}") from e
