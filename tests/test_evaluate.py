"""`selfalign evaluate` and the evaluate stage on a run whose answers carry planted features.

Every answer is marked `<<a+>>`/`<<a->>` (a kind-a pair: the critic judges it right) or `<<b+>>`/`<<b->>` (a
kind-b pair: the critic prefers the human-rejected answer); the planted embedding puts the marks on two axes
(tests/support/planted_embeddings.py). So before anything runs we know each arm's held-out accuracy:

- human (every label right) and final (the filtered a pairs + correct b pairs mixed in): every pair right, 1.0;
- synthetic (the critic's labels: b pairs reversed): learns b backwards, so only the a pairs: A / (A + B);
- filtered (consistency keeps only a pairs): no b weight at all, ties on b pairs: (A + B / 2) / (A + B).

With 70 a and 30 b held-out pairs: 1.0, 1.0, 0.7 and 0.85. Five more eval pairs reuse training prompts (with
other capitals and spaces): they must be found and left out.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest

from selfalign import evaluate, evaluate_arms, evaluate_view
from selfalign.backends.fake import FakeBackend
from selfalign.cli import main
from selfalign.config import load_pipeline
from selfalign.errors import ConfigErrors
from selfalign.evaluate import EvaluateSettings
from selfalign.evaluate_arms import make_disjoint, prompt_key
from selfalign.evaluate_run import evaluate_run_dir
from selfalign.finished_run import load_run
from selfalign.runner import run_pipeline
from selfalign.trainer_formats import prompt_bucket
from tests.support.planted_embeddings import EmbeddingsServer, PlantedEmbedder

TRAIN_PAIRS = 200
OVERLAP = 5          # eval pairs that reuse a training prompt (0..4): three of kind b (0, 1, 2), two of kind a
EVAL_A, EVAL_B = 70, 30
EXTRA_B = 60         # correct kind-b pairs the mix stage adds


def kind(i: int) -> str:
    return "b" if i % 10 < 3 else "a"


def pair(prompt: str, k: str, i: int) -> dict:
    return {"prompt": prompt, "chosen": f"answer {i}, the better one <<{k}+>>",
            "rejected": f"answer {i}, the worse one <<{k}->>"}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def critic(request) -> str:
    """A critic that scores kind-a answers the way people do and kind-b answers the other way round."""
    text = request.messages[-1]["content"].split("ASSISTANT:")[-1]
    score = {"<<a+>>": 8, "<<a->>": 3, "<<b+>>": 3, "<<b->>": 8}[re.search(r"<<[ab][+-]>>", text).group(0)]
    return json.dumps({"critique": "noted", "score": score})


PIPELINE = """\
schema_version: 1
name: planted
models:
  critic: {{backend: fake}}
stages:
  - {{kind: load, path: {train}, format: trl}}
  - {{kind: critique, model: critic, samples: 1}}
  - {{kind: consistency}}
  - {{kind: mix, add: [{{path: {extra}, format: trl}}]}}
  - {{kind: export, test_size: 0.2}}
{evaluate}"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("planted")
    train = write_jsonl(base / "train.jsonl", [pair(f"question {i}?", kind(i), i) for i in range(TRAIN_PAIRS)])
    extra = write_jsonl(base / "extra.jsonl", [pair(f"extra question {i}?", "b", 1000 + i) for i in range(EXTRA_B)])
    held = ([pair(f"held-out question {i}?", "a", 2000 + i) for i in range(EVAL_A)]
            + [pair(f"held-out question {i}?", "b", 3000 + i) for i in range(EVAL_B)]
            + [pair(f"Question  {i}?", kind(i), 4000 + i) for i in range(OVERLAP)])  # case and spaces differ
    return {"base": base, "train": train, "extra": extra, "eval": write_jsonl(base / "eval.jsonl", held)}


def run_planted(data, run_dir: Path, evaluate_stage: str = "") -> dict:
    pipeline = data["base"] / f"{run_dir.name}.yaml"
    pipeline.write_text(PIPELINE.format(train=data["train"], extra=data["extra"], evaluate=evaluate_stage))
    return run_pipeline(load_pipeline(pipeline), output=run_dir, quiet=True,
                        backend_overrides={"critic": FakeBackend(responder=critic)})


