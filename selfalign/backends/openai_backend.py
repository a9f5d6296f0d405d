"""Any OpenAI-compatible endpoint (vLLM serve, llama.cpp server, TGI, OpenAI) through the async client.

A fixed pool of `max_concurrency` workers drains the batch, so memory stays flat at any batch size.
Transport failures (429, 5xx, timeouts, resets, garbage bodies, empty choices) are retried with
jittered exponential backoff, honouring `Retry-After`; what still fails comes back as that row's error.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import time
from typing import Any

import openai
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from ..errors import RunError
from .base import Completion, OnResult, Request

RETRYABLE_STATUS = {408, 409, 425, 429}
MAX_RETRY_AFTER_S = 120.0


class EmptyReply(Exception):
    """A 200 response without a usable choice: treated like any other transient server fault."""


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError, openai.APIResponseValidationError,
                        EmptyReply, ValueError)):
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in RETRYABLE_STATUS or exc.status_code >= 500
    return False


def retry_after_seconds(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        seconds = parsed.timestamp() - time.time() if parsed else 0.0
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


class _WaitHonouringRetryAfter:
    def __init__(self, fallback):
        self.fallback = fallback

    def __call__(self, retry_state) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        told = retry_after_seconds(exc) if exc else None
        return told if told is not None else self.fallback(retry_state)


def response_format(mode: str, schema: dict[str, Any] | None) -> dict[str, Any] | None:
    if schema is None or mode == "none":
        return None
    if mode == "json_object":
        return {"type": "json_object", "schema": schema}
    return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}


class OpenAIBackend:
    def __init__(self, base_url: str, model: str, api_key_env: str | None = None, max_concurrency: int = 16,
                 timeout_s: float = 120.0, max_retries: int = 6, structured_output: str = "json_schema",
                 backoff_max_s: float = 30.0):
        self.identity = {"backend": "openai", "base_url": base_url.rstrip("/"), "model": model}
        if api_key_env:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise RunError(f"environment variable {api_key_env} is not set; export it with the API key "
                               f"(the pipeline's models section names it in api_key_env)")
        else:
            api_key = "not-needed"  # local servers ignore the key; the client insists on one
        self._api_key = api_key
        self.base_url, self.model = base_url, model
        self.max_concurrency, self.timeout_s = max_concurrency, timeout_s
        self.max_retries, self.structured_output = max_retries, structured_output
        self.backoff_max_s = backoff_max_s

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIBackend(base_url={self.base_url!r}, model={self.model!r})"

    def generate(self, requests: list[Request], on_result: OnResult | None = None) -> list[Completion]:
        return asyncio.run(self._generate(requests, on_result))

    async def _generate(self, requests: list[Request], on_result: OnResult | None) -> list[Completion]:
        results: list[Completion | None] = [None] * len(requests)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for index in range(len(requests)):
            queue.put_nowait(index)
        client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self._api_key, timeout=self.timeout_s,
                                    max_retries=0)  # tenacity retries, so that Retry-After and counts are ours

        async def worker() -> None:
            while True:
                try:
                    index = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results[index] = await self._one(client, requests[index])
                if on_result:
                    on_result(index, results[index])

        try:
            await asyncio.gather(*(worker() for _ in range(min(self.max_concurrency, len(requests)) or 1)))
        finally:
            await client.close()
        return [r if r is not None else Completion(None, error="no reply") for r in results]

    async def _one(self, client: openai.AsyncOpenAI, request: Request) -> Completion:
        sampling = request.sampling
        body: dict[str, Any] = {
            "model": self.model, "messages": list(request.messages), "temperature": sampling.temperature,
            "top_p": sampling.top_p, "max_tokens": sampling.max_tokens,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed + request.sample_index
        fmt = response_format(self.structured_output, request.json_schema)
        if fmt is not None:
            body["response_format"] = fmt
        tries = 0
        try:
            async for attempt in AsyncRetrying(
                    stop=stop_after_attempt(self.max_retries + 1),
                    wait=_WaitHonouringRetryAfter(wait_random_exponential(multiplier=0.5, max=self.backoff_max_s)),
                    retry=retry_if_exception(is_retryable), reraise=True):
                with attempt:
                    tries += 1
                    reply = await client.chat.completions.create(**body)
                    if not reply.choices or reply.choices[0].message is None \
                            or reply.choices[0].message.content is None:
                        raise EmptyReply("the server returned no choices/content")
        except Exception as exc:
            return Completion(None, error=f"{type(exc).__name__}: {_short(exc)} (after {tries} tries)",
                              extra={"tries": tries})
        usage = reply.usage
        return Completion(reply.choices[0].message.content, usage.prompt_tokens if usage else 0,
                          usage.completion_tokens if usage else 0, extra={"tries": tries})

    def close(self) -> None:
        pass


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) < 300 else text[:300] + "..."
