"""What a model's calls may cost: its price, caps on one run's spending, its declared speed.

`ModelCosts` is the base of every backend's config class (backends/*.py), so any model may carry `price:`,
`budget:` and `throughput:`; `selfalign plan` (plan.py) and the call layer's caps (budget.py) read them.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from .config_base import Strict


class Price(Strict):
    """What a model's calls cost, in USD per million tokens (what the provider's price list says)."""

    input_per_mtok: float = Field(ge=0, le=10_000, description="USD per million prompt tokens")
    output_per_mtok: float = Field(ge=0, le=10_000, description="USD per million completion tokens")


class Budget(Strict):
    """Caps on what one `selfalign run` sends (calls served from the cache cost nothing against them).

    Before each call the call layer reserves its prompt tokens plus its max_tokens; a call that could pass a
    cap is not sent, the calls in flight finish into the cache, and the run stops (exit 5). See budget.py."""

    max_usd: float | None = Field(None, gt=0, description="USD this run may spend (needs a price on every model "
                                                          "it covers)")
    max_calls: int | None = Field(None, ge=1, description="model calls this run may send (re-asks count)")
    max_tokens: int | None = Field(None, ge=1, description="prompt + completion tokens this run may use")

    @model_validator(mode="after")
    def _some_cap(self) -> "Budget":
        if self.max_usd is None and self.max_calls is None and self.max_tokens is None:
            raise ValueError("a budget needs at least one of max_usd, max_calls, max_tokens; remove it for no cap")
        return self


class Throughput(Strict):
    """Declared speed of a model, for `selfalign plan`'s time range (a previous run's measured speed wins)."""

    completion_tokens_per_s: float = Field(gt=0, description="completion tokens per second over all concurrent "
                                                             "calls")
    prompt_tokens_per_s: float | None = Field(None, gt=0, description="prompt tokens read per second; default: "
                                                                      "prompt reading not counted")


class ModelCosts(Strict):
    """What every model config may say about cost. Left out of dumps (config hash, stage fingerprints): a price,
    a cap or a speed changes what a run may spend or how long it takes, not what it makes."""

    price: Price | None = Field(None, exclude=True, description="USD per million tokens, for `selfalign plan` "
                                                                "and budget.max_usd")
    budget: Budget | None = Field(None, exclude=True, description="caps on this model's calls in one run")
    throughput: Throughput | None = Field(None, exclude=True, description="declared speed, for `selfalign plan`")

    @model_validator(mode="after")
    def _usd_cap_needs_a_price(self) -> "ModelCosts":
        if self.budget is not None and self.budget.max_usd is not None and self.price is None:
            raise ValueError("budget.max_usd needs the model's price: add price: {input_per_mtok: ..., "
                             "output_per_mtok: ...} (USD per million tokens; 0 for a local model)")
        return self
