"""Did alignment work? Implicit-reward accuracy on held-out pairs (`eval`) and a judged pairwise comparison
(`compare`).

- `eval`: on held-out pairs, the implicit DPO reward beta * (log pi(y|x) - log pi_ref(y|x)) (summed over response
  tokens, as in training and RewardBench's DPO mode) of the chosen and the rejected response. A pair counts as
  accurate when the chosen reward is strictly higher (an exact tie is not, as in TRL's `rewards/accuracies`).
  With `--adapter` the reference is the same base with the adapter switched off; a fully fine-tuned `--model`
  needs its starting point named with `--reference`, because nothing else can tell what it moved away from.
- `compare`: answers from two models, every (question, turn) judged twice with the answers' order swapped. Model
  B wins only when both orders say so, likewise A; any other pair of verdicts is a tie (MT-Bench's rule). A judge
  that gives no verdict in one order or both makes a *failure*: counted apart and left out of wins, ties, losses and
  every rate, as MT-Bench's `show_result.py` drops "error" judgments, so a flaky judge cannot pose as a tie.

Files, so that `dpokit report RUN_DIR` finds them (RUN_DIR is a `dpokit train` output folder, its adapter in
RUN_DIR/adapter): `eval` writes RUN_DIR/eval.json and `compare` the folder RUN_DIR/compare/ by default when the (B)
adapter sits in a run folder. A compare folder is laid out as an MT-Bench bench folder: question.jsonl,
model_answer/<model_id>.jsonl, model_judgment/dpokit_pair.jsonl, plus summary.json.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
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
from dpokit.data import Message, Pair
from dpokit.data.encode import EncodedPair
from dpokit.distributed import process_state
from dpokit.errors import UserError
from dpokit.inference import (
    ADAPTER_DIR_NAME,
    RUN_CONFIG,
    Question,
    adapter_base_model,
    answer_questions,
    check_loadable,
    load_for_inference,
    load_questions,
    run_folder_of,
    sampling_from_args,
)
from dpokit.models import autocast_for
from dpokit.outputs import ensure_writable, write_atomic, write_jsonl
from dpokit.sampling import SamplingSettings
from dpokit.stats import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, bootstrap_mean_interval

EVAL_FILE = "eval.json"
COMPARE_DIR = "compare"
QUESTIONS_FILE = "question.jsonl"
ANSWERS_DIR = "model_answer"
JUDGMENTS_FILE = "model_judgment/dpokit_pair.jsonl"
SUMMARY_FILE = "summary.json"


# --- eval: implicit reward on held-out pairs ------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSettings:
    beta: float = 0.1
    batch_size: int = 8
    max_length: int | None = 1024
    max_prompt_length: int | None = None
    truncation_mode: str = "keep_start"
    bf16: bool | None = None  # None: where the hardware runs it fast


@torch.no_grad()
def sequence_logps_of_pairs(
    model: Any, tokenizer: Any, encoded: Sequence[EncodedPair], settings: EvalSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the chosen and of the rejected responses under `model`, in batches: (N,) each."""
    from dpokit.data.collate import collate
    from dpokit.logprobs import SequenceLogps

    scorer = SequenceLogps(model)
    device = next(model.parameters()).device
    chosen, rejected = [], []
    for start in range(0, len(encoded), settings.batch_size):
        batch = collate(encoded[start : start + settings.batch_size], tokenizer.pad_token_id, padding_free=True)
        with autocast_for(device, settings.bf16):
            logps = scorer(batch.to(device))
        chosen.append(logps.chosen.float().cpu())
        rejected.append(logps.rejected.float().cpu())
    return torch.cat(chosen), torch.cat(rejected)


