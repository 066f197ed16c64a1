"""`dpokit vibe`: base and aligned answers to a few prompts side by side, the adapter switched off and on.

The rows are saved as RUN_DIR/vibe.jsonl of the adapter's run by default, where `dpokit report RUN_DIR` shows them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpokit.generation import SamplingSettings, sampling_from_args
from dpokit.inference import load_with_settings, tokenizer_with_settings
from dpokit.outputs import ensure_writable, write_jsonl
from dpokit.questions import Question, answer_questions, check_questions, load_questions
from dpokit.runs import run_folder_of
from dpokit.settings import resolve

VIBE_FILE = "vibe.jsonl"


def vibe_check(
    model: Any,
    tokenizer: Any,
    questions: Sequence[Question],
    settings: SamplingSettings,
    bf16: bool | None = None,
    system_message: str = "keep",
) -> list[tuple[str, str]]:
    """(base answer, aligned answer) to each question's first turn: the adapter switched off, then on."""
    first_turns = [Question(q.question_id, q.turns[:1], q.category, q.context) for q in questions]
    with model.disable_adapter():
        base = answer_questions(model, tokenizer, first_turns, settings, bf16, system_message=system_message)
    aligned = answer_questions(model, tokenizer, first_turns, settings, bf16, system_message=system_message)
    return [(b[0], a[0]) for b, a in zip(base, aligned, strict=True)]


def run_vibe(args: argparse.Namespace) -> int:
    questions = load_questions(args.prompts, args.limit)
    if args.output is not None:
        output = Path(args.output)
    else:
        run_dir = run_folder_of(args.adapter)
        output = (run_dir if run_dir is not None else Path(args.adapter).resolve().parent) / VIBE_FILE
    ensure_writable(output.resolve().parent, "--output")
    view = resolve("vibe", args, args.adapter)
    cfg = view.config
    settings = sampling_from_args(args)
    policy = cfg.system_message
    first_turns = [Question(q.question_id, q.turns[:1], q.category, q.context) for q in questions]
    check_questions(tokenizer_with_settings(cfg, args.adapter), first_turns, args.prompts, policy, output.parent)
    model, tokenizer, _ = load_with_settings(cfg, args.adapter)
    view.announce("vibe")
    answers = vibe_check(model, tokenizer, questions, settings, cfg.bf16, policy)
    base_name = cfg.model_name_or_path
    rows = [
        {
            "question_id": q.question_id,
            "category": q.category,
            "prompt": q.turns[0],
            "base": base_answer,
            "aligned": aligned_answer,
            "model": base_name,
            "adapter": str(args.adapter),
            "sampling": settings.to_dict(),
        }
        for q, (base_answer, aligned_answer) in zip(questions, answers, strict=True)
    ]
    write_jsonl(output, rows)
    _print_vibe(rows)
    print(f"saved to {output}", file=sys.stderr)
    return 0


def _print_vibe(rows: Sequence[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title="vibe check", show_lines=True, expand=True)
    table.add_column("prompt", ratio=1)
    table.add_column("base", ratio=2)
    table.add_column("aligned", ratio=2)
    for row in rows:
        table.add_row(Text(row["prompt"]), Text(row["base"]), Text(row["aligned"]))  # Text: no markup from models
    Console().print(table)
