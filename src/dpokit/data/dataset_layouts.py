"""The layouts of public preference datasets: UltraFeedback binarized (argilla's and H4's), Intel's Orca pairs,
Stack Exchange paired, rated responses (UltraFeedback's raw completions among them) and Anthropic's HH-RLHF
transcripts. `dpokit.data.formats` registers them ahead of the general TRL layouts."""

from __future__ import annotations

import re
from typing import Any

from dpokit.data import Message, Pair
from dpokit.data.rows import (
    CONTRADICTING_SCORES,
    DATASETS,
    MISSING_COLUMN,
    ROLES_OUT_OF_ORDER,
    TIED,
    TOO_FEW_RESPONSES,
    UNDER_MARGIN,
    WRONG_TYPE,
    Adjusted,
    Dropped,
    Format,
    Normalized,
    Normalizer,
    Options,
    RowError,
    as_chat_pair,
    check_messages,
    check_score,
    check_text,
    collect,
    need_columns,
    split_conversations,
    user,
)

HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}

LAYOUTS: list[tuple[Format, int]] = []  # registered by `dpokit.data.formats`, in this order


def parse_hh(text: str, column: str) -> list[Message]:
    """An HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as messages, each turn's text stripped."""
    parts = HH_TURN.split(text)
    if parts[0].strip():
        raise RowError(f"column {column!r} has text before its first `Human:` turn", ROLES_OUT_OF_ORDER)
    if len(parts) < 3:
        raise RowError(f"column {column!r} has no `Human:` / `Assistant:` turns", WRONG_TYPE)
    turns = zip(parts[1::2], parts[2::2], strict=True)  # split with one group: head, role, text, role, text, ...
    return [{"role": HH_ROLES[role], "content": content.strip()} for role, content in turns]


def _hh_rlhf(row: dict[str, Any], options: Options) -> Pair | Adjusted:
    need_columns(row, "chosen", "rejected")
    chosen = parse_hh(check_text(row["chosen"], "chosen"), "chosen")
    rejected = parse_hh(check_text(row["rejected"], "rejected"), "rejected")
    return split_conversations(chosen, rejected, options)


def _looks_hh(row: dict[str, Any]) -> bool:
    chosen = row.get("chosen")
    return (
        "prompt" not in row
        and "rejected" in row
        and isinstance(chosen, str)
        and re.search(r"(?:^|\n\n)Human:", chosen) is not None
        and "Assistant:" in chosen
    )


def _score_gate(chosen_score: float, rejected_score: float, options: Options) -> Dropped | None:
    """Ties never make a pair; nor does a gap of `min_score_margin` or less."""
    if chosen_score == rejected_score:
        return Dropped(TIED)
    if chosen_score - rejected_score <= options.min_score_margin:
        return Dropped(UNDER_MARGIN)
    return None


def _binarized(chosen_score_column: str, rejected_score_column: str) -> Normalizer:
    """UltraFeedback binarized: a prompt text, chosen/rejected conversations (or answers) and their scores."""

    def normalize(row: dict[str, Any], options: Options) -> Normalized:
        need_columns(row, "prompt", "chosen", "rejected", chosen_score_column, rejected_score_column)
        chosen, rejected = row["chosen"], row["rejected"]
        holds_prompt = isinstance(chosen, list) and chosen and isinstance(chosen[0], dict)
        if holds_prompt and chosen[0].get("role") != "assistant":  # whole conversations, prompt included
            result: Pair | Adjusted = split_conversations(
                check_messages(chosen, "chosen"), check_messages(rejected, "rejected"), options
            )
        else:
            result = as_chat_pair(row["prompt"], chosen, rejected)
        chosen_score = check_score(row[chosen_score_column], chosen_score_column)
        rejected_score = check_score(row[rejected_score_column], rejected_score_column)
        if chosen_score < rejected_score:
            raise RowError(
                f"{chosen_score_column} {chosen_score:g} is below {rejected_score_column} {rejected_score:g}",
                CONTRADICTING_SCORES,
            )
        return _score_gate(chosen_score, rejected_score, options) or result

    return normalize


