"""Refined critiques are re-checked against the label they train (issue 13, item 6).

A scripted critic: every sampled critique agrees with the human label (chosen 8, rejected 3), so consistency
passes every pair; then its summaries flip a third of the pairs (chosen 2, rejected 9), tie another third (5
and 5) and keep the rest (chosen 9, rejected 2). The critic-rm export must never train on a flipped pair.
"""

from __future__ import annotations

import json

import polars as pl
import pytest

from selfalign.backends.fake import FakeBackend
from selfalign.config import load_pipeline
from selfalign.runner import run_pipeline
from tests.support.fake_pipeline import fake_pipeline_yaml

ROWS = 30
SUMMARY = {0: (2, 9), 1: (5, 5), 2: (9, 2)}  # row number % 3 -> (chosen, rejected) summary scores


def scripted(request) -> str:
    text = request.messages[-1]["content"]
    number = int(text.split("Question ")[1].split(":")[0])
    chosen_side = "the right answer" in text
    if "Reviews of this reply" in text:  # the refine/summarize prompt
        score = SUMMARY[number % 3][0 if chosen_side else 1]
        return json.dumps({"critique": f"summary {number}", "score": score})
    return json.dumps({"critique": f"critique {number}", "score": 8 if chosen_side else 3})


def run(tmp_path, refine: dict | None = None) -> tuple[dict, pl.DataFrame, pl.DataFrame]:
    """ROWS pairs critiqued, checked, summarized (with the refine stage's further `refine` options), exported."""
    (tmp_path / "pairs.jsonl").write_text("".join(
        json.dumps({"prompt": f"Question {i}: what is {i} + {i}?", "chosen": f"{2 * i}, the right answer.",
                    "rejected": f"{2 * i + 1}, a wrong one."}) + "\n" for i in range(ROWS)))
    path = tmp_path / "pipeline.yaml"
    path.write_text(fake_pipeline_yaml("recheck", [
        {"kind": "load", "path": "pairs.jsonl", "format": "trl"},
        {"kind": "critique", "model": "critic", "samples": 2},
        {"kind": "consistency", "min_margin": 1},
        {"kind": "refine", "model": "critic", "method": "summarize", **(refine or {})},
        {"kind": "export", "formats": ["trl", "critic-rm"]},
    ]))
    backend = FakeBackend(responder=scripted)
    manifest = run_pipeline(load_pipeline(path), output=tmp_path / "run", quiet=True,
                            backend_overrides={"critic": backend})
    kept = pl.read_parquet(tmp_path / "run" / "stages" / "03-refine.parquet")
    dropped = pl.read_parquet(tmp_path / "run" / "dropped" / "03-refine.parquet")
    return manifest, kept, dropped


def test_flipped_and_tied_summaries_are_dropped_and_counted(tmp_path):
    manifest, kept, dropped = run(tmp_path)
    consistency, refine = manifest["rows"][2], manifest["rows"][3]
    assert consistency["out"] == ROWS  # every sampled critique agreed with the label
    assert refine["metrics"]["refined_flips"] == {"scores_contradict_label": 10, "scores_tied": 10}
    assert refine["drop_reasons"] == {"refined_scores_contradict_label": 10, "refined_scores_tied": 10}
    assert refine["metrics"]["agreement_with_human_before"] == pytest.approx(1 / 3, abs=1e-3)
    assert refine["agreement_with_human"] == 1.0
    assert kept.height == 10
    # The pair's scores and margin are those of the critiques it now holds, not consistency's.
    assert kept["chosen_score"].to_list() == [9.0] * 10 and kept["rejected_score"].to_list() == [2.0] * 10
    assert kept["margin"].to_list() == [7.0] * 10
    exported = pl.concat([pl.read_parquet(f) for f in (tmp_path / "run" / "export" / "critic-rm").glob("*.parquet")])
    assert exported.height == 10  # what critique + reward training sees: only pairs whose critiques agree
    flipped = dropped.filter(pl.col("drop_reason") == "refined_scores_contradict_label")
    assert flipped["chosen_critiques"].to_list()[0][0]["score"] == 2.0  # what the refiner wrote, for inspection


def test_keep_original_keeps_the_critiques_consistency_passed(tmp_path):
    manifest, kept, dropped = run(tmp_path, {"on_contradiction": "keep_original"})
    refine = manifest["rows"][3]
    assert refine["metrics"]["refined_flips"] == {"scores_contradict_label": 10, "scores_tied": 10}
    assert kept.height == ROWS and dropped.height == 0
    assert refine["agreement_with_human"] == 1.0
    by_score = kept.group_by("chosen_score").len().sort("chosen_score").rows()
    # 20 pairs fell back to their two sampled critiques (8 vs 3), 10 kept their summaries (9 vs 2).
    assert by_score == [(8.0, 20), (9.0, 10)]
    assert (kept["margin"] > 0).all()