@pytest.fixture(scope="module")
def planted_run(data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "planted"
    run_planted(data, run_dir)
    return run_dir


def eval_settings(data, **extra) -> list[str]:
    return [f"eval={json.dumps({'path': str(data['eval']), 'format': 'trl'})}", *extra.get("sets", [])]


def arms(result: dict) -> dict[str, dict]:
    return {arm["name"]: arm for arm in result["arms"]}


def test_planted_signal_gives_the_known_accuracies_and_order(data, planted_run):
    source = PlantedEmbedder()
    result = evaluate_run_dir(planted_run, overrides=eval_settings(data), source=source)
    by_name = arms(result)
    held_a, held_b = EVAL_A, EVAL_B  # the eval pairs that share a training prompt are left out
    assert result["held_out"]["pairs"] == held_a + held_b
    assert result["held_out"]["removed_sharing_a_training_prompt"] == OVERLAP
    assert by_name["human"]["accuracy"] == 1.0
    assert by_name["final"]["accuracy"] == 1.0
    assert by_name["synthetic"]["accuracy"] == round(held_a / (held_a + held_b), 4)
    assert by_name["filtered"]["accuracy"] == round((held_a + held_b / 2) / (held_a + held_b), 4)
    order = sorted(by_name, key=lambda name: by_name[name]["accuracy"])
    assert order[:2] == ["synthetic", "filtered"]

    # Same budget for every arm: the smallest arm (the filtered a pairs); an eval keeps the arms whole.
    filtered_rows = sum(kind(i) == "a" for i in range(TRAIN_PAIRS))
    assert {a["budget"] for a in by_name.values()} == {filtered_rows}
    assert by_name["human"]["rows"] == TRAIN_PAIRS and by_name["filtered"]["rows"] == filtered_rows
    assert by_name["final"]["rows"] == filtered_rows + EXTRA_B
    assert {name: (a["sharing_a_held_out_prompt"], a["removed"], a["training_rows"]) for name, a in by_name.items()} \
        == {"human": (OVERLAP, 0, TRAIN_PAIRS), "synthetic": (OVERLAP, 0, TRAIN_PAIRS),
            "filtered": (2, 0, filtered_rows), "final": (2, 0, filtered_rows + EXTRA_B)}

    differences = {d["name"]: d for d in result["differences"]}
    assert differences["filtered - synthetic"]["difference"] == 0.15
    low, high = differences["filtered - synthetic"]["ci"]
    assert 0 < low < differences["filtered - synthetic"]["difference"] < high
    assert differences["filtered - synthetic"]["verdict"] == "higher"
    assert differences["final - human"]["difference"] == 0 and differences["final - human"]["ci"] == [0, 0]
    for arm in by_name.values():  # the interval holds the estimate
        assert arm["ci"][0] <= arm["accuracy"] <= arm["ci"][1]

    stored = json.loads((planted_run / "evaluate.json").read_text())
    assert stored["arms"] == result["arms"]
    manifest = json.loads((planted_run / "manifest.json").read_text())
    assert manifest["evaluation"]["arms"]["filtered"]["accuracy"] == by_name["filtered"]["accuracy"]
    assert manifest["status"] == "complete"


def test_training_rows_are_prompt_disjoint_from_the_held_out_pairs(data, planted_run):
    from selfalign import report

    run = report.load_run(planted_run)
    arm_list = evaluate_arms.make_arms(run.stages, has_export=True)
    held_out = evaluate_arms.read_eval_data(EvaluateSettings.model_validate(
        {"eval": {"path": str(data["eval"]), "format": "trl"}}).eval, Path)
    assert held_out.height == EVAL_A + EVAL_B + OVERLAP
    for remove_from in ("held_out", "arms"):
        pools, clean, removed = make_disjoint(arm_list, held_out, remove_from)
        held = {prompt_key(p) for p in clean["prompt"].to_list()}
        for pool in pools:
            training = {prompt_key(p) for p in pool.rows["prompt"].to_list()}
            assert not training & held, (remove_from, pool.arm.name)
            assert pool.rows.height + pool.removed == pool.arm.frame.height
        assert {pool.arm.name: pool.shared for pool in pools} == {"human": 5, "synthetic": 5, "filtered": 2, "final": 2}
        if remove_from == "held_out":  # the eval loses its 5 pairs, the arms keep every row
            assert (removed, clean.height) == (OVERLAP, EVAL_A + EVAL_B) and not any(p.removed for p in pools)
        else:  # the arms lose the rows, the held-out pairs stay
            assert (removed, clean.height) == (0, held_out.height)
            assert {p.arm.name: p.removed for p in pools} == {"human": 5, "synthetic": 5, "filtered": 2, "final": 2}


def test_own_split_holds_out_the_human_prompts_export_tests_on(data, planted_run, tmp_path):
    result = evaluate_run_dir(planted_run, source=PlantedEmbedder())
    assert result["held_out"]["kind"] == "split" and result["held_out"]["holdout"] == 0.2  # the export's test_size
    human = [pair(f"question {i}?", kind(i), i) for i in range(TRAIN_PAIRS)]
    expected = [row for row in human if prompt_bucket([{"role": "user", "content": row["prompt"]}]) < 0.2]
    assert result["held_out"]["pairs"] == len(expected) > 0
    by_name = arms(result)
    assert by_name["human"]["removed"] == by_name["human"]["sharing_a_held_out_prompt"] == len(expected)
    assert by_name["human"]["training_rows"] == TRAIN_PAIRS - len(expected)
    # every human pair export put in its test split is held out (the mixed-in pairs are not human pairs)
    test_rows = pl.read_parquet(planted_run / "export" / "trl" / "test.parquet").filter(pl.col("source") == "human")
    exported_test = {prompt_key(p) for p in test_rows["prompt"].to_list()}
    assert exported_test and exported_test <= {prompt_key([{"role": "user", "content": row["prompt"]}])
                                               for row in expected}


def test_a_rerun_embeds_nothing(data, planted_run):
    first, second = PlantedEmbedder(), PlantedEmbedder()
    settings = eval_settings(data, sets=["seeds=3"])
    before = evaluate_run_dir(planted_run, overrides=settings, source=first)
    again = evaluate_run_dir(planted_run, overrides=settings, source=second)
    assert second.calls == 0 and again["features"]["computed"] == 0
    assert again["features"]["cached"] == again["features"]["texts"] == before["features"]["texts"]
    assert again["arms"] == before["arms"] and again["differences"] == before["differences"]
    # each distinct text was embedded at most once over both runs (the fixture's earlier tests shared the cache)
    assert len(first.texts) == len(set(first.texts))


def test_evaluate_stage_with_an_openai_embeddings_endpoint(data, tmp_path):
    with EmbeddingsServer() as server:
        stage = (f"  - {{kind: evaluate, eval: {{path: {data['eval']}, format: trl}}, seeds: 2,\n"
                 f"     embedding: {{source: openai, base_url: '{server.url}', model: planted, batch_size: 50}}}}\n")
        manifest = run_planted(data, tmp_path / "staged", stage)
        first = server.texts
        again = run_planted(data, tmp_path / "staged", stage)
    assert first > 0 and server.texts == first  # the re-run embedded nothing
    evaluation = evaluate.evaluation_of(manifest)
    assert evaluation == evaluate.evaluation_of(again)
    assert evaluation["arms"]["human"]["accuracy"] == 1.0
    assert evaluation["arms"]["synthetic"]["accuracy"] == EVAL_A / (EVAL_A + EVAL_B)
    result = json.loads((tmp_path / "staged" / "evaluate.json").read_text())
    assert result["features"]["source"] == {"source": "openai", "base_url": server.url, "model": "planted"}
    assert manifest["rows"][-1]["kind"] == "evaluate" and manifest["rows"][-1]["out"] == manifest["rows"][-2]["out"]


def test_cli_prints_the_arms_table(data, planted_run, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "embedder_for", lambda config, resolve: PlantedEmbedder())
    code = main(["evaluate", str(planted_run), "--eval", str(data["eval"]), "--eval-format", "trl", "--seeds", "2",
                 "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"^human\s+1\.000\s+\[1\.000, 1\.000\]\s+0\.000\s+200\s+5\s+200\s+140$", out, re.M), out
    assert re.search(r"^synthetic\s+0\.700\s+\[0\.6\d\d, 0\.7\d\d\]", out, re.M), out
    assert "filtered - synthetic: +0.150" in out and "higher" in out
    assert "5 eval pairs shared a prompt with the run's rows and were left out" in out
    assert "final - human: +0.000" in out


def test_arms_the_run_cannot_make_say_why(data, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"q {i}"} for i in range(6)])
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"""\
schema_version: 1
name: prompts-only
models:
  m: {{backend: fake}}
stages:
  - {{kind: load, path: {prompts}, format: prompts}}
  - {{kind: generate, model: m, samples: 3}}
  - {{kind: critique, model: m, targets: [responses], samples: 1}}
  - {{kind: pair, min_margin: 0}}
  - {{kind: export}}
""")
    run_pipeline(load_pipeline(pipeline), output=tmp_path / "run", quiet=True)
    with pytest.raises(evaluate.EvaluationError, match="no human pairs to hold out; give `eval:`"):
        evaluate_run_dir(tmp_path / "run", source=PlantedEmbedder())
    result = evaluate_run_dir(tmp_path / "run", overrides=eval_settings(data), source=PlantedEmbedder())
    by_name = arms(result)
    assert not by_name["human"]["available"] and "no human pairs" in by_name["human"]["why_not"]
    assert not by_name["filtered"]["available"] and "no consistency or judge" in by_name["filtered"]["why_not"]
    assert by_name["synthetic"]["available"] and by_name["final"]["available"]
    assert "pair" in by_name["synthetic"]["origin"]
    differences = {d["name"]: d for d in result["differences"]}
    assert not differences["final - human"]["available"] and "no human arm" in differences["final - human"]["why_not"]
    assert "no human arm: the input has no human pairs" in evaluate_view.arms_table(result)


