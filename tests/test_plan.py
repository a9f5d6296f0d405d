"""`selfalign plan`: what a run will call, find cached and cost, before it runs; compared with the manifest of the
run that follows, on real HH-RLHF rows with the fake backend (fresh, part-way and finished run directories)."""

from __future__ import annotations

import json

import pytest

from selfalign.cli import main
from selfalign.config import load_pipeline
from selfalign.backends.openai_config import OpenAIModel
from selfalign.plan import PLACEHOLDER, plan_pipeline
from selfalign.runner import run_pipeline
from selfalign import tokens

# load -> critique -> consistency -> filter -> judge -> export: the judge comes after two stages that keep rows
# by the critiques' scores, so on a fresh run directory its rows and calls are bounds.
PAIRS = """\
schema_version: 1
name: plan-pairs
models:
  critic: {{backend: fake, price: {{input_per_mtok: 0.5, output_per_mtok: 1.5}}}}
stages:
  - {{kind: load, path: {data}, format: hh-rlhf, on_bad_row: drop}}
  - {{kind: critique, model: critic, samples: 2, sampling: {{max_tokens: 100}}}}
  - {{kind: consistency, min_margin: 1}}
  - {{kind: filter, where: "chosen_critiques_kept >= 2"}}
  - {{kind: judge, model: critic, sampling: {{max_tokens: 50}}}}
  - {{kind: export, formats: [trl]}}
"""

# Prompts only: answers, then critiques quoting them, then pairs. No stage before the critique keeps rows by
# content, so its calls are exact even before the answers exist; its prompts quote answers not yet written.
ANSWERS = """\
schema_version: 1
name: plan-answers
models:
  policy: {{backend: fake, throughput: {{completion_tokens_per_s: 50, prompt_tokens_per_s: 500}}}}
stages:
  - {{kind: load, path: {data}, format: hh-rlhf, on_bad_row: drop}}
  - {{kind: generate, model: policy, samples: 3, sampling: {{max_tokens: 40}}}}
  - {{kind: critique, model: policy, targets: [responses], samples: 2, sampling: {{max_tokens: 60}}}}
  - {{kind: pair, min_margin: 0.5}}
  - {{kind: export, formats: [trl]}}
"""

LIMIT = 30


def plan_of(path, run_dir, *more: str) -> dict:
    return plan_pipeline(path, list(more), limit=LIMIT, output=run_dir)


def run(path, run_dir, *sets: str) -> dict:
    return run_pipeline(load_pipeline(path, list(sets)), output=run_dir, limit=LIMIT, quiet=True)


def assert_plan_matches(plan: dict, manifest: dict) -> None:
    """Exact stages equal the run's funnel and calls; bounded ones hold what the run did."""
    assert len(plan["stages"]) == len(manifest["rows"])
    for planned, done in zip(plan["stages"], manifest["rows"]):
        where = f"stage {planned['stage']} ({planned['kind']})"
        if planned["rows_in_exact"]:
            assert planned["rows_in"] == done["in"], where
        else:
            assert planned["rows_in"] >= done["in"], where
        if not planned.get("model"):
            assert done["model_calls"]["requested"] == 0, where
            continue
        calls = done["model_calls"]
        if planned["calls_exact"]:
            assert (planned["calls"], planned["cached"], planned["to_send"]) == \
                (calls["requested"], calls["cached"], calls["sent"]), where
        else:
            assert planned["calls"] >= calls["requested"] and planned["to_send"] >= calls["sent"], where
            assert planned["cached"] == calls["cached"], where
        assert planned["completion_tokens_at_most"] >= done["tokens"]["completion"], where
        if planned["prompt_tokens_exact"] and planned["calls_exact"]:
            # The fake backend counts words, and so does its counter: the prompt tokens are the run's own.
            assert planned["prompt_tokens"] == done["tokens"]["prompt"], where
        else:
            assert planned["prompt_tokens"] >= done["tokens"]["prompt"], where


