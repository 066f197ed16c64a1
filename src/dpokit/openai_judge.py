"""The `openai:MODEL@BASE_URL` judge: any OpenAI-compatible chat endpoint (vLLM, llama.cpp, Ollama, transformers
serve, api.openai.com), asked in parallel threads through the `openai` client. The key comes only from the
environment and never appears in outputs or logs.
"""

from __future__ import annotations

import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dpokit.data import Message
from dpokit.errors import UserError
from dpokit.judge_base import DEFAULT_API_KEY_ENV, Judge, JudgeOptions, LLMJudge
from dpokit.judge_prompts import PAIRWISE_PROMPT


def openai_judge(spec: str, rest: str, options: JudgeOptions) -> Judge:
    model, _, base_url = rest.partition("@")
    if not model.strip():
        raise UserError(f"judge `{spec}`: name the model, as openai:MODEL@BASE_URL")
    if base_url and not re.match(r"https?://[^/]", base_url):
        raise UserError(
            f"judge `{spec}`: BASE_URL must be an http(s) address such as http://127.0.0.1:8000/v1, got {base_url!r}"
        )
    return OpenAIJudge(spec, model, base_url or None, options)


class OpenAIJudge(LLMJudge):
    """An OpenAI-compatible chat endpoint, asked in parallel threads through the `openai` client."""

    def __init__(self, spec: str, model: str, base_url: str | None, options: JudgeOptions) -> None:
        super().__init__(spec)
        import openai

        self.model = model
        self.options = options
        key = os.environ.get(options.api_key_env)
        if not key:
            if options.api_key_env != DEFAULT_API_KEY_ENV or base_url is None:
                raise UserError(
                    f"judge `{spec}`: environment variable {options.api_key_env} is not set; export the "
                    "endpoint's API key in it (dpokit reads keys only from the environment)"
                )
            key = "unused"  # vLLM, llama.cpp and Ollama accept any key when they were started without one
        self._secret = key if os.environ.get(options.api_key_env) else ""
        self._client = openai.OpenAI(
            api_key=key, base_url=base_url, timeout=options.timeout, max_retries=options.retries
        )
        self.base_url = str(self._client.base_url).rstrip("/")
        self._pool = ThreadPoolExecutor(max_workers=options.concurrency, thread_name_prefix="dpokit-judge")
        self._failures_in_a_row = 0
        # httpx logs every request at INFO; that would bury the progress bar (it never logs the key)
        logging.getLogger("httpx").setLevel(logging.WARNING)

    def chat(self, conversations: list[list[Message]], reply_start: str = "") -> list[str | None]:
        """Replies in parallel threads; `reply_start` is not sent (the chat API has no way to start a reply)."""
        futures = [self._pool.submit(self._chat, c) for c in conversations]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()  # do not start queued requests once the run is stopping
            raise

    def check(self) -> None:
        """One pairwise question about two identical answers; its verdict is not counted, only that it came. A
        failure here is a first failure, so `_request_failed` makes it a one-line UserError."""
        if not self._worked:
            question = PAIRWISE_PROMPT.format(question="Say hello.", answer_a="Hello!", answer_b="Hello!")
            self._chat([{"role": "user", "content": question}])

    def _chat(self, messages: list[Message]) -> str | None:
        import openai

        try:
            completion = self._client.chat.completions.create(
                model=self.model,
                messages=messages,
                temperature=0.0,
                max_tokens=self.options.max_tokens,
            )
        except openai.APIError as e:
            return self._request_failed(*self._describe(e))
        except ValueError as e:  # a 200 answer whose body is not JSON
            return self._request_failed("malformed reply", f"the body is not JSON ({type(e).__name__})")
        text = _reply_text(completion)
        if text is None:
            return self._request_failed("malformed reply", f"not a chat completion: {str(completion)[:80]!r}")
        with self._lock:
            self._worked = True
            self._failures_in_a_row = 0
        return text

    def _describe(self, error: Exception) -> tuple[str, str]:
        """(reason, one-line detail) of a failed request; the detail never holds the key."""
        import openai

        tries = f"tried {self.options.retries + 1} time{'s' if self.options.retries else ''}"
        if isinstance(error, openai.APITimeoutError):
            return "timeout", f"no reply from {self.base_url} within {self.options.timeout:g} s ({tries})"
        if isinstance(error, openai.APIConnectionError):
            cause = error.__cause__ or error
            return "connection failed", f"cannot connect to {self.base_url} ({tries}): {self._redact(cause)}"
        if isinstance(error, openai.AuthenticationError | openai.PermissionDeniedError):
            raise UserError(
                f"judge `{self.spec}`: {self.base_url} refused the API key from ${self.options.api_key_env} "
                f"(HTTP {error.status_code})"
            ) from None
        if isinstance(error, openai.NotFoundError):
            raise UserError(
                f"judge `{self.spec}`: {self.base_url} answered 404 for model `{self.model}`; check the model name "
                "and that BASE_URL ends where /chat/completions starts (often /v1)"
            ) from None
        if isinstance(error, openai.APIStatusError):
            message = error.message
            body = error.body
            if isinstance(body, dict) and isinstance(body.get("detail"), str):  # FastAPI servers (transformers serve)
                message = f"{message}: {body['detail']}"
            return f"HTTP {error.status_code}", f"from {self.base_url}: {self._redact(message)[:240]}"
        return "malformed reply", self._redact(error)[:160]

    def _redact(self, value: object) -> str:
        text = " ".join(str(value).split())
        return text.replace(self._secret, "***") if self._secret else text

    def _request_failed(self, reason: str, detail: str) -> None:
        with self._lock:
            worked = self._worked
            self._failures_in_a_row += 1
            in_a_row = self._failures_in_a_row
        if not worked:
            raise UserError(f"judge `{self.spec}`: the first request failed: {detail}")
        if in_a_row >= self.options.max_consecutive_failures:
            raise UserError(
                f"judge `{self.spec}`: {in_a_row} requests in a row failed (last: {detail}); what was made so far "
                "is saved, rerun the same command once the endpoint answers"
            )
        self._count_failure(reason, detail)
        return None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()


def _reply_text(completion: Any) -> str | None:
    """The text of a chat completion, or None when the endpoint sent something else (HTML, a bare string, ...)."""
    choices = getattr(completion, "choices", None)
    if not isinstance(choices, list) or not choices:
        return None
    content = getattr(getattr(choices[0], "message", None), "content", None)
    return content if isinstance(content, str) else None