def evaluate_pairs(
    model: Any, tokenizer: Any, pairs: Sequence[Pair], settings: EvalSettings, reference: Any | None = None
) -> dict[str, Any]:
    """Implicit-reward metrics of `model` against `reference` (None: `model` with its adapter switched off)."""
    from dpokit.data.encode import apply_length_policy, encode_pairs

    encoded = apply_length_policy(
        encode_pairs(tokenizer, pairs),
        [p.origin for p in pairs],
        max_length=settings.max_length,
        max_prompt_length=settings.max_prompt_length,
        truncation_mode=settings.truncation_mode,
    )
    if not encoded.pairs:
        raise UserError(f"no pair is left after the length limits ({encoded.counts}); raise --max-length")
    policy_chosen_logps, policy_rejected_logps = sequence_logps_of_pairs(model, tokenizer, encoded.pairs, settings)
    if reference is None:
        with model.disable_adapter():
            reference_chosen_logps, reference_rejected_logps = sequence_logps_of_pairs(
                model, tokenizer, encoded.pairs, settings
            )
    else:
        reference_chosen_logps, reference_rejected_logps = sequence_logps_of_pairs(
            reference, tokenizer, encoded.pairs, settings
        )
    chosen_rewards = settings.beta * (policy_chosen_logps - reference_chosen_logps)  # (N,)
    rejected_rewards = settings.beta * (policy_rejected_logps - reference_rejected_logps)  # (N,)
    accurate = (chosen_rewards > rejected_rewards).double()
    low, high = bootstrap_mean_interval(accurate.tolist())
    return {
        "pairs": len(encoded.pairs),
        "beta": settings.beta,
        "rewards/accuracies": accurate.mean().item(),
        "accuracy_ci_low": low,
        "accuracy_ci_high": high,
        "rewards/margins": (chosen_rewards - rejected_rewards).double().mean().item(),
        "rewards/chosen": chosen_rewards.double().mean().item(),
        "rewards/rejected": rejected_rewards.double().mean().item(),
        "logps/chosen": policy_chosen_logps.double().mean().item(),
        "logps/rejected": policy_rejected_logps.double().mean().item(),
        "ref_logps/chosen": reference_chosen_logps.double().mean().item(),
        "ref_logps/rejected": reference_rejected_logps.double().mean().item(),
        "length_policy": encoded.counts,
    }


def _eval_settings(args: argparse.Namespace, run_dir: Path | None) -> tuple[EvalSettings, str]:
    """Settings from the flags, falling back to the run's own config.yaml, then to the training defaults."""
    from dpokit.config import DPOConfig, load_config

    run_config = load_config(run_dir / RUN_CONFIG) if run_dir is not None else DPOConfig()
    source = f"{run_dir / RUN_CONFIG}" if run_dir is not None else "defaults"
    beta = args.beta if args.beta is not None else run_config.beta
    if beta <= 0 or not math.isfinite(beta):
        raise UserError(f"--beta must be a positive number, got {beta}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    settings = EvalSettings(
        beta=beta,
        batch_size=args.batch_size,
        max_length=args.max_length if args.max_length is not None else run_config.max_length,
        max_prompt_length=run_config.max_prompt_length,
        truncation_mode=run_config.truncation_mode,
        bf16=args.bf16,
    )
    return settings, ("--beta" if args.beta is not None else source)


def run_eval(args: argparse.Namespace) -> int:
    from dpokit.data.load import load_pairs

    if args.adapter is None and args.reference is None:
        raise UserError(
            "eval needs a reference: give --adapter (the reference is --model with the adapter off) or, for a "
            "fully fine-tuned --model, --reference with the model it started from"
        )
    if args.adapter is not None and args.reference is not None:
        raise UserError("give either --adapter (reference: the base without it) or --reference, not both")
    run_dir = run_folder_of(args.adapter)
    settings, beta_source = _eval_settings(args, run_dir)
    output = Path(args.output) if args.output else (run_dir / EVAL_FILE if run_dir is not None else None)
    if output is not None:
        ensure_writable(output.resolve().parent, "--output")
    loaded = load_pairs(args.data, split=args.split, data_format=args.data_format, max_bad_rows=args.max_bad_rows)
    quant = quantization.from_flags(args)
    model, tokenizer = load_for_inference(args.model, args.adapter, quant)
    reference = None
    if args.reference is not None:
        reference, _ = load_for_inference(args.reference, None, quant)
    metrics = evaluate_pairs(model, tokenizer, loaded.pairs, settings, reference)
    result = {
        "data": loaded.source,
        "data_format": loaded.format,
        "bad_rows": len(loaded.bad_rows),
        "rows_dropped": loaded.counts,
        "model": args.model or adapter_base_model(args.adapter),
        "adapter": args.adapter,
        "reference": args.reference or "the model with the adapter switched off",
        "beta_from": beta_source,
        "quantization": quant.describe() if quant is not None else None,
        **metrics,
    }
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if output is not None:
        write_atomic(output, text + "\n")
        print(f"written to {output}", file=sys.stderr)
    return 0


