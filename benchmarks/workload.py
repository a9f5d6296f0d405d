"""Generated inputs for the benchmark cases: TRL preference rows, pipeline files, and the exact requests.

Nothing here needs orjson or openai, so the vLLM case can import it from vLLM's own virtual environment.

- :func:`write_trl_jsonl` writes ``rows`` deterministic TRL preference rows (``prompt``/``chosen``/
  ``rejected`` as text), streaming, so a million rows cost no memory.
- :func:`write_pipeline` writes a pipeline YAML whose first stage loads that file.
- :func:`collect_requests` runs a pipeline with a recording backend in place of one model (in a throwaway
  run directory) and returns the `Request`s selfalign builds: the baselines then send exactly those.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Iterable

import yaml

REPO = Path(__file__).resolve().parent.parent
CRITIQUE_PROMPT = REPO / "prompts" / "critique.jinja"
VALID_CRITIQUE = ('{"critique": "The response answers the question directly and is mostly accurate, but it omits '
                  'one relevant detail and could be more concise.", "score": 7}')

_TOPICS = ("the sum of the first {n} odd numbers", "why the sky looks blue at noon", "how a hash table resizes",
           "the boiling point of water at {n} metres", "what a Bloom filter with {n} bits can do",
           "how to split a bill of {n} dollars three ways", "why leap years exist",
           "the difference between TCP and UDP", "how vaccines train the immune system",
           "what {n} factorial is roughly")


def trl_row(i: int) -> dict[str, str]:
    """Row `i` of the generated data: a question with a good and a worse answer (lengths vary with i)."""
    n = i + 2
    topic = _TOPICS[i % len(_TOPICS)].format(n=n)
    detail = " ".join(["It also helps to check the result with a small example."] * (i % 4))
    return {
        "prompt": f"Question {i}: please explain {topic}.",
        "chosen": f"Here is a clear explanation of {topic}, step by step, with the key fact first. {detail}".strip(),
        "rejected": f"Not sure about {topic}." + (" Maybe look it up." if i % 3 else ""),
    }


def write_trl_jsonl(path: Path, rows: int, start: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import orjson

        def dumps(row: dict) -> bytes:
            return orjson.dumps(row)
    except ImportError:  # the vLLM venv has no orjson
        def dumps(row: dict) -> bytes:
            return json.dumps(row, ensure_ascii=False).encode()
    with open(path, "wb") as handle:
        buffer = []
        for i in range(start, start + rows):
            buffer.append(dumps(trl_row(i)))
            if len(buffer) >= 10_000:
                handle.write(b"\n".join(buffer) + b"\n")
                buffer = []
        if buffer:
            handle.write(b"\n".join(buffer) + b"\n")
    return path


def load_stage(data: Path) -> dict[str, Any]:
    return {"kind": "load", "path": str(data), "format": "trl"}


def critique_stage(model: str = "m", samples: int = 4, targets: Iterable[str] = ("chosen",), max_tokens: int = 256,
                   temperature: float = 0.7, seed: int = 0, max_attempts: int = 3) -> dict[str, Any]:
    return {"kind": "critique", "model": model, "prompt": str(CRITIQUE_PROMPT), "samples": samples,
            "targets": list(targets), "max_attempts": max_attempts,
            "sampling": {"temperature": temperature, "max_tokens": max_tokens, "seed": seed}}


def write_pipeline(path: Path, name: str, stages: list[dict[str, Any]],
                   models: dict[str, dict[str, Any]] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"schema_version": 1, "name": name, "models": models or {}, "stages": stages}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class RecordingBackend:
    """Answers every request at once with a valid critique and keeps the requests, in order."""

    def __init__(self, identity: dict[str, Any]):
        self.identity = identity
        self.requests: list = []

    def generate(self, requests, on_result=None):
        from selfalign.backends.base import Completion

        out = []
        for index, request in enumerate(requests):
            self.requests.append(request)
            completion = Completion(VALID_CRITIQUE, 1, 1)
            out.append(completion)
            if on_result:
                on_result(index, completion)
        return out

    def close(self) -> None:
        pass


def collect_requests(pipeline: Path, model: str, identity: dict[str, Any] | None = None) -> list:
    """The requests selfalign sends to `model` when running `pipeline` (first attempts, in order)."""
    from selfalign.config import load_pipeline
    from selfalign.runner import run_pipeline

    recorder = RecordingBackend(identity or {"backend": "recorder"})
    with tempfile.TemporaryDirectory(prefix="selfalign-bench-record-") as tmp:
        run_pipeline(load_pipeline(pipeline), output=Path(tmp) / "run", quiet=True,
                     backend_overrides={model: recorder})
    return recorder.requests
