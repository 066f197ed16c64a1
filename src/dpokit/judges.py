"""Judges: who decides which answer is better, for `generate` (ranking samples) and `compare` (pairwise).

A judge is built from a spec string by `load_judge`:

- `python:module:function` or `python:path/to/file.py:function`: `function(prompt, response) -> float`, both as
  text (the prompt's last user message), higher is better; `None` means no verdict.
- `reward-model:ID`: a sequence-classification reward model (one output), scoring in batches through the
  model's chat template where its tokenizer has one.
- `llm:MODEL`: a local causal LM asked, greedily, for a 1-10 score (`SCORE_PROMPT`) or an A/B verdict
  (`PAIRWISE_PROMPT`); its reply is started for it with `[[`, the opening of the asked-for verdict.
- `openai:MODEL@BASE_URL` (or `openai:MODEL` for api.openai.com): any OpenAI-compatible chat endpoint, asked the
  same two prompts. The key comes from the environment variable `api_key_env` (OPENAI_API_KEY by default).

Every judge offers both verbs. `score` returns one score per response, `None` where the judge gave no usable
verdict; `compare` returns "A", "B", "tie", or `None` for no verdict. Scoring judges compare by score; LLM judges
are asked the pairwise question. LLM judges also take pairwise questions already written out
(`PairwiseRequest`: `compare` writes MT-Bench's prompts that way) through `compare_requests`, which returns each
reply beside its verdict. Every missing verdict is counted in `judge.failures` (by reason in
`judge.failure_reasons`), never guessed.

Failures follow one rule: a judge that fails before it ever worked is misconfigured, and that is a one-line
`UserError` (a function that raises on its first call, an endpoint that refuses the first connection); once it has
worked, a failure is a counted, logged skip. An LLM reply that cannot be parsed is always a counted skip, and an
endpoint that fails `max_consecutive_failures` requests in a row stops the run.

This module builds judges and holds the local kinds; what every judge shares is in `judge_base`, the prompts and
the reading of replies in `judge_prompts`, the endpoint client in `openai_judge`.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from dpokit.data import Message
from dpokit.errors import UserError
from dpokit.judge_base import Judge, JudgeOptions, LLMJudge, ScoringJudge, regroup
from dpokit.judge_prompts import last_user_text
from dpokit.openai_judge import openai_judge


def load_judge(spec: str, **options: Any) -> Judge:
    """The judge `spec` names, with `JudgeOptions` fields as keyword options. A bad spec is a one-line UserError."""
    known = {f.name for f in fields(JudgeOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown judge options {unknown}; known: {sorted(known)}")
    opts = JudgeOptions(**options)
    kind, sep, rest = spec.partition(":")
    builders: dict[str, Callable[[str, str, JudgeOptions], Judge]] = {
        "python": _python_judge,
        "reward-model": RewardModelJudge,
        "llm": LocalLLMJudge,
        "openai": openai_judge,
    }
    if not sep or kind not in builders or not rest.strip():
        raise UserError(
            f"judge `{spec}` is not a judge spec; use python:module:function, python:path/to/file.py:function, "
            "reward-model:ID, llm:MODEL or openai:MODEL@BASE_URL"
        )
    return builders[kind](spec, rest, opts)


def judge_options_from_args(args: Any) -> dict[str, Any]:
    """The `--judge-*` flags of a parsed command line, as keyword options for `load_judge`."""
    names = ("concurrency", "timeout", "retries", "api_key_env", "max_tokens", "batch_size")
    return {n: getattr(args, f"judge_{n}") for n in names if getattr(args, f"judge_{n}", None) is not None}


# --- python:module:function ---------------------------------------------------------------------------------------


class PythonJudge(ScoringJudge):
    """A user's function(prompt_text, response_text) -> float, higher is better, or None for no verdict."""

    def __init__(self, spec: str, function: Callable[[str, str], Any]) -> None:
        super().__init__(spec)
        self.function = function

    def score_batch(self, prompts: Sequence[list[Message]], responses: Sequence[list[str]]) -> list[list[float | None]]:
        return [[self._call(last_user_text(p), r) for r in rs] for p, rs in zip(prompts, responses, strict=True)]

    def _call(self, prompt_text: str, response: str) -> float | None:
        try:
            value = self.function(prompt_text, response)
        except Exception as e:
            message = " ".join(f"{type(e).__name__}: {e}".split())[:200]
            if not self._worked:
                raise UserError(
                    f"judge `{self.spec}` raised {message} on its first call; fix the function (--debug shows the "
                    "traceback) or return None where it has no verdict"
                ) from e
            self._count_failure("function raised", message)
            return None
        if value is None:
            self._count_failure("function returned None")
            return None
        if isinstance(value, str | bytes) or not hasattr(type(value), "__float__"):
            raise UserError(
                f"judge `{self.spec}` returned {type(value).__name__} {str(value)[:40]!r}; it must return a number, "
                "higher is better (or None for no verdict)"
            )
        try:
            score = float(value)
        except (TypeError, ValueError, RuntimeError) as e:  # e.g. a tensor of several numbers
            raise UserError(f"judge `{self.spec}` returned {type(value).__name__}, not one number: {e}") from e
        if not math.isfinite(score):
            self._count_failure("function returned a non-finite number", str(score))
            return None
        self._worked = True
        return score


