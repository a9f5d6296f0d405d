"""Budget caps: `budget: {max_usd, max_calls, max_tokens}` on the pipeline and on a model stop the run (exit 5,
manifest status `budget`) before a call that could pass them; the calls sent are in the cache, and raising the
cap and running the same command resumes without paying for any finished call twice.

The OpenAI cases run against a deterministic OpenAI-compatible server on 127.0.0.1 that counts every request
it answers (tests/support/fake_openai_server.py; its usage counts words)."""

from __future__ import annotations

import json
import re
import sqlite3

import pytest

from selfalign.cli import main
from selfalign.errors import EXIT_BUDGET
from tests.support.fake_openai_server import FakeOpenAIServer

ROWS = 10  # x 2 targets x 2 samples = 40 critique calls


def pipeline(tmp_path, model: str, top: str = "", stage: str = "") -> str:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}? Explain the sum in one sentence.",
                                        "chosen": f"{i} + {i} is {2 * i}.", "rejected": f"It is {2 * i + 1}."}) + "\n"
                            for i in range(ROWS)))
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"""\
schema_version: 1
name: budget
{top}models:
  critic: {model}
stages:
  - {{kind: load, path: {data}, format: trl}}
  - {{kind: critique, model: critic, samples: 2, sampling: {{max_tokens: 50}}{stage}}}
  - {{kind: consistency}}
""")
    return str(path)


def openai_model(server, extra: str = "") -> str:
    return f"{{backend: openai, base_url: '{server.url}', model: fake, max_concurrency: 4{extra}}}"


def run(path: str, run_dir, *more: str) -> int:
    return main(["run", path, "--output", str(run_dir), "--quiet", *more])


def cached(run_dir) -> int:
    with sqlite3.connect(run_dir / "cache.sqlite") as db:
        return db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]


def manifest(run_dir) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def last_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_max_calls_stops_then_raising_it_resumes_paying_for_nothing_twice(tmp_path, capsys):
    with FakeOpenAIServer() as server:
        path = pipeline(tmp_path, openai_model(server), top="budget: {max_calls: 15}\n")
        run_dir = tmp_path / "run"
        assert run(path, run_dir) == EXIT_BUDGET == 5
        line = last_line(capsys)
        assert server.requests == 15 and cached(run_dir) == 15, "calls in flight must finish into the cache"
        assert "budget.max_calls 15 is reached" in line and "15 calls" in line, line
        assert "25 of this stage's 40 calls not sent" in line, line
        assert "--set budget.max_calls=" in line and "run the same command" in line, line
        stopped = manifest(run_dir)
        assert stopped["status"] == "budget" and stopped["attempts"][-1]["status"] == "budget"
        assert stopped["budget"] == [{"cap": "budget", "limits": {"max_calls": 15},
                                      "spent": {**stopped["budget"][0]["spent"], "calls": 15}}]

        assert run(path, run_dir, "--set", "budget.max_calls=40") == 0, capsys.readouterr().err
        assert server.requests == 40 and set(server.bodies.values()) == {1}, "a finished call was paid twice"
        done = manifest(run_dir)
        assert done["model_calls"] == {"requested": 40, "cached": 15, "sent": 25, "failed": 0}
        assert done["budget"][0]["spent"]["calls"] == 25  # a cap counts what one run sends
        # Cached calls cost nothing against a cap: a finished run re-runs under the smallest one.
        assert run(path, run_dir, "--set", "budget.max_calls=1") == 0
        assert server.requests == 40


def test_max_tokens_on_a_model_stops_before_a_call_that_could_pass_it(tmp_path, capsys):
    cap = 2500
    with FakeOpenAIServer() as server:
        path = pipeline(tmp_path, openai_model(server, f", budget: {{max_tokens: {cap}}}"))
        run_dir = tmp_path / "run"
        assert run(path, run_dir) == EXIT_BUDGET
        line = last_line(capsys)
        [spent] = [entry["spent"] for entry in manifest(run_dir)["budget"]]
        used = spent["prompt_tokens"] + spent["completion_tokens"]
        assert f"models.critic.budget.max_tokens {cap:,}" in line, line
        reserved = int(re.search(r"it may use up to ([\d,]+)", line).group(1).replace(",", ""))
        # Never past the cap, and stopped only when the next call (reserved at prompt bytes + max_tokens) could pass it.
        assert used <= cap < used + reserved, (used, reserved)
        assert 0 < server.requests == spent["calls"] == cached(run_dir) < 40
        # The server's own usage is what was counted.
        assert used == manifest(run_dir)["tokens"]["prompt"] + manifest(run_dir)["tokens"]["completion"]


def test_max_usd_on_the_pipeline_with_the_fake_backend_then_resume(tmp_path, capsys):
    price = "{input_per_mtok: 20, output_per_mtok: 40}"  # dear, so a few calls pass the cap
    path = pipeline(tmp_path, f"{{backend: fake, price: {price}}}", top="budget: {max_usd: 0.05}\n")
    run_dir = tmp_path / "run"
    assert run(path, run_dir) == EXIT_BUDGET
    line = last_line(capsys)
    assert "budget.max_usd $0.0500" in line and "$0." in line.split("Spent this run")[1], line
    first = manifest(run_dir)
    spent = first["budget"][0]["spent"]
    assert spent["usd"] <= 0.05
    assert spent["usd"] == pytest.approx((spent["prompt_tokens"] * 20 + spent["completion_tokens"] * 40) / 1e6)
    sent_first = first["model_calls"]["sent"]
    assert 0 < sent_first == cached(run_dir) < 40
    assert run(path, run_dir, "--set", "budget.max_usd=10") == 0, capsys.readouterr().err
    resumed = manifest(run_dir)["model_calls"]
    assert resumed["cached"] == sent_first and resumed["sent"] == 40 - sent_first