# --- compare: pairwise judging with position swap -------------------------------------------------------------------

MODEL_1, MODEL_2, TIE, ERROR = "model_1", "model_2", "tie", "error"  # MT-Bench's g1/g2_winner values
OUTCOMES = ("win", "tie", "loss", "failure")  # of model B (model_2) against model A (model_1)
SECOND_TURN_PROMPT = (
    "This conversation has {n} user turns. Judge the answer to the last one, given the earlier answers.\n\n{turns}"
)


@dataclass(frozen=True)
class Game:
    """One judged (question, turn): the verdicts of both orders as MT-Bench writes them."""

    question_id: int | str
    turn: int  # 1-based
    g1_winner: str  # answers shown as (A, B): model_1 | model_2 | tie | error
    g2_winner: str  # answers shown as (B, A), already mapped back to model names
    category: str | None = None

    @property
    def outcome(self) -> str:
        """win / tie / loss of model_2, or failure when the judge gave no verdict in one order or both."""
        if ERROR in (self.g1_winner, self.g2_winner):
            return "failure"
        if self.g1_winner == self.g2_winner == MODEL_2:
            return "win"
        if self.g1_winner == self.g2_winner == MODEL_1:
            return "loss"
        return "tie"  # both said tie, or the orders disagree (position bias)

    @property
    def score(self) -> float:
        return {"win": 1.0, "tie": 0.5, "loss": 0.0}[self.outcome]


def _mapped(verdict: str | None, first: str, second: str, judge_spec: str) -> str:
    """A judge's "A" / "B" / "tie" / None in presentation order -> the model it names (MT-Bench's g*_winner)."""
    mapping = {"A": first, "B": second, "tie": TIE, None: ERROR}
    if verdict not in mapping:
        raise UserError(f"judge {judge_spec} answered {verdict!r}; a verdict must be 'A', 'B', 'tie' or None")
    return mapping[verdict]


def judge_both_orders(judge: Any, prompt: list[Message], answer_1: str, answer_2: str) -> tuple[str, str]:
    """(g1_winner, g2_winner): model_1's answer shown first, then model_2's first."""
    g1 = _mapped(judge.compare(prompt, answer_1, answer_2), MODEL_1, MODEL_2, judge.spec)
    g2 = _mapped(judge.compare(prompt, answer_2, answer_1), MODEL_2, MODEL_1, judge.spec)
    return g1, g2


