"""Any OpenAI-compatible endpoint (vLLM serve, llama.cpp server, TGI, OpenAI) through the async client.

A fixed pool of `max_concurrency` workers drains the batch, so memory stays flat at any batch size; the
`openai.AsyncOpenAI` client runs over its aiohttp transport (`DefaultAioHttpClient`, keep-alive, one
connection per worker). Transport failures (429, 5xx, timeouts, resets, truncated or garbage bodies,
empty choices) are retried with jittered exponential backoff, honouring `Retry-After`; what still fails
comes back as that row's error.

Lean on purpose (see benchmarks/): the request body is serialised once with orjson and sent through the
client's generic `post` (auth, headers, timeouts, error types of the SDK, but not its recursive transform
of typed params), the reply is parsed with orjson (no pydantic model of it), and the first attempt runs
outside tenacity; only a retryable failure enters the `AsyncRetrying` loop.
"""

from __future__ import annotations

import asyncio
import difflib
import email.utils
import inspect
import os
import time
from typing import Any, Awaitable, Callable

import openai
import orjson
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from ..errors import RunError, RunStopped
from .base import Completion, OnResult, Request
from .openai_config import OpenAIModel, endpoint_identity

try:  # the HTTP library the installed openai is built on: httpx2 (openai >= 3) or httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover - older openai releases
    import httpx  # type: ignore[no-redef]

RETRYABLE_STATUS = {408, 409, 425, 429}
# Statuses about the endpoint, never about one row (a bad key, a key without access, no such model or path): the
# first one stops the stage. Any other failure stops it when STOP_AFTER_FAILURES_IN_A_ROW calls in a row failed
# after their retries with no success between (a schema the server rejects, a dead server): past that point
# every further call would fail too, and each would be paid for in money or in retry time.
ENDPOINT_STATUS = {401, 403, 404}
STOP_AFTER_FAILURES_IN_A_ROW = 5
PREFLIGHT_TIMEOUT_S = 10.0
MAX_RETRY_AFTER_S = 120.0
BACKOFF_MULTIPLIER_S = 0.5
CHAT_PATH = "/chat/completions"
MAX_RAW_BODY = 20_000  # characters of a bad reply body kept on the failed row

# send(body bytes) -> reply body bytes; raises the SDK's errors (APIStatusError, APIConnectionError, ...)
Send = Callable[[bytes], Awaitable[bytes]]


class BadReply(ValueError):
    """A 200 response whose body is not a chat completion (not JSON, not an object, no choices, no content).

    Carries the body, so a call that exhausts its tries still shows the user what the server sent."""

    def __init__(self, message: str, body: bytes):
        super().__init__(message)
        self.body = body


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError, openai.APIResponseValidationError,
                        ValueError, asyncio.TimeoutError, TimeoutError, ConnectionError)):
        return True  # ValueError covers BadReply: a 200 whose body is not a usable chat completion
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in RETRYABLE_STATUS or exc.status_code >= 500
    return False


