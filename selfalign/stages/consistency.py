"""consistency: Critic-RM's filter, keeping only what agrees with the human label.

For each pair, in this order:
1. instance: the mean score of all chosen critiques must exceed that of all rejected critiques
   (the human's order), else the row is dropped (`scores_contradict_label`, or `scores_tied`);
2. critique: a chosen critique survives if its score is above the rejected mean, a rejected critique
   if its score is below the chosen mean (each critique must itself agree with the label);
3. margin: the means of the surviving critiques must differ by at least `min_margin`.
Example: chosen 8/7/2 vs rejected 5/5/5 keeps chosen 8 and 7 (2 disagrees) and all three rejected,
and the pair at margin 7.5 - 5 = 2.5.
"""

from __future__ import annotations

from typing import Any, Literal

import polars as pl
from pydantic import Field

from .base import StageConfig, StageContext, StageOutput
from .model_calls import CRITIQUE


class ConsistencyConfig(StageConfig):
    kind: Literal["consistency"]
    rule: Literal["mean-score-orders-pair"] = "mean-score-orders-pair"
    min_margin: float = Field(0.0, ge=0, description="minimum gap between surviving chosen and rejected means")
    filter_critiques: bool = Field(True, description="drop the individual critiques that disagree")

    def needs(self) -> set[str]:
        return {"chosen_critiques", "rejected_critiques"}

    def adds(self) -> set[str]:
        return {"chosen_score", "rejected_score", "margin", "chosen_critiques_kept", "rejected_critiques_kept"}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def judge_pair(chosen: list[dict[str, Any]], rejected: list[dict[str, Any]], config: ConsistencyConfig) \
        -> tuple[str | None, list[dict[str, Any]], list[dict[str, Any]]]:
    """(drop reason or None, surviving chosen critiques, surviving rejected critiques)."""
    if not chosen or not rejected:
        return "no_critiques", chosen, rejected
    chosen_mean = _mean([c["score"] for c in chosen])
    rejected_mean = _mean([c["score"] for c in rejected])
    if chosen_mean == rejected_mean:
        return "scores_tied", chosen, rejected
    if chosen_mean < rejected_mean:
        return "scores_contradict_label", chosen, rejected
    if config.filter_critiques:
        chosen = [c for c in chosen if c["score"] > rejected_mean]
        rejected = [c for c in rejected if c["score"] < chosen_mean]
    margin = _mean([c["score"] for c in chosen]) - _mean([c["score"] for c in rejected])
    if margin < config.min_margin:
        return "margin_below_min", chosen, rejected
    return None, chosen, rejected


def run(df: pl.DataFrame, config: ConsistencyConfig, ctx: StageContext) -> StageOutput:
    reasons, kept_chosen, kept_rejected = [], [], []
    critiques_before = critiques_after = 0
    for chosen, rejected in df.select("chosen_critiques", "rejected_critiques").iter_rows():
        reason, chosen_kept, rejected_kept = judge_pair(chosen, rejected, config)
        reasons.append(reason)
        kept_chosen.append(chosen_kept)
        kept_rejected.append(rejected_kept)
        critiques_before += len(chosen) + len(rejected)
        if reason is None:
            critiques_after += len(chosen_kept) + len(rejected_kept)
    scored = df.with_columns(
        chosen_critiques=pl.Series(kept_chosen, dtype=pl.List(CRITIQUE)),
        rejected_critiques=pl.Series(kept_rejected, dtype=pl.List(CRITIQUE)),
        drop_reason=pl.Series(reasons, dtype=pl.Utf8),
    ).with_columns(
        chosen_score=pl.col("chosen_critiques").list.eval(pl.element().struct.field("score")).list.mean(),
        rejected_score=pl.col("rejected_critiques").list.eval(pl.element().struct.field("score")).list.mean(),
        chosen_critiques_kept=pl.col("chosen_critiques").list.len().cast(pl.Int64),
        rejected_critiques_kept=pl.col("rejected_critiques").list.len().cast(pl.Int64),
    ).with_columns(margin=pl.col("chosen_score") - pl.col("rejected_score"))
    kept = scored.filter(pl.col("drop_reason").is_null()).drop("drop_reason")
    dropped = scored.filter(pl.col("drop_reason").is_not_null())
    agree = sum(1 for r in reasons if r not in ("scores_contradict_label", "scores_tied", "no_critiques"))
    metrics = {
        "agreement_with_human_before": round(agree / len(reasons), 4) if reasons else None,
        "agreement_with_human_after": 1.0 if kept.height else None,
        "critiques_before": critiques_before,
        "critiques_kept": critiques_after,
    }
    return StageOutput(kept, dropped, metrics)