def summarize_games(
    games: Sequence[Game],
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """Wins, ties, losses of model_2, MT-Bench's rates, and a bootstrap interval of the adjusted rate.

    `win_rate` = wins / total and `win_rate_adjusted` = (wins + ties / 2) / total, total = wins + ties + losses;
    failures count apart. The interval resamples questions (both turns of one question together).
    """
    counted = [g for g in games if g.outcome != "failure"]
    counts = {o: sum(g.outcome == o for g in games) for o in OUTCOMES}
    total = len(counted)
    summary: dict[str, Any] = {
        "wins": counts["win"],
        "ties": counts["tie"],
        "losses": counts["loss"],
        "judge_failures": counts["failure"],
        "total": total,
        "win_rate": counts["win"] / total if total else None,
        "win_rate_adjusted": (counts["win"] + counts["tie"] / 2) / total if total else None,
        "ci_low": None,
        "ci_high": None,
        "confidence": confidence,
    }
    if total:
        summary["ci_low"], summary["ci_high"] = bootstrap_mean_interval(
            [g.score for g in counted],
            [g.question_id for g in counted],
            confidence=confidence,
            n_resamples=n_resamples,
            seed=seed,
        )
    return summary


def summarize_by_category(games: Sequence[Game], seed: int = 0) -> dict[str, dict[str, Any]]:
    """`summarize_games` per category, for the games whose question has one."""
    categories = sorted({g.category for g in games if g.category is not None})
    return {c: summarize_games([g for g in games if g.category == c], seed=seed) for c in categories}


def judged_exchange(
    question: Question, turn: int, answers_1: Sequence[str], answers_2: Sequence[str]
) -> tuple[list[Message], str, str]:
    """(prompt, answer_1, answer_2) shown to the judge for turn `turn` (1-based).

    The first turn is the question and the two answers. For a later turn the two conversations differ before it
    (each holds its own model's earlier answers), so, as MT-Bench's multi-turn judge does, the judge sees every
    question and each side's whole conversation, and is asked about the last answer.
    """
    if turn == 1:
        return [*question.context, {"role": "user", "content": question.turns[0]}], answers_1[0], answers_2[0]
    questions = "\n\n".join(f"Question {i}: {t}" for i, t in enumerate(question.turns[:turn], 1))
    prompt = [*question.context, {"role": "user", "content": SECOND_TURN_PROMPT.format(n=turn, turns=questions)}]

    def conversation(answers: Sequence[str]) -> str:
        return "\n\n".join(f"Answer {i}: {a}" for i, a in enumerate(answers[:turn], 1))

    return prompt, conversation(answers_1), conversation(answers_2)


@dataclass(frozen=True)
class Contestant:
    """One side of a comparison: a model, an optional adapter, and the model_id written into the outputs."""

    model: str | None
    adapter: str | None
    model_id: str
    quant: quantization.Quantization | None = None  # the base quantized as it loads (--load-in-4bit/8bit)


def contestant_id(model: str | None, adapter: str | None) -> str:
    """A readable model_id: the run folder's name for an adapter at RUN_DIR/adapter, else the folder or model."""
    if adapter is not None:
        path = Path(adapter).resolve()
        name = path.parent.name if path.name == ADAPTER_DIR_NAME else path.name
    else:
        name = (model or "model").removeprefix("builtin:").rstrip("/").split("/")[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def _answers_of(side: Contestant, questions: Sequence[Question], settings: SamplingSettings, bf16: bool | None):
    model, tokenizer = load_for_inference(side.model, side.adapter, side.quant)
    answers = answer_questions(model, tokenizer, questions, settings, bf16)
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


def play_question(
    judge: Any, question: Question, answers_1: list[str], answers_2: list[str], ids: tuple[str, str]
) -> ComparisonRecord:
    """Judge every turn of one question in both orders; judgment rows in MT-Bench's pairwise layout."""
    record = ComparisonRecord(question, answers_1, answers_2)
    for turn in range(1, len(question.turns) + 1):
        prompt, answer_1, answer_2 = judged_exchange(question, turn, answers_1, answers_2)
        g1, g2 = judge_both_orders(judge, prompt, answer_1, answer_2)
        game = Game(question.question_id, turn, g1, g2, question.category)
        record.games.append(game)
        record.judgments.append(
            {
                "question_id": question.question_id,
                "model_1": ids[0],
                "model_2": ids[1],
                "g1_winner": g1,
                "g2_winner": g2,
                "judge": [judge.spec, "dpokit-pair" if turn == 1 else "dpokit-pair-multi-turn"],
                "g1_user_prompt": prompt[-1]["content"],
                "g1_judgment": g1,
                "g2_user_prompt": prompt[-1]["content"],
                "g2_judgment": g2,
                "turn": turn,
                "tstamp": time.time(),
                "category": question.category,
                "outcome": game.outcome,
            }
        )
    return record


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
) -> dict[str, Any]:
    """Answer, judge in both orders, write the MT-Bench files and summary.json; return the summary.

    Under `accelerate launch` each process answers and judges its own contiguous share of the questions and
    the main process writes everything, in question order.
    """
    from accelerate.utils import gather_object

    state = process_state()
    with state.split_between_processes(list(questions)) as shard:
        records: list[ComparisonRecord] = []
        if shard:
            answers_1 = _answers_of(side_1, shard, settings, bf16)
            answers_2 = _answers_of(side_2, shard, settings, bf16)
            ids = (side_1.model_id, side_2.model_id)
            records = [
                play_question(judge, q, a1, a2, ids) for q, a1, a2 in zip(shard, answers_1, answers_2, strict=True)
            ]
    records = gather_object(records)
    summary: dict[str, Any] = {}
    if state.is_main_process:
        summary = comparison_summary(records, side_1, side_2, judge.spec, settings, seed)
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
        "model_a": {"model_id": side_1.model_id, "model": side_1.model, "adapter": side_1.adapter},
        "model_b": {"model_id": side_2.model_id, "model": side_2.model, "adapter": side_2.adapter},
        "perspective": "wins, ties and losses are model B's (model_2) against model A (model_1)",
        "judge": judge_spec,
        "questions": len(records),
        "sampling": settings.to_dict(),
        "bootstrap": {"resamples": DEFAULT_RESAMPLES, "seed": seed, "cluster": "question"},
        "files": {"questions": QUESTIONS_FILE, "answers": ANSWERS_DIR, "judgments": JUDGMENTS_FILE},
    }


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