def retry_after_seconds(exc: BaseException) -> float | None:
    """The server's `Retry-After` (seconds or an HTTP date; `retry-after-ms` too), capped; None if absent."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    seconds = None
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            seconds = float(millis) / 1000.0
        except ValueError:
            seconds = None
    value = headers.get("retry-after")
    if seconds is None and value:
        try:
            seconds = float(value)
        except ValueError:
            try:
                parsed = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError):
                parsed = None
            seconds = parsed.timestamp() - time.time() if parsed is not None else None
    if seconds is None or seconds != seconds:  # absent, unparseable or NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


class _WaitHonouringRetryAfter:
    """tenacity wait: the server's Retry-After when it sent one, else `fallback` (jittered exponential).

    `offset` counts the failures that happened before the tenacity loop started (the fast first attempt),
    so the backoff keeps growing from where that attempt left it.
    """

    def __init__(self, fallback, offset: int = 0):
        self.fallback = fallback
        self.offset = offset

    def __call__(self, retry_state) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        told = retry_after_seconds(exc) if exc else None
        if told is not None:
            return told
        if self.offset:
            retry_state = _Shifted(retry_state, self.offset)
        return self.fallback(retry_state)


class _Failures:
    """The one field of a tenacity RetryCallState that its exponential waits read."""

    def __init__(self, attempt_number: int):
        self.attempt_number = attempt_number


class _Shifted:
    """A view of a tenacity RetryCallState whose attempt_number counts earlier failures too."""

    def __init__(self, state, offset: int):
        self._state, self.attempt_number = state, state.attempt_number + offset

    def __getattr__(self, name: str):
        return getattr(self._state, name)


def response_format(mode: str, schema: dict[str, Any] | None) -> dict[str, Any] | None:
    if schema is None or mode == "none":
        return None
    if mode == "json_object":
        return {"type": "json_object", "schema": schema}
    return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}


def parse_reply(payload: bytes) -> Completion:
    """A chat-completion body -> Completion; raises (retryably) on non-JSON, no choices or null content."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise BadReply(f"the reply body is not JSON ({exc})", payload) from None
    if not isinstance(data, dict):
        raise BadReply("the reply is JSON but not an object", payload)
    choices = data.get("choices")
    if not choices:
        error = data.get("error")
        raise BadReply(f"the server returned no choices{f': {error}' if error else ''}", payload)
    choice = choices[0]
    message = choice.get("message") if isinstance(choice, dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    if content is None:
        raise BadReply("the server returned no message content", payload)
    usage = data.get("usage")
    if not isinstance(usage, dict):
        usage = {}
    extra = {"tries": 1}
    if choice.get("finish_reason"):
        extra["finish_reason"] = choice["finish_reason"]
    return Completion(content, _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")), extra=extra)


def _count(value: Any) -> int:
    return value if type(value) is int else 0


class OpenAIBackend:
    def __init__(self, base_url: str, model: str, api_key_env: str | None = None, max_concurrency: int = 16,
                 timeout_s: float = 120.0, max_retries: int = 6, structured_output: str = "json_schema",
                 backoff_max_s: float = 30.0):
        self.identity = endpoint_identity(base_url, model)
        if api_key_env:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise RunError(f"environment variable {api_key_env} is not set; export it with the API key "
                               f"(the pipeline's models section names it in api_key_env)")
        else:
            api_key = "not-needed"  # local servers ignore the key; the client insists on one
        self._api_key = api_key
        self.api_key_env = api_key_env
        self.base_url, self.model = base_url, model
        self.max_concurrency, self.timeout_s = max_concurrency, timeout_s
        self.max_retries, self.structured_output = max_retries, structured_output
        self.backoff_max_s = backoff_max_s

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIBackend(base_url={self.base_url!r}, model={self.model!r})"

    # ------------------------------------------------------------------ request bodies

    def request_body(self, request: Request) -> dict[str, Any]:
        """The chat-completion body sent for `request` (the benchmarks send the very same bytes)."""
        sampling = request.sampling
        body: dict[str, Any] = {
            "model": self.model, "messages": request.messages, "temperature": sampling.temperature,
            "top_p": sampling.top_p, "max_tokens": sampling.max_tokens,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed + request.sample_index
        fmt = response_format(self.structured_output, request.json_schema)
        if fmt is not None:
            body["response_format"] = fmt
        return body

    def encode(self, request: Request) -> bytes:
        return orjson.dumps(self.request_body(request))

    # ------------------------------------------------------------------ preflight

    def preflight(self) -> None:
        """One cheap request before the first call, so a wrong URL, key or model fails in seconds, not after
        every call has been sent and retried: GET /models (free), and a 1-token chat completion only when that
        list does not name the model (some servers serve no list, or accept any name)."""
        timeout = min(self.timeout_s, PREFLIGHT_TIMEOUT_S)
        headers = {"Authorization": f"Bearer {self._api_key}"}
        for attempt in range(3):  # a refused connection is retried briefly: a server may be starting
            try:
                with httpx.Client(timeout=timeout, headers=headers) as client:
                    listed = self._listed_models(client)
                    if listed is None or self.model not in listed:
                        self._probe_chat(client, listed)
                return
            except httpx.TimeoutException:
                raise RunError(f"{self.base_url} did not answer within {timeout:g} s: is the server hung or "
                               "overloaded? Check it, or fix the model's base_url") from None
            except httpx.TransportError as exc:
                if attempt < 2 and connection_refused(exc):
                    time.sleep(0.5)
                    continue
                raise RunError(f"cannot reach {self.base_url}: {describe(exc)}. Start the server, or fix the "
                               "model's base_url") from None

    def _listed_models(self, client) -> list[str] | None:
        response = client.get(self.base_url.rstrip("/") + "/models")
        self._refuse_on_status(response, "GET /models")
        if response.status_code != 200:
            return None  # not served here: the chat probe decides
        try:
            return [str(m.get("id")) for m in orjson.loads(response.content).get("data") or [] if isinstance(m, dict)]
        except (orjson.JSONDecodeError, AttributeError):
            return None

    def _probe_chat(self, client, listed: list[str] | None) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": "Reply with OK."}],
                "max_tokens": 1, "temperature": 0}
        response = client.post(self.base_url.rstrip("/") + CHAT_PATH, content=orjson.dumps(body),
                               headers={"Content-Type": "application/json"})
        if response.status_code == 404:
            served = f"; it serves {', '.join(map(repr, listed[:10]))}" if listed else ""
            raise RunError(f"{self.base_url}: model {self.model!r} is not served there (HTTP 404 on POST "
                           f"{CHAT_PATH}: {_server_message(response)}){served}. Fix the model's model name or "
                           f"base_url (it usually ends in /v1){_did_you_mean(self.model, listed or [])}")
        # 401/403 stop here; 400, 429 and 5xx do not: they may be about this probe or passing, and the run's own
        # retries and its stop after repeated failures handle them with the real requests.
        self._refuse_on_status(response, f"POST {CHAT_PATH}")

    def _refuse_on_status(self, response, what: str) -> None:
        if response.status_code in (401, 403):
            raise RunError(f"{self.base_url}: HTTP {response.status_code} on {what} ({_server_message(response)}). "
                           f"{self._fix(response.status_code, '')}")

    # ------------------------------------------------------------------ transport

    def _http_client(self):
        """The SDK's aiohttp transport sized to our concurrency (keep-alive); httpx if the extra is missing."""
        limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency,
                              keepalive_expiry=60.0)
        factory = getattr(openai, "DefaultAioHttpClient", None)
        if factory is not None:
            try:
                return factory(limits=limits, timeout=self.timeout_s)
            except RuntimeError:  # openai installed without its aiohttp extra
                pass
        return openai.DefaultAsyncHttpxClient(limits=limits, timeout=self.timeout_s)

    async def _open(self) -> tuple[Send, Callable[[], Awaitable[None]]]:
        """(send, close) for one batch. Must run inside the batch's event loop (aiohttp binds to it)."""
        client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self._api_key, timeout=self.timeout_s,
                                    max_retries=0,  # tenacity retries, so that Retry-After and counts are ours
                                    http_client=self._http_client())
        post, response_type = client.post, httpx.Response
        # Bytes go in `content=` where the SDK has it; older releases take pre-serialised bytes as `body=`.
        field = "content" if "content" in inspect.signature(post).parameters else "body"

        async def send(body: bytes) -> bytes:
            # The SDK's generic POST: its auth, headers, timeouts and error types (non-2xx raises
            # APIStatusError), with the body already serialised and the raw response back.
            response = await post(CHAT_PATH, cast_to=response_type, **{field: body})
            return response.content

        return send, client.close

    # ------------------------------------------------------------------ the batch

    def generate(self, requests: list[Request], on_result: OnResult | None = None) -> list[Completion]:
        return asyncio.run(self._generate(requests, on_result))

    async def _generate(self, requests: list[Request], on_result: OnResult | None) -> list[Completion]:
        results: list[Completion | None] = [None] * len(requests)
        if not requests:
            return []
        send, close = await self._open()
        indices = iter(range(len(requests)))  # shared by the workers: each takes the next index
        failures_in_a_row = 0
        stopped: list[Completion] = []  # the failure that showed the endpoint refuses every call

        async def worker() -> None:
            nonlocal failures_in_a_row
            one = self._one
            for index in indices:
                if stopped:
                    return  # the calls not yet sent stay unsent: the stage stops below
                completion = await one(send, requests[index])
                results[index] = completion
                if on_result is not None:
                    on_result(index, completion)
                if completion.ok:
                    failures_in_a_row = 0
                    continue
                failures_in_a_row += 1
                if completion.extra.get("status") in ENDPOINT_STATUS or \
                        failures_in_a_row >= STOP_AFTER_FAILURES_IN_A_ROW:
                    stopped.append(completion)

        try:
            await asyncio.gather(*(worker() for _ in range(min(self.max_concurrency, len(requests)))))
        finally:
            await close()
        if stopped:
            answered = sum(1 for r in results if r is not None and r.ok)
            unsent = sum(1 for r in results if r is None)
            failure = stopped[0]
            fix = self._fix(failure.extra.get("status"), f"{failure.text or ''} {failure.error or ''}")
            raise RunStopped(f"{self.base_url} fails every call: {failure.error}. {fix}. "
                             f"Stopped the stage with {unsent} of {len(requests)} calls not sent; {answered} "
                             "answered calls are cached. Fix the cause and run the same command again")
        return [r if r is not None else Completion(None, error="no reply") for r in results]

    def _fix(self, status: int | None, reply: str) -> str:
        """What to do about a failure that stops the stage or fails the preflight (`reply`: what the server said)."""
        if status == 401:
            return (f"The server refused the API key: set {self.api_key_env} to a valid key" if self.api_key_env else
                    "The server wants an API key: export it in an environment variable and name that variable "
                    "with api_key_env in the model's config")
        if status == 403:
            return "The key is not allowed to use this model or endpoint: check its permissions, or use another key"
        if status == 404:
            return (f"Check the model's base_url (it usually ends in /v1) and its model name {self.model!r} (the "
                    "names the server serves are listed at GET <base_url>/models)")
        if status is not None and 400 <= status < 500 and "response_format" in reply:
            return ("The server rejects the structured-output request: set structured_output: json_object "
                    "(llama.cpp's server) or none in the model's config")
        if status is not None and 400 <= status < 500:
            return "The server rejects the requests (its reply is quoted above): fix the model config or the prompt"
        return "Check that the server is up and answers at base_url"

    async def _one(self, send: Send, request: Request) -> Completion:
        try:
            body = self.encode(request)
        except Exception as exc:  # a request that cannot be serialised fails alone
            return _failed(exc, 0)
        try:  # the fast path: one attempt, no retry machinery
            return parse_reply(await send(body))
        except Exception as exc:
            if not is_retryable(exc) or self.max_retries <= 0:
                return _failed(exc, 1)
            first = exc
        return await self._retry(send, body, first)

    async def _retry(self, send: Send, body: bytes, first: BaseException) -> Completion:
        """After a retryable first failure: wait, then up to `max_retries` more attempts under tenacity.

        The waits are those a tenacity loop around every attempt would make: Retry-After when the server
        sent one, else jittered exponential backoff by the number of failures so far."""
        backoff = wait_random_exponential(multiplier=BACKOFF_MULTIPLIER_S, max=self.backoff_max_s)
        told = retry_after_seconds(first)
        await asyncio.sleep(told if told is not None else backoff(_Failures(1)))
        tries = 1
        try:
            async for attempt in AsyncRetrying(
                    stop=stop_after_attempt(self.max_retries),
                    wait=_WaitHonouringRetryAfter(backoff, offset=1),
                    retry=retry_if_exception(is_retryable), reraise=True):
                with attempt:
                    tries += 1
                    completion = parse_reply(await send(body))
        except Exception as exc:
            return _failed(exc, tries)
        completion.extra["tries"] = tries
        return completion

    def close(self) -> None:
        pass


