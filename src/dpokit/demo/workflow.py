"""`dpokit demo`: the whole workflow on the built-in model and task, one stage after another.

1. generate  sample answers to the training prompts with the base model; the task's judge picks best and worst
2. baseline  the base model's greedy answers to the held-out prompts: the task metric before training
3. train     DPO with LoRA on the generated pairs (the run folder is an ordinary `dpokit train` run)
4. compare   the aligned model's greedy answers to the same held-out prompts, judged against the base answers in
             both orders; win rate with a bootstrap 95% interval, and the task metric after training
5. report    report.html in the run folder, result.json, and a summary on the terminal

Every stage uses the same code as its command (`generate`, `train`, `compare`, `vibe`, `report`), and the files
it leaves are the ones those commands write, so the demo's output folder is also a worked example of the workflow.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from dpokit.config import BUILTIN_MODEL
from dpokit.demo import task
from dpokit.errors import UserError
from dpokit.outputs import write_jsonl

log = logging.getLogger("dpokit")

MODEL = BUILTIN_MODEL
JUDGE = "python:dpokit.demo.task:judge"
MARKER = "demo.json"  # the settings of the demo that owns the folder
RESULT = "result.json"
CATEGORY = "word-range"
VIBE_ROWS = 12


@dataclass(frozen=True)
class DemoSettings:
    """The demo's knobs. The defaults finish in about ten minutes on two CPU cores; they were chosen on the task's
    validation prompts, never on the held-out ones the demo reports."""

    model: str = MODEL  # the model to align; the task's defaults were tuned for the built-in one
    train_prompts: int = 128  # prompts whose sampled answers become pairs
    heldout_prompts: int = 128  # prompts of unseen topics that measure the result
    samples: int = 6  # answers sampled per training prompt
    temperature: float = 0.7  # sampling temperature of those answers
    max_new_tokens: int = 32  # longest sampled answer, in tokens
    eval_max_new_tokens: int = 48  # longest greedy answer to a held-out prompt
    steps: int = 40  # optimizer steps of DPO
    batch_size: int = 8  # pairs per optimizer step
    learning_rate: float = 2e-4
    beta: float = 0.5
    lora_r: int = 16
    seed: int = 0
    generation_batch_size: int = 96  # sequences per generate() call

    def check(self) -> None:
        for name in ("train_prompts", "heldout_prompts", "samples", "max_new_tokens", "eval_max_new_tokens", "steps"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.samples < 2:
            raise UserError(f"--samples must be at least 2 (a pair needs two answers), got {self.samples}")
        for split, count in (("train", self.train_prompts), ("heldout", self.heldout_prompts)):
            available = task.prompt_count(split)
            if count > available:
                flag = "--train-prompts" if split == "train" else "--heldout-prompts"
                raise UserError(f"{flag} {count} is more than the {available} prompts of the task's {split} split")


@dataclass(frozen=True)
class Layout:
    """Where the demo writes: the files of each stage under one folder."""

    root: Path

    @property
    def train_prompts(self) -> Path:
        return self.root / "prompts" / "train.jsonl"

    @property
    def heldout_prompts(self) -> Path:
        return self.root / "prompts" / "heldout.jsonl"

    @property
    def pairs(self) -> Path:
        return self.root / "pairs.jsonl"

    @property
    def config(self) -> Path:
        return self.root / "train.yaml"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def adapter(self) -> Path:
        return self.run / "adapter"

    @property
    def compare(self) -> Path:
        return self.run / "compare"


def run(args: argparse.Namespace) -> int:
    """`dpokit demo`."""
    settings = DemoSettings(
        model=args.model,
        train_prompts=args.train_prompts,
        heldout_prompts=args.heldout_prompts,
        samples=args.samples,
        steps=args.steps,
        seed=args.seed,
    )
    settings.check()
    output = Path(args.output)
    print_summary(run_demo(output, settings), output)
    return 0


def run_demo(output: Path, settings: DemoSettings) -> dict[str, Any]:
    """All five stages into `output`; returns what result.json holds."""
    from dpokit.generation import SamplingSettings
    from dpokit.inference import load_for_inference
    from dpokit.onpolicy import read_rows
    from dpokit.questions import load_questions
    from dpokit.report import write_report

    started = time.perf_counter()
    where = prepare_folder(output, settings)
    write_prompts(where, settings)
    heldout = load_questions(str(where.heldout_prompts))
    greedy = SamplingSettings(
        temperature=0.0, max_new_tokens=settings.eval_max_new_tokens, batch_size=settings.generation_batch_size
    )

    stage(1, f"generate: {settings.samples} answers to each of {settings.train_prompts} training prompts, judged")
    model, tokenizer = load_for_inference(settings.model, None)
    make_pairs(where, settings, model, tokenizer)
    stage(2, f"baseline: the base model answers {len(heldout)} held-out prompts")
    base_answers = answer(model, tokenizer, heldout, greedy, "base answers")
    del model
    gc.collect()

    stage(3, f"train: DPO with LoRA, {settings.steps} steps of {settings.batch_size} pairs")
    train_summary = train_on_pairs(where, settings)

    stage(4, "compare: the aligned model answers the same held-out prompts; the judge scores both, in both orders")
    model, tokenizer = load_for_inference(settings.model, str(where.adapter))
    aligned_answers = answer(model, tokenizer, heldout, greedy, "aligned answers")
    del model
    gc.collect()
    comparison = judge_comparison(where, settings, greedy, heldout, base_answers, aligned_answers)

    stage(5, "report")
    prompts = [q.turns[0] for q in heldout]
    write_vibe(where, heldout, base_answers, aligned_answers)

    report = write_report(where.run)
    result = {
        "task": "answer in the number of words the prompt asks for",
        "win_rate": comparison["win_rate_adjusted"],
        "ci_low": comparison["ci_low"],
        "ci_high": comparison["ci_high"],
        "wins": comparison["wins"],
        "ties": comparison["ties"],
        "losses": comparison["losses"],
        "metric": "share of held-out answers inside the asked word range",
        "metric_before": task.in_range_rate(prompts, [a[0] for a in base_answers]),
        "metric_after": task.in_range_rate(prompts, [a[0] for a in aligned_answers]),
        "mean_words_before": mean_words(base_answers),
        "mean_words_after": mean_words(aligned_answers),
        "train_pairs": len(read_rows(where.pairs, repair=False)),
        "heldout_prompts": len(heldout),
        "train_steps": train_summary.get("steps"),
        "minutes": round((time.perf_counter() - started) / 60, 2),
        "settings": asdict(settings),
        "files": {
            "pairs": str(where.pairs),
            "config": str(where.config),
            "run": str(where.run),
            "adapter": str(where.adapter),
            "comparison": str(where.compare),
            "report": str(report),
        },
    }
    (where.root / RESULT).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


# --- stages -------------------------------------------------------------------------------------------------------


def stage(number: int, title: str) -> None:
    print(f"\n[{number}/5] {title}", file=sys.stderr, flush=True)


def prepare_folder(output: Path, settings: DemoSettings) -> Layout:
    """An empty or new folder, or one an earlier demo made. Pairs of an earlier demo with the same settings are
    kept (generation resumes); everything else the demo makes is made anew."""
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; give a folder (it is created if missing)")
    if output.is_dir() and any(output.iterdir()) and not (output / MARKER).is_file():
        names = ", ".join(sorted(p.name for p in output.iterdir())[:3])
        raise UserError(f"--output {output} holds other files ({names}); choose a new or empty folder")
    from dpokit.onpolicy import skipped_path

    where = Layout(output)
    marker = output / MARKER
    previous = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None
    remake = [where.run, output / RESULT, where.config]
    if previous != asdict(settings):
        remake += [where.pairs, skipped_path(where.pairs), where.train_prompts.parent]
    try:
        output.mkdir(parents=True, exist_ok=True)
        for target in remake:
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        marker.write_text(json.dumps(asdict(settings), indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise UserError(f"--output {output} cannot be written: {e.strerror or e}") from e
    return where


def write_prompts(where: Layout, settings: DemoSettings) -> None:
    """The training prompts as `dpokit generate` reads them, the held-out ones in MT-Bench's question layout."""
    train = task.make_prompts("train", settings.train_prompts, settings.seed)
    heldout = task.make_prompts("heldout", settings.heldout_prompts, settings.seed)
    where.train_prompts.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(where.train_prompts, [{"prompt": p} for p in train])
    write_jsonl(
        where.heldout_prompts,
        [{"question_id": i + 1, "category": CATEGORY, "turns": [p]} for i, p in enumerate(heldout)],
    )


