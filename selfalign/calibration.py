"""Judge calibration: the `calibrate:` option of the critique and judge stages, and the numbers it reports.

Before a scoring or judging stage sends its calls, its own prompt and model judge a held-out slice of
human-labelled pairs (calibrate.py runs that); this module says how well the verdicts match the people:

- agreement: the share of pairs on which the stage's verdict is the human's, i.e. the share it would keep
  as agreeing (critique: the mean critique score of chosen above rejected, the consistency stage's rule, so a
  tie is not agreement; judge: both orders name chosen, so a position-inconsistent pair is not agreement);
- agreement_ci95: a percentile bootstrap interval (1,000 resamples of the pairs) around it;
- kappa: Cohen's kappa between the human's and the stage's answer to "which position holds the better
  answer, A or B?". The stored human label is always `chosen`, so agreement on that label alone leaves
  nothing for kappa to correct; in positions, the human says A and B equally often. A pairwise judge is
  asked in both orders (each judgment counts); a pointwise critic has no order, so each pair counts once
  with chosen as A and once as B. 0 is what a judge with the same answer rates but no skill gets, 1 is
  perfect, below 0 is worse than chance;
- tie_rate (critique): pairs whose mean scores are equal; flip_rate (judge): pairs whose verdict changes when
  the two answers swap places;
- length_bias: over the pairs the stage decided, how often the answer it preferred is the longer one, beside
  how often the person's preferred answer is (metrics.length_bias; 0.5 is no preference for length).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Literal, Sequence

import polars as pl
from pydantic import Field, model_validator

from .metrics import length_bias
from .config_base import Strict

BOOTSTRAP_RESAMPLES = 1000
# What a calibration pair's `prefers` column may hold.
CHOSEN, REJECTED, TIE, INCONSISTENT, FAILED = "chosen", "rejected", "tie", "inconsistent", "failed"
# Columns of calibration/NN-kind.parquet, one row per calibration pair.
PAIR_SCHEMA = {"row_id": pl.Utf8, "prompt": pl.List(pl.Struct({"role": pl.Utf8, "content": pl.Utf8})),
               "chosen": pl.Utf8, "rejected": pl.Utf8, "prefers": pl.Utf8, "chosen_score": pl.Float64,
               "rejected_score": pl.Float64, "winner_order_1": pl.Utf8, "winner_order_2": pl.Utf8,
               "error": pl.Utf8}


class CalibrateConfig(Strict):
    """Judge a held-out slice of human-labelled pairs with the stage's own prompt and model first."""

    rows: int | None = Field(None, ge=1, le=1_000_000, description="pairs to calibrate on: a seeded random sample "
                             "of the stage's human-labelled input rows (their calls are the stage's own, cached "
                             "and reused), or of the `path:`/`hf:` dataset (default there: all of it)")
    path: str | None = Field(None, description="a labelled dataset to calibrate on instead of the input: a local "
                             ".jsonl/.jsonl.gz/.json/.parquet/.csv file, read as the load stage reads it")
    hf: str | None = Field(None, description="a labelled `datasets` id (or saved folder) to calibrate on instead "
                           "of the input")
    split: str = Field("train", description="the split of the `hf:` dataset")
    format: Literal["hh-rlhf", "trl"] | None = Field(None, description="the `path:`/`hf:` dataset's format, as "
                                                     "for the load stage")
    on_bad_row: Literal["error", "drop"] = Field("error", description="a `path:`/`hf:` row that cannot be read: "
                                                 "stop (error) or leave it out of the calibration (drop), counted")
    min_agreement: float | None = Field(None, ge=0, le=1, description="stop the run (exit 6) before the stage "
                                        "sends its other calls when agreement with the human labels is below this")

    @model_validator(mode="after")
    def _one_source(self) -> "CalibrateConfig":
        if self.path is not None and self.hf is not None:
            raise ValueError("give one of `path:` or `hf:` (or neither, to calibrate on `rows:` of the input)")
        named = self.path is not None or self.hf is not None
        if named and self.format is None:
            raise ValueError("`format:` is needed with `path:`/`hf:` (hh-rlhf or trl), as for the load stage")
        if not named:
            if self.rows is None:
                raise ValueError("say how many input rows to calibrate on (e.g. `rows: 50`), or name a labelled "
                                 "dataset with `path:` or `hf:` and `format:`")
            extra = sorted({"format", "on_bad_row"} & self.model_fields_set)
            if extra:
                raise ValueError(f"{', '.join(extra)} applies only to a `path:`/`hf:` dataset; the input rows are "
                                 "already read; remove it")
        if "split" in self.model_fields_set and self.hf is None:
            raise ValueError("`split:` applies only to an `hf:` dataset; remove it")
        return self

    def source(self) -> str:
        """Where the pairs come from, as the manifest, report and card say it (a local file by its name only)."""
        if self.path is not None:
            return f"file {Path(self.path).name}"
        if self.hf is not None:
            return f"hf {self.hf} ({self.split})"
        return "rows of the stage's input"


