"""Did alignment work? Implicit-reward accuracy, judged pairwise comparison, chat, vibe check, merging.

- `eval`: on held-out pairs, the implicit DPO reward beta * (log pi(y|x) - log pi_ref(y|x)) (summed over response
  tokens, as in training and RewardBench's DPO mode) of the chosen and the rejected response. A pair counts as
  accurate when the chosen reward is strictly higher (an exact tie is not, as in TRL's `rewards/accuracies`).
  With `--adapter` the reference is the same base with the adapter switched off; a fully fine-tuned `--model`
  needs its starting point named with `--reference`, because nothing else can tell what it moved away from.
- `compare`: answers from two models, every (question, turn) judged twice with the answers' order swapped. Model
  B wins only when both orders say so, likewise A; any other pair of verdicts is a tie (MT-Bench's rule). A judge
  that gives no verdict in one order or both makes a *failure*: counted apart and left out of wins, ties, losses and
  every rate, as MT-Bench's `show_result.py` drops "error" judgments, so a flaky judge cannot pose as a tie.
- `chat`, `vibe`: talk to a model; base and aligned answers side by side.
- `merge`: LoRA folded into its base, saved as a plain transformers model, checked against the unmerged model.

Files, so that `dpokit report RUN_DIR` finds them (RUN_DIR is a `dpokit train` output folder, its adapter in
RUN_DIR/adapter): `eval` writes RUN_DIR/eval.json, `vibe` RUN_DIR/vibe.jsonl and `compare` the folder
RUN_DIR/compare/ by default when the (B) adapter sits in a run folder. A compare folder is laid out as an MT-Bench
bench folder: question.jsonl, model_answer/<model_id>.jsonl, model_judgment/dpokit_pair.jsonl, plus summary.json.
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dpokit.data import Message, Pair
from dpokit.data.encode import EncodedPair
from dpokit.errors import UserError
from dpokit.sampling import SamplingSettings, generate_responses
from dpokit.stats import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, bootstrap_mean_interval

ADAPTER_DIR_NAME = "adapter"  # a run's final adapter: RUN_DIR/adapter
RUN_CONFIG = "config.yaml"  # what marks a folder as a `dpokit train` run
EVAL_FILE = "eval.json"
VIBE_FILE = "vibe.jsonl"
COMPARE_DIR = "compare"
QUESTIONS_FILE = "question.jsonl"
ANSWERS_DIR = "model_answer"
JUDGMENTS_FILE = "model_judgment/dpokit_pair.jsonl"
SUMMARY_FILE = "summary.json"


# --- models ---------------------------------------------------------------------------------------------------------


def adapter_base_model(adapter_dir: str | os.PathLike) -> str:
    """The base an adapter belongs to: `dpokit.json`'s `base_model` (the name as the user gave it, e.g. a
    `builtin:` name) when dpokit trained it, else `base_model_name_or_path` from adapter_config.json."""
    from dpokit.models import base_model_of_adapter

    recorded = base_model_of_adapter(adapter_dir)  # also checks that this is an adapter folder
    dpokit_file = Path(adapter_dir) / "dpokit.json"
    if dpokit_file.is_file():
        try:
            base = json.loads(dpokit_file.read_text(encoding="utf-8")).get("base_model")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise UserError(f"{dpokit_file} is not a valid JSON object; delete it to use {recorded}") from e
        if isinstance(base, str) and base:
            return base
    return recorded


def run_folder_of(adapter_dir: str | os.PathLike | None) -> Path | None:
    """The `dpokit train` run an adapter belongs to: the nearest folder above it that holds config.yaml."""
    if adapter_dir is None:
        return None
    for folder in Path(adapter_dir).resolve().parents:
        if (folder / RUN_CONFIG).is_file():
            return folder
    return None


def load_for_inference(model_name: str | None, adapter: str | None) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode on this process's device, with the adapter attached when given.

    The tokenizer comes from the adapter folder when training saved one there (it holds the chat template the
    adapter was trained with), else from the base model with the chat template of the adapter's run, if any.
    """
    from accelerate import PartialState

    from dpokit.models import load_adapter, load_model, load_tokenizer

    if model_name is None:
        if adapter is None:
            raise UserError("give --model, or an --adapter whose base model is then used")
        model_name = adapter_base_model(adapter)
    if adapter is not None and not Path(adapter).is_dir():
        raise UserError(f"adapter folder {adapter} does not exist")
    has_own_tokenizer = adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file()
    if has_own_tokenizer:
        tokenizer = load_tokenizer(str(adapter))
    else:
        tokenizer = load_tokenizer(model_name, chat_template=_run_chat_template(adapter))
    model = load_model(model_name)
    if adapter is not None:
        model = load_adapter(model, adapter)
    model.to(PartialState().device)
    model.eval()
    return model, tokenizer


