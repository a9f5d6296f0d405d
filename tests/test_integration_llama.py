"""Real models: the embedded llama.cpp backend in-process, and the openai backend against llama.cpp's
OpenAI-compatible server started on 127.0.0.1 by the fixture. The bundled model is tiny: these tests
check plumbing (real calls, schema-valid replies, cache, resume), never judgement quality."""

import datasets
import pytest

from selfalign.config import load_pipeline
from selfalign.runner import run_pipeline
from tests.support.llama_server import llama_server  # noqa: F401  (pytest fixture)

PIPELINE = """\
schema_version: 1
name: real
models:
  critic: {model}
stages:
  - kind: load
    path: {data}
    format: hh-rlhf
    on_bad_row: drop
  - kind: critique
    model: critic
    samples: {samples}
    max_critique_chars: 200
    sampling: {{temperature: 0.7, max_tokens: 120, seed: 0}}
  - kind: consistency
  - kind: export
    test_size: 0
"""


def run_twice(path, tmp_path, limit):
    first = run_pipeline(load_pipeline(path), output=tmp_path / "run", limit=limit, quiet=True)
    again = run_pipeline(load_pipeline(path), output=tmp_path / "run", limit=limit, quiet=True)
    return first, again


def check_real_run(first, again, rows, samples, run_dir):
    calls = first["model_calls"]
    assert calls["requested"] >= rows * 2 * samples and calls["sent"] == calls["requested"]
    assert first["tokens"]["completion"] > 0 and first["tokens"]["prompt"] > 0
    critique = first["rows"][1]
    assert critique["in"] == critique["out"] + critique["dropped"] == rows
    assert again["model_calls"]["sent"] == 0 and again["model_calls"]["cached"] == calls["requested"]
    assert again["rows_out"] == first["rows_out"]
    if first["rows_out"]:
        dataset = datasets.load_from_disk(str(run_dir / "dataset"))
        assert dataset["train"].num_rows == first["rows_out"]


def test_embedded_llamacpp_backend_end_to_end(write_pipeline, hh_data, tmp_path):
    path = write_pipeline(PIPELINE.format(model="{backend: llamacpp}", data=hh_data, samples=1))
    first, again = run_twice(path, tmp_path, limit=2)
    check_real_run(first, again, rows=2, samples=1, run_dir=tmp_path / "run")
    assert first["models"]["critic"]["identity"]["model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_openai_backend_against_a_real_llama_cpp_server(llama_server, write_pipeline, hh_data, tmp_path):  # noqa: F811
    model = (f"{{backend: openai, base_url: '{llama_server}', model: smollm2, max_concurrency: 4, "
             "structured_output: json_object}")
    path = write_pipeline(PIPELINE.format(model=model, data=hh_data, samples=2))
    first, again = run_twice(path, tmp_path, limit=3)
    check_real_run(first, again, rows=3, samples=2, run_dir=tmp_path / "run")


@pytest.mark.slow
def test_multi_row_hh_run_on_the_embedded_model(write_pipeline, hh_data, tmp_path):
    path = write_pipeline(PIPELINE.format(model="{backend: llamacpp}", data=hh_data, samples=2))
    first, again = run_twice(path, tmp_path, limit=6)
    check_real_run(first, again, rows=6, samples=2, run_dir=tmp_path / "run")
