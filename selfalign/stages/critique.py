"""critique: n scored critiques per (prompt, response), as in Critic-RM.

Targets are `chosen` and/or `rejected` (human pairs) or `responses` (the list `generate` makes).

Each reply is a validated `{critique, score}` (or, with a rubric, one score per named criterion and a
weighted total). A row any of whose calls failed after its attempts goes to `dropped/` with
`drop_reason: model_call_failed` and the failure's status, error, attempts and raw output; a re-run
asks again only for those calls (the others are in the cache).
"""

from __future__ import annotations

from typing import Any, Literal

import polars as pl
import pyarrow as pa
from pydantic import BaseModel, Field, create_model, model_validator

from ..backends import DEFAULT_MODEL_NAME
from ..backends.base import Request
from ..calibration import CalibrateConfig
from ..config_base import Strict
from .base import ModelStageConfig, StageContext, StageOutput, lists, strings, structs
from .model_calls import CRITIQUE, RowFailure, SamplingConfig, ask, split_failed_rows


class Criterion(Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="snake_case, used as a JSON key")
    description: str
    weight: float = Field(1.0, gt=0)


class CritiqueConfig(ModelStageConfig):
    kind: Literal["critique"]
    model: str = DEFAULT_MODEL_NAME
    prompt: str = "prompts/critique.jinja"
    samples: int = Field(4, ge=1, le=64)
    score_range: tuple[int, int] = (1, 10)
    targets: list[Literal["chosen", "rejected", "responses"]] = ["chosen", "rejected"]
    rubric: list[Criterion] | None = None
    sampling: SamplingConfig = SamplingConfig()
    max_attempts: int = Field(3, ge=1, le=10, description="re-asks of an invalid reply, with the error quoted")
    max_critique_chars: int = Field(600, ge=20)
    calibrate: CalibrateConfig | None = Field(None, description="first score a held-out slice of human-labelled "
                                              "pairs and report agreement; with min_agreement, stop when it is low")

    @model_validator(mode="after")
    def _check(self):
        if self.score_range[0] >= self.score_range[1]:
            raise ValueError("score_range must be [low, high] with low < high")
        if not self.targets:
            raise ValueError("targets needs at least one of chosen, rejected")
        return self

    def needs(self) -> set[str]:
        return {"prompt", *self.targets}

    def adds(self) -> set[str]:
        return {f"{t}_critiques" for t in self.targets}

    def templates(self) -> dict[str, tuple[str, set[str]]]:
        return {"prompt": (self.prompt, {"prompt", "response", "score_min", "score_max", "rubric"})}

    def reply_model(self) -> type[BaseModel]:
        # An enum rather than minimum/maximum: grammar-constrained backends (llama.cpp) enforce enums but not
        # numeric bounds. The length cap keeps a rambling model from running out of tokens mid-JSON.
        low, high = self.score_range
        score = (Literal[tuple(range(low, high + 1))], ...)
        critique = (str, Field(min_length=1, max_length=self.max_critique_chars))
        if not self.rubric:
            return create_model("Critique", critique=critique, score=score)
        scores = create_model("Scores", **{c.name: score for c in self.rubric})
        return create_model("RubricCritique", critique=critique, scores=(scores, ...))


def score_of(value: dict[str, Any], config: CritiqueConfig) -> tuple[float, list[dict[str, Any]]]:
    if not config.rubric:
        return float(value["score"]), []
    per = [{"name": c.name, "score": float(value["scores"][c.name])} for c in config.rubric]
    total = sum(c.weight * value["scores"][c.name] for c in config.rubric) / sum(c.weight for c in config.rubric)
    return round(total, 4), per


def _texts(row: dict[str, Any], target: str) -> list[str]:
    value = row[target]
    return value if isinstance(value, list) else [value]


def build_requests(df: pl.DataFrame, config: CritiqueConfig, ctx: StageContext) -> list[Request]:
    """Requests in (row, target, response, sample) order."""
    template = ctx.template(config.prompt)
    schema = config.reply_model().model_json_schema()
    sampling = config.sampling.sampling()
    rubric = [c.model_dump() for c in config.rubric] if config.rubric else None
    requests = []
    for row in df.select("prompt", *config.targets).iter_rows(named=True):
        for target in config.targets:
            for text in _texts(row, target):
                messages = tuple(template.render_messages(
                    prompt=row["prompt"], response=text, score_min=config.score_range[0],
                    score_max=config.score_range[1], rubric=rubric))
                requests.extend(Request(messages, sampling, schema, sample_index=s) for s in range(config.samples))
    return requests


class CritiqueColumn:
    """One target's `<target>_critiques` column, gathered as flat lists and built through Arrow (base.lists):
    a list of critiques per answer, and for `responses` a list of those per row."""

    def __init__(self, nested: bool):
        self.nested = nested
        self.texts: list[str] = []
        self.scores: list[float] = []
        self.sample_indexes: list[int] = []
        self.criterion_names: list[str] = []
        self.criterion_scores: list[float] = []
        self.criterion_offsets = [0]  # criterion scores per critique
        self.answer_offsets = [0]  # critiques per answer
        self.row_offsets = [0]  # answers per row (nested only)

    def add(self, text: str, score: float, sample_index: int, per_criterion: list[dict[str, Any]]) -> None:
        self.texts.append(text)
        self.scores.append(score)
        self.sample_indexes.append(sample_index)
        for criterion in per_criterion:
            self.criterion_names.append(criterion["name"])
            self.criterion_scores.append(criterion["score"])
        self.criterion_offsets.append(len(self.criterion_names))

    def end_answer(self) -> None:
        self.answer_offsets.append(len(self.texts))

    def end_row(self) -> None:
        if self.nested:
            self.row_offsets.append(len(self.answer_offsets) - 1)

    def series(self, name: str, model: str) -> pl.Series:
        per_criterion = structs(name=strings(self.criterion_names),
                                score=pa.array(self.criterion_scores, pa.float64()))
        critiques = structs(text=strings(self.texts), score=pa.array(self.scores, pa.float64()),
                            sample_index=pa.array(self.sample_indexes, pa.int64()),
                            model=strings([model] * len(self.texts)),
                            criterion_scores=lists(self.criterion_offsets, per_criterion))
        column = lists(self.answer_offsets, critiques)
        if self.nested:
            return pl.Series(name, lists(self.row_offsets, column)).cast(pl.List(pl.List(CRITIQUE)))
        return pl.Series(name, column).cast(pl.List(CRITIQUE))


def run(df: pl.DataFrame, config: CritiqueConfig, ctx: StageContext) -> StageOutput:
    requests = build_requests(df, config, ctx)
    results = iter(ask(ctx, config, requests, config.reply_model()))
    columns = {target: CritiqueColumn(nested=target == "responses") for target in config.targets}
    failures: list[RowFailure | None] = []
    for row in df.select(*config.targets).iter_rows(named=True):
        failure = None
        for target in config.targets:
            column = columns[target]
            for text_index, _ in enumerate(_texts(row, target)):
                for s in range(config.samples):
                    result = next(results)
                    if result.ok:
                        score, per = score_of(result.value, config)
                        column.add(result.value["critique"], score, s, per)
                    elif failure is None:
                        where = f"{target}[{text_index}]" if isinstance(row[target], list) else target
                        failure = RowFailure(result, f"{where} sample {s}")
                column.end_answer()
            column.end_row()
        failures.append(failure)
    out = df.with_columns(column.series(f"{target}_critiques", config.model) for target, column in columns.items())
    return split_failed_rows(out, failures, {"calls": len(requests)})