# -- the numbers ----------------------------------------------------------------------------------------------


def cohen_kappa(first: Sequence[str], second: Sequence[str]) -> float | None:
    """Cohen's kappa of two raters' labels for the same items; None when undefined (no items, or both raters
    give one and the same label to everything, so chance agreement is already 1).

    >>> cohen_kappa(["A", "A", "B", "B"], ["A", "A", "B", "A"])
    0.5
    """
    if len(first) != len(second):
        raise ValueError("both raters must label the same items")
    n = len(first)
    if n == 0:
        return None
    observed = sum(a == b for a, b in zip(first, second)) / n
    expected = sum((list(first).count(label) / n) * (list(second).count(label) / n)
                   for label in set(first) | set(second))
    if expected == 1:
        return None
    return (observed - expected) / (1 - expected)


def bootstrap_interval(hits: Sequence[bool], seed: int, resamples: int = BOOTSTRAP_RESAMPLES,
                       level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the share of True in `hits` (resampling the items with replacement)."""
    n = len(hits)
    if n == 0:
        return None
    rng = random.Random(seed)
    values = [int(hit) for hit in hits]
    shares = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    return shares[int(tail * (resamples - 1))], shares[int(round((1 - tail) * (resamples - 1)))]


def positions(pairs: pl.DataFrame, pairwise: bool) -> tuple[list[str], list[str]]:
    """(the human's labels, the stage's labels) in positions A/B (or tie) for kappa; see the module doc."""
    human, stage = [], []
    for prefers, first, second in pairs.select("prefers", "winner_order_1", "winner_order_2").iter_rows():
        if pairwise:  # order 1 shows chosen as A, order 2 as B
            human += ["A", "B"]
            stage += [first, second]
        else:
            as_a = {CHOSEN: "A", REJECTED: "B"}.get(prefers, TIE)  # chosen shown as A
            as_b = {CHOSEN: "B", REJECTED: "A"}.get(prefers, TIE)  # and as B
            human += ["A", "B"]
            stage += [as_a, as_b]
    return human, stage


def preference_length_bias(pairs: pl.DataFrame) -> dict[str, float | int | None]:
    """Over the pairs the stage decided: how often its preferred answer is the longer one, and how often the
    human's is (both through metrics.length_bias, so the report's length bias means the same)."""
    decided = pairs.filter(pl.col("prefers").is_in([CHOSEN, REJECTED]))
    as_human = decided.select("chosen", "rejected", source=pl.lit("human"))
    swap = pl.col("prefers") == REJECTED  # the stage's preferred answer in `chosen`
    as_stage = decided.select(chosen=pl.when(swap).then("rejected").otherwise("chosen"),
                              rejected=pl.when(swap).then("chosen").otherwise("rejected"), source=pl.lit("human"))
    return {"pairs": decided.height, "stage_prefers_longer": length_bias(as_stage).get("human"),
            "human_prefers_longer": length_bias(as_human).get("human")}


def summarize(pairs: pl.DataFrame, pairwise: bool, seed: int) -> dict[str, Any]:
    """The calibration numbers for a frame of calibration pairs (PAIR_SCHEMA)."""
    judged = pairs.filter(pl.col("prefers") != FAILED)
    n = judged.height
    hits = [prefers == CHOSEN for prefers in judged["prefers"]]
    interval = bootstrap_interval(hits, seed)
    kappa = cohen_kappa(*positions(judged, pairwise))

    def share(value: str) -> float | None:
        return round(sum(p == value for p in judged["prefers"]) / n, 4) if n else None

    return {
        "pairs": n,
        "failed": pairs.height - n,
        "agreement": round(sum(hits) / n, 4) if n else None,
        "agreement_ci95": [round(interval[0], 4), round(interval[1], 4)] if interval else None,
        "kappa": round(kappa, 4) if kappa is not None else None,
        "tie_rate": None if pairwise else share(TIE),
        "flip_rate": share(INCONSISTENT) if pairwise else None,
        "length_bias": preference_length_bias(judged),
    }


def passed(summary: dict[str, Any], min_agreement: float | None) -> bool:
    if min_agreement is None:
        return True
    return summary["agreement"] is not None and summary["agreement"] >= min_agreement


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def describe(summary: dict[str, Any], agreement: bool = True) -> str:
    """The numbers in one line (for the log; the error message puts agreement first itself)."""
    parts = []
    if agreement:
        parts.append(f"agreement {_number(summary['agreement'])}{_interval(summary)}")
    parts.append(f"kappa {_number(summary['kappa'])}")
    if summary["tie_rate"] is not None:
        parts.append(f"tie rate {_number(summary['tie_rate'])}")
    if summary["flip_rate"] is not None:
        parts.append(f"flip rate {_number(summary['flip_rate'])}")
    bias = summary["length_bias"]
    parts.append(f"prefers the longer answer {_number(bias['stage_prefers_longer'])} (humans "
                 f"{_number(bias['human_prefers_longer'])})")
    line = ", ".join(parts)
    if summary["failed"]:
        line += f"; {summary['failed']} pairs not judged (their calls failed)"
    return line


def _interval(summary: dict[str, Any]) -> str:
    if not summary["agreement_ci95"]:
        return ""
    low, high = summary["agreement_ci95"]
    return f" (95% CI {low:.2f}-{high:.2f})"


def failure_message(index: int, stage, summary: dict[str, Any], remaining: str, file: str) -> str:
    """Why the run stopped, with the numbers, what was not sent and what to do."""
    config = stage.calibrate
    agreement = summary["agreement"]
    what = (f"agreement {agreement:.2f}{_interval(summary)} is below min_agreement {config.min_agreement:g}"
            if agreement is not None else f"no pair was judged, so agreement is unknown (min_agreement "
                                          f"{config.min_agreement:g})")
    hints = []
    if summary["flip_rate"] is not None and summary["flip_rate"] >= 0.2:
        hints.append(f"the verdict flips with the order of the answers in {summary['flip_rate']:.0%} of pairs "
                     "(position bias)")
    if summary["tie_rate"] is not None and summary["tie_rate"] >= 0.2:
        hints.append(f"{summary['tie_rate']:.0%} of pairs are tied (more `samples:` or a wider `score_range:` "
                     "separate them)")
    return (f"stage {index} ({stage.kind}): calibration on {summary['pairs']} human-labelled pairs "
            f"({config.source()}): {what}; {describe(summary, agreement=False)}. The run stopped before the stage "
            f"sent {remaining}; the calibration's calls are cached, and each pair's verdict is in {file}."
            + (f" Notably: {'; '.join(hints)}." if hints else "")
            + f" Fix: use a stronger model for `model: {stage.model}`, improve the prompt "
              f"({getattr(stage, 'prompt', None)}), or lower `calibrate.min_agreement` if this agreement is good "
              "enough for your data; then run the same command again (the calibration replies come from the cache)")


# -- for the report and the card --------------------------------------------------------------------------------

READING = ("Before the stage ran, its own prompt and model judged human-labelled pairs. Agreement: the share "
           "of pairs where its verdict is the person's (the share it keeps as agreeing), with a bootstrap 95% "
           "interval, wide when the pairs are few. Kappa: agreement beyond chance on which position (A/B) holds "
           "the better answer: 0 is no skill, 1 perfect. Ties: pairs a critic scored equally. Flips: pairs whose "
           "verdict changed when the answers swapped places. Longer preferred: how often the answer the stage "
           "(and the person) preferred is the longer one; a gap means it rewards length.")
HEADERS = ["stage", "kind", "pairs from", "pairs", "agreement", "95% CI", "kappa", "tie rate", "flip rate",
           "stage prefers longer", "humans prefer longer", "min agreement", "result"]


def table_rows(manifest: dict[str, Any]) -> list[list[Any]]:
    """One row per calibrated stage of a run's manifest (stage metrics, plus the one that stopped the run)."""
    # Stage metrics are the stage's own keys; the manifest's `calibration` is there only when it stopped the run.
    entries = [(entry["stage"], entry["kind"], entry["metrics"].get("calibration")) for entry in manifest["rows"]]
    stopped = manifest.get("calibration")
    if stopped:
        entries.append((stopped["stage"], stopped["kind"], stopped))

    def fmt(value: Any) -> str:
        return "-" if value is None else f"{value:.2f}"

    rows = []
    for index, kind, summary in entries:
        if not summary:
            continue
        ci = summary.get("agreement_ci95")
        bias = summary.get("length_bias") or {}
        rows.append([index, kind, summary.get("source"), summary.get("pairs"), fmt(summary.get("agreement")),
                     f"{ci[0]:.2f}-{ci[1]:.2f}" if ci else "-", fmt(summary.get("kappa")),
                     fmt(summary.get("tie_rate")), fmt(summary.get("flip_rate")),
                     fmt(bias.get("stage_prefers_longer")), fmt(bias.get("human_prefers_longer")),
                     fmt(summary.get("min_agreement")), "passed" if summary.get("passed") else "stopped the run"])
    return rows