def _python_judge(spec: str, rest: str, options: JudgeOptions) -> Judge:
    target, sep, name = rest.rpartition(":")
    if not sep or not target or not name:
        raise UserError(f"judge `{spec}`: write python:module:function or python:path/to/file.py:function")
    module = _import_target(spec, target)
    function = getattr(module, name, None)
    if function is None:
        raise UserError(f"judge `{spec}`: {target} has no function `{name}`")
    if not callable(function):
        raise UserError(f"judge `{spec}`: `{name}` in {target} is a {type(function).__name__}, not a function")
    return PythonJudge(spec, function)


def _import_target(spec: str, target: str) -> Any:
    """A module by dotted name from PYTHONPATH, or from a .py file (given as a path, or beside us as NAME.py)."""
    is_path = target.endswith(".py") or "/" in target or os.sep in target
    if not is_path:
        try:
            return importlib.import_module(target)
        except ModuleNotFoundError as e:
            if e.name is None or not (target == e.name or target.startswith(e.name + ".")):
                raise UserError(f"judge `{spec}`: importing {target} failed: {e}") from e
            fallback = Path(target.replace(".", "/") + ".py")
            if not fallback.is_file():
                raise UserError(
                    f"judge `{spec}`: no module `{target}` on PYTHONPATH and no file {fallback}; add its folder to "
                    "PYTHONPATH or give the file path, python:path/to/file.py:function"
                ) from e
            return _import_file(spec, fallback)
        except Exception as e:  # the user's module failed while importing; that is theirs to fix
            raise UserError(f"judge `{spec}`: importing {target} failed: {type(e).__name__}: {e}") from e
    path = Path(target).expanduser()
    if not path.is_file():
        raise UserError(f"judge `{spec}`: file {path} does not exist")
    return _import_file(spec, path)


def _import_file(spec: str, path: Path) -> Any:
    module_name = f"dpokit_judge_{path.stem}_{abs(hash(str(path.resolve()))):x}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise UserError(f"judge `{spec}`: {path} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # before running it, so dataclasses and pickling inside it work
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise UserError(f"judge `{spec}`: importing {path} failed: {type(e).__name__}: {e}") from e
    return module


# --- reward-model:ID ----------------------------------------------------------------------------------------------


class RewardModelJudge(ScoringJudge):
    """A sequence-classification reward model: the score is its single output on prompt + response."""

    def __init__(self, spec: str, model_id: str, options: JudgeOptions) -> None:
        super().__init__(spec)
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.options = options
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=options.trust_remote_code)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                model_id, trust_remote_code=options.trust_remote_code, use_safetensors=True
            )
        except (OSError, ValueError) as e:
            reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise UserError(
                f"judge `{spec}`: cannot load reward model `{model_id}` ({reason}); give a local folder with a "
                "sequence-classification model in safetensors, or a hub id while online"
            ) from e
        if self.model.config.num_labels != 1:
            raise UserError(
                f"judge `{spec}`: `{model_id}` has {self.model.config.num_labels} outputs; a reward model has one "
                "(num_labels=1)"
            )
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # the model pools the last non-pad token of each row, so it must know the pad id to score in batches
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.truncation_side = "left"  # an over-long conversation keeps the response
        self.use_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.model.eval()

    def render(self, prompt: list[Message], response: str) -> str:
        """The text the model scores: the conversation through its chat template, else the plain turns."""
        if self.use_chat_template:
            conversation = [*prompt, {"role": "assistant", "content": response}]
            return self.tokenizer.apply_chat_template(conversation, tokenize=False)
        return "\n\n".join([*(m["content"] for m in prompt), response])

    def score_batch(self, prompts: Sequence[list[Message]], responses: Sequence[list[str]]) -> list[list[float | None]]:
        import torch

        texts = [self.render(p, r) for p, rs in zip(prompts, responses, strict=True) for r in rs]
        device = next(self.model.parameters()).device
        scores: list[float | None] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.options.batch_size):
                inputs = self.tokenizer(
                    texts[start : start + self.options.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.options.max_length,
                    return_tensors="pt",
                    add_special_tokens=not self.use_chat_template,  # the template already holds them
                ).to(device)
                logits = self.model(**inputs).logits[:, 0].float()  # (B,)
                scores.extend(logits.tolist())
        if scores:
            self._worked = True
        return regroup(scores, [len(rs) for rs in responses])

    def close(self) -> None:
        self.model = None


# --- llm:MODEL ----------------------------------------------------------------------------------------------------


class LocalLLMJudge(LLMJudge):
    """A local causal LM (hub id, folder or builtin:) asked greedily, in batches, through its chat template.

    Its reply is started for it with `[[`, the opening of the verdict the prompt asks for, so that even a small
    model answers in that form instead of restating the question.
    """

    def __init__(self, spec: str, model_name: str, options: JudgeOptions) -> None:
        super().__init__(spec)
        from dpokit.generation import SamplingSettings
        from dpokit.models import load_model, load_tokenizer

        self.tokenizer = load_tokenizer(model_name, trust_remote_code=options.trust_remote_code)
        self.model = load_model(model_name, trust_remote_code=options.trust_remote_code)
        self.settings = SamplingSettings(
            num_samples=1, temperature=0.0, max_new_tokens=options.max_tokens, batch_size=options.batch_size
        )

    def chat(self, conversations: list[list[Message]], reply_start: str = "") -> list[str | None]:
        from dpokit.generation import generate_responses

        replies = generate_responses(
            self.model, self.tokenizer, conversations, self.settings, answer_prefix=reply_start
        )
        return [reply_start + r[0] for r in replies]

    def close(self) -> None:
        self.model = None