def make_pairs(where: Layout, settings: DemoSettings, model: Any, tokenizer: Any) -> Any:
    """Stage 1, as `dpokit generate --judge python:dpokit.demo.task:judge` runs it."""
    from dpokit.generation import SamplingSettings
    from dpokit.judges import load_judge
    from dpokit.onpolicy import generate_pairs, read_rows, skipped_path
    from dpokit.pairing import PairingSettings
    from dpokit.prompts import load_prompts

    sampling = SamplingSettings(
        num_samples=settings.samples,
        temperature=settings.temperature,
        max_new_tokens=settings.max_new_tokens,
        seed=settings.seed,
        batch_size=settings.generation_batch_size,
    )
    judge = load_judge(JUDGE)
    try:
        summary = generate_pairs(
            load_prompts(str(where.train_prompts)),
            where.pairs,
            model,
            tokenizer,
            judge,
            sampling,
            PairingSettings(),
            model_name=settings.model,
        )
    finally:
        judge.close()
    print(summary.line(), file=sys.stderr)
    if not read_rows(where.pairs, repair=False):
        raise UserError(f"no training pairs were made; the reason for each prompt is in {skipped_path(where.pairs)}")
    return summary


def answer(model: Any, tokenizer: Any, questions: list[Any], greedy: Any, label: str) -> list[list[str]]:
    """Greedy answers to the held-out prompts, as `dpokit compare` makes them, with a progress bar."""
    from dpokit.console import make_console, progress_counter
    from dpokit.questions import answer_questions

    with progress_counter(
        make_console(), len(questions), label=label, unit="answers", rate_unit="responses"
    ) as advance:
        return answer_questions(model, tokenizer, questions, greedy, on_batch=advance)


