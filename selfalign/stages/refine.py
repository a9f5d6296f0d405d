"""refine: Critic-RM's last step over the critiques that survived consistency.

- `summarize`: the model merges a response's surviving critiques into one critique and score, which
  replaces the list (one critique per answer for critique + reward training).
- `rank`: a meta-judge scores how good each surviving critique is (1-10); the top `top_k` per answer stay.
"""

from __future__ import annotations

from typing import Any, Literal

import polars as pl
from pydantic import Field, create_model, model_validator

from ..backends.base import Request
from ..calls import json_parser
from ..models import DEFAULT_MODEL_NAME
from .base import ModelStageConfig, StageOutput
from .critique import CRITIQUE, SamplingConfig, failure_columns

SIDES = ("chosen", "rejected")
MetaScore = create_model("MetaScore", reason=(str, Field(min_length=1, max_length=600)),
                         quality=(Literal[tuple(range(1, 11))], ...))


class RefineConfig(ModelStageConfig):
    kind: Literal["refine"]
    method: Literal["summarize", "rank"]
    model: str = DEFAULT_MODEL_NAME
    prompt: str | None = Field(None, description="default: prompts/refine_summarize.jinja or refine_rank.jinja")
    top_k: int = Field(2, ge=1, description="critiques kept per answer with method: rank")
    score_range: tuple[int, int] = (1, 10)
    max_critique_chars: int = Field(800, ge=20)
    sampling: SamplingConfig = SamplingConfig(temperature=0.0, max_tokens=384)
    max_attempts: int = Field(3, ge=1, le=10)

    @model_validator(mode="after")
    def _default_prompt(self):
        if self.prompt is None:
            self.prompt = f"prompts/refine_{self.method}.jinja"
        return self

    def needs(self) -> set[str]:
        return {"prompt", "chosen", "rejected", "chosen_critiques", "rejected_critiques"}

    def templates(self) -> dict[str, tuple[str, set[str]]]:
        provided = ({"prompt", "response", "critiques", "score_min", "score_max"} if self.method == "summarize"
                    else {"prompt", "response", "critique", "critique_score"})
        return {"prompt": (self.prompt, provided)}

    def reply_model(self):
        if self.method == "rank":
            return MetaScore
        low, high = self.score_range
        return create_model("Summary", critique=(str, Field(min_length=1, max_length=self.max_critique_chars)),
                            score=(Literal[tuple(range(low, high + 1))], ...))


def build_requests(df: pl.DataFrame, config: RefineConfig, ctx) -> list[Request]:
    """summarize: one request per (row, side); rank: one per (row, side, critique)."""
    template = ctx.template(config.prompt)
    schema, sampling = config.reply_model().model_json_schema(), config.sampling.sampling()
    requests = []
    for row in df.select("prompt", *SIDES, *(f"{s}_critiques" for s in SIDES)).iter_rows(named=True):
        for side in SIDES:
            critiques = row[f"{side}_critiques"]
            if config.method == "summarize":
                variables = [dict(critiques=[{"text": c["text"], "score": c["score"]} for c in critiques],
                                  score_min=config.score_range[0], score_max=config.score_range[1])]
            else:
                variables = [dict(critique=c["text"], critique_score=c["score"]) for c in critiques]
            for extra in variables:
                messages = tuple(template.render_messages(prompt=row["prompt"], response=row[side], **extra))
                requests.append(Request(messages, sampling, schema))
    return requests


def run(df: pl.DataFrame, config: RefineConfig, ctx) -> StageOutput:
    results = iter(ctx.client(config.model).run(build_requests(df, config, ctx), json_parser(config.reply_model()),
                                                label=f"refine/{config.method} ({config.model})",
                                                max_attempts=config.max_attempts))
    refined: dict[str, list] = {side: [] for side in SIDES}
    failures: list[dict[str, Any] | None] = []
    for row in df.select(*(f"{s}_critiques" for s in SIDES)).iter_rows(named=True):
        failure = None
        for side in SIDES:
            critiques = row[f"{side}_critiques"]
            if config.method == "summarize":
                result = next(results)
                outcome = ([{"text": result.value["critique"], "score": float(result.value["score"]),
                             "sample_index": -1, "model": config.model, "criterion_scores": []}]
                           if result.ok else critiques)
                failed = [] if result.ok else [result]
            else:
                ranked = [(next(results), c) for c in critiques]
                failed = [r for r, _ in ranked if not r.ok]
                ok = sorted(((r.value["quality"], -i, c) for i, (r, c) in enumerate(ranked) if r.ok), reverse=True)
                outcome = [c for _, _, c in ok[:config.top_k]]
            if failed and failure is None:
                failure = {"error": f"{side}: {failed[0].error}", "attempts": failed[0].attempts,
                           "raw_output": failed[0].text}
            refined[side].append(outcome)
        failures.append(failure)
    out = df.with_columns(pl.Series(f"{side}_critiques", refined[side], dtype=pl.List(CRITIQUE)) for side in SIDES)
    return failure_columns(out, failures, {"method": config.method})
