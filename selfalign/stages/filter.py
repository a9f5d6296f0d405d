"""filter: keep the rows where a polars SQL expression holds; every other row is written with a reason."""

from __future__ import annotations

from typing import Literal

import polars as pl
from pydantic import Field, field_validator

from .base import StageConfig, StageContext, StageOutput


class FilterConfig(StageConfig):
    kind: Literal["filter"]
    where: str = Field(description="polars SQL expression, e.g. \"chosen_score - rejected_score >= 2\"")
    reason: str | None = Field(None, description="drop_reason for rows that fail; default: 'filter: <where>'")

    @field_validator("where")
    @classmethod
    def _parses(cls, value: str) -> str:
        try:
            pl.sql_expr(value)
        except Exception as exc:
            raise ValueError(f"not a valid polars SQL expression: {exc}") from None
        return value

    def expression(self) -> pl.Expr:
        return pl.sql_expr(self.where)

    def needs(self) -> set[str]:
        return set(self.expression().meta.root_names())


def run(df: pl.DataFrame, config: FilterConfig, ctx: StageContext) -> StageOutput:
    # A null result (e.g. a comparison with a missing score) counts as "does not hold".
    holds = config.expression().fill_null(False)
    marked = df.with_columns(_keep=holds)
    kept = marked.filter(pl.col("_keep")).drop("_keep")
    dropped = marked.filter(~pl.col("_keep")).drop("_keep").with_columns(
        drop_reason=pl.lit(config.reason or f"filter: {config.where}"))
    return StageOutput(kept, dropped)
