"""Numbers about a frame of pairs, for the manifest (and from there the report and the dataset card).

Agreement with the human labels is defined once here (`critique_verdict`): the runner records it per stage
and for the final data, the report's confusion table and per-category plot count the same verdicts. The
metric names that several modules write and read are constants below.
"""

from __future__ import annotations

from typing import Any

import polars as pl

# Stage metrics (`manifest["rows"][i]["metrics"]`) of the filters that compare critiques with human labels
# (consistency, refine): the share of pairs whose critique scores order them as the label does, before and after
# the filter. Read by the card and the report.
AGREEMENT_BEFORE = "agreement_with_human_before"
AGREEMENT_AFTER = "agreement_with_human_after"
# Critiques in and kept by the consistency filter (its stage metrics), shown by the card.
CRITIQUES_BEFORE = "critiques_before"
CRITIQUES_KEPT = "critiques_kept"

CRITIQUE_COLUMNS = {"chosen_critiques", "rejected_critiques", "source"}
# How the mean critique scores order a pair against its label (the label's preferred answer is `chosen`).
VERDICTS = ("agrees", "tied", "disagrees", "no_scores")


def _mean_score(column: str) -> pl.Expr:
    return pl.col(column).list.eval(pl.element().struct.field("score")).list.mean()


def critique_verdict() -> pl.Expr:
    """Per row, one of VERDICTS: the mean chosen critique score above the mean rejected one (agrees), equal,
    below, or either side without a score."""
    chosen, rejected = _mean_score("chosen_critiques"), _mean_score("rejected_critiques")
    return (pl.when(chosen.is_null() | rejected.is_null()).then(pl.lit("no_scores"))
            .when(chosen > rejected).then(pl.lit("agrees"))
            .when(chosen < rejected).then(pl.lit("disagrees"))
            .otherwise(pl.lit("tied")))


def human_verdicts(df: pl.DataFrame) -> dict[str, int] | None:
    """Human rows per critique verdict (every verdict present, 0 if none); None when the frame has no
    critiques or no source column."""
    if not CRITIQUE_COLUMNS <= set(df.columns):
        return None
    human = df.filter(pl.col("source") == "human")
    counts = dict(human.select(v=critique_verdict()).group_by("v").len().rows()) if human.height else {}
    return {verdict: counts.get(verdict, 0) for verdict in VERDICTS}


def agreement_share(verdicts: dict[str, int] | None) -> float | None:
    """Share of the rows counted in `verdicts` that agree, to 4 decimals; None without rows."""
    total = sum(verdicts.values()) if verdicts else 0
    return round(verdicts["agrees"] / total, 4) if total else None


def agreement_with_human(df: pl.DataFrame) -> float | None:
    """Share of human pairs whose critique scores order chosen above rejected, as the person did (a pair
    without scores on both sides does not agree); None without human pairs or critiques."""
    return agreement_share(human_verdicts(df))


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
