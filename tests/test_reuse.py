"""Stage reuse on a re-run (reuse.py): an unchanged model stage is read back; any change re-runs it, and a
row dropped for a failed call is asked again."""

import shutil
from pathlib import Path

import polars as pl
import pytest

from selfalign.backends.fake import FakeBackend
from selfalign.config import load_pipeline
from selfalign.runner import run_pipeline
from selfalign.stages import critique
from tests.support.fake_pipeline import fake_pipeline_yaml

ROOT = Path(__file__).resolve().parent.parent


def pipeline_yaml(data: Path, prompt: Path, samples: int) -> str:
    return fake_pipeline_yaml("reuse", [
        {"kind": "load", "path": data, "format": "trl"},
        {"kind": "critique", "model": "critic", "prompt": prompt, "samples": samples},
        {"kind": "consistency"},
        {"kind": "export"},
    ])


ROWS = 12  # pipelines/data/quickstart_pairs.jsonl


@pytest.fixture
def prompt(tmp_path):
    path = tmp_path / "critique.jinja"
    shutil.copy(ROOT / "prompts" / "critique.jinja", path)
    return path


@pytest.fixture
def pipeline(write_pipeline, prompt):
    def make(samples: int = 2):
        return load_pipeline(write_pipeline(pipeline_yaml(
            data=ROOT / "pipelines" / "data" / "quickstart_pairs.jsonl", prompt=prompt, samples=samples)))
    return make


def run(loaded, run_dir, backend):
    return run_pipeline(loaded, output=run_dir, quiet=True, backend_overrides={"critic": backend})


def outputs(run_dir):
    return {path.name: pl.read_parquet(path) for folder in ("stages", "dropped")
            for path in sorted((run_dir / folder).glob("*.parquet"))}


def refuse_to_build_requests(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the critique stage was recomputed")
    monkeypatch.setattr(critique, "build_requests", refuse)


def test_an_unchanged_model_stage_is_read_back_with_identical_outputs(pipeline, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    first = run(pipeline(), run_dir, FakeBackend())
    before = outputs(run_dir)
    refuse_to_build_requests(monkeypatch)
    backend = FakeBackend()
    again = run(pipeline(), run_dir, backend)
    assert backend.requests == []
    assert again["model_calls"]["sent"] == 0
    assert again["model_calls"]["cached"] == first["model_calls"]["requested"] == ROWS * 2 * 2
    assert again["rows"][1]["model_calls"] == {"requested": ROWS * 4, "cached": ROWS * 4, "sent": 0, "failed": 0}
    assert again["rows"][1]["metrics"] == first["rows"][1]["metrics"]
    assert again["rows_out"] == first["rows_out"]
    after = outputs(run_dir)
    assert after.keys() == before.keys()
    for name, frame in before.items():
        assert after[name].equals(frame), name


def test_a_changed_prompt_file_reruns_the_stage(pipeline, prompt, tmp_path):
    run_dir = tmp_path / "run"
    run(pipeline(), run_dir, FakeBackend())
    prompt.write_text(prompt.read_text().replace("{% block user %}", "{% block user %}Be strict.\n", 1))
    backend = FakeBackend()
    again = run(pipeline(), run_dir, backend)
    assert again["model_calls"]["sent"] == ROWS * 4 == len(backend.requests)
    assert all("Be strict." in request.messages[-1]["content"] for request in backend.requests)


def test_a_changed_config_reruns_the_stage(pipeline, tmp_path):
    run_dir = tmp_path / "run"
    run(pipeline(samples=2), run_dir, FakeBackend())
    again = run(pipeline(samples=3), run_dir, FakeBackend())
    # Samples 0 and 1 of each answer come from the cache; sample 2 is new.
    assert again["model_calls"]["cached"] == ROWS * 2 * 2 and again["model_calls"]["sent"] == ROWS * 2
    critiques = pl.read_parquet(run_dir / "stages" / "01-critique.parquet")["chosen_critiques"]
    assert critiques.list.len().to_list() == [3] * ROWS


def test_a_changed_model_reruns_the_stage(pipeline, tmp_path):
    run_dir = tmp_path / "run"
    run(pipeline(), run_dir, FakeBackend(model="a"))
    again = run(pipeline(), run_dir, FakeBackend(model="b"))
    assert again["model_calls"]["sent"] == ROWS * 4


def test_changed_input_rows_rerun_the_stage(write_pipeline, prompt, tmp_path):
    lines = (ROOT / "pipelines" / "data" / "quickstart_pairs.jsonl").read_text().splitlines()
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(lines) + "\n")
    loaded = load_pipeline(write_pipeline(pipeline_yaml(data=data, prompt=prompt, samples=2)))
    run_dir = tmp_path / "run"
    run(loaded, run_dir, FakeBackend())
    data.write_text("\n".join(lines[:-1]) + "\n")  # one row fewer
    again = run(loaded, run_dir, FakeBackend())
    assert again["model_calls"]["sent"] == 0 and again["model_calls"]["cached"] == (ROWS - 1) * 4
    assert pl.read_parquet(run_dir / "stages" / "01-critique.parquet").height == ROWS - 1


def test_a_row_dropped_for_a_failed_call_is_asked_again(pipeline, tmp_path, monkeypatch):
    good = FakeBackend()

    def fail_one_answer(request):
        if "Berlin" in request.messages[-1]["content"]:
            raise ConnectionError("server went away")
        return good.reply(request)

    run_dir = tmp_path / "run"
    first = run(pipeline(), run_dir, FakeBackend(responder=fail_one_answer))
    assert first["rows"][1]["drop_reasons"] == {"model_call_failed": 1}
    assert first["model_calls"]["failed"] == 2  # both samples of the rejected answer of one row
    backend = FakeBackend()
    again = run(pipeline(), run_dir, backend)
    assert again["model_calls"]["sent"] == 2 == len(backend.requests)
    assert all("Berlin" in request.messages[-1]["content"] for request in backend.requests)
    assert again["rows"][1]["dropped"] == 0 and again["rows"][1]["out"] == ROWS
    # Now every call succeeded: the next run reads the stage back.
    refuse_to_build_requests(monkeypatch)
    third = run(pipeline(), run_dir, FakeBackend())
    assert third["model_calls"]["sent"] == 0 and third["rows"][1]["out"] == ROWS


def test_without_its_record_a_stage_is_recomputed_from_the_cache(pipeline, tmp_path):
    run_dir = tmp_path / "run"
    run(pipeline(), run_dir, FakeBackend())
    before = outputs(run_dir)
    shutil.rmtree(run_dir / "reuse")  # as after a kill between writing a stage's files and its record
    again = run(pipeline(), run_dir, FakeBackend())
    assert again["model_calls"]["sent"] == 0 and again["model_calls"]["cached"] == ROWS * 4
    after = outputs(run_dir)
    for name, frame in before.items():
        assert after[name].equals(frame), name
