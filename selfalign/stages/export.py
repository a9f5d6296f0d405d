"""export: write the dataset in trainer formats, split by prompt hash.

`<run>/export/<format>/<split>.parquet` for every format (plus `export/llama-factory/dataset_info.json`), and
`<run>/dataset/` (`DatasetDict.save_to_disk` of the first format) so that `datasets.load_from_disk` opens the
run's result directly.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import polars as pl
from pydantic import Field

from ..atomic import write_dir, write_json, write_parquet
from ..fingerprint import frame_fingerprint
from ..trainer_formats import NEEDS, CritiquePrompt, format_frame, llama_factory_dataset_info, split_by_prompt
from .base import StageConfig, StageOutput

FormatName = Literal["trl", "trl-implicit", "openrlhf", "llama-factory", "critic-rm", "cloud", "critique-sft"]


class ExportConfig(StageConfig):
    kind: Literal["export"]
    formats: list[FormatName] = Field(default_factory=lambda: ["trl"], min_length=1)
    test_size: float = Field(0.1, ge=0, lt=1, description="share of prompts (by hash) in the test split")

    def needs(self) -> set[str]:
        return set().union(*(NEEDS[f] for f in self.formats))


def to_dataset_dict(splits: dict[str, pl.DataFrame]):
    import datasets

    # Our own content fingerprint: without one, `datasets` hashes a serialised copy of the whole table.
    return datasets.DatasetDict({name: datasets.Dataset(frame.to_arrow(), fingerprint=frame_fingerprint(frame))
                                 for name, frame in splits.items()})


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """`datasets` draws a "Saving the dataset" bar on stderr; --quiet means nothing but errors, so turn its
    bars off for the save (a global switch in `datasets`, put back as it was)."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not enabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and not was_disabled:
            enable_progress_bars()


def critique_prompt_from_stages(stages: list[Any], template: Callable[[str], Any]) -> CritiquePrompt | None:
    """The function that re-renders the exact messages each critique was asked with (for `critique-sft`):
    the critique stage whose `model` wrote the critique, its template, score range and rubric."""
    by_model = {stage.model: stage for stage in stages if getattr(stage, "kind", None) == "critique"}
    if not by_model:
        return None
    templates = {}

    def render(prompt: list[dict[str, str]], response: str, critique: dict[str, Any]) -> list[dict[str, str]]:
        stage = by_model.get(critique.get("model")) or next(iter(by_model.values()))
        if stage.prompt not in templates:
            templates[stage.prompt] = template(stage.prompt)
        rubric = [c.model_dump() for c in stage.rubric] if stage.rubric else None
        return templates[stage.prompt].render_messages(prompt=prompt, response=response,
                                                       score_min=stage.score_range[0],
                                                       score_max=stage.score_range[1], rubric=rubric)
    return render


def write_format(frames: dict[str, pl.DataFrame], name: str, directory: Path) -> None:
    """`directory/<split>.parquet` (+ `dataset_info.json` for llama-factory)."""
    for split, frame in frames.items():
        write_parquet(frame, directory / f"{split}.parquet")
    if name == "llama-factory":
        write_json(llama_factory_dataset_info(splits={split: f"{split}.parquet" for split in frames}),
                   directory / "dataset_info.json")


def run(df: pl.DataFrame, config: ExportConfig, ctx) -> StageOutput:
    splits = split_by_prompt(df, config.test_size)
    critique_prompt = critique_prompt_from_stages(ctx.loaded.pipeline.stages, ctx.template)
    written = {}
    for index, name in enumerate(config.formats):
        formatted = {split: format_frame(name, frame, critique_prompt) for split, frame in splits.items()}
        write_format(formatted, name, ctx.run_dir / "export" / name)
        written[name] = {split: frame.height for split, frame in formatted.items()}
        if index == 0:
            dataset = to_dataset_dict(formatted)
            # An empty split (a small run whose prompts all hashed into train) must still be written as one
            # shard: `datasets` would write none for it, and load_from_disk then fails on the folder.
            shards = {split: (1 if frame.height == 0 else None) for split, frame in formatted.items()}
            with _progress_bars(not ctx.progress.quiet):
                write_dir(ctx.run_dir / "dataset", lambda tmp: dataset.save_to_disk(str(tmp), num_shards=shards))
    return StageOutput(df, metrics={"exported": written})
