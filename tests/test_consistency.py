"""Critic-RM's consistency rules, pinned with hand-made critiques."""

import polars as pl

from selfalign.stages.consistency import ConsistencyConfig, judge_pair, run
from selfalign.stages.model_calls import CRITIQUE


def critiques(*scores):
    return [{"text": f"c{i}", "score": float(s), "sample_index": i, "model": "m", "criterion_scores": []}
            for i, s in enumerate(scores)]


def test_paper_example_keeps_two_chosen_critiques_and_the_pair_at_margin_1():
    reason, chosen, rejected = judge_pair(critiques(8, 7, 2), critiques(5, 5, 5),
                                          ConsistencyConfig(kind="consistency", min_margin=1))
    assert reason is None
    assert [c["score"] for c in chosen] == [8, 7]
    assert [c["score"] for c in rejected] == [5, 5, 5]


def test_contradicting_tied_and_thin_pairs_are_dropped_with_reasons():
    config = ConsistencyConfig(kind="consistency", min_margin=3)
    assert judge_pair(critiques(3, 4), critiques(6, 7), config)[0] == "scores_contradict_label"
    assert judge_pair(critiques(5, 5), critiques(6, 4), config)[0] == "scores_tied"
    assert judge_pair(critiques(8, 7, 2), critiques(5, 5, 5), config)[0] == "margin_below_min"  # 2.5 < 3
    assert judge_pair(critiques(6, 6), critiques(5, 4), config)[0] == "margin_below_min"


def test_without_critique_filter_all_critiques_stay():
    config = ConsistencyConfig(kind="consistency", filter_critiques=False)
    reason, chosen, _ = judge_pair(critiques(8, 7, 2), critiques(5, 5, 5), config)
    assert reason is None and len(chosen) == 3


def test_stage_scores_counts_and_agreement_metrics():
    df = pl.DataFrame({
        "row_id": ["a", "b", "c"],
        "chosen_critiques": [critiques(8, 7, 2), critiques(2, 3), critiques(9)],
        "rejected_critiques": [critiques(5, 5, 5), critiques(8, 9), critiques(1)],
    }, schema={"row_id": pl.Utf8, "chosen_critiques": pl.List(CRITIQUE), "rejected_critiques": pl.List(CRITIQUE)})
    output = run(df, ConsistencyConfig(kind="consistency"), None)
    kept = output.kept.sort("row_id").to_dicts()
    assert [r["row_id"] for r in kept] == ["a", "c"]
    assert kept[0]["chosen_score"] == 7.5 and kept[0]["rejected_score"] == 5.0 and kept[0]["margin"] == 2.5
    assert kept[0]["chosen_critiques_kept"] == 2 and kept[0]["rejected_critiques_kept"] == 3
    assert output.dropped["drop_reason"].to_list() == ["scores_contradict_label"]
    assert output.metrics["agreement_with_human_before"] == round(2 / 3, 4)
    assert output.metrics["critiques_before"] == 12 and output.metrics["critiques_kept"] == 7
