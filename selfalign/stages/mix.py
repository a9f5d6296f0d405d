"""mix: combine human and synthetic pairs by ratio or count, deterministic for a seed.

The rows so far (each with a `source`) are joined by any extra data sets listed under `add:`; duplicates
across sources (same normalised prompt and answers) are dropped, the first copy kept; then each source is
sampled down to its `ratios` share (or `counts`). With `near_duplicates:` (the dedupe stage's options),
near-duplicate prompts go too, after the exact dedupe (human kept before synthetic by default). Every row
left out is in `dropped/` with its reason.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

import polars as pl
from pydantic import Field, model_validator

from ..config_base import Strict
from .base import StageConfig, StageContext, StageOutput
from .dedupe import NearDuplicates, near_duplicates
from .load import LoadConfig, run as load

Source = Literal["human", "synthetic"]


class MixInput(Strict):
    path: str | None = None
    hf: str | None = None
    split: str = "train"
    format: Literal["hh-rlhf", "trl"] = "trl"
    source: Source = "synthetic"


class MixConfig(StageConfig):
    kind: Literal["mix"]
    add: list[MixInput] = Field(default_factory=list, description="more pair data sets to mix in")
    ratios: dict[Source, float] | None = Field(None, description="share of each source to keep, 0..1")
    counts: dict[Source, int] | None = Field(None, description="rows to keep per source (at most what exists)")
    seed: int = 0
    near_duplicates: NearDuplicates | None = Field(None, description="also drop near-duplicate prompts (MinHash "
                                                   "LSH, as the dedupe stage) after the exact dedupe, e.g. {}")

    @model_validator(mode="after")
    def _one_rule(self):
        if self.ratios is not None and self.counts is not None:
            raise ValueError("give ratios or counts, not both")
        for share in (self.ratios or {}).values():
            if not 0 <= share <= 1:
                raise ValueError("ratios are shares between 0 and 1")
        return self

    def needs(self) -> set[str]:
        return {"prompt", "chosen", "rejected", "source",
                *(self.near_duplicates.columns() if self.near_duplicates else ())}


def normalised_key(prompt, chosen: str, rejected: str) -> str:
    def norm(text: str) -> str:
        return " ".join(text.lower().split())
    payload = [[m["role"], norm(m["content"])] for m in prompt] + [norm(chosen), norm(rejected)]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def _rank(row_id: str, seed: int) -> str:
    """A seeded, order-independent shuffle key."""
    return hashlib.sha256(f"{seed}:{row_id}".encode()).hexdigest()


def run(df: pl.DataFrame, config: MixConfig, ctx: StageContext) -> StageOutput:
    frames = [df]
    for extra in config.add:
        loaded = load(None, LoadConfig(kind="load", path=extra.path, hf=extra.hf, split=extra.split,
                                       format=extra.format), ctx).kept
        frames.append(loaded.with_columns(source=pl.lit(extra.source)))
    combined = pl.concat(frames, how="diagonal_relaxed")
    keys = [normalised_key(p, c, r) for p, c, r in combined.select("prompt", "chosen", "rejected").iter_rows()]
    combined = combined.with_columns(_key=pl.Series(keys, dtype=pl.Utf8))
    is_first = combined.with_row_index("_i").select(pl.col("_i") == pl.col("_i").min().over("_key")).to_series()
    dropped = [combined.filter(~is_first).with_columns(drop_reason=pl.lit("duplicate_across_sources"))]
    unique, near = combined.filter(is_first), {}
    if config.near_duplicates is not None:
        unique, near_dropped, near = near_duplicates(unique, config.near_duplicates)
        dropped.append(near_dropped)
    unique = unique.with_columns(
        _rank=pl.col("row_id").map_elements(lambda r: _rank(r, config.seed), return_dtype=pl.Utf8))
    kept = []
    for source in ("human", "synthetic"):
        rows = unique.filter(pl.col("source") == source).sort("_rank")
        if config.counts is not None and source in config.counts:
            take = min(config.counts[source], rows.height)
        elif config.ratios is not None and source in config.ratios:
            take = round(rows.height * config.ratios[source])
        else:
            take = rows.height
        kept.append(rows.head(take))
        dropped.append(rows.slice(take).with_columns(drop_reason=pl.lit(f"not_sampled_{source}")))
    result = pl.concat(kept, how="diagonal_relaxed").sort("_rank").drop("_key", "_rank")
    counts = dict(result.group_by("source").len().rows())
    return StageOutput(result, pl.concat(dropped, how="diagonal_relaxed").drop("_key", "_rank", strict=False),
                       metrics={"sources": counts, **({"near_duplicates": near} if near else {})})