def test_bad_settings_name_the_set_and_the_fix(planted_run):
    with pytest.raises(ConfigErrors) as error:
        evaluate_run_dir(planted_run, overrides=["budgt=3", "embedding.n_ctx=1"], source=PlantedEmbedder())
    text = str(error.value)
    assert "--set budgt=3: budgt: unknown key; did you mean 'budget'?" in text
    assert "--set embedding.n_ctx=1: embedding.n_ctx:" in text
    assert json.loads((planted_run / "manifest.json").read_text())["status"] == "complete"


def test_validate_checks_the_evaluate_stage(data, write_pipeline):
    path = write_pipeline(PIPELINE.format(train=data["train"], extra=data["extra"], evaluate=(
        "  - {kind: evaluate, eval: {path: missing.jsonl, format: trl}}\n"
        "  - {kind: filter, where: 'true'}\n")))
    from selfalign.check import check_pipeline

    messages = [e.format() for e in check_pipeline(load_pipeline(path))]
    assert any("stage 5 (evaluate): eval.path: file 'missing.jsonl' not found" in m for m in messages), messages
    assert any("stage 5 (evaluate): kind: evaluate comes before stage 6 (filter)" in m for m in messages), messages


def test_report_and_card_show_the_evaluation(data, planted_run, tmp_path):
    from PIL import Image

    from selfalign import publish
    from selfalign.report import write_report

    result = evaluate_run_dir(planted_run, overrides=eval_settings(data), source=PlantedEmbedder())
    page = write_report(planted_run).read_text()
    section = page.split('<section id="evaluation">')[1].split("</section>")[0]
    assert '<img src="data:image/png;base64,' in section and 'href="#evaluation"' in page
    assert Image.open(planted_run / "report" / "evaluation.png").size[0] > 600
    filtered = arms(result)["filtered"]
    assert f"<td>filtered</td><td>{filtered['accuracy']:.3f}</td>" in section
    assert "filtered - synthetic</b>: +0.150" in section
    assert "made before the run's latest" not in section
    card = publish.write_card(load_run(planted_run), tmp_path / "card")
    text = card.read_text()
    assert "## Reward-model evaluation" in text
    assert f"| filtered | {filtered['accuracy']:.3f} |" in text and "- final - human: +0.000" in text