def start(config: OpenAIModel) -> OpenAIBackend:
    backend = OpenAIBackend(config.base_url, config.model, api_key_env=config.api_key_env,
                            max_concurrency=config.max_concurrency, timeout_s=config.timeout_s,
                            max_retries=config.max_retries, structured_output=config.structured_output,
                            backoff_max_s=config.backoff_max_s)
    backend.preflight()  # a wrong URL, key or model fails here in seconds, before the first call
    return backend


def _failed(exc: BaseException, tries: int) -> Completion:
    # The raw output of a failed call: the body of a 200 that was not a usable completion, or of an
    # HTTP error response (its JSON error, an HTML error page); None when nothing arrived (reset, timeout).
    raw = _raw_body(exc)
    extra: dict[str, Any] = {"tries": tries, "retryable": is_retryable(exc)}
    if isinstance(exc, openai.APIStatusError):
        extra["status"] = exc.status_code
    # The aiohttp transport reports a refused connection as APITimeoutError: name it by what happened.
    kind = "ConnectionRefusedError" if connection_refused(exc) else type(exc).__name__
    return Completion(raw, error=f"{kind}: {describe(exc)} (after {tries} tries)", extra=extra)


def describe(exc: BaseException) -> str:
    """What went wrong, in the words of the failure: a refused connection is not a timeout."""
    refused = connection_refused(exc)
    if refused:
        return refused
    return _short(exc)


