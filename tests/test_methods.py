"""Every ready pipeline, end to end with the fake backend on all 1,500 HH-RLHF rows; stage rules by hand."""

import gzip
import json

import datasets
import polars as pl
import pytest

from selfalign.backends.fake import FakeBackend
from selfalign.check import check_pipeline
from selfalign.config import load_pipeline
from selfalign.input_formats import from_hh_rlhf
from selfalign.runner import run_pipeline
from selfalign.stages.mix import MixConfig, MixInput, run as mix
from selfalign.stages.pair import PairConfig, choose
from tests.support.fake_pipeline import fake_pipeline_yaml, load_hh_rlhf

PIPELINES = ["critic_rm", "self_rewarding", "rubric_story", "ultrafeedback"]


def fake_everything(name: str) -> list[str]:
    loaded = load_pipeline(f"pipelines/{name}.yaml")
    return [f"models.{model}.backend=fake" for model in loaded.pipeline.models]


@pytest.mark.parametrize("name", PIPELINES)
def test_ready_pipeline_on_all_hh_rows_with_fake_backend(name, hh_data, tmp_path):
    overrides = fake_everything(name) + [f"stages.0.path={hh_data}", "stages.0.format=hh-rlhf",
                                         "stages.0.on_bad_row=drop"]
    loaded = load_pipeline(f"pipelines/{name}.yaml", overrides)
    assert check_pipeline(loaded) == []
    manifest = run_pipeline(loaded, output=tmp_path / "run", quiet=True)
    funnel = manifest["rows"]
    assert funnel[0]["in"] == 1500
    for stage in funnel:
        assert stage["in"] == stage["out"] + stage["dropped"], stage
    assert manifest["rows_out"] > 100
    assert manifest["model_calls"]["failed"] == 0
    dataset = datasets.load_from_disk(str(tmp_path / "run" / "dataset"))
    row = dataset["train"][0]
    assert row["chosen"][0]["role"] == "assistant" and row["chosen"][0]["content"] != row["rejected"][0]["content"]
    if name != "critic_rm":
        assert set(dataset["train"]["source"]) == {"synthetic"}
        assert "margin" not in dataset["train"].column_names  # TRL would add it to the loss (export margin: none)
        assert all(c > r for c, r in zip(dataset["train"]["chosen_score"], dataset["train"]["rejected_score"]))


def test_critic_rm_reports_agreement_and_refines_to_one_critique(hh_data, tmp_path):
    overrides = fake_everything("critic_rm") + [f"stages.0.path={hh_data}", "stages.0.on_bad_row=drop"]
    manifest = run_pipeline(load_pipeline("pipelines/critic_rm.yaml", overrides), output=tmp_path / "run",
                            quiet=True)
    consistency = manifest["rows"][2]["metrics"]
    # Fake scores are random: about half the pairs agree with the human label before filtering.
    assert 0.3 < consistency["agreement_with_human_before"] < 0.7
    assert consistency["agreement_with_human_after"] == 1.0
    final = pl.read_parquet(tmp_path / "run" / "stages" / "04-export.parquet")
    assert final["chosen_critiques"].list.len().unique().to_list() == [1]
    assert (final["margin"] >= 1).all()


def test_feedback_to_reward_on_a_log_built_from_hh(hh_data, tmp_path):
    log = tmp_path / "log.jsonl"
    with gzip.open(hh_data, "rt") as source, open(log, "w") as out:
        for line in list(source)[:300]:
            try:
                row = from_hh_rlhf(json.loads(line))
            except Exception:
                continue
            out.write(json.dumps({"prompt": row["prompt"], "response": row["chosen"], "feedback": "thanks!",
                                  "thumbs": "up"}) + "\n")
            out.write(json.dumps({"prompt": row["prompt"], "response": row["rejected"], "feedback": "that's wrong",
                                  "thumbs": "down"}) + "\n")
    overrides = fake_everything("feedback_to_reward") + [f"stages.0.path={log}"]
    manifest = run_pipeline(load_pipeline("pipelines/feedback_to_reward.yaml", overrides), output=tmp_path / "run",
                            quiet=True)
    assert manifest["rows"][1]["metrics"]["prompts"] == manifest["rows"][2]["in"]
    assert manifest["rows_out"] > 0
    final = pl.read_parquet(tmp_path / "run" / "stages" / "03-export.parquet")
    assert (final["margin"] >= 1).all()


