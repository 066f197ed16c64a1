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
from dpokit.generation import SamplingSettings
from dpokit.inference import (
    check_loadable,
    inference_tokenizer,
    load_for_inference,
    sampling_from_args,
    system_message_of,
)
from dpokit.models import autocast_for
from dpokit.outputs import ensure_writable, write_atomic, write_jsonl
from dpokit.questions import Question, answer_questions, check_questions, load_questions
from dpokit.runs import ADAPTER_DIR_NAME, RUN_CONFIG, adapter_base_model, run_folder_of
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
    system_message: str = "keep"  # as the run was trained (see dpokit.data.chat_template)


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
        encode_pairs(tokenizer, pairs, system_message=settings.system_message),
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
        system_message=run_config.system_message,
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
    length_1: int | None = None  # characters of the judged answers (this turn's), for the length-controlled rate
    length_2: int | None = None

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
    failures count apart. The interval resamples questions (both turns of one question together). Beside them, the
    judge's position consistency and the length-controlled rate (`dpokit.judge_bias`), from the games that know
    their answers' lengths.
    """
    from dpokit.judge_bias import length_controlled_win_rate, position_consistency

    counted = [g for g in games if g.outcome != "failure"]
    measured = [g for g in counted if g.length_1 is not None and g.length_2 is not None]
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
        "position_consistency": position_consistency([(g.g1_winner, g.g2_winner) for g in counted]),
        "win_rate_length_controlled": length_controlled_win_rate(
            [g.score for g in measured], [g.length_2 - g.length_1 for g in measured]
        ),
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
    """One side of a comparison: a model, an optional adapter, and the model_id written into the outputs; or
    answers already made (an MT-Bench answer file, read by `dpokit.mtbench.load_answer_file`)."""

    model: str | None
    adapter: str | None
    model_id: str
    system_message: str = "keep"  # what its answers do with system turns (see dpokit.data.chat_template)
    answers: dict[str, list[str]] | None = field(default=None, compare=False, repr=False)
    answers_file: str | None = None
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
    if side.answers is not None:
        from dpokit.mtbench import answers_for

        return answers_for(side.answers, questions, side.answers_file or side.model_id)
    model, tokenizer = load_for_inference(side.model, side.adapter, side.quant)
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
        g1 = _mapped(v1, MODEL_1, MODEL_2, judge.spec)
        g2 = _mapped(v2, MODEL_2, MODEL_1, judge.spec)
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
    from accelerate.utils import gather_object

    state = process_state()
    with state.split_between_processes(list(questions)) as shard:
        records: list[ComparisonRecord] = []
        if shard:
            answers_1 = _answers_of(side_1, shard, settings, bf16)
            answers_2 = _answers_of(side_2, shard, settings, bf16)
            ids = (side_1.model_id, side_2.model_id)
            records = play_questions(judge, shard, answers_1, answers_2, ids, prompts)
    records = gather_object(records)
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


def _contestants(args: argparse.Namespace) -> tuple[Contestant, Contestant]:
    """Model A defaults to model B's base, so `--adapter-b RUN/adapter` alone compares before and after. A side given
    `--answers-X` (an MT-Bench answer file) is judged on those answers and loads no model."""
    answers_a, answers_b = getattr(args, "answers_a", None), getattr(args, "answers_b", None)
    for side, answers, model, adapter in (
        ("a", answers_a, args.model_a, args.adapter_a),
        ("b", answers_b, args.model_b, args.adapter_b),
    ):
        if answers is not None and (model is not None or adapter is not None):
            raise UserError(f"give --answers-{side} or --model-{side}/--adapter-{side}, not both")
    if args.model_b is None and args.adapter_b is None and answers_b is None:
        raise UserError("give --model-b and/or --adapter-b (or --answers-b): the model to compare against model A")
    model_a = args.model_a
    if model_a is None and args.adapter_a is None and answers_a is None:
        if answers_b is not None:
            raise UserError("give --model-a, --adapter-a or --answers-a: there is no model B whose base could be A")
        model_a = args.model_b or adapter_base_model(args.adapter_b)
    id_1 = args.name_a or _default_id(model_a, args.adapter_a, answers_a)
    id_2 = args.name_b or _default_id(args.model_b, args.adapter_b, answers_b)
    if id_1 == id_2:
        id_1, id_2 = f"{id_1}-A", f"{id_2}-B"
    policy_1 = system_message_of(args.adapter_a, args.system_message)
    policy_2 = system_message_of(args.adapter_b, args.system_message)
    quant = quantization.from_flags(args)
    return _contestant(model_a, args.adapter_a, id_1, policy_1, quant, answers_a, "--answers-a"), _contestant(
        args.model_b, args.adapter_b, id_2, policy_2, quant, answers_b, "--answers-b"
    )


def _default_id(model: str | None, adapter: str | None, answers_file: str | None) -> str:
    """FastChat names a model by its answer file (model_answer/<name>.jsonl); a model by `contestant_id`."""
    if answers_file is not None:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(answers_file).stem).strip("-") or "model"
    return contestant_id(model, adapter)


def _contestant(
    model: str | None,
    adapter: str | None,
    model_id: str,
    system_message: str,
    quant: quantization.Quantization | None,
    answers_file: str | None,
    flag: str,
) -> Contestant:
    if answers_file is None:
        return Contestant(model, adapter, model_id, system_message, quant=quant)
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
    side_1, side_2 = _contestants(args)
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
                tokenizer = inference_tokenizer(side.model, side.adapter)
                check_questions(tokenizer, questions, args.prompts, side.system_message, output.resolve().parent)
        summary = compare_models(
            side_1, side_2, questions, judge, settings, output, bf16=args.bf16, seed=args.seed, prompts=prompts
        )
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
        f"mean answer length: A {summary['mean_length_a']:.0f}, B {summary['mean_length_b']:.0f} characters; "
        f"length-controlled win rate {_percent(summary['win_rate_length_controlled'])}; judge position "
        f"consistency {_percent(summary['position_consistency'])} (both orders agree)",
        markup=False,
    )
    reasons = summary.get("judge_failure_reasons") or {}
    if reasons:
        shown = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
        console.print(f"judge gave no verdict {sum(reasons.values())} times: {shown}", markup=False)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