def test_plan_then_run_fresh_then_finished(write_pipeline, hh_data, tmp_path):
    path = write_pipeline(PAIRS.format(data=hh_data))
    run_dir = tmp_path / "run"
    plan = plan_of(path, run_dir)
    assert not run_dir.exists(), "a plan wrote into the run directory"
    stages = plan["stages"]
    assert [s["rows_in_exact"] for s in stages] == [True, True, True, False, False, False]
    assert stages[1]["calls"] == LIMIT * 2 * 2 and stages[1]["cached"] == 0 and stages[1]["calls_exact"]
    assert stages[4]["calls"] == 2 * stages[4]["rows_in"] and not stages[4]["calls_exact"]
    # Money: prompt tokens at the input price plus every completion token of max_tokens at the output price.
    critique = stages[1]
    assert critique["completion_tokens_at_most"] == critique["calls"] * 100
    assert critique["usd_at_most"] == pytest.approx((critique["prompt_tokens"] * 0.5 + critique["calls"] * 100 * 1.5) / 1e6)
    assert plan["models"]["critic"]["throughput"] is None and critique["seconds"] is None

    manifest = run(path, run_dir)
    assert_plan_matches(plan, manifest)
    assert manifest["rows"][4]["in"] < plan["stages"][4]["rows_in"], "the bound was not a bound: nothing filtered"

    # Finished: every call is in the cache and every stage is known, the judge's too.
    again = plan_of(path, run_dir)
    assert all(s["rows_in_exact"] and s.get("calls_exact", True) for s in again["stages"])
    assert again["total"]["to_send"] == 0 and again["total"]["cached"] == again["total"]["calls"]
    assert again["stages"][4]["calls"] == manifest["rows"][4]["model_calls"]["requested"]
    assert_plan_matches(again, run(path, run_dir))
    # The run measured its speed: the next plan times with it.
    assert again["models"]["critic"]["throughput"]["source"].startswith("measured in")


def test_resume_plan_counts_what_the_stopped_run_cached(write_pipeline, hh_data, tmp_path, capsys):
    path = write_pipeline(PAIRS.format(data=hh_data))
    run_dir = tmp_path / "run"
    status = main(["run", str(path), "--output", str(run_dir), "--limit", str(LIMIT), "--quiet",
                   "--set", "budget.max_calls=70"])
    assert status == 5, capsys.readouterr().err
    plan = plan_of(path, run_dir)
    critique = plan["stages"][1]
    assert (critique["calls"], critique["cached"], critique["to_send"]) == (120, 70, 50)
    assert critique["calls_exact"] and not plan["stages"][4]["calls_exact"]
    assert_plan_matches(plan, run(path, run_dir))


def test_answers_then_critiques_exact_calls_and_bounded_prompt_tokens(write_pipeline, hh_data, tmp_path):
    path = write_pipeline(ANSWERS.format(data=hh_data))
    run_dir = tmp_path / "run"
    plan = plan_of(path, run_dir)
    generate, critique = plan["stages"][1], plan["stages"][2]
    assert generate["calls"] == LIMIT * 3 and generate["calls_exact"] and generate["prompt_tokens_exact"]
    assert critique["calls"] == LIMIT * 3 * 2 and critique["calls_exact"]
    # The critiques quote answers not written yet: counted as max_tokens long, an upper bound.
    assert not critique["prompt_tokens_exact"]
    # Declared throughput: prompt reading, then from 1 token to max_tokens per reply.
    reading = generate["prompt_tokens"] / 500
    assert generate["seconds"] == pytest.approx([reading + 90 / 50, reading + 90 * 40 / 50], abs=1e-3)
    assert plan["stages"][4]["rows_in_exact"] is False  # after pair over placeholder scores
    manifest = run(path, run_dir)
    assert_plan_matches(plan, manifest)
    assert critique["prompt_tokens"] > manifest["rows"][2]["tokens"]["prompt"]


