"""Backends: one batch-first protocol (see base.py), one module per engine, each imported only when used."""

from __future__ import annotations

from typing import Any, Callable

from ..models import FakeModel, LlamaCppModel, OpenAIModel, VLLMModel
from .base import Backend


def backend_for(config) -> tuple[dict[str, Any], Callable[[], Backend]]:
    """(identity for cache keys, factory that starts the backend). Nothing heavy happens until the factory runs."""
    if isinstance(config, LlamaCppModel):
        from .llamacpp import LlamaCppBackend, model_identity
        return model_identity(config.model_path), lambda: LlamaCppBackend(
            config.model_path, n_ctx=config.n_ctx, n_threads=config.n_threads)
    if isinstance(config, OpenAIModel):
        identity = {"backend": "openai", "base_url": config.base_url.rstrip("/"), "model": config.model}

        def start_openai() -> Backend:
            # Imported here: a fully cached re-run never pays for loading the openai SDK.
            from .openai_backend import OpenAIBackend
            backend = OpenAIBackend(config.base_url, config.model, api_key_env=config.api_key_env,
                                    max_concurrency=config.max_concurrency, timeout_s=config.timeout_s,
                                    max_retries=config.max_retries, structured_output=config.structured_output,
                                    backoff_max_s=config.backoff_max_s)
            backend.preflight()  # a wrong URL, key or model fails here in seconds, before the first call
            return backend
        return identity, start_openai
    if isinstance(config, VLLMModel):
        identity = {"backend": "vllm", "model": config.model, "dtype": config.dtype}

        def start() -> Backend:
            from .vllm_backend import VLLMBackend
            return VLLMBackend(config.model, dtype=config.dtype, enforce_eager=config.enforce_eager,
                               max_model_len=config.max_model_len,
                               gpu_memory_utilization=config.gpu_memory_utilization, chunk_size=config.chunk_size,
                               **({"kv_cache_memory_bytes": config.kv_cache_memory_bytes}
                                  if config.kv_cache_memory_bytes else {}))
        return identity, start
    if isinstance(config, FakeModel):
        from .fake import FakeBackend
        return {"backend": "fake", "model": config.model}, lambda: FakeBackend(config.model, latency_s=config.latency_s)
    raise TypeError(f"unknown model config {config!r}")
