"""export: write the dataset in trainer formats (trainer_formats.py), split by prompt hash.

`<run>/export/<format>/<split>.parquet` for every format, beside the format's side files
(`export/llama-factory/dataset_info.json`), and
`<run>/dataset/` (`DatasetDict.save_to_disk` of the first format) so that `datasets.load_from_disk` opens the
run's result directly.

Metrics (manifest.json): rows per format and split, the `margin` setting, and per format the p50/p90/p99/max
length of a row (its longer conversation: prompt + chosen or prompt + rejected), in tokens of `tokenizer:`
(chat template applied, as TRL's RewardTrainer tokenizes) or, without one, in characters of message text.
TRL's `max_length` (default 1024) silently drops longer rows; OpenRLHF's `--data.max_len` truncates them.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import polars as pl
from pydantic import Field

from ..atomic import write_dir, write_json, write_parquet
from ..errors import ConfigError
from ..fingerprint import frame_fingerprint
from ..trainer_formats import (MARGIN_FORMATS, MARGIN_MODES, TRAINER_FORMATS, CritiquePrompt, FormatName,
                               MarginMode, format_frame, percentiles, split_by_prompt, split_file_name)
from .base import StageConfig, StageContext, StageOutput


class ExportConfig(StageConfig):
    kind: Literal["export"]
    formats: list[FormatName] = Field(default_factory=lambda: ["trl"], min_length=1)
    test_size: float = Field(0.1, ge=0, lt=1, description="share of prompts (by hash) in the test split")
    margin: MarginMode = Field("none", description="the `margin` column of " + ", ".join(MARGIN_FORMATS) + ": "
                               + "; ".join(f"{k}: {v}" for k, v in MARGIN_MODES.items()))
    tokenizer: str | None = Field(None, description="tokenizer (a local folder or a Hub id) of the model you will "
                                                    "train: row lengths in the metrics are then counted in its "
                                                    "tokens with its chat template, else in characters")

    def needs(self) -> set[str]:
        return set().union(*(TRAINER_FORMATS[f].needs for f in self.formats))


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


def write_format(frames: dict[str, pl.DataFrame], name: str, directory: Path) -> dict[str, Path]:
    """`directory/<split>.parquet` and the format's side files (llama-factory's `dataset_info.json`); returns
    {split, or a side file's name without its suffix: path}."""
    written = {}
    for split, frame in frames.items():
        written[split] = directory / split_file_name(split)
        write_parquet(frame, written[split])
    side_files = TRAINER_FORMATS[name].side_files
    for file_name, content in (side_files(tuple(frames), None) if side_files else {}).items():
        written[Path(file_name).stem] = directory / file_name
        write_json(content, written[Path(file_name).stem])
    return written


def score_range(stages: list[Any]) -> tuple[float, float] | None:
    """The scale the answers' scores are on: the critique stages' `score_range` or the feedback stage's
    `reward_range`; None when no stage scored answers."""
    ranges = {tuple(stage.score_range) for stage in stages if getattr(stage, "kind", None) == "critique"}
    ranges |= {tuple(stage.reward_range) for stage in stages if getattr(stage, "kind", None) == "feedback"}
    if len(ranges) > 1:
        raise ValueError(f"margin: scaled needs one score scale, but the stages score on {sorted(ranges)}; give "
                         "them one score_range or use margin: raw")
    return next(iter(ranges), None)


def margin_setting(stages: list[Any] | None) -> tuple[MarginMode, tuple[float, float] | None]:
    """(margin mode, score range for "scaled") as the pipeline's export stage sets them; ("none", None) without
    an export stage. For everything that formats a run's rows (this stage, and a push or `selfalign export` of
    the run, so that they write the same `margin`). Raises ValueError when "scaled" has no single range."""
    export = next((stage for stage in stages or [] if getattr(stage, "kind", None) == "export"), None)
    if export is None or export.margin != "scaled":
        return (export.margin if export is not None else "none"), None
    scale = score_range(stages)
    if scale is None:
        raise ValueError("margin: scaled divides by the score range, and no critique or feedback stage scored "
                         "these answers; use margin: raw or none")
    return "scaled", scale


def load_tokenizer(value: str, ctx: StageContext, error: Callable[[str], ConfigError]):
    """The tokenizer named by `tokenizer:`: a folder (relative paths as for other files) or a Hub id."""
    from transformers import AutoTokenizer

    path = ctx.resolve(value)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if path.exists() else value)
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, Hub errors: all mean "cannot load it"
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise error(f"cannot load tokenizer {value!r} ({type(exc).__name__}: {detail}); name a folder with "
                    "tokenizer files or a Hub id you can download, or leave tokenizer: out to count "
                    "characters") from None
    if not tokenizer.chat_template:
        raise error(f"tokenizer {value!r} has no chat template, and TRL and OpenRLHF render these conversational "
                    "rows with one; name the tokenizer of a chat (instruct) model")
    return tokenizer