def _orca(row: dict[str, Any], options: Options) -> Pair:
    need_columns(row, "question", "chosen", "rejected")
    system = row.get("system")
    if system is not None:
        check_text(system, "system", allow_empty=True)
    question = check_text(row["question"], "question")
    prompt = ([{"role": "system", "content": system}] if system and system.strip() else []) + [user(question)]
    return as_chat_pair(prompt, row["chosen"], row["rejected"], ("question", "chosen", "rejected"))


def _stack_exchange(row: dict[str, Any], options: Options) -> Pair:
    need_columns(row, "question", "response_j", "response_k")
    return as_chat_pair(row["question"], row["response_j"], row["response_k"], ("question", "response_j", "response_k"))


# Rated responses: the usual names of the prompt, the list of responses and the list of scores.
RATED_PROMPTS = ("prompt", "instruction", "question")
RATED_RESPONSES = ("responses", "completions")
RATED_SCORES = ("scores", "ratings", "rewards")
RESPONSE_TEXT_KEYS = ("response", "text", "content", "completion")
# UltraFeedback's `fine-grained_score` (the mean of its aspect ratings, which its binarized releases moved to)
# is preferred to its `overall_score`.
RESPONSE_SCORE_KEYS = ("score", "rating", "reward", "fine-grained_score", "overall_score")


def _first_present(row: dict[str, Any], names: tuple[str, ...]) -> str | None:
    return next((name for name in names if name in row), None)


def _looks_rated(row: dict[str, Any]) -> bool:
    responses = _first_present(row, RATED_RESPONSES)
    return (
        "chosen" not in row
        and _first_present(row, RATED_PROMPTS) is not None
        and responses is not None
        and isinstance(row[responses], list)
    )


def _rated(row: dict[str, Any], options: Options) -> Normalized:
    prompt_column = _first_present(row, RATED_PROMPTS)
    responses_column = _first_present(row, RATED_RESPONSES)
    if prompt_column is None or responses_column is None:
        missing = "prompt (or instruction, question)" if prompt_column is None else "responses (or completions)"
        raise RowError(f"missing column {missing}", MISSING_COLUMN)
    texts, scores = _responses_and_scores(row, responses_column)
    if len(texts) < 2:
        return Dropped(TOO_FEW_RESPONSES)
    best = max(range(len(scores)), key=scores.__getitem__)  # the first of equal bests
    worst = min(range(len(scores)), key=scores.__getitem__)
    labels = (prompt_column, f"{responses_column}[{best}]", f"{responses_column}[{worst}]")
    pair = as_chat_pair(row[prompt_column], texts[best], texts[worst], labels)
    return _score_gate(scores[best], scores[worst], options) or pair


def _responses_and_scores(row: dict[str, Any], column: str) -> tuple[list[Any], list[float]]:
    """Responses as texts (or message lists) with their scores, from a separate score list or from each item."""
    responses = row[column]
    if not isinstance(responses, list):
        raise RowError(f"column {column!r} must be a list of responses, got {type(responses).__name__}", WRONG_TYPE)
    scores_column = _first_present(row, RATED_SCORES)
    if scores_column is not None:
        scores = row[scores_column]
        if not isinstance(scores, list):
            raise RowError(f"column {scores_column!r} must be a list of numbers, got {type(scores).__name__}")
        if len(scores) != len(responses):
            raise RowError(
                f"column {column!r} has {len(responses)} responses but {scores_column!r} {len(scores)} scores"
            )
        texts = [_response_text(item, f"{column}[{i}]") for i, item in enumerate(responses)]
        return texts, [check_score(s, f"{scores_column}[{i}]") for i, s in enumerate(scores)]
    texts, numbers = [], []
    for i, item in enumerate(responses):
        label = f"{column}[{i}]"
        if not isinstance(item, dict):
            raise RowError(f"{label} must be an object with a response and a score (or give a `scores` column)")
        score_key = _first_present(item, RESPONSE_SCORE_KEYS)
        if score_key is None:
            raise RowError(f"{label} has no score ({', '.join(RESPONSE_SCORE_KEYS)})", MISSING_COLUMN)
        texts.append(_response_text(item, label))
        numbers.append(check_score(item[score_key], f"{label}.{score_key}"))
    return texts, numbers


