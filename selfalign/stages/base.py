"""What every stage shares: its config base class and the shape of what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import polars as pl
import pyarrow as pa

from pydantic import Field

from ..models import Strict


class StageConfig(Strict):
    """A stage's YAML block. Subclasses declare the columns they read and write so that the runner can
    check the whole chain before the first model call."""

    kind: str

    def needs(self) -> set[str]:
        return set()

    def adds(self) -> set[str]:
        return set()

    def model_names(self) -> list[str]:
        model = getattr(self, "model", None)
        return [model] if model else []

    def templates(self) -> dict[str, tuple[str, set[str]]]:
        """field name -> (template path, variables the stage provides to it)."""
        return {}


class ModelStageConfig(StageConfig):
    """A stage that calls a model. `max_failed_fraction` overrides the pipeline's failure budget for it."""

    # Left out of dumps (stage fingerprints, config hash): a budget changes when a run stops, not its results.
    max_failed_fraction: float | None = Field(
        None, ge=0, le=1, exclude=True, description="stop the run when more than this share of the stage's "
                                                    "calls failed (default: the pipeline's max_failed_fraction)")


@dataclass
class StageOutput:
    kept: pl.DataFrame
    # Rows that did not make it, each with a `drop_reason` (and for model failures: status, error, ...).
    dropped: pl.DataFrame | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def drop(df: pl.DataFrame, reason: str | pl.Expr) -> pl.DataFrame:
    """Mark rows as dropped with a reason (a literal or a per-row expression)."""
    return df.with_columns(drop_reason=pl.lit(reason) if isinstance(reason, str) else reason)


# Nested columns built from flat Python lists through Arrow: polars converts nested Python objects (a dict per
# struct) one row at a time, which dominated the load and critique stages' own time and memory.

def strings(values: list[str | None]) -> pa.Array:
    return pa.array(values, pa.large_string())


def structs(**fields: pa.Array) -> pa.Array:
    return pa.StructArray.from_arrays(list(fields.values()), names=list(fields))


def lists(offsets: list[int], values: pa.Array) -> pa.Array:
    """Row i holds values[offsets[i]:offsets[i + 1]] (offsets has one more entry than there are rows)."""
    return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), values)