def train_config(where: Layout, settings: DemoSettings) -> dict[str, Any]:
    """The run's config: an ordinary `dpokit train` config file, written next to the pairs."""
    return {
        "model_name_or_path": settings.model,
        "train_data": str(where.pairs),
        "output_dir": str(where.run),
        "max_steps": settings.steps,
        "per_device_train_batch_size": settings.batch_size,
        "learning_rate": settings.learning_rate,
        "warmup_ratio": 0.1,
        "beta": settings.beta,
        "use_peft": True,
        "lora_r": settings.lora_r,
        "lora_alpha": 2 * settings.lora_r,
        "lora_target_modules": ["all-linear"],
        "logging_steps": 5,
        "save_steps": settings.steps,
        "seed": settings.seed,
    }


def train_on_pairs(where: Layout, settings: DemoSettings) -> dict[str, Any]:
    """Stage 3, as `dpokit train demo-output/train.yaml` runs it."""
    from dpokit.config import load_config
    from dpokit.train import train

    where.config.write_text(yaml.safe_dump(train_config(where, settings), sort_keys=False), encoding="utf-8")
    return train(load_config(where.config))


def judge_comparison(
    where: Layout,
    settings: DemoSettings,
    greedy: Any,
    questions: list[Any],
    base_answers: list[list[str]],
    aligned_answers: list[list[str]],
) -> dict[str, Any]:
    """Stage 4's verdicts, as `dpokit compare` judges and writes them (MT-Bench files and summary.json)."""
    from dpokit.compare import Contestant, comparison_summary, contestant_id, play_question, write_comparison
    from dpokit.judges import load_judge
    from dpokit.verdicts import print_comparison

    base = Contestant(settings.model, None, contestant_id(settings.model, None))
    aligned = Contestant(settings.model, str(where.adapter), "demo-dpo")
    judge = load_judge(JUDGE)
    try:
        records = [
            play_question(judge, q, a, b, (base.model_id, aligned.model_id))
            for q, a, b in zip(questions, base_answers, aligned_answers, strict=True)
        ]
    finally:
        judge.close()
    summary = comparison_summary(records, base, aligned, JUDGE, greedy, settings.seed)
    write_comparison(where.compare, records, base, aligned, summary)
    print_comparison(summary)
    return summary


def write_vibe(where: Layout, questions: list[Any], base: list[list[str]], aligned: list[list[str]]) -> None:
    """A few held-out answers side by side, as `dpokit vibe` saves them for the report."""
    rows = [
        {
            "question_id": q.question_id,
            "category": q.category,
            "prompt": q.turns[0],
            "base": b[0],
            "aligned": a[0],
            "base_words": task.count_words(b[0]),
            "aligned_words": task.count_words(a[0]),
        }
        for q, b, a in list(zip(questions, base, aligned, strict=True))[:VIBE_ROWS]
    ]
    write_jsonl(where.run / "vibe.jsonl", rows)


# --- helpers ------------------------------------------------------------------------------------------------------


def mean_words(answers: list[list[str]]) -> float:
    return sum(task.count_words(a[0]) for a in answers) / len(answers)


def print_summary(result: dict[str, Any], output: Path) -> None:
    from rich.console import Console

    console = Console(stderr=True)
    before, after = result["metric_before"], result["metric_after"]
    console.print(
        f"\n[bold]DPO result on {result['heldout_prompts']} held-out prompts[/bold] "
        f"(topics never seen in training; {result['train_pairs']} training pairs, {result['minutes']:.1f} minutes)"
    )
    console.print(
        f"  answers inside the asked word range: {before:.0%} before, {after:.0%} after "
        f"(mean length {result['mean_words_before']:.1f} -> {result['mean_words_after']:.1f} words)"
    )
    console.print(
        f"  aligned beats base under the judge: win rate {result['win_rate']:.0%} (ties half), "
        f"95% interval {result['ci_low']:.0%} to {result['ci_high']:.0%} "
        f"({result['wins']} wins, {result['ties']} ties, {result['losses']} losses)"
    )
    files = result["files"]
    console.print(f"  report:  {files['report']}")
    console.print(f"  adapter: {files['adapter']}  (dpokit merge --adapter {files['adapter']} --output merged)")
    console.print(f"  result:  {output / RESULT}")