def connection_refused(exc: BaseException) -> str | None:
    """'connection refused ...' when a ConnectionRefusedError is anywhere in the exception's causes."""
    seen = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ConnectionRefusedError) or "Connection refused" in str(cause):
            return "connection refused: nothing is listening at that address (is the server running?)"
        cause = cause.__cause__ or cause.__context__
    return None


def _raw_body(exc: BaseException) -> str | None:
    body = getattr(exc, "body", None) if isinstance(exc, BadReply) else None
    if body is None and isinstance(exc, openai.APIStatusError):
        try:
            body = exc.response.content
        except Exception:  # a streamed or already closed response has no content to show
            body = None
    if body is None:
        return None
    return body[:MAX_RAW_BODY].decode("utf-8", errors="replace") if isinstance(body, bytes) else str(body)[:MAX_RAW_BODY]


def _server_message(response) -> str:
    """The error message of an HTTP error response (OpenAI's {"error": {"message"}} shape), else its text."""
    try:
        error = orjson.loads(response.content).get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (orjson.JSONDecodeError, AttributeError):
        message = None
    text = str(message) if message else response.content[:300].decode("utf-8", "replace").strip()
    return text[:300] or "no body"


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f". Did you mean {close[0]!r}?" if close else ""


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) < 300 else text[:300] + "..."
