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

Under `accelerate launch`, each process takes its contiguous share of the batches of prompts
(`distributed.split_for_process`) and appends to its own part file; the main process merges the parts into the
output in the prompts' order. Which two answers make a pair, and the rows, are `dpokit.pairing`'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpokit import quantization
from dpokit.config import DPOConfig
from dpokit.console import make_console, progress_counter
from dpokit.distributed import gather_in_order, part_path, parts_of, process_state, split_for_process
from dpokit.errors import UserError
from dpokit.generation import SamplingSettings, sampling_from_args
from dpokit.jsonl import read_jsonl
from dpokit.judge_base import Judge, JudgeOptions
from dpokit.judges import judge_options_from_args, load_judge
from dpokit.outputs import JsonlAppender, ensure_file_writable
from dpokit.pairing import SKIP_JUDGE, PairingSettings, Summary, judge_batch
from dpokit.prompts import PromptItem, load_prompts

log = logging.getLogger(__name__)

BEST_WORST = PairingSettings()  # the default pairing

# --- the output files ---------------------------------------------------------------------------------------------


def skipped_path(output: Path) -> Path:
    return output.with_name(output.stem + ".skipped.jsonl")


def read_rows(path: Path, repair: bool) -> list[dict[str, Any]]:
    """The complete rows of an output file. A last line cut off by a kill is dropped (and cut from the file when
    `repair`, so that appending goes on after the last whole row); a broken line before it means the file is not
    ours."""
    found = read_jsonl(path, lambda row: isinstance(row.get("prompt_id"), str), tail="cut" if repair else "drop")
    return found.require_clean(path, "a row written by dpokit generate", "give a new --output or remove the file")


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
        for path in (target, *parts_of(target)):  # parts: rows of a killed multi-process run, not merged yet
            rows = read_rows(path, repair and path == target)
            check_provenance(path, rows, provenance)
            done.update(row["prompt_id"] for row in rows if row.get("reason") != SKIP_JUDGE)
    return done


def merge_parts(output: Path, order: dict[str, int]) -> None:
    """Move the rows of every process's part files into the output files, in the prompts' order.

    A merge killed halfway is finished by the next run: rows already in the output are not written twice.
    """
    for target in (output, skipped_path(output)):
        parts = parts_of(target)
        if not parts:
            continue
        merged = {(row["prompt_id"], row.get("reason")) for row in read_rows(target, repair=True)}
        rows = [row for part in parts for row in read_rows(part, repair=False)]
        rows = [row for row in rows if (row["prompt_id"], row.get("reason")) not in merged]
        rows.sort(key=lambda row: order.get(row["prompt_id"], len(order)))
        writer = JsonlAppender(target)
        writer.write(rows)
        writer.close()
        for part in parts:
            part.unlink()


# --- the run ------------------------------------------------------------------------------------------------------


def generate_pairs(
    items: Sequence[PromptItem],
    output: str | os.PathLike,
    model: Any,
    tokenizer: Any,
    judge: Judge,
    sampling: SamplingSettings,
    pairing: PairingSettings = BEST_WORST,
    *,
    model_name: str | None = None,
    adapter: str | None = None,
    state: Any | None = None,
    show_progress: bool = True,
    bf16: bool | None = None,
    system_message: str = "keep",
) -> Summary:
    """Make pairs for `items` into `output` (resuming it), and return the counts. The Python face of the command.

    `model_name` and `adapter` are the names recorded in each row (the loaded `model` cannot tell its own).
    `bf16` samples under bf16 autocast; None uses it where the hardware runs it fast (`devices.use_bf16`).
    `system_message` keeps, merges or drops system turns before the chat template renders them. `state` is this
    process's `distributed.process_state()` (found when not given).
    """
    from dpokit.devices import use_bf16

    state = state or process_state()
    output = Path(output)
    provenance = make_provenance(judge.spec, model_name, adapter, sampling, pairing)
    # recorded, not required to match on resume: it changes numerics, not the recipe
    provenance["bf16"] = use_bf16(next(model.parameters()).device, bf16)
    if system_message != "keep":  # recorded only when it changes the prompts, so earlier files still match
        provenance["system_message"] = system_message
    order = {item.key: i for i, item in reversed(list(enumerate(items)))}
    if state.is_main_process:
        output.parent.mkdir(parents=True, exist_ok=True)
        merge_parts(output, order)  # rows of a killed multi-process run
    state.wait_for_everyone()
    summary = Summary(output=str(output), prompts=len(items))
    done = finished_keys(output, provenance, repair=state.is_main_process)
    todo = _prompts_to_do(items, done, summary)
    if state.is_main_process and not (summary.already_done and not todo):
        log.info(
            "generate: %d prompts to do (%d already done), %d answers each, judge %s",
            len(todo),
            summary.already_done,
            sampling.num_samples,
            judge.spec,
        )
    own, _ = split_for_process(_batches(todo, sampling), state)
    local = _run_batches(own, output, model, tokenizer, judge, sampling, pairing, provenance, state, show_progress)
    state.wait_for_everyone()
    for other in gather_in_order([local], state):
        summary.add(other)
    if state.is_main_process and state.num_processes > 1:
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