def test_a_call_larger_than_the_cap_is_never_sent(tmp_path, capsys):
    path = pipeline(tmp_path, "{backend: fake, budget: {max_tokens: 40}}")
    run_dir = tmp_path / "run"
    assert run(path, run_dir) == EXIT_BUDGET
    line = last_line(capsys)
    assert "one call may use" in line and "max_tokens 50" in line and "models.critic.budget.max_tokens 40" in line
    assert not run_dir.exists(), "nothing was sent, so nothing may be left on disk"


def test_progress_shows_spent_against_the_cap(tmp_path, capsys):
    path = pipeline(tmp_path, "{backend: fake, price: {input_per_mtok: 1, output_per_mtok: 1}}",
                    top="budget: {max_calls: 100, max_usd: 1}\n")
    assert main(["run", path, "--output", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert re.search(r"critique \(critic\) .* budget usd \$0\.\d{4}/\$1\.00 calls 40/100", err), err


BASE = pipeline  # the YAML each bad case edits


@pytest.mark.parametrize("top, model, message", [
    ("budget: {max_usd: -1}\n", "{backend: fake, price: {input_per_mtok: 1, output_per_mtok: 1}}",
     "{p}:3: budget.max_usd: Input should be greater than 0"),
    ("budget: {}\n", "{backend: fake}", "{p}:3: budget: Value error, a budget needs at least one of max_usd"),
    ("budget: {max_call: 5}\n", "{backend: fake}", "{p}:3: budget.max_call: unknown key; did you mean 'max_calls'?"),
    ("budget: {max_calls: true}\n", "{backend: fake}", "{p}:3: budget.max_calls: expected a number, got a boolean"),
    ("budget: {max_calls: 2.5}\n", "{backend: fake}", "{p}:3: budget.max_calls: Input should be a valid integer"),
    ("budget: {max_usd: 1}\n", "{backend: fake}",
     "{p}:3: budget.max_usd: max_usd needs a price on every model the stages call; 'critic' has none"),
    ("", "{backend: fake, budget: {max_usd: 1}}", "{p}:4: models.critic: Value error, budget.max_usd needs the "
                                                  "model's price"),
    ("", "{backend: fake, price: {input_per_mtok: -1, output_per_mtok: 1}}",
     "{p}:4: models.critic.price.input_per_mtok: Input should be greater than or equal to 0"),
    ("", "{backend: fake, price: {input_per_mtk: 1, output_per_mtok: 1}}",
     "{p}:4: models.critic.price.input_per_mtk: unknown key; did you mean 'input_per_mtok'?"),
    ("", "{backend: fake, price: {output_per_mtok: 1}}",
     "{p}:4: models.critic.price.input_per_mtok: required field is missing"),
    ("", "{backend: fake, throughput: {completion_tokens_per_s: 0}}",
     "{p}:4: models.critic.throughput.completion_tokens_per_s: Input should be greater than 0"),
])
def test_bad_budget_price_and_throughput_values_are_refused_by_validate_and_run(tmp_path, capsys, top, model, message):
    path = BASE(tmp_path, model, top=top)
    for command in (["validate", path], ["run", path, "--output", str(tmp_path / "run")],
                    ["plan", path, "--output", str(tmp_path / "run")]):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert message.format(p=path) in err, err
    assert not (tmp_path / "run").exists()


def test_a_bad_cap_given_with_set_names_the_set(tmp_path, capsys):
    path = BASE(tmp_path, "{backend: fake}")
    assert main(["run", path, "--output", str(tmp_path / "run"), "--set", "budget.max_calls=0"]) == 2
    assert "--set budget.max_calls=0: budget.max_calls: Input should be greater than or equal to 1" in \
        capsys.readouterr().err


def test_the_pipeline_cap_counts_every_model_and_a_model_cap_only_its_own(tmp_path, capsys):
    """critique (model critic) sends 40 calls, then judge (model judge) 2 per kept row: a pipeline max_calls of 43
    lets the judge send 3; a judge cap of 2 stops it at 2 while the pipeline cap still has room."""
    path = pipeline(tmp_path, "{backend: fake}", top="budget: {max_calls: 43}\n")
    text = open(path).read().replace("models:\n", "models:\n  judge: {backend: fake, model: judge}\n")
    open(path, "w").write(text + "  - {kind: judge, model: judge}\n")
    run_dir = tmp_path / "run"
    assert run(path, run_dir) == EXIT_BUDGET
    line = last_line(capsys)
    assert "judge (judge)" in line and "budget.max_calls 43 is reached" in line, line
    assert manifest(run_dir)["error"] in line
    calls = manifest(run_dir)["models"]
    assert (calls["critic"]["calls"]["sent"], calls["judge"]["calls"]["sent"]) == (40, 3)

    text = open(path).read().replace("judge: {backend: fake, model: judge}",
                                     "judge: {backend: fake, model: judge, budget: {max_calls: 2}}")
    open(path, "w").write(text)
    assert run(path, run_dir, "--set", "budget.max_calls=100") == EXIT_BUDGET
    line = last_line(capsys)
    assert "models.judge.budget.max_calls 2 is reached" in line, line
    stopped = manifest(run_dir)
    assert stopped["models"]["judge"]["calls"]["sent"] == 2 and stopped["models"]["critic"]["calls"]["sent"] == 0
    assert [cap["cap"] for cap in stopped["budget"]] == ["budget", "models.judge.budget"]
    assert [cap["spent"]["calls"] for cap in stopped["budget"]] == [2, 2]
