"""What the five model stages (generate, critique, judge, refine, feedback) share.

- `SamplingConfig`: every model stage's `sampling:` block.
- `CRITIQUE`: the struct of one critique, in the `*_critiques` columns that critique, refine, consistency, pair and
  feedback make or read; `critique_value` builds one.
- `ask`: a stage's requests to its model, through the cached client (validated replies, bounded re-asks).
- The failure record: a row any of whose calls failed goes to `dropped/` with `drop_reason: model_call_failed`
  and its first failed call's `CallResult` fields (status, error, attempts, raw output). A stage keeps one
  `RowFailure | None` per row (`first_failure` finds it) and hands the list to `split_failed_rows`.

A model stage is then: `build_requests(df, config, ctx)` -> `ask` -> walk the results row by row (values into
columns, the first failure into the row's `RowFailure`) -> `split_failed_rows`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import polars as pl
from pydantic import BaseModel, Field

from ..backends.base import Request, Sampling
from ..calls import CallResult, json_parser
from ..config_base import Strict
from .base import ModelStageConfig, StageContext, StageOutput

CRITIQUE = pl.Struct({"text": pl.Utf8, "score": pl.Float64, "sample_index": pl.Int64, "model": pl.Utf8,
                      "criterion_scores": pl.List(pl.Struct({"name": pl.Utf8, "score": pl.Float64}))})


class SamplingConfig(Strict):
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(384, ge=1)
    seed: int | None = Field(0, description="sample i uses seed + i; null for unseeded")

    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.max_tokens, self.seed)


def critique_value(text: str, score: float, sample_index: int, model: str,
                   criterion_scores: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One critique, as a value of the CRITIQUE struct."""
    return {"text": text, "score": score, "sample_index": sample_index, "model": model,
            "criterion_scores": criterion_scores or []}


def ask(ctx: StageContext, config: ModelStageConfig, requests: list[Request],
        reply_model: type[BaseModel] | None, label: str | None = None) -> list[CallResult]:
    """Send `requests` to the stage's model (`config.model`); one result per request, in order.

    With `reply_model` each reply must be a JSON object of that model, and an invalid one is re-asked with the
    error quoted (`config.max_attempts` attempts in all); without, the reply's text is the value, in one attempt.
    The progress bar reads `label`, by default "<kind> (<model>)"."""
    parse = json_parser(reply_model) if reply_model is not None else None
    max_attempts = config.max_attempts if reply_model is not None else 1
    return ctx.client(config.model).run(requests, parse, label=label or f"{config.kind} ({config.model})",
                                        max_attempts=max_attempts)


@dataclass(frozen=True)
class RowFailure:
    """Why a row goes to dropped/: the first of its calls that failed, and which call that was (e.g. "rejected
    sample 2"), named before the error when the row made more than one kind of call."""

    call: CallResult
    where: str | None = None

    @property
    def error(self) -> str:
        return f"{self.where}: {self.call.error}" if self.where else str(self.call.error)


def first_failure(results: Iterable[CallResult], where: str | None = None) -> RowFailure | None:
    """The first failed call among a row's `results`, or None when every one answered."""
    failed = next((result for result in results if not result.ok), None)
    return None if failed is None else RowFailure(failed, where)


def split_failed_rows(out: pl.DataFrame, failures: list[RowFailure | None], metrics: dict[str, Any]) -> StageOutput:
    """Rows with a failure (one entry of `failures` per row of `out`) go to dropped/ with its record; the others
    are kept."""
    failed = pl.Series([f is not None for f in failures], dtype=pl.Boolean)
    records = [f for f in failures if f is not None]
    dropped = out.filter(failed).with_columns(
        drop_reason=pl.lit("model_call_failed"),
        status=pl.Series([f.call.status for f in records], dtype=pl.Utf8),
        error=pl.Series([f.error for f in records], dtype=pl.Utf8),
        attempts=pl.Series([f.call.attempts for f in records], dtype=pl.Int64),
        raw_output=pl.Series([f.call.text for f in records], dtype=pl.Utf8))
    return StageOutput(out.filter(~failed), dropped, metrics)