def row_lengths(name: str, frame: pl.DataFrame, tokenizer=None) -> list[int]:
    """Each row's length as its trainer sees it: the longer of its conversations, in tokens with the chat
    template (TRL's `apply_chat_template(..., tokenize=True)`) or in characters of message text."""
    if tokenizer is None:
        size = lambda messages: sum(len(m["content"]) for m in messages)  # noqa: E731
    else:
        size = lambda messages: len(tokenizer.apply_chat_template(  # noqa: E731
            messages, tokenize=True, return_dict=True)["input_ids"])
    return [max(size(messages) for messages in conversations)
            for conversations in TRAINER_FORMATS[name].conversations(frame)]


def length_stats(name: str, frames: dict[str, pl.DataFrame], tokenizer=None, tokenizer_name: str | None = None) \
        -> dict[str, Any]:
    """Length percentiles of a format's rows over all splits, with their unit."""
    lengths = [n for frame in frames.values() for n in row_lengths(name, frame, tokenizer)]
    unit = {"unit": "tokens", "tokenizer": tokenizer_name} if tokenizer is not None else {"unit": "characters"}
    return {**unit, "rows": len(lengths), **percentiles(lengths)}


def run(df: pl.DataFrame, config: ExportConfig, ctx: StageContext) -> StageOutput:
    stages = ctx.loaded.pipeline.stages
    stage = next((i for i, other in enumerate(stages) if other is config), None)

    def error(field: str) -> Callable[[str], ConfigError]:
        place = ctx.loaded.place("stages", stage, field) if stage is not None else {}
        return lambda message: ConfigError(message, **place, stage=stage, kind="export", field=field)

    try:
        margin, scale = margin_setting(stages if stage is not None else [config])
    except ValueError as exc:
        raise error("margin")(str(exc)) from None
    tokenizer = load_tokenizer(config.tokenizer, ctx, error("tokenizer")) if config.tokenizer else None
    # Named by its folder name when local: the manifest goes onto the Hub with the dataset, and a local path there
    # would show the user's disk layout.
    tokenizer_name = None
    if config.tokenizer:
        tokenizer_name = Path(config.tokenizer).name if ctx.resolve(config.tokenizer).exists() else config.tokenizer
    splits = split_by_prompt(df, config.test_size)
    critique_prompt = critique_prompt_from_stages(stages, ctx.template)
    written, lengths = {}, {}
    for index, name in enumerate(config.formats):
        formatted = {split: format_frame(name, frame, critique_prompt, margin, scale)
                     for split, frame in splits.items()}
        write_format(formatted, name, ctx.run_dir / "export" / name)
        written[name] = {split: frame.height for split, frame in formatted.items()}
        lengths[name] = length_stats(name, formatted, tokenizer, tokenizer_name)
        if index == 0:
            dataset = to_dataset_dict(formatted)
            # An empty split (a small run whose prompts all hashed into train) must still be written as one
            # shard: `datasets` would write none for it, and load_from_disk then fails on the folder.
            shards = {split: (1 if frame.height == 0 else None) for split, frame in formatted.items()}
            with _progress_bars(not ctx.progress.quiet):
                write_dir(ctx.run_dir / "dataset", lambda tmp: dataset.save_to_disk(str(tmp), num_shards=shards))
    return StageOutput(df, metrics={"exported": written, "margin": margin, "lengths": lengths})