def test_plan_command_prints_a_table_and_json(write_pipeline, hh_data, tmp_path, capsys):
    path = write_pipeline(PAIRS.format(data=hh_data))
    run_dir = tmp_path / "run"
    assert main(["plan", str(path), "--output", str(run_dir), "--limit", "5"]) == 0
    table = capsys.readouterr().out
    lines = table.splitlines()
    critique = next(line for line in lines if line.split()[:2] == ["1", "critique"])
    assert critique.split()[2:7] == ["5", "critic", "20", "0", "20"], critique
    judge = next(line for line in lines if line.split()[:2] == ["4", "judge"])
    assert "≤ 5" in judge and "≤ 10" in judge, judge
    assert "critic: prompt tokens: the fake backend's word count" in table
    assert "critic: time: unknown: add throughput:" in table
    assert main(["plan", str(path), "--output", str(run_dir), "--limit", "5", "--json",
                 "--set", "budget.max_usd=0.001"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["stages"][1]["calls"] == 20 and data["limit"] == 5
    [cap] = data["budget"]
    assert cap["cap"] == "budget.max_usd" and cap["may_stop"] is (data["total"]["usd_at_most"] > 0.001)


def test_plan_refuses_a_bad_pipeline_like_validate(write_pipeline, hh_data, tmp_path, capsys):
    path = write_pipeline(PAIRS.format(data=hh_data).replace("model: critic, samples", "model: critc, samples"))
    assert main(["plan", str(path), "--output", str(tmp_path / "run")]) == 2
    assert "model 'critc' is not defined" in capsys.readouterr().err


def test_token_counters_say_what_they_are(monkeypatch):
    import tiktoken

    messages = [{"role": "system", "content": "Judge."}, {"role": "user", "content": "Is 2 + 2 = 4? Héllo"}]
    # A tiktoken encoding of single bytes (the real ones are downloaded, and this machine is offline): the
    # counter must use tiktoken's count plus the OpenAI cookbook's 3 tokens a message and 3 for the reply.
    byte_encoding = tiktoken.Encoding("bytes-only", pat_str=r"[\s\S]", mergeable_ranks={bytes([i]): i for i in range(256)},
                                      special_tokens={})
    monkeypatch.setattr(tokens, "_load_encoding", lambda module, name: byte_encoding)
    known = tokens.counter_for(OpenAIModel(backend="openai", base_url="http://h/v1", model="gpt-4o-mini"))
    expected = sum(len(m["content"].encode()) + len(m["role"]) + 3 for m in messages) + 3
    assert known.exact and known.label.startswith("tiktoken bytes-only") and known.count(messages) == expected

    monkeypatch.setattr(tokens, "_load_encoding", lambda module, name: None)
    offline = tokens.counter_for(OpenAIModel(backend="openai", base_url="http://h/v1", model="gpt-4o-mini"))
    assert not offline.exact and "could not be loaded" in offline.label
    unknown = tokens.counter_for(OpenAIModel(backend="openai", base_url="http://h/v1", model="my-model"))
    assert not unknown.exact and unknown.label.startswith("estimate")
    # A budget reserves at least every byte: no tokenizer makes more tokens than that.
    assert unknown.upper_bound(messages) >= sum(len(m["content"].encode()) for m in messages)


def test_gguf_counter_equals_what_llama_cpp_reports():
    """The bundled model's own count, chat template and default system prompt included (one real completion)."""
    from selfalign.backends.base import Request, Sampling
    from selfalign.backends.llamacpp import LlamaCppBackend
    from selfalign.backends.llamacpp import LlamaCppModel

    counter = tokens.counter_for(LlamaCppModel())
    assert counter.exact and "GGUF" in counter.label
    messages = ({"role": "user", "content": "Name a colour."},)
    backend = LlamaCppBackend(n_ctx=256, n_threads=2)
    try:
        [completion] = backend.generate([Request(messages, Sampling(temperature=0, max_tokens=2, seed=0))])
    finally:
        backend.close()
    assert completion.ok, completion.error
    assert counter.count(messages) == completion.prompt_tokens > 10  # the template adds a system prompt


def test_a_placeholder_counts_at_its_ceiling():
    from selfalign.plan import PlaceholderBackend

    backend = PlaceholderBackend({"backend": "fake"}, tokens.counter_for(type("C", (), {"backend": "fake"})()))
    messages = [{"role": "user", "content": f"Rate this answer: {PLACEHOLDER.format(tokens=40)} please"}]
    assert backend.count_prompt(messages) == (4 + 40, True)


READY = {"critic_rm": "critic", "feedback_to_reward": "reader", "quickstart": "critic", "rubric_story": "writer",
         "self_rewarding": "policy", "ultrafeedback": "rater"}


@pytest.mark.parametrize("name", sorted(READY))
def test_every_ready_pipeline_plans_what_it_runs(name, tmp_path):
    """Every stage kind the ready pipelines use (generate, critique with a rubric, refine, feedback, pair, ...),
    on the fake backend: the plan holds before the run, and is exact after it."""
    from selfalign.check import PROJECT_ROOT

    path = PROJECT_ROOT / "pipelines" / f"{name}.yaml"
    fake = f"models.{READY[name]}={{backend: fake}}"
    run_dir = tmp_path / "run"
    plan = plan_pipeline(path, [fake], limit=6, output=run_dir)
    manifest = run_pipeline(load_pipeline(path, [fake]), output=run_dir, limit=6, quiet=True)
    assert_plan_matches(plan, manifest)
    assert plan["total"]["calls"] >= manifest["model_calls"]["requested"] > 0
    again = plan_pipeline(path, [fake], limit=6, output=run_dir)
    assert again["total"]["calls_exact"] and again["total"]["to_send"] == 0
    assert [s["rows_in"] for s in again["stages"]] == [s["in"] for s in manifest["rows"]]
    assert again["total"]["calls"] == manifest["model_calls"]["requested"]