def _response_text(item: Any, label: str) -> Any:
    if isinstance(item, str | list):
        return item
    if isinstance(item, dict):
        key = _first_present(item, RESPONSE_TEXT_KEYS)
        if key is None:
            raise RowError(f"{label} has no response text ({', '.join(RESPONSE_TEXT_KEYS)})", MISSING_COLUMN)
        return item[key]
    raise RowError(f"{label} must be text, got {type(item).__name__}", WRONG_TYPE)


collect(
    LAYOUTS,
    Format(
        "ultrafeedback-argilla",
        "UltraFeedback binarized as argilla/ultrafeedback-binarized-preferences-cleaned: conversations with ratings; "
        "tied ratings are dropped.",
        lambda row: (
            {"prompt", "chosen", "rejected"} <= set(row)
            and ({"chosen-rating", "rejected-rating"} <= set(row) or {"chosen_rating", "rejected_rating"} <= set(row))
        ),
        lambda row, options: _binarized(*_rating_columns(row))(row, options),
        "prompt, chosen, rejected (message lists), chosen-rating, rejected-rating",
        reads=("prompt", "chosen", "rejected", "chosen-rating", "rejected-rating", "chosen_rating", "rejected_rating"),
    ),
    DATASETS,
)


def _rating_columns(row: dict[str, Any]) -> tuple[str, str]:
    return ("chosen-rating", "rejected-rating") if "chosen-rating" in row else ("chosen_rating", "rejected_rating")


collect(
    LAYOUTS,
    Format(
        "ultrafeedback-h4",
        "UltraFeedback binarized as HuggingFaceH4/ultrafeedback_binarized: conversations with scores; tied scores "
        "are dropped.",
        lambda row: {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"} <= set(row),
        _binarized("score_chosen", "score_rejected"),
        "prompt, chosen, rejected (message lists), score_chosen, score_rejected",
        reads=("prompt", "chosen", "rejected", "score_chosen", "score_rejected"),
    ),
    DATASETS,
)
collect(
    LAYOUTS,
    Format(
        "orca",
        "Intel/orca_dpo_pairs: a system text (kept as a system message), a question and two answers.",
        lambda row: {"question", "chosen", "rejected"} <= set(row) and "prompt" not in row,
        _orca,
        "system (optional), question, chosen, rejected",
        reads=("system", "question", "chosen", "rejected"),
    ),
    DATASETS,
)
collect(
    LAYOUTS,
    Format(
        "stack-exchange",
        "Stack Exchange paired: a question, the preferred answer response_j and the other response_k.",
        lambda row: {"question", "response_j", "response_k"} <= set(row),
        _stack_exchange,
        "question, response_j, response_k",
        reads=("question", "response_j", "response_k"),
    ),
    DATASETS,
)
collect(
    LAYOUTS,
    Format(
        "rated",
        "A prompt with several scored responses, paired best against worst; ties and gaps not above "
        "min_score_margin are dropped. Scores come from a list column or from each response object "
        "(UltraFeedback's completions with fine-grained_score or overall_score).",
        _looks_rated,
        _rated,
        "prompt|instruction|question, responses|completions, scores|ratings|rewards (or a score in each response)",
        reads=RATED_PROMPTS + RATED_RESPONSES + RATED_SCORES,
    ),
    DATASETS,
)
collect(
    LAYOUTS,
    Format(
        "hh-rlhf",
        "Anthropic HH-RLHF: chosen and rejected transcripts of `\\n\\nHuman:` / `\\n\\nAssistant:` turns, made into "
        "conversations with an implicit prompt.",
        _looks_hh,
        _hh_rlhf,
        "chosen, rejected (transcripts)",
        reads=("chosen", "rejected"),
    ),
    DATASETS,
)