def _run_chat_template(adapter: str | None) -> str | None:
    """The `chat_template` override of the run the adapter was trained in, so answers use the training format."""
    from dpokit.config import load_config

    run_dir = run_folder_of(adapter)
    return load_config(run_dir / RUN_CONFIG).chat_template if run_dir is not None else None


def bf16_autocast(model: Any, enabled: bool | None) -> contextlib.AbstractContextManager:
    """bf16 autocast where it pays (None: decide by the hardware), else nothing."""
    from dpokit.models import bf16_is_fast

    device = next(model.parameters()).device
    if enabled is None:
        enabled = bf16_is_fast(device)
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


# --- prompts --------------------------------------------------------------------------------------------------------
# TODO(merge): this minimal reader stands in for `dpokit.prompts` (MT-Bench question.jsonl and `prompt` rows);
# switch `read_questions` to it when it lands.


@dataclass(frozen=True)
class Question:
    """One prompt to answer: its user turns are answered one after another in the same conversation."""

    question_id: int | str
    turns: tuple[str, ...]
    category: str | None = None
    context: tuple[Message, ...] = ()  # messages before the first turn (a system prompt, an earlier exchange)

    def to_mt_bench(self) -> dict[str, Any]:
        row: dict[str, Any] = {"question_id": self.question_id, "category": self.category, "turns": list(self.turns)}
        if self.context:
            row["context"] = list(self.context)
        return row