def test_the_report_says_when_the_evaluation_is_older_than_the_run(data, tmp_path):
    from selfalign.report import write_report

    run_dir = tmp_path / "rerun"
    run_planted(data, run_dir)
    evaluate_run_dir(run_dir, overrides=eval_settings(data, sets=["seeds=1"]), source=PlantedEmbedder())
    pipeline = data["base"] / "rerun.yaml"  # the same pipeline with another split: other rows in the run
    run_pipeline(load_pipeline(pipeline, ["stages.4.test_size=0.3"]), output=run_dir, quiet=True,
                 backend_overrides={"critic": FakeBackend(responder=critic)})
    assert "evaluation" not in json.loads((run_dir / "manifest.json").read_text())
    assert "made before the run's latest <code>selfalign run</code>" in write_report(run_dir).read_text()
    # evaluated again: current, and the own split follows the run's --set test_size, as its export did
    again = evaluate_run_dir(run_dir, overrides=["seeds=1"], source=PlantedEmbedder())
    assert again["held_out"]["holdout"] == 0.3
    assert "made before the run's latest" not in write_report(run_dir).read_text()


def test_the_embedded_model_embeds_a_batch_as_it_embeds_each_text(tmp_path):
    """The bundled model through llama.cpp (a real forward pass in the fast suite): mean-pooled vectors of its
    hidden size, the same for a text whether it shares a decode with others or not, cached by text."""
    import numpy as np

    from selfalign.embeddings import FeatureCache, FeatureStats, LlamaCppEmbedding, embedder_for, features

    texts = ["user: Is it safe to eat raw cookie dough?\n\nassistant: It can carry salmonella; bake it first.",
             "user: hi\n\nassistant: Hello! How can I help?", "assistant: " + "a long answer " * 40]  # > n_ctx
    source = embedder_for(LlamaCppEmbedding(n_ctx=64, n_seq=3))
    try:
        together = np.array(source.embed(texts))
        alone = np.array([source.embed([text])[0] for text in texts])
    finally:
        source.close()
    assert together.shape == (3, 576) and np.isfinite(together).all()
    cosine = (together * alone).sum(1) / np.linalg.norm(together, axis=1) / np.linalg.norm(alone, axis=1)
    assert (cosine > 0.9999).all(), cosine
    assert np.linalg.norm(together[0] - together[1]) > 0.1 * np.linalg.norm(together[0])  # texts differ
    cache = FeatureCache(tmp_path / "features.sqlite")
    first, again, planted = FeatureStats(), FeatureStats(), FeatureStats()
    vectors = features(texts[:2] + texts[:1], source, cache, first)  # a repeated text is embedded once
    reread = features(texts[:2], source, FeatureCache(tmp_path / "features.sqlite"), again)  # reopened file
    features(texts[:2], PlantedEmbedder(), cache, planted)  # another source's vectors are its own
    cache.close()
    assert (first.computed, again.computed, again.cached, planted.computed) == (2, 0, 2, 2)
    assert np.array_equal(reread[texts[0]], vectors[texts[0]])


