"""Numbers about a frame of pairs, for the manifest (and from there the report and the dataset card)."""

from __future__ import annotations

from typing import Any

import polars as pl


def _mean_score(column: str) -> pl.Expr:
    return pl.col(column).list.eval(pl.element().struct.field("score")).list.mean()


def agreement_with_human(df: pl.DataFrame) -> float | None:
    """Share of human pairs whose critique scores order chosen above rejected, as the person did."""
    if not {"chosen_critiques", "rejected_critiques", "source"} <= set(df.columns):
        return None
    human = df.filter(pl.col("source") == "human")
    if human.height == 0:
        return None
    agree = human.select((_mean_score("chosen_critiques") > _mean_score("rejected_critiques")).fill_null(False)
                         .mean()).item()
    return round(float(agree), 4)


def length_bias(df: pl.DataFrame) -> dict[str, float]:
    """Per source: share of pairs whose chosen answer is the longer one (0.5 means no length preference)."""
    if not {"chosen", "rejected", "source"} <= set(df.columns) or df.height == 0:
        return {}
    shares = (df.group_by("source").agg((pl.col("chosen").str.len_chars() > pl.col("rejected").str.len_chars())
                                        .mean().alias("share")).sort("source"))
    return {source: round(share, 4) for source, share in shares.rows()}


def score_histograms(df: pl.DataFrame) -> dict[str, dict[str, int]]:
    """Counts of chosen and rejected scores, rounded to the nearest half point."""
    out = {}
    for column in ("chosen_score", "rejected_score"):
        if column in df.columns and df.height:
            rounded = df.select((pl.col(column) * 2).round() / 2).drop_nulls()[column]
            counts = rounded.value_counts().sort(column)
            out[column] = {f"{value:g}": count for value, count in counts.rows()}
    return out


def dataset_summary(df: pl.DataFrame) -> dict[str, Any]:
    sources = dict(df.group_by("source").len().sort("source").rows()) if "source" in df.columns else {}
    return {"rows": df.height, "sources": sources, "length_bias_chosen_longer": length_bias(df),
            "score_histograms": score_histograms(df), "agreement_with_human": agreement_with_human(df)}
