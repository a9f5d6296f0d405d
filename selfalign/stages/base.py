"""What every stage shares: its config base class, what it may use of the run (`StageContext`) and the shape of
what it returns (`StageOutput`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import polars as pl
import pyarrow as pa

from pydantic import Field

from ..config_base import Strict

if TYPE_CHECKING:  # types only: a stage gets these objects from the runner, it never imports the runner
    from ..calls import ModelClient
    from ..config import LoadedPipeline
    from ..manifest import Manifest
    from ..progress import Progress
    from ..prompts import PromptTemplate


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


class StageContext(Protocol):
    """What a stage may use of the run it is part of (runner.RunContext implements it; so can a test)."""

    loaded: LoadedPipeline   # the pipeline: its stages, models, path (for resolving relative paths)
    run_dir: Path
    progress: Progress
    limit: int | None        # --limit: the load stage reads at most this many rows

    def resolve(self, value: str) -> Path:
        """A path written in the pipeline file (paths.resolve_path)."""

    def template(self, value: str) -> PromptTemplate:
        """The prompt template at `value`, loaded once per run (its hash goes in the manifest)."""

    def client(self, name: str) -> ModelClient:
        """The cached, retried client of model `name` (started on first use)."""

    def manifest_so_far(self, stage: int) -> Manifest:
        """The manifest as far as it is known before stage `stage` finishes (status "running")."""


@dataclass
class StageOutput:
    kept: pl.DataFrame
    # Rows that did not make it, each with a `drop_reason` (and for model failures: status, error, ...).
    dropped: pl.DataFrame | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


# Nested columns built from flat Python lists through Arrow: polars converts nested Python objects (a dict per
# struct) one row at a time, which dominated the load and critique stages' own time and memory.

def strings(values: list[str | None]) -> pa.Array:
    return pa.array(values, pa.large_string())


def structs(**fields: pa.Array) -> pa.Array:
    return pa.StructArray.from_arrays(list(fields.values()), names=list(fields))


def lists(offsets: list[int], values: pa.Array) -> pa.Array:
    """Row i holds values[offsets[i]:offsets[i + 1]] (offsets has one more entry than there are rows)."""
    return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), values)