def judge(request) -> str:
    """A pairwise judge with the critic's blind spot: right on kind-a pairs, reversed on kind-b pairs, in both
    orders (so never position-inconsistent)."""
    text = request.messages[-1]["content"]
    a = re.search(r"<<[ab][+-]>>", text.split("Answer A:")[1].split("Answer B:")[0]).group(0)
    a_wins = a in ("<<a+>>", "<<b->>")
    return json.dumps({"reasoning": "compared", "winner": "A" if a_wins else "B"})


def test_a_judge_pipeline_makes_its_arms_from_the_verdicts(data, tmp_path):
    pipeline = tmp_path / "judged.yaml"
    pipeline.write_text(f"""\
schema_version: 1
name: judged
models:
  j: {{backend: fake}}
stages:
  - {{kind: load, path: {data['train']}, format: trl}}
  - {{kind: judge, model: j}}
  - {{kind: export}}
""")
    run_pipeline(load_pipeline(pipeline), output=tmp_path / "run", quiet=True,
                 backend_overrides={"j": FakeBackend(responder=judge)})
    result = evaluate_run_dir(tmp_path / "run", overrides=eval_settings(data, sets=["seeds=2"]),
                              source=PlantedEmbedder())
    by_name = arms(result)
    assert "judge's verdict" in by_name["synthetic"]["origin"] and by_name["synthetic"]["rows"] == TRAIN_PAIRS
    assert "judge kept" in by_name["filtered"]["origin"]
    assert {name: arm["accuracy"] for name, arm in by_name.items()} == {
        "human": 1.0, "synthetic": 0.7, "filtered": 0.85, "final": 0.85}
