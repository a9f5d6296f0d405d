"""The one protocol every backend speaks: a batch of requests in, the same number of completions out.

A backend never raises for the batch because one row failed: that row's `Completion` carries `error`.
Backends call `on_result(index, completion)` as each request finishes so the caller can checkpoint it
(write it to the cache) before the rest of the batch is done; a killed run then loses only calls in
flight. Caching, validation and re-asking live above the backends, in `selfalign.calls`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens, "seed": self.seed}


@dataclass(frozen=True)
class Request:
    """One model call. `json_schema`, when set, asks the backend to constrain the reply to it."""

    messages: tuple[dict[str, str], ...]
    sampling: Sampling
    json_schema: dict[str, Any] | None = None
    sample_index: int = 0


@dataclass
class Completion:
    text: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    # Set on transport failures we know are worth retrying on a later run (timeouts, 5xx).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.text is not None


OnResult = Callable[[int, Completion], None]


class Backend(Protocol):
    """`identity` names the backend for cache keys: backend kind + endpoint/model path, never a secret."""

    identity: dict[str, Any]

    def generate(self, requests: list[Request], on_result: OnResult | None = None) -> list[Completion]: ...

    def close(self) -> None: ...


def finish(results: list[Completion | None]) -> list[Completion]:
    """Turn any slot a backend failed to fill into an explicit error instead of a silent None."""
    return [r if r is not None else Completion(text=None, error="backend returned no result") for r in results]