def _contestants(args: argparse.Namespace) -> tuple[Contestant, Contestant]:
    """Model A defaults to model B's base, so `--adapter-b RUN/adapter` alone compares before and after."""
    if args.model_b is None and args.adapter_b is None:
        raise UserError("give --model-b and/or --adapter-b: the model to compare against model A")
    model_a = args.model_a
    if model_a is None and args.adapter_a is None:
        model_a = args.model_b or adapter_base_model(args.adapter_b)
    id_1 = args.name_a or contestant_id(model_a, args.adapter_a)
    id_2 = args.name_b or contestant_id(args.model_b, args.adapter_b)
    if id_1 == id_2:
        id_1, id_2 = f"{id_1}-A", f"{id_2}-B"
    quant = quantization.from_flags(args)
    return Contestant(model_a, args.adapter_a, id_1, quant), Contestant(args.model_b, args.adapter_b, id_2, quant)


def run_compare(args: argparse.Namespace) -> int:
    """`dpokit compare`: every input, the output folder and the judge are checked before any model loads."""
    from dpokit.judges import judge_options_from_args, load_judge

    questions = load_questions(args.prompts, args.limit)
    output = _compare_output(args)
    settings = sampling_from_args(args)
    side_1, side_2 = _contestants(args)
    judge = load_judge(args.judge, **judge_options_from_args(args))
    try:
        judge.check()  # an endpoint that cannot be reached fails now, not after every answer was generated
        for side in (side_1, side_2):
            check_loadable(side.model, side.adapter)  # model B's mistake is found before model A answers
        summary = compare_models(side_1, side_2, questions, judge, settings, output, bf16=args.bf16, seed=args.seed)
    finally:
        judge.close()
    if summary:
        print_comparison(summary)
        print(f"answers, judgments and summary.json in {output}", file=sys.stderr)
    return 0


def print_comparison(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    a, b = summary["model_a"]["model_id"], summary["model_b"]["model_id"]
    table = Table(title=f"{b} (B) against {a} (A), judged by {summary['judge']}")
    for column in ("", "wins", "ties", "losses", "failures", "win rate", "adjusted", "95% CI"):
        table.add_column(column, justify="right" if column else "left")
    rows = [("all", summary)] + list(summary["per_category"].items())
    for name, s in rows:
        table.add_row(
            name,
            str(s["wins"]),
            str(s["ties"]),
            str(s["losses"]),
            str(s["judge_failures"]),
            _percent(s["win_rate"]),
            _percent(s["win_rate_adjusted"]),
            f"{_percent(s['ci_low'])} - {_percent(s['ci_high'])}",
        )
    console = Console()
    console.print(table)
    console.print(
        f"mean answer length: A {summary['mean_length_a']:.0f}, B {summary['mean_length_b']:.0f} characters",
        markup=False,
    )


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