def test_feedback_rewards_follow_the_reaction(tmp_path):
    """A scripted reader: thumbs up -> 5, down -> 1; pairs come out best vs worst."""
    def reader(request):
        text = request.messages[-1]["content"]
        return json.dumps({"rationale": "r", "reward": 5 if "thumbs up" in text else 1})
    overrides = ["models.reader.backend=fake"]
    loaded = load_pipeline("pipelines/feedback_to_reward.yaml", overrides)
    run_pipeline(loaded, output=tmp_path / "run", quiet=True, backend_overrides={"reader": FakeBackend(
        responder=reader)})
    final = pl.read_parquet(tmp_path / "run" / "stages" / "03-export.parquet")
    pairs = {r["prompt"][0]["content"]: (r["chosen"], r["rejected"]) for r in final.to_dicts()}
    assert pairs["What is the boiling point of water at sea level?"] == ("100 degrees Celsius.",
                                                                        "50 degrees Celsius.")


def test_pair_rules():
    config = PairConfig(kind="pair", min_margin=1)
    assert choose(["a", "b"], [3, 3], config)[0] == "all_tied"
    assert choose(["a"], [3], config)[0] == "too_few_responses"
    assert choose(["a", "b"], [3, 2.5], config)[0] == "margin_below_min"
    assert choose(["a", "bb", "c"], [2, 4, 1], config) == (None, 1, 2)
    short = PairConfig(kind="pair", min_margin=1, length_control=True, length_tolerance=0.5)
    assert choose(["a very long answer", "short", "bad"], [4.0, 3.6, 1.0], short) == (None, 1, 2)


def test_judge_keeps_only_position_consistent_verdicts(hh_data, tmp_path):
    pipeline = tmp_path / "judge.yaml"
    pipeline.write_text(fake_pipeline_yaml("judge", [load_hh_rlhf(hh_data), {"kind": "judge", "model": "j"},
                                                     {"kind": "export"}], models=("j",)))
    # A judge that always says "A": it never agrees with itself across orders.
    always_a = FakeBackend(responder=lambda r: json.dumps({"reasoning": "first is best", "winner": "A"}))
    manifest = run_pipeline(load_pipeline(pipeline), output=tmp_path / "a", limit=40, quiet=True,
                            backend_overrides={"j": always_a})
    assert manifest["rows"][1]["metrics"]["position_consistency"] == 0.0
    assert manifest["rows"][1]["drop_reasons"] == {"position_inconsistent": 40}
    # A judge that finds the human's chosen answer wherever it is shown: consistent, and agrees with the label.
    chosen = set(pl.read_parquet(tmp_path / "a" / "stages" / "00-load.parquet")["chosen"].to_list())

    def fair(request):
        text = request.messages[-1]["content"]
        answer_a = text.split("Answer A:\n", 1)[1].split("\n\nAnswer B:", 1)[0]
        return json.dumps({"reasoning": "r", "winner": "A" if answer_a.strip() in chosen else "B"})
    manifest = run_pipeline(load_pipeline(pipeline), output=tmp_path / "fair", limit=40, quiet=True,
                            backend_overrides={"j": FakeBackend(responder=fair)})
    assert manifest["rows"][1]["metrics"] == {"position_consistency": 1.0, "agreement_with_label": 1.0}
    assert manifest["rows"][1]["out"] == 40


def test_mix_by_ratio_and_count_dedupes_across_sources(tmp_path):
    prompt = [{"role": "user", "content": "q"}]
    human = pl.DataFrame({"row_id": [f"h{i}" for i in range(10)], "prompt": [prompt] * 10,
                          "chosen": [f"good {i}" for i in range(10)], "rejected": ["bad"] * 10,
                          "source": ["human"] * 10})
    synthetic = tmp_path / "synthetic.jsonl"
    lines = [{"prompt": "q", "chosen": f"good {i}", "rejected": "bad"} for i in range(5, 25)]
    synthetic.write_text("".join(json.dumps(r) + "\n" for r in lines))

    class Ctx:
        limit = None

        def resolve(self, value):
            from pathlib import Path
            return Path(value)

    config = MixConfig(kind="mix", add=[MixInput(path=str(synthetic))], counts={"human": 4, "synthetic": 6},
                       seed=1)
    output = mix(human, config, Ctx())
    assert output.metrics["sources"] == {"human": 4, "synthetic": 6}
    reasons = output.dropped["drop_reason"].value_counts().sort("drop_reason").rows()
    # good 5..9 exist in both: the human copies win, 5 synthetic duplicates dropped.
    assert reasons == [("duplicate_across_sources", 5), ("not_sampled_human", 6), ("not_sampled_synthetic", 9)]
    again = mix(human, config, Ctx())
    assert again.kept["row_id"].to_list() == output.kept["row_id"].to_list()
    halves = mix(human, MixConfig(kind="mix", add=[MixInput(path=str(synthetic))], ratios={"human": 0.5}), Ctx())
    assert halves.metrics["sources"] == {"human": 5, "synthetic": 15}
