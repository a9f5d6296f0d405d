"""Budget caps: `budget: {max_usd, max_calls, max_tokens}` on the pipeline (every model's calls count) and on
each model (its own calls count), enforced where calls are sent (calls.py).

A cap limits what one `selfalign run` sends: calls served from the cache cost nothing against it, so after a
stop, raising the cap and running the same command resumes and pays for no finished call twice. Before a
batch is sent the call layer asks `admit` how many of the next calls fit: each is reserved at its prompt
tokens (an upper bound when no tokenizer is at hand, tokens.py) plus its `max_tokens`, priced at the model's
`price`. The calls admitted are sent together (the backend's concurrency is untouched); as each one returns
its reservation is replaced by what it used (the usage the backend reports). When not even the next call
fits, the calls in flight have already finished into the cache, and `exhausted` is the error that stops the
run (BudgetExhausted, exit 5): it names the cap, what was spent and how to go on.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

from .backends.base import Completion, Request
from .errors import BudgetExhausted
from .model_costs import Budget, Price
from .tokens import TokenCounter, counter_for

CAP_FIELDS = ("max_usd", "max_calls", "max_tokens")


@dataclass
class Spend:
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usd: float = 0.0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: "Spend", sign: int = 1) -> None:
        self.calls += sign * other.calls
        self.prompt_tokens += sign * other.prompt_tokens
        self.completion_tokens += sign * other.completion_tokens
        self.usd += sign * other.usd

    def value(self, field: str) -> float:
        return {"max_usd": self.usd, "max_calls": self.calls, "max_tokens": self.tokens}[field]

    def as_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "usd": round(self.usd, 6)}


def _shown(field: str, value: float) -> str:
    if field == "max_usd":
        return f"${value:.4f}" if value < 1 else f"${value:,.2f}"
    return f"{int(value):,}"


class Cap:
    """One `budget:` block and what this run has spent and reserved against it."""

    def __init__(self, where: str, config: Budget):
        self.where = where  # "budget" or "models.critic.budget": where the user raises it
        self.limits = {field: getattr(config, field) for field in CAP_FIELDS if getattr(config, field) is not None}
        self.spent = Spend()
        self.reserved = Spend()

    def passed_by(self, extra: Spend) -> str | None:
        """The first cap field that spent + reserved + `extra` would pass, or None."""
        for field, limit in self.limits.items():
            if self.spent.value(field) + self.reserved.value(field) + extra.value(field) > limit + 1e-12:
                return field
        return None

    def progress(self) -> str:
        return " ".join(f"{field[4:]} {_shown(field, self.spent.value(field))}/{_shown(field, limit)}"
                        for field, limit in self.limits.items())

    def manifest(self) -> dict[str, Any]:
        return {"cap": self.where, "limits": dict(self.limits), "spent": self.spent.as_dict()}


class RunBudget:
    """The caps of one run: the pipeline's, shared by every model, and each model's own."""

    def __init__(self, pipeline_budget: Budget | None):
        self.pipeline_cap = Cap("budget", pipeline_budget) if pipeline_budget is not None else None
        self.model_caps: dict[str, Cap] = {}
        self._lock = threading.Lock()  # replies of several models may settle on different threads

    @classmethod
    def of(cls, pipeline) -> "RunBudget | None":
        """None when neither the pipeline nor any model has a budget (the call layer then checks nothing)."""
        if pipeline.budget is None and not any(model.budget for model in pipeline.models.values()):
            return None
        return cls(pipeline.budget)

    def for_model(self, name: str, config) -> "CallBudget | None":
        caps = [self.pipeline_cap] if self.pipeline_cap is not None else []
        if config.budget is not None:
            self.model_caps[name] = Cap(f"models.{name}.budget", config.budget)
            caps.append(self.model_caps[name])
        return CallBudget(name, caps, config.price, config, self._lock) if caps else None

    def manifest(self) -> list[dict[str, Any]]:
        caps = ([self.pipeline_cap] if self.pipeline_cap is not None else []) + list(self.model_caps.values())
        return [cap.manifest() for cap in caps]


class CallBudget:
    """What one model's calls count against (the pipeline's cap and the model's own), at the model's price."""

    def __init__(self, model: str, caps: list[Cap], price: Price | None, config, lock: threading.Lock):
        self.model, self.caps, self.price, self._lock = model, caps, price, lock
        self._config = config
        self._counter: TokenCounter | None = None
        # Only a token or money cap needs prompt tokens counted; max_calls alone counts calls.
        self._counts_tokens = any(field in cap.limits for cap in caps for field in ("max_usd", "max_tokens"))
        self._pending: dict[int, Spend] = {}  # batch index -> its reservation, until its reply settles it
        self._stopped_by: tuple[Cap, str, Spend] | None = None

    @property
    def counter(self) -> TokenCounter:
        if self._counter is None:
            self._counter = counter_for(self._config)
        return self._counter

    def _usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        if self.price is None:
            return 0.0
        return (prompt_tokens * self.price.input_per_mtok + completion_tokens * self.price.output_per_mtok) / 1e6

    def reservation(self, request: Request) -> Spend:
        """The most one call may cost: its prompt tokens (an upper bound) and every token of its max_tokens."""
        if not self._counts_tokens:
            return Spend(calls=1)
        prompt = self.counter.upper_bound(request.messages)
        completion = request.sampling.max_tokens
        return Spend(1, prompt, completion, self._usd(prompt, completion))

    def admit(self, requests: list[Request]) -> int:
        """Reserve the longest prefix of `requests` that fits under every cap; the number reserved (0: stop)."""
        with self._lock:
            self._pending = {}
            for index, request in enumerate(requests):
                reservation = self.reservation(request)  # counted only up to the first call that does not fit
                for cap in self.caps:
                    field = cap.passed_by(reservation)
                    if field is not None:
                        if index == 0:
                            self._stopped_by = (cap, field, reservation)
                        return index
                for cap in self.caps:
                    cap.reserved.add(reservation)
                self._pending[index] = reservation
            return len(requests)

    def settle(self, index: int, completion: Completion) -> None:
        """Replace the reservation of the batch's call `index` by what it used."""
        with self._lock:
            reservation = self._pending.pop(index, None)
            if reservation is None:
                return
            used = self._used(completion, reservation)
            for cap in self.caps:
                cap.reserved.add(reservation, sign=-1)
                cap.spent.add(used)

    def release(self) -> None:
        """Reservations of calls that never reported (a backend that stopped the batch) are not spent."""
        with self._lock:
            for reservation in self._pending.values():
                for cap in self.caps:
                    cap.reserved.add(reservation, sign=-1)
            self._pending = {}

    def _used(self, completion: Completion, reservation: Spend) -> Spend:
        prompt, completion_tokens = completion.prompt_tokens, completion.completion_tokens
        if completion.ok and not prompt and not completion_tokens and self._counts_tokens:
            # A server that reports no usage: count the prompt as reserved and the reply's text ourselves.
            prompt, completion_tokens = reservation.prompt_tokens, self.counter.count_text(completion.text)
        return Spend(1, prompt, completion_tokens, self._usd(prompt, completion_tokens))

    def progress(self) -> str:
        return "; ".join(f"{cap.where} {cap.progress()}" for cap in self.caps)

    def exhausted(self, label: str, unsent: int, asked: int) -> BudgetExhausted:
        cap, field, reservation = self._stopped_by or (self.caps[0], next(iter(self.caps[0].limits)), Spend(1))
        limit = cap.limits[field]
        spent = cap.spent
        never = reservation.value(field) > limit
        if never:
            # Not even an untouched cap fits this one call: raising by a little would not help.
            cause = (f"one call may use {_shown(field, reservation.value(field))} ({reservation.prompt_tokens:,} prompt "
                     f"tokens at most + max_tokens {reservation.completion_tokens:,}), more than {cap.where}.{field} "
                     f"{_shown(field, limit)} allows")
        elif field == "max_calls":
            cause = f"{cap.where}.max_calls {_shown(field, limit)} is reached"
        else:
            cause = (f"the next call could pass {cap.where}.{field} {_shown(field, limit)}: "
                     f"{_shown(field, spent.value(field))} is spent and it may use up to "
                     f"{_shown(field, reservation.value(field))}")
        suggestion = _raised(field, max(limit * 2, reservation.value(field) * 2 + spent.value(field)))
        return BudgetExhausted(
            f"budget cap reached in {label}: {cause}, so the run stopped sending. Spent this run against "
            f"{cap.where}: {spent.calls:,} calls, {spent.tokens:,} tokens ({spent.prompt_tokens:,} prompt + "
            f"{spent.completion_tokens:,} completion)" + (f", ${spent.usd:.4f}" if self.price is not None else "")
            + f"; {unsent:,} of this stage's {asked:,} calls not sent. Every answered call is in the cache. To go "
            f"on, raise the cap (e.g. --set {cap.where}.{field}={suggestion}) and run the same command: it resumes, "
            "and calls served from the cache cost nothing against the cap (a cap counts what one run sends). "
            "`selfalign plan` with the same arguments shows what the rest costs")


def _raised(field: str, value: float) -> str:
    if field == "max_usd":
        return f"{value:.2f}" if value >= 0.01 else f"{value:.6f}".rstrip("0")
    return str(math.ceil(value))
