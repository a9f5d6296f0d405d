"""Model calls as stages see them: cache first, then the backend, then validation and bounded re-asks.

Every reply is validated here with pydantic even when the backend constrained decoding. An invalid reply
is re-asked with the error quoted (a new request, so it has its own cache entry and resumes exactly);
the caller's messages are never mutated. A call that still fails comes back as a `CallResult` with
status "failed", its error, the number of attempts (transport tries and re-asks) and the raw output:
never as a silent None.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ValidationError

from .backends.base import Backend, Completion, Request
from .budget import CallBudget
from .cache import Cache, request_keys
from .errors import RunError, RunStopped
from .progress import Progress

REASK = ("Your reply could not be used: {error}\n"
         "Reply again with only a JSON object that matches the required schema, nothing else.")


@dataclass
class CallResult:
    value: Any
    text: str | None
    status: str  # "ok" | "failed"
    error: str | None
    attempts: int
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class CallStats:
    calls: int = 0  # calls the stages asked for; a call's re-asks count once here, each in `requested`
    requested: int = 0
    cached: int = 0
    sent: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def extract_json(text: str) -> str:
    """Models without constrained decoding often wrap JSON in prose or ``` fences; take the object."""
    fenced = re.search(r"```(?:json)?\s*(\{.*?\})\s*```", text, re.DOTALL)
    if fenced:
        return fenced.group(1)
    start, end = text.find("{"), text.rfind("}")
    return text[start:end + 1] if start != -1 and end > start else text


def json_parser(model: type[BaseModel]) -> Callable[[str], dict[str, Any]]:
    def parse(text: str) -> dict[str, Any]:
        candidate = extract_json(text)
        try:
            return model.model_validate_json(candidate).model_dump()
        except ValidationError as exc:
            # Models often put raw newlines or tabs inside JSON strings, which strict JSON forbids; the
            # meaning is unambiguous, so accept them rather than re-ask (the schema is still enforced).
            lenient = _loads_allowing_control_characters(candidate)
            if lenient is not None:
                try:
                    return model.model_validate(lenient).model_dump()
                except ValidationError as retry_exc:
                    exc = retry_exc
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'reply'}: {e['msg']}" for e in exc.errors())
            raise ValueError(problems) from None
    return parse


def _loads_allowing_control_characters(text: str) -> Any:
    try:
        return json.loads(text, strict=False)
    except ValueError:
        return None


class ModelClient:
    """One named model of the pipeline: a lazily started backend behind the shared cache."""

    def __init__(self, name: str, make_backend: Callable[[], Backend], identity: dict[str, Any],
                 cache: Cache | None, stats: CallStats, progress: Progress, offline: bool = False,
                 budget: CallBudget | None = None):
        self.name = name
        self.budget = budget  # caps on what this run sends (budget.py); None: no cap, nothing checked
        self.identity = identity
        self._make_backend = make_backend
        self._backend: Backend | None = None
        self._cache = cache
        self.stats = stats
        self._progress = progress
        self._offline = offline

    @property
    def backend(self) -> Backend:
        # Started only when a call misses the cache: a fully cached re-run never loads a model.
        if self._backend is None:
            try:
                self._backend = self._make_backend()
            except RunError as exc:  # e.g. the endpoint's preflight failed: say which model it is
                raise RunError(f"model {self.name!r}: {exc}") from None
        return self._backend

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def run(self, requests: list[Request], parse: Callable[[str], Any] | None, label: str,
            max_attempts: int = 3) -> list[CallResult]:
        """Answer every request; `parse` validates a reply (raise ValueError to re-ask)."""
        self.stats.calls += len(requests)
        results: list[CallResult | None] = [None] * len(requests)
        current = list(requests)
        attempts = [0] * len(requests)
        chain_keys: list[list[str]] = [[] for _ in requests]  # cache keys of each request's attempts
        pending = list(range(len(requests)))
        for attempt in range(max_attempts):
            if not pending:
                break
            suffix = "" if attempt == 0 else f" (re-ask {attempt})"
            replies, keys = self._complete([current[i] for i in pending], label + suffix)
            still_invalid = []
            for i, reply, key in zip(pending, replies, keys):
                # Every HTTP try counts (a reply that needed 3 tries is 3 attempts); a cached reply counts 1.
                attempts[i] += max(1, int(reply.extra.get("tries", 1)))
                chain_keys[i].append(key)
                if not reply.ok:
                    # Transport failures were already retried by the backend; re-asking would not help.
                    results[i] = CallResult(None, reply.text, "failed", reply.error, attempts[i])
                    continue
                try:
                    value = parse(reply.text) if parse else reply.text
                except ValueError as exc:
                    results[i] = CallResult(None, reply.text, "failed", f"invalid reply: {exc}", attempts[i],
                                            reply.prompt_tokens, reply.completion_tokens)
                    current[i] = _reask(current[i], reply.text, str(exc))
                    still_invalid.append(i)
                    continue
                results[i] = CallResult(value, reply.text, "ok", None, attempts[i],
                                        reply.prompt_tokens, reply.completion_tokens)
            pending = still_invalid
        failed = [i for i, r in enumerate(results) if r is not None and not r.ok]
        self.stats.failed += len(failed)
        if self._cache is not None and failed:
            # A request that ended invalid is forgotten, so a re-run asks it afresh instead of replaying the
            # same invalid replies; requests that ended valid keep their whole chain (a re-run replays them).
            self._cache.delete([key for i in failed for key in chain_keys[i]])
        return _fill(results)

    def _complete(self, requests: list[Request], label: str) -> tuple[list[Completion], list[str]]:
        started = time.perf_counter()
        keys = request_keys(self.identity, requests)
        hits = self._cache.get_many(keys) if self._cache is not None else {}
        replies: list[Completion | None] = [None] * len(requests)
        misses = []
        for i, key in enumerate(keys):
            if key in hits:
                text, prompt_tokens, completion_tokens = hits[key]
                replies[i] = Completion(text, prompt_tokens, completion_tokens)
            else:
                misses.append(i)
        self.stats.requested += len(requests)
        self.stats.cached += len(requests) - len(misses)
        bar = self._progress.bar(label, total=len(requests), done=len(requests) - len(misses),
                                 note=self.budget.progress if self.budget is not None else None)
        if misses and self._offline:
            raise RunError(f"model {self.name!r}: {len(misses)} call(s) are not in the cache and this command "
                           "sends no model calls; run the pipeline first (selfalign run)")
        if misses:
            def on_result(j: int, completion: Completion) -> None:
                i = misses[j]
                replies[i] = completion
                if self._cache is not None:  # committed now: a kill -9 after this line loses nothing
                    if completion.ok:
                        self._cache.put(keys[i], completion.text, completion.prompt_tokens,
                                        completion.completion_tokens)
                    else:
                        self._cache.count_unanswered()
                self.stats.prompt_tokens += completion.prompt_tokens
                self.stats.completion_tokens += completion.completion_tokens
                bar.advance(completion)

            try:
                if self.budget is None:  # no cap: the whole batch at once, nothing counted
                    self._send(requests, misses, 0, len(misses), on_result, replies)
                else:
                    self._send_within_budget(requests, misses, on_result, label, replies)
            finally:
                self.stats.seconds += time.perf_counter() - started
                bar.close()
            return [r if r is not None else Completion(None, error="no reply") for r in replies], keys
        bar.close()
        self.stats.seconds += time.perf_counter() - started
        return [r if r is not None else Completion(None, error="no reply") for r in replies], keys

    def _send(self, requests: list[Request], misses: list[int], start: int, end: int,
              on_result: Callable[[int, Completion], None], replies: list[Completion | None]) -> None:
        """Send misses[start:end]; `on_result` takes the index into `misses` and fills `replies`."""
        self.stats.sent += end - start

        def report(j: int, completion: Completion) -> None:
            on_result(start + j, completion)

        try:
            answered = self.backend.generate([requests[i] for i in misses[start:end]], on_result=report)
        except RunStopped as exc:  # the endpoint refuses every call; what was answered is cached
            raise RunStopped(f"model {self.name!r}: {exc}") from None
        for j, completion in enumerate(answered):
            if replies[misses[start + j]] is None:
                report(j, completion)  # a backend that did not report through on_result

    def _send_within_budget(self, requests: list[Request], misses: list[int],
                            on_result: Callable[[int, Completion], None], label: str,
                            replies: list[Completion | None]) -> None:
        """Send the misses in batches the budget admits (each batch whole, at the backend's concurrency); when
        not even the next call fits, the calls sent so far are in the cache and the run stops (exit 5)."""
        budget = self.budget
        start = 0
        while start < len(misses):
            admitted = budget.admit([requests[i] for i in misses[start:]])
            if admitted == 0:
                raise budget.exhausted(label, unsent=len(misses) - start,
                                       asked=len(requests))
            end = start + admitted

            def settle(j: int, completion: Completion, start: int = start) -> None:
                budget.settle(j - start, completion)
                on_result(j, completion)

            try:
                self._send(requests, misses, start, end, settle, replies)
            finally:
                budget.release()
            start = end


def _reask(request: Request, bad_reply: str, error: str) -> Request:
    messages = request.messages + ({"role": "assistant", "content": bad_reply},
                                   {"role": "user", "content": REASK.format(error=error)})
    return Request(messages=messages, sampling=request.sampling, json_schema=request.json_schema,
                   sample_index=request.sample_index)


def _fill(results: list[CallResult | None]) -> list[CallResult]:
    return [r if r is not None else CallResult(None, None, "failed", "no reply", 0) for r in results]

