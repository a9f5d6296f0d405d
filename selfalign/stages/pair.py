"""pair: build chosen/rejected from scored responses (self-rewarding, rubric, feedback pipelines).

Each response's score is the mean of its critiques' scores. The best and worst make the pair when they
differ by at least `min_margin`; all-tied rows are dropped. With `length_control`, the chosen answer is
the shortest of those within `length_tolerance` of the best score (counters the judge's length bias).
"""

from __future__ import annotations

from typing import Literal

import polars as pl
from pydantic import Field

from .base import StageConfig, StageContext, StageOutput
from .model_calls import CRITIQUE


class PairConfig(StageConfig):
    kind: Literal["pair"]
    min_margin: float = Field(0.5, ge=0, description="best minus worst score needed to make a pair")
    length_control: bool = False
    length_tolerance: float = Field(0.25, ge=0, description="how far below the best a shorter answer may score")

    def needs(self) -> set[str]:
        return {"prompt", "responses", "responses_critiques"}

    def adds(self) -> set[str]:
        return {"chosen", "rejected", "chosen_critiques", "rejected_critiques", "chosen_score", "rejected_score",
                "margin", "source"}


def choose(texts: list[str], scores: list[float], config: PairConfig) -> tuple[str | None, int, int]:
    """(drop reason or None, chosen index, rejected index)."""
    if len(texts) < 2:
        return "too_few_responses", -1, -1
    best, worst = max(scores), min(scores)
    if best == worst:
        return "all_tied", -1, -1
    chosen = scores.index(best)
    if config.length_control:
        near_best = [i for i, s in enumerate(scores) if s >= best - config.length_tolerance]
        chosen = min(near_best, key=lambda i: (len(texts[i]), -scores[i]))
    rejected = scores.index(worst)
    if scores[chosen] - scores[rejected] < config.min_margin:
        return "margin_below_min", chosen, rejected
    return None, chosen, rejected


def run(df: pl.DataFrame, config: PairConfig, ctx: StageContext) -> StageOutput:
    columns = {name: [] for name in ("chosen", "rejected", "chosen_critiques", "rejected_critiques",
                                     "chosen_score", "rejected_score", "drop_reason")}
    for texts, critiques in df.select("responses", "responses_critiques").iter_rows():
        scores = [sum(c["score"] for c in cs) / len(cs) if cs else float("-inf") for cs in critiques]
        reason, c, r = choose(texts, scores, config)
        ok = c >= 0
        columns["chosen"].append(texts[c] if ok else None)
        columns["rejected"].append(texts[r] if ok else None)
        columns["chosen_critiques"].append(critiques[c] if ok else [])
        columns["rejected_critiques"].append(critiques[r] if ok else [])
        columns["chosen_score"].append(scores[c] if ok else None)
        columns["rejected_score"].append(scores[r] if ok else None)
        columns["drop_reason"].append(reason)
    types = {"chosen_critiques": pl.List(CRITIQUE), "rejected_critiques": pl.List(CRITIQUE),
             "chosen_score": pl.Float64, "rejected_score": pl.Float64}
    paired = df.with_columns(pl.Series(name, values, dtype=types.get(name, pl.Utf8))
                             for name, values in columns.items()).with_columns(
        margin=pl.col("chosen_score") - pl.col("rejected_score"), source=pl.lit("synthetic"))
    kept = paired.filter(pl.col("drop_reason").is_null()).drop("drop_reason")
    return StageOutput(kept, paired.filter(pl.col("drop_reason").is_not_null()))
