"""generate: n responses per prompt (self-rewarding, rubric and UltraFeedback-style pipelines).

Sample i is drawn with seed + i, so n samples are n different answers and a re-run asks for the same ones.
A row any of whose samples failed goes to `dropped/` with `model_call_failed` and the failure details.
"""

from __future__ import annotations

from typing import Literal

import polars as pl
from pydantic import Field

from ..backends import DEFAULT_MODEL_NAME
from ..backends.base import Request
from .base import ModelStageConfig, StageContext, StageOutput
from .model_calls import SamplingConfig, ask, first_failure, split_failed_rows


class GenerateConfig(ModelStageConfig):
    kind: Literal["generate"]
    model: str = DEFAULT_MODEL_NAME
    samples: int = Field(4, ge=2, le=64, description="responses per prompt (at least 2, to make pairs)")
    prompt: str | None = Field(None, description="optional template wrapping the conversation; default: send "
                                                 "the conversation as is")
    sampling: SamplingConfig = SamplingConfig(temperature=0.8, max_tokens=512)

    def needs(self) -> set[str]:
        return {"prompt"}

    def adds(self) -> set[str]:
        return {"responses"}

    def templates(self) -> dict[str, tuple[str, set[str]]]:
        return {"prompt": (self.prompt, {"prompt"})} if self.prompt else {}


def build_requests(df: pl.DataFrame, config: GenerateConfig, ctx: StageContext) -> list[Request]:
    template = ctx.template(config.prompt) if config.prompt else None
    sampling = config.sampling.sampling()
    requests = []
    for prompt in df["prompt"].to_list():
        messages = tuple(template.render_messages(prompt=prompt) if template else prompt)
        requests.extend(Request(messages, sampling, None, sample_index=s) for s in range(config.samples))
    return requests


def run(df: pl.DataFrame, config: GenerateConfig, ctx: StageContext) -> StageOutput:
    results = ask(ctx, config, build_requests(df, config, ctx), reply_model=None)
    responses, failures = [], []
    for row in range(df.height):
        mine = results[row * config.samples:(row + 1) * config.samples]
        responses.append([r.value.strip() for r in mine if r.ok])
        failures.append(first_failure(mine))
    out = df.with_columns(responses=pl.Series(responses, dtype=pl.List(pl.Utf8)))
    return split_failed_rows(out, failures, {"calls": len(results)})
