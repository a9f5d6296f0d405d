"""A whole pipeline on real HH-RLHF data with the fake backend: outputs, accounting, resume, render."""

import json

import datasets
import polars as pl
import pytest

from selfalign.cli import main
from selfalign.config import load_pipeline
from selfalign.runner import run_pipeline
from tests.support.fake_pipeline import fake_pipeline_yaml, load_hh_rlhf


@pytest.fixture
def hh_pipeline(write_pipeline, hh_data):
    return write_pipeline(fake_pipeline_yaml("hh-fake", [
        load_hh_rlhf(hh_data),
        {"kind": "critique", "model": "critic", "samples": 3},
        {"kind": "consistency", "min_margin": 1},
        {"kind": "filter", "where": "chosen_critiques_kept >= 2", "reason": "too_few_consistent_critiques"},
        {"kind": "export", "formats": ["trl", "critic-rm"], "test_size": 0.1},
    ]))


def test_full_run_accounts_for_every_row_and_reruns_from_cache(hh_pipeline, tmp_path):
    run_dir = tmp_path / "run"
    manifest = run_pipeline(load_pipeline(hh_pipeline), output=run_dir, quiet=True)
    funnel = manifest["rows"]
    assert funnel[0]["in"] == 1500
    for stage in funnel:  # nothing lost, nothing duplicated, at every stage
        assert stage["in"] == stage["out"] + stage["dropped"], stage
    for earlier, later in zip(funnel, funnel[1:]):
        assert later["in"] == earlier["out"]
    dropped_ids = set()
    for path in sorted((run_dir / "dropped").glob("*.parquet"))[1:]:
        frame = pl.read_parquet(path)
        assert frame["drop_reason"].null_count() == 0
        dropped_ids |= set(frame["row_id"].to_list())
    kept_ids = set(pl.read_parquet(run_dir / "stages" / "04-export.parquet")["row_id"].to_list())
    loaded_ids = set(pl.read_parquet(run_dir / "stages" / "00-load.parquet")["row_id"].to_list())
    assert kept_ids | dropped_ids == loaded_ids and not kept_ids & dropped_ids

    calls = manifest["model_calls"]
    assert calls["requested"] == calls["sent"] == funnel[1]["in"] * 2 * 3 and calls["cached"] == 0
    assert manifest["rows"][2]["metrics"]["agreement_with_human_before"] is not None
    assert manifest["rows_out"] == len(kept_ids) > 0
    summary = manifest["dataset"]
    assert summary["sources"] == {"human": len(kept_ids)}
    assert 0 <= summary["length_bias_chosen_longer"]["human"] <= 1
    assert sum(summary["score_histograms"]["chosen_score"].values()) == len(kept_ids)
    assert summary["agreement_with_human"] == 1.0  # after the consistency filter, by construction
    assert 0.3 < funnel[1]["agreement_with_human"] < 0.7  # random fake scores, before filtering

    dataset = datasets.load_from_disk(str(run_dir / "dataset"))
    assert set(dataset) == {"train", "test"}
    assert dataset["train"].num_rows + dataset["test"].num_rows == len(kept_ids)
    row = dataset["train"][0]
    assert row["chosen"][0]["role"] == "assistant" and row["prompt"][-1]["role"] == "user"
    assert len(row["chosen_critiques"]) >= 2 and row["chosen_score"] - row["rejected_score"] >= 1
    train_prompts = {json.dumps(p) for p in dataset["train"]["prompt"]}
    assert not train_prompts & {json.dumps(p) for p in dataset["test"]["prompt"]}
    critic_rm = pl.read_parquet(run_dir / "export" / "critic-rm" / "train.parquet")
    assert {"chosen_critiques", "rejected_critiques", "chosen_score"} <= set(critic_rm.columns)

    first_result = pl.read_parquet(run_dir / "stages" / "04-export.parquet")
    again = run_pipeline(load_pipeline(hh_pipeline), output=run_dir, quiet=True)
    assert again["model_calls"]["sent"] == 0
    assert again["model_calls"]["cached"] == calls["requested"]
    assert pl.read_parquet(run_dir / "stages" / "04-export.parquet").equals(first_result)
    assert again["rows_out"] == manifest["rows_out"]


def test_limit_reads_only_the_first_rows(hh_pipeline, tmp_path):
    manifest = run_pipeline(load_pipeline(hh_pipeline), output=tmp_path / "run", limit=20, quiet=True)
    assert manifest["rows"][0]["in"] == 20


def test_render_prints_the_exact_messages_for_a_row(hh_pipeline, capsys):
    assert main(["render", str(hh_pipeline), "--stage", "1", "--row", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("=== request") == 2  # chosen and rejected; the 3 samples share messages
    assert "--- system ---" in out and "--- user ---" in out and "samples 0, 1, 2" in out
    assert '"score": {"enum": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]' in out


def test_render_refuses_a_stage_that_sends_no_calls(hh_pipeline, capsys):
    assert main(["render", str(hh_pipeline), "--stage", "2"]) == 2
    assert "sends no model calls; model stages: 1 (critique)" in capsys.readouterr().err


def test_second_run_on_a_locked_directory_names_the_first_runs_pid(hh_pipeline, tmp_path):
    from selfalign.errors import RunError
    from selfalign.rundir import RunLock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    import os
    with RunLock(run_dir):
        with pytest.raises(RunError, match=f"in use by another selfalign run \\(PID {os.getpid()}\\)"):
            run_pipeline(load_pipeline(hh_pipeline), output=run_dir, limit=5, quiet=True)


@pytest.mark.parametrize("limit, where, expected", [
    (3, "chosen_critiques_kept >= 0", None),  # 3 pairs: with test_size 0.1 the test split is usually empty
    (20, "chosen_critiques_kept < 0", {"train": 0}),  # every row filtered out: an empty dataset, still loadable
])
def test_small_or_empty_results_load_with_load_from_disk(hh_pipeline, tmp_path, limit, where, expected):
    loaded = load_pipeline(hh_pipeline, [f"stages.3.where={where}"])
    manifest = run_pipeline(loaded, output=tmp_path / "run", limit=limit, quiet=True)
    dataset = datasets.load_from_disk(str(tmp_path / "run" / "dataset"))
    sizes = {split: dataset[split].num_rows for split in dataset}
    assert sum(sizes.values()) == manifest["rows_out"]
    if expected is not None:
        assert sizes == expected
    else:
        assert 0 in sizes.values(), f"pick a limit whose split has an empty side: {sizes}"
    assert "chosen" in dataset["train"].column_names