def _batches(todo: list[PromptItem], sampling: SamplingSettings) -> list[list[PromptItem]]:
    """The batches of prompts, formed before they are shared out, so each batch is the same whatever the number of
    processes, and so are its answers (see `batch_seed`)."""
    per_batch = max(1, sampling.batch_size // sampling.num_samples)  # one generate() call: all samples of each
    return [todo[s : s + per_batch] for s in range(0, len(todo), per_batch)]


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
    state: Any,
    show_progress: bool,
) -> Summary:
    from dpokit.devices import autocast_for
    from dpokit.generation import generate_responses

    device = next(model.parameters()).device
    policy = provenance.get("system_message", "keep")
    summary = Summary(output=str(output))
    targets = (output, skipped_path(output))
    if state.num_processes > 1:
        targets = tuple(part_path(target, state.process_index) for target in targets)
    pairs, skipped = (JsonlAppender(target) for target in targets)
    total = sum(len(batch) for batch in batches) * sampling.num_samples
    console = make_console(show_progress and state.is_main_process)
    with progress_counter(console, total, label="sampling", unit="answers", rate_unit="responses") as advance:
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


def run(args: argparse.Namespace) -> int:
    """`dpokit generate`: inputs are checked before any model loads, so mistakes answer at once."""
    from dpokit.inference import tokenizer_with_settings
    from dpokit.models import load_adapter, load_model
    from dpokit.settings import resolve

    sampling = sampling_from_args(args, several=True)
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
    ensure_file_writable(output, "--output")
    # another run's file, or nothing left to do: known before loading anything
    done = finished_keys(output, make_provenance(args.judge, model_name, args.adapter, sampling, pairing), False)
    state = process_state()  # on a machine without GPUs this picks gloo, so torchrun's processes see each other
    quant = quantization.start(cfg, state.device)
    if all(item.key in done for item in items):
        summary = Summary(output=str(output), prompts=len(items))
        _prompts_to_do(items, done, summary)
        if state.is_main_process:
            print(summary.line())
        return 0
    judge = load_judge(args.judge, **judge_options)
    try:
        judge.check()  # an endpoint that cannot be reached fails now, before the model loads
        tokenizer = tokenizer_with_settings(cfg, args.adapter)
        items = _accepted_prompts(items, tokenizer, args.prompts, output, cfg)
        model = load_model(model_name, quantization=quant, device=state.device, trust_remote_code=cfg.trust_remote_code)
        if args.adapter:
            model = load_adapter(model, args.adapter)
        model.to(state.device)
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
            state=state,
            bf16=cfg.bf16,
            system_message=cfg.system_message,
        )
    finally:
        judge.close()
    if state.is_main_process:
        print(summary.line())
        if summary.pairs_written == 0:
            log.warning("generate: no new pairs; the reason for each prompt is in %s", skipped_path(output))
    return 0


def _accepted_prompts(
    items: list[PromptItem], tokenizer: Any, source: str, output: Path, cfg: DPOConfig
) -> list[PromptItem]:
    """The prompts the chat template accepts; the refused are written beside the output, and more than
    `max_bad_rows` of them stop the run before the model loads."""
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
