"""export: write the dataset in trainer formats, split by prompt hash.

`<run>/export/<format>/<split>.parquet` for every format, and `<run>/dataset/` (`DatasetDict.save_to_disk`
of the first format) so that `datasets.load_from_disk` opens the run's result directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import polars as pl
from pydantic import Field

from ..atomic import write_dir, write_parquet
from ..trainer_formats import FORMATS, NEEDS, split_by_prompt
from .base import StageConfig, StageOutput

FormatName = Literal["trl", "critic-rm"]


class ExportConfig(StageConfig):
    kind: Literal["export"]
    formats: list[FormatName] = Field(default_factory=lambda: ["trl"], min_length=1)
    test_size: float = Field(0.1, ge=0, lt=1, description="share of prompts (by hash) in the test split")

    def needs(self) -> set[str]:
        return set().union(*(NEEDS[f] for f in self.formats))


def to_dataset_dict(splits: dict[str, pl.DataFrame]):
    import datasets

    return datasets.DatasetDict({name: datasets.Dataset(frame.to_arrow()) for name, frame in splits.items()})


def run(df: pl.DataFrame, config: ExportConfig, ctx) -> StageOutput:
    splits = split_by_prompt(df, config.test_size)
    written = {}
    for index, name in enumerate(config.formats):
        formatted = {split: FORMATS[name](frame) for split, frame in splits.items()}
        for split, frame in formatted.items():
            write_parquet(frame, ctx.run_dir / "export" / name / f"{split}.parquet")
        written[name] = {split: frame.height for split, frame in formatted.items()}
        if index == 0:
            dataset = to_dataset_dict(formatted)
            write_dir(ctx.run_dir / "dataset", lambda tmp: dataset.save_to_disk(str(tmp)))
    return StageOutput(df, metrics={"exported": written})