def read_questions(path: str) -> list[Question]:
    """Questions from MT-Bench's question.jsonl layout (`question_id`, `category`, `turns`), JSONL rows with a
    `prompt` (text or a conversation ending in a user message), or a .txt file with one prompt per line."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"prompts file {path} does not exist")
    text = _read_text(file)
    if file.suffix.lower() == ".txt":
        questions = [Question(i, (line.strip(),)) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    else:
        questions = [_question_from_row(row, f"{path}:{n}", n) for n, row in _json_rows(file, text)]
    if not questions:
        raise UserError(f"prompts file {path} holds no prompt text; give one prompt per row")
    ids = [q.question_id for q in questions]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"prompts file {path}: question_id {duplicate!r} appears more than once")
    return questions


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"prompts file {file}: undecodable bytes (not UTF-8) at byte {e.start}") from None


def _json_rows(file: Path, text: str) -> Iterator[tuple[int, Any]]:
    if file.suffix.lower() == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"prompts file {file}: invalid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(rows, list):
            raise UserError(f"prompts file {file}: expected a JSON list of rows, got {type(rows).__name__}")
        yield from enumerate(rows, 1)
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"prompts file {file}:{number}: invalid JSON ({e.msg} at column {e.colno})") from None


def _question_from_row(row: Any, origin: str, number: int) -> Question:
    if not isinstance(row, dict):
        raise UserError(f"{origin}: expected a JSON object, got {type(row).__name__}")
    category = row.get("category")
    category = str(category) if category is not None else None
    question_id = row.get("question_id", row.get("id", number))
    if "turns" in row:
        turns = row["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise UserError(f"{origin}: `turns` must be a non-empty list of non-empty texts")
        return Question(question_id, tuple(turns), category)
    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        return Question(question_id, (prompt,), category)
    if isinstance(prompt, list) and prompt:
        if not all(isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in prompt):
            raise UserError(f"{origin}: `prompt` messages must be objects with role and content")
        last = prompt[-1]
        if last["role"] != "user" or not last["content"].strip():
            raise UserError(f"{origin}: a `prompt` conversation must end with a non-empty user message")
        context = tuple({"role": m["role"], "content": m["content"]} for m in prompt[:-1])
        return Question(question_id, (last["content"],), category, context)
    raise UserError(f"{origin}: a prompt row needs non-empty `turns` (MT-Bench) or `prompt` (text or messages)")


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
        with bf16_autocast(model, settings.bf16):
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
    model, tokenizer = load_for_inference(args.model, args.adapter)
    reference = None
    if args.reference is not None:
        reference, _ = load_for_inference(args.reference, None)
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
        **metrics,
    }
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if output is not None:
        _write_atomic(output, text + "\n")
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


def contestant_id(model: str | None, adapter: str | None) -> str:
    """A readable model_id: the run folder's name for an adapter at RUN_DIR/adapter, else the folder or model."""
    if adapter is not None:
        path = Path(adapter).resolve()
        name = path.parent.name if path.name == ADAPTER_DIR_NAME else path.name
    else:
        name = (model or "model").removeprefix("builtin:").rstrip("/").split("/")[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def answer_questions(
    model: Any, tokenizer: Any, questions: Sequence[Question], settings: SamplingSettings, bf16: bool | None = None
) -> list[list[str]]:
    """Each question's answers, one per turn; a later turn is asked in the conversation holding the earlier
    answers of the same model, as MT-Bench does."""
    conversations = [list(q.context) for q in questions]
    answers: list[list[str]] = [[] for _ in questions]
    for turn in range(max(len(q.turns) for q in questions)):
        active = [i for i, q in enumerate(questions) if len(q.turns) > turn]
        for i in active:
            conversations[i].append({"role": "user", "content": questions[i].turns[turn]})
        with bf16_autocast(model, bf16):
            outputs = generate_responses(model, tokenizer, [conversations[i] for i in active], settings)
        for i, samples in zip(active, outputs, strict=True):
            answers[i].append(samples[0])
            conversations[i].append({"role": "assistant", "content": samples[0]})
    return answers


def _answers_of(side: Contestant, questions: Sequence[Question], settings: SamplingSettings, bf16: bool | None):
    model, tokenizer = load_for_inference(side.model, side.adapter)
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
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
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
        _write_jsonl(staging / QUESTIONS_FILE, [r.question.to_mt_bench() for r in records])
        for side, pick in ((side_1, "answers_1"), (side_2, "answers_2")):
            rows = [_answer_row(side.model_id, r.question.question_id, getattr(r, pick)) for r in records]
            _write_jsonl(staging / ANSWERS_DIR / f"{side.model_id}.jsonl", rows)
        _write_jsonl(staging / JUDGMENTS_FILE, [j for r in records for j in r.judgments])
        _write_atomic(staging / SUMMARY_FILE, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
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


def _sampling(args: argparse.Namespace) -> SamplingSettings:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be 0 (greedy) or more, got {args.temperature}")
    return SamplingSettings(
        num_samples=1,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        batch_size=args.batch_size,
    )


def _limited(questions: list[Question], limit: int | None) -> list[Question]:
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    return questions[:limit] if limit is not None else questions


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
    return Contestant(model_a, args.adapter_a, id_1), Contestant(args.model_b, args.adapter_b, id_2)


def run_compare(args: argparse.Namespace) -> int:
    questions = _limited(read_questions(args.prompts), args.limit)
    output = _compare_output(args)
    settings = _sampling(args)
    side_1, side_2 = _contestants(args)
    from dpokit.judges import load_judge

    judge = load_judge(args.judge)  # before any answer is generated: a bad judge fails in seconds
    summary = compare_models(side_1, side_2, questions, judge, settings, output, bf16=args.bf16, seed=args.seed)
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


# --- chat and vibe --------------------------------------------------------------------------------------------------


def run_chat(args: argparse.Namespace) -> int:
    """A conversation in the terminal; lines come from stdin, so it can be scripted."""
    from dpokit.config import BUILTIN_MODEL

    model_name = args.model or (None if args.adapter else BUILTIN_MODEL)
    model, tokenizer = load_for_inference(model_name, args.adapter)
    settings = _sampling(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[Message] = list(system)
    print("type a message; /reset starts over, /exit leaves", flush=True)
    turn = 0
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        text = line.strip()
        if text == "/exit":
            return 0
        if text == "/reset":
            history = list(system)
            print("(conversation cleared)", flush=True)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        turn_settings = SamplingSettings(**{**settings.to_dict(), "seed": settings.seed + turn})
        with bf16_autocast(model, args.bf16):
            reply = generate_responses(model, tokenizer, [history], turn_settings)[0][0]
        history.append({"role": "assistant", "content": reply})
        turn += 1
        print(f"assistant> {reply}", flush=True)


def vibe_check(
    model: Any, tokenizer: Any, questions: Sequence[Question], settings: SamplingSettings, bf16: bool | None = None
) -> list[tuple[str, str]]:
    """(base answer, aligned answer) to each question's first turn: the adapter switched off, then on."""
    first_turns = [Question(q.question_id, q.turns[:1], q.category, q.context) for q in questions]
    with model.disable_adapter():
        base = answer_questions(model, tokenizer, first_turns, settings, bf16)
    aligned = answer_questions(model, tokenizer, first_turns, settings, bf16)
    return [(b[0], a[0]) for b, a in zip(base, aligned, strict=True)]


def run_vibe(args: argparse.Namespace) -> int:
    questions = _limited(read_questions(args.prompts), args.limit)
    if args.output is not None:
        output = Path(args.output)
    else:
        run_dir = run_folder_of(args.adapter)
        output = (run_dir if run_dir is not None else Path(args.adapter).resolve().parent) / VIBE_FILE
    ensure_writable(output.resolve().parent, "--output")
    settings = _sampling(args)
    model, tokenizer = load_for_inference(args.model, args.adapter)
    answers = vibe_check(model, tokenizer, questions, settings, args.bf16)
    base_name = args.model or adapter_base_model(args.adapter)
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
    _write_jsonl(output, rows)
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


# --- merge ----------------------------------------------------------------------------------------------------------

# Largest |merged - unmerged| logit allowed, relative to the largest |logit|. Merging adds B @ A * scale into each
# weight in fp32, which reorders float additions only: measured differences are ~1e-6 of the logit scale, so
# 1e-4 leaves room while still catching a wrong scale, a missed module or a dtype loss (those are >= 1e-2).
MERGE_RELATIVE_TOLERANCE = 1e-4
PROBE_CONVERSATION = [
    {"role": "user", "content": "Give me three tips for writing clear code, and explain why each helps."},
    {"role": "assistant", "content": "1. Name things after what they mean. 2. Keep functions short. 3. Test."},
]
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class MergeCheck:
    max_abs_diff: float
    max_abs_logit: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_abs_diff": self.max_abs_diff,
            "max_abs_logit": self.max_abs_logit,
            "tolerance": self.tolerance,
            "relative_tolerance": MERGE_RELATIVE_TOLERANCE,
            "passed": self.passed,
        }


@torch.no_grad()
def _probe_logits(model: Any, probe: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**probe, use_cache=False).logits.float()


def merge_adapter(adapter_dir: str, output_dir: str, model_name: str | None = None, dtype: str = "auto") -> MergeCheck:
    """Fold the adapter into its base (fp32), check logits on a probe conversation, save in `dtype`.

    The folder appears complete or not at all: the model is written to a temporary folder beside it and
    renamed into place.
    """
    from dpokit.models import load_adapter, load_model, load_tokenizer, resolve_model_path

    output = Path(output_dir)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"output folder {output} is not empty; give a new --output folder")
    ensure_writable(output.resolve().parent, "--output")
    base = model_name or adapter_base_model(adapter_dir)
    save_dtype = _save_dtype(resolve_model_path(base), dtype)
    has_own_tokenizer = (Path(adapter_dir) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(adapter_dir if has_own_tokenizer else base)
    model = load_adapter(load_model(base, dtype=torch.float32), adapter_dir)
    model.eval()
    text = tokenizer.apply_chat_template(PROBE_CONVERSATION, tokenize=False)
    probe = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    unmerged = _probe_logits(model, probe)
    merged_model = model.merge_and_unload()
    merged = _probe_logits(merged_model, probe)
    max_logit = unmerged.abs().max().item()
    check = MergeCheck((merged - unmerged).abs().max().item(), max_logit, MERGE_RELATIVE_TOLERANCE * max(1, max_logit))
    if not check.passed:
        raise RuntimeError(f"merged logits differ from the adapter's by {check.max_abs_diff:.3g} (> {check.tolerance})")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        merged_model.to(save_dtype).save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        provenance = {"adapter": str(Path(adapter_dir).resolve()), "base_model": base, "check": check.to_dict()}
        (staging / "merge.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        os.chmod(staging, 0o755)
        if output.exists():
            output.rmdir()  # empty, checked above
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return check


def _save_dtype(base_path: str, dtype: str) -> torch.dtype:
    """`auto`: the dtype the base model was stored in, so a bf16 base stays bf16 after merging."""
    if dtype != "auto":
        return SAVE_DTYPES[dtype]
    from transformers import AutoConfig

    try:
        stored = getattr(AutoConfig.from_pretrained(base_path), "dtype", None)
    except (OSError, ValueError):
        stored = None
    if isinstance(stored, str):
        stored = SAVE_DTYPES.get(stored)
    return stored if isinstance(stored, torch.dtype) else torch.float32


def run_merge(args: argparse.Namespace) -> int:
    check = merge_adapter(args.adapter, args.output, args.model, args.dtype)
    print(
        f"merged into {args.output}: logits agree with the adapter's (max |diff| {check.max_abs_diff:.2e} <= "
        f"{check.tolerance:.2e})"
    )
    return 0


# --- files ----------------------------------------------------------------------------------------------------------


def ensure_writable(folder: Path, what: str) -> None:
    """Fail in a second, before any model loads, when `folder` (created if missing) cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(
            f"{what}: {folder} cannot be written ({e.strerror}); choose a folder you can write to"
        ) from None


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` so that `path` holds either its old content or all of the new, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    _write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
