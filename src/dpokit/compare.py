"""`dpokit compare`: answers from two models, judged pairwise in both orders (`dpokit.verdicts`).

Files, so that `dpokit report RUN_DIR` finds them (RUN_DIR is a `dpokit train` output folder, its adapter in
RUN_DIR/adapter): the folder RUN_DIR/compare/ by default when the (B) adapter sits in a run folder, laid out as an
MT-Bench bench folder: question.jsonl, model_answer/<model_id>.jsonl, model_judgment/dpokit_pair.jsonl, plus
summary.json.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dpokit import quantization
from dpokit.config import DPOConfig
from dpokit.distributed import gather_in_order, process_state, split_for_process
from dpokit.errors import UserError
from dpokit.generation import SamplingSettings, sampling_from_args
from dpokit.inference import (
    check_loadable,
    inference_tokenizer,
    load_for_inference,
)
from dpokit.outputs import ensure_writable, write_atomic, write_jsonl
from dpokit.questions import Question, answer_questions, check_questions, load_questions
from dpokit.runs import ADAPTER_DIR_NAME, adapter_base_model, run_folder_of
from dpokit.settings import Settings, resolve
from dpokit.stats import DEFAULT_RESAMPLES
from dpokit.verdicts import (
    MODEL_1,
    MODEL_2,
    Game,
    judge_both_orders,
    judged_exchange,
    mapped_verdict,
    print_comparison,
    summarize_by_category,
    summarize_games,
)

COMPARE_DIR = "compare"
QUESTIONS_FILE = "question.jsonl"
ANSWERS_DIR = "model_answer"
JUDGMENTS_FILE = "model_judgment/dpokit_pair.jsonl"
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class Contestant:
    """One side of a comparison: a model, an optional adapter, and the model_id written into the outputs; or
    answers already made (an MT-Bench answer file, read by `dpokit.mtbench.load_answer_file`)."""

    model: str | None
    adapter: str | None
    model_id: str
    system_message: str = "keep"  # what its answers do with system turns (see dpokit.data.chat_template)
    answers: dict[str, list[str]] | None = field(default=None, compare=False, repr=False)
    answers_file: str | None = None
    quant: quantization.Quantization | None = None  # the base quantized as it loads (--load-in-4bit/8bit)
    chat_template: str | None = None  # the one its run trained with, or --chat-template
    trust_remote_code: bool = False


def contestant_id(model: str | None, adapter: str | None) -> str:
    """A readable model_id: the run folder's name for an adapter at RUN_DIR/adapter, else the folder or model."""
    if adapter is not None:
        path = Path(adapter).resolve()
        name = path.parent.name if path.name == ADAPTER_DIR_NAME else path.name
    else:
        name = (model or "model").removeprefix("builtin:").rstrip("/").split("/")[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def _answers_of(side: Contestant, questions: Sequence[Question], settings: SamplingSettings, bf16: bool | None):
    if side.answers is not None:
        from dpokit.mtbench import answers_for

        return answers_for(side.answers, questions, side.answers_file or side.model_id)
    model, tokenizer = load_for_inference(
        side.model, side.adapter, side.quant, chat_template=side.chat_template, trust_remote_code=side.trust_remote_code
    )
    answers = answer_questions(model, tokenizer, questions, settings, bf16, system_message=side.system_message)
    del model  # the memory goes back before the other side's model loads
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return answers


@dataclass
class ComparisonRecord:
    """Everything about one question: both sides' answers and the games of its turns, with judgment rows."""

    question: Question
    answers_1: list[str]
    answers_2: list[str]
    games: list[Game] = field(default_factory=list)
    judgments: list[dict[str, Any]] = field(default_factory=list)


class OwnPrompts:
    """Our pairwise prompt (`dpokit.judges.PAIRWISE_PROMPT`) for each turn of a question, for LLM judges."""

    def check(self, questions: Sequence[Question]) -> None:
        return None

    def judged_turns(self, question: Question) -> range:
        return range(1, len(question.turns) + 1)

    def prompt_name(self, question: Question, turn: int) -> str:
        return "dpokit-pair" if turn == 1 else "dpokit-pair-multi-turn"

    def request(self, question: Question, turn: int, answers_a: Sequence[str], answers_b: Sequence[str]) -> Any:
        from dpokit.judge_base import LLMJudge, PairwiseRequest
        from dpokit.judge_prompts import PAIRWISE_PROMPT, parse_verdict, question_text

        prompt, answer_a, answer_b = judged_exchange(question, turn, answers_a, answers_b)
        text = PAIRWISE_PROMPT.format(question=question_text(prompt), answer_a=answer_a, answer_b=answer_b)
        return PairwiseRequest(({"role": "user", "content": text},), parse_verdict, LLMJudge.REPLY_START)


def _judgment_row(
    record: ComparisonRecord, game: Game, ids: tuple[str, str], judge_name: list[str], asked: tuple[str, ...]
) -> dict[str, Any]:
    """One line of MT-Bench's model_judgment/*_pair.jsonl; `asked` is (g1 prompt, g1 reply, g2 prompt, g2 reply)."""
    return {
        "question_id": record.question.question_id,
        "model_1": ids[0],
        "model_2": ids[1],
        "g1_winner": game.g1_winner,
        "g2_winner": game.g2_winner,
        "judge": judge_name,
        "g1_user_prompt": asked[0],
        "g1_judgment": asked[1],
        "g2_user_prompt": asked[2],
        "g2_judgment": asked[3],
        "turn": game.turn,
        "tstamp": time.time(),
        "category": record.question.category,
        "outcome": game.outcome,
    }


def play_question(
    judge: Any, question: Question, answers_1: list[str], answers_2: list[str], ids: tuple[str, str]
) -> ComparisonRecord:
    """Judge every turn of one question in both orders through `judge.compare`; rows in MT-Bench's layout."""
    record = ComparisonRecord(question, answers_1, answers_2)
    for turn in range(1, len(question.turns) + 1):
        prompt, answer_1, answer_2 = judged_exchange(question, turn, answers_1, answers_2)
        g1, g2 = judge_both_orders(judge, prompt, answer_1, answer_2)
        lengths = len(answers_1[turn - 1]), len(answers_2[turn - 1])
        game = Game(question.question_id, turn, g1, g2, question.category, *lengths)
        record.games.append(game)
        name = [judge.spec, OwnPrompts().prompt_name(question, turn)]
        asked = (prompt[-1]["content"], g1, prompt[-1]["content"], g2)
        record.judgments.append(_judgment_row(record, game, ids, name, asked))
    return record


def play_questions(
    judge: Any,
    questions: Sequence[Question],
    answers_1: Sequence[list[str]],
    answers_2: Sequence[list[str]],
    ids: tuple[str, str],
    prompts: Any | None = None,
) -> list[ComparisonRecord]:
    """Every judged (question, turn) in both orders. An LLM judge (one with `compare_requests`) is sent all the
    written-out prompts at once, ours or `prompts` (MT-Bench's), and its replies are kept in the rows; any other
    judge is asked through `compare`, one question at a time."""
    if not hasattr(judge, "compare_requests"):
        if prompts is not None:
            raise UserError(f"--judge-prompts needs an llm: or openai: judge; `{judge.spec}` reads no prompt")
        return [play_question(judge, *item, ids) for item in zip(questions, answers_1, answers_2, strict=True)]
    prompts = prompts or OwnPrompts()
    records = [ComparisonRecord(*item) for item in zip(questions, answers_1, answers_2, strict=True)]
    plan = [(r, turn) for r in records for turn in prompts.judged_turns(r.question)]
    requests = []
    for r, turn in plan:
        requests.append(prompts.request(r.question, turn, r.answers_1, r.answers_2))  # model_1 shown first
        requests.append(prompts.request(r.question, turn, r.answers_2, r.answers_1))
    replies = judge.compare_requests(requests)
    for i, (r, turn) in enumerate(plan):
        (v1, reply_1), (v2, reply_2) = replies[2 * i], replies[2 * i + 1]
        g1 = mapped_verdict(v1, MODEL_1, MODEL_2, judge.spec)
        g2 = mapped_verdict(v2, MODEL_2, MODEL_1, judge.spec)
        lengths = len(r.answers_1[turn - 1]), len(r.answers_2[turn - 1])
        game = Game(r.question.question_id, turn, g1, g2, r.question.category, *lengths)
        r.games.append(game)
        asked = (requests[2 * i].messages[-1]["content"], reply_1, requests[2 * i + 1].messages[-1]["content"], reply_2)
        r.judgments.append(_judgment_row(r, game, ids, [judge.spec, prompts.prompt_name(r.question, turn)], asked))
    return records


def compare_models(
    side_1: Contestant,
    side_2: Contestant,
    questions: Sequence[Question],
    judge: Any,
    settings: SamplingSettings,
    output_dir: Path,
    *,
    bf16: bool | None = None,
    seed: int = 0,
    prompts: Any | None = None,
) -> dict[str, Any]:
    """Answer, judge in both orders, write the MT-Bench files and summary.json; return the summary. `prompts`
    (`dpokit.mtbench.MTBenchPrompts`) replaces our own pairwise prompt for an LLM judge.

    Under `accelerate launch` each process answers and judges its own contiguous share of the questions and
    the main process writes everything, in question order.
    """
    state = process_state()
    shard, _ = split_for_process(questions, state)
    records: list[ComparisonRecord] = []
    if shard:
        answers_1 = _answers_of(side_1, shard, settings, bf16)
        answers_2 = _answers_of(side_2, shard, settings, bf16)
        ids = (side_1.model_id, side_2.model_id)
        records = play_questions(judge, shard, answers_1, answers_2, ids, prompts)
    records = gather_in_order(records, state)
    summary: dict[str, Any] = {}
    if state.is_main_process:
        reasons = getattr(judge, "failure_reasons", None)
        summary = comparison_summary(records, side_1, side_2, judge.spec, settings, seed, failure_reasons=reasons)
        summary["judge_prompts"] = "mt-bench" if prompts is not None else "dpokit"
        write_comparison(output_dir, records, side_1, side_2, summary)
    state.wait_for_everyone()
    return summary


def comparison_summary(
    records: Sequence[ComparisonRecord],
    side_1: Contestant,
    side_2: Contestant,
    judge_spec: str,
    settings: SamplingSettings,
    seed: int,
    failure_reasons: dict[str, int] | None = None,
) -> dict[str, Any]:
    games = [g for r in records for g in r.games]
    lengths_1 = [len(a) for r in records for a in r.answers_1]
    lengths_2 = [len(a) for r in records for a in r.answers_2]
    return {
        **summarize_games(games, seed=seed),
        "per_category": summarize_by_category(games, seed=seed),
        "mean_length_a": sum(lengths_1) / len(lengths_1),
        "mean_length_b": sum(lengths_2) / len(lengths_2),
        "length_unit": "characters",
        "longer_answer_won": _longer_answer_won(records),
        "model_a": _side_summary(side_1),
        "model_b": _side_summary(side_2),
        "perspective": "wins, ties and losses are model B's (model_2) against model A (model_1)",
        "judge": judge_spec,
        "judge_failure_reasons": dict(failure_reasons or {}),
        "questions": len(records),
        "sampling": settings.to_dict(),
        "bootstrap": {"resamples": DEFAULT_RESAMPLES, "seed": seed, "cluster": "question"},
        "files": {"questions": QUESTIONS_FILE, "answers": ANSWERS_DIR, "judgments": JUDGMENTS_FILE},
    }


def _side_summary(side: Contestant) -> dict[str, Any]:
    row: dict[str, Any] = {"model_id": side.model_id, "model": side.model, "adapter": side.adapter}
    if side.answers_file is not None:
        row["answers"] = side.answers_file
    return row


def _longer_answer_won(records: Sequence[ComparisonRecord]) -> float | None:
    """Share of decisive games won by the longer answer: near 1 hints that the judge rewards length."""
    decisive = longer_won = 0
    for record in records:
        for game in record.games:
            if game.outcome not in ("win", "loss"):
                continue
            length_1 = len(record.answers_1[game.turn - 1])
            length_2 = len(record.answers_2[game.turn - 1])
            if length_1 == length_2:
                continue
            decisive += 1
            longer_won += (game.outcome == "win") == (length_2 > length_1)
    return longer_won / decisive if decisive else None


def write_comparison(
    output_dir: Path,
    records: Sequence[ComparisonRecord],
    side_1: Contestant,
    side_2: Contestant,
    summary: dict[str, Any],
) -> None:
    """question.jsonl, model_answer/<id>.jsonl, model_judgment/dpokit_pair.jsonl and summary.json, written into a
    staging folder that then replaces `output_dir`, so an earlier comparison there is never half overwritten."""
    replaceable = not output_dir.exists() or not any(output_dir.iterdir()) or (output_dir / SUMMARY_FILE).is_file()
    if not replaceable:
        raise UserError(f"output folder {output_dir} holds something other than a comparison; choose another folder")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        write_jsonl(staging / QUESTIONS_FILE, [r.question.to_mt_bench() for r in records])
        for side, pick in ((side_1, "answers_1"), (side_2, "answers_2")):
            rows = [_answer_row(side.model_id, r.question.question_id, getattr(r, pick)) for r in records]
            write_jsonl(staging / ANSWERS_DIR / f"{side.model_id}.jsonl", rows)
        write_jsonl(staging / JUDGMENTS_FILE, [j for r in records for j in r.judgments])
        write_atomic(staging / SUMMARY_FILE, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        os.chmod(staging, 0o755)
        if output_dir.exists():
            shutil.rmtree(output_dir)  # checked by _compare_output: empty, or a comparison replaced on request
        os.replace(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _answer_row(model_id: str, question_id: int | str, turns: list[str]) -> dict[str, Any]:
    """One line of MT-Bench's model_answer/<model_id>.jsonl."""
    digest = hashlib.sha256(json.dumps([model_id, question_id, turns]).encode()).hexdigest()[:22]
    return {
        "question_id": question_id,
        "answer_id": digest,
        "model_id": model_id,
        "choices": [{"index": 0, "turns": turns}],
        "tstamp": time.time(),
    }


def _compare_output(args: argparse.Namespace) -> Path:
    """The output folder: --output, or RUN_DIR/compare beside model B's adapter. An existing non-empty folder is
    replaced only with --overwrite, and only when it holds a comparison."""
    if args.output is not None:
        output = Path(args.output)
    else:
        run_dir = run_folder_of(args.adapter_b)
        if run_dir is None:
            raise UserError("give --output DIR (the default, RUN_DIR/compare, needs --adapter-b inside a run folder)")
        output = run_dir / COMPARE_DIR
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        if not args.overwrite:
            raise UserError(f"output folder {output} is not empty; choose another --output or add --overwrite")
        if not (output / SUMMARY_FILE).is_file():
            raise UserError(f"output folder {output} holds something other than a comparison; choose another --output")
    ensure_writable(output.resolve().parent, "--output")
    return output


def _contestants(args: argparse.Namespace) -> tuple[Contestant, Contestant, tuple[Settings, Settings]]:
    """Model A defaults to model B's base, so `--adapter-b RUN/adapter` alone compares before and after, A then
    answering with B's settings (its chat template, system messages, quantization) with the adapter off. A side
    given `--answers-X` (an MT-Bench answer file) is judged on those answers and loads no model. Also returns each
    side's settings."""
    answers_a, answers_b = getattr(args, "answers_a", None), getattr(args, "answers_b", None)
    for side, answers, model, adapter in (
        ("a", answers_a, args.model_a, args.adapter_a),
        ("b", answers_b, args.model_b, args.adapter_b),
    ):
        if answers is not None and (model is not None or adapter is not None):
            raise UserError(f"give --answers-{side} or --model-{side}/--adapter-{side}, not both")
    if args.model_b is None and args.adapter_b is None and answers_b is None:
        raise UserError("give --model-b and/or --adapter-b (or --answers-b): the model to compare against model A")
    view_b = resolve("compare", args, args.adapter_b, skip=("model_name_or_path",))
    model_a, view_a = args.model_a, view_b
    if model_a is None and args.adapter_a is None and answers_a is None:
        if answers_b is not None:
            raise UserError("give --model-a, --adapter-a or --answers-a: there is no model B whose base could be A")
        model_a = args.model_b or adapter_base_model(args.adapter_b)
    else:
        view_a = resolve("compare", args, args.adapter_a, skip=("model_name_or_path",))
    id_1 = args.name_a or _default_id(model_a, args.adapter_a, answers_a)
    id_2 = args.name_b or _default_id(args.model_b, args.adapter_b, answers_b)
    if id_1 == id_2:
        id_1, id_2 = f"{id_1}-A", f"{id_2}-B"
    side_1 = _contestant(model_a, args.adapter_a, id_1, view_a.config, answers_a, "--answers-a")
    side_2 = _contestant(args.model_b, args.adapter_b, id_2, view_b.config, answers_b, "--answers-b")
    return side_1, side_2, (view_a, view_b)


def _default_id(model: str | None, adapter: str | None, answers_file: str | None) -> str:
    """FastChat names a model by its answer file (model_answer/<name>.jsonl); a model by `contestant_id`."""
    if answers_file is not None:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(answers_file).stem).strip("-") or "model"
    return contestant_id(model, adapter)


def _contestant(
    model: str | None,
    adapter: str | None,
    model_id: str,
    cfg: DPOConfig,
    answers_file: str | None,
    flag: str,
) -> Contestant:
    system_message = cfg.system_message
    if answers_file is None:
        quant = quantization.start(cfg, process_state().device)  # the probe runs before any answer
        return Contestant(
            model,
            adapter,
            model_id,
            system_message,
            quant=quant,
            chat_template=cfg.chat_template,
            trust_remote_code=cfg.trust_remote_code,
        )
    from dpokit.mtbench import load_answer_file

    answers = load_answer_file(answers_file, flag)
    return Contestant(None, None, model_id, system_message, answers=answers, answers_file=f"{flag} {answers_file}")


def _judge_prompts(args: argparse.Namespace, questions: Sequence[Question]) -> Any | None:
    """MT-Bench's prompts from --judge-prompts (and --reference-answers), checked against the questions."""
    if args.judge_prompts is None:
        if args.reference_answers is not None:
            raise UserError("--reference-answers is read with --judge-prompts (MT-Bench's pair-math-v1); add it")
        return None
    from dpokit.mtbench import MTBenchPrompts, load_answer_file, load_judge_prompts

    references = None
    if args.reference_answers is not None:
        references = load_answer_file(args.reference_answers, "--reference-answers")
    prompts = MTBenchPrompts(load_judge_prompts(args.judge_prompts), references)
    prompts.check(questions)
    return prompts


def run_compare(args: argparse.Namespace) -> int:
    """`dpokit compare`: every input, the output folder and the judge are checked before any model loads."""
    from dpokit.judges import judge_options_from_args, load_judge
    from dpokit.mtbench import MTBENCH_MAX_TOKENS

    questions = load_questions(args.prompts, args.limit)
    output = _compare_output(args)
    settings = sampling_from_args(args)
    side_1, side_2, views = _contestants(args)
    for side in (side_1, side_2):
        if side.answers is not None:
            _answers_of(side, questions, settings, None)  # every question is answered there, or say so now
    prompts = _judge_prompts(args, questions)
    options = judge_options_from_args(args)
    if prompts is not None:
        options.setdefault("max_tokens", MTBENCH_MAX_TOKENS)  # MT-Bench's judge explains before its verdict
    judge = load_judge(args.judge, **options)
    try:
        if prompts is not None and not hasattr(judge, "compare_requests"):
            raise UserError(f"--judge-prompts needs an llm: or openai: judge; `{judge.spec}` reads no prompt")
        judge.check()  # an endpoint that cannot be reached fails now, not after every answer was generated
        for side in (side_1, side_2):
            if side.answers is None:
                check_loadable(side.model, side.adapter)  # model B's mistake is found before model A answers
                tokenizer = inference_tokenizer(side.model, side.adapter, side.chat_template, side.trust_remote_code)
                check_questions(tokenizer, questions, args.prompts, side.system_message, output.resolve().parent)
        for side, view in zip((side_1, side_2), views, strict=True):
            if side.answers is None:
                view.announce(f"compare: {side.model_id}")
        summary = compare_models(
            side_1,
            side_2,
            questions,
            judge,
            settings,
            output,
            bf16=views[1].config.bf16,
            seed=args.sampling_seed,
            prompts=prompts,
        )
    finally:
        judge.close()
    if summary:
        print_comparison(summary)
        print(f"answers, judgments and summary.json in {output}", file=sys.stderr)
    return 0
