"""feedback: turn a user's reaction to a chat answer into a numeric reward with a short rationale.

Input rows (load `format: feedback`) hold prompt, response, and the user's free-text `feedback` ("haha,
that's funny!", "that's wrong") and/or `thumbs` up/down. The model maps each reaction to a reward in
`reward_range`; then the answers to the same prompt are gathered into one row (`responses` plus
`responses_critiques`, the rationale standing as the critique), ready for `pair`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

import polars as pl
from pydantic import Field, create_model

from ..backends import DEFAULT_MODEL_NAME
from ..backends.base import Request
from .base import ModelStageConfig, StageContext, StageOutput
from .model_calls import CRITIQUE, SamplingConfig, ask, critique_value, first_failure, split_failed_rows


class FeedbackConfig(ModelStageConfig):
    kind: Literal["feedback"]
    model: str = DEFAULT_MODEL_NAME
    prompt: str = "prompts/feedback_reward.jinja"
    reward_range: tuple[int, int] = (1, 5)
    sampling: SamplingConfig = SamplingConfig(temperature=0.0, max_tokens=192)
    max_attempts: int = Field(3, ge=1, le=10)

    def needs(self) -> set[str]:
        return {"prompt", "response", "feedback", "thumbs"}

    def adds(self) -> set[str]:
        return {"responses", "responses_critiques"}

    def templates(self) -> dict[str, tuple[str, set[str]]]:
        return {"prompt": (self.prompt, {"prompt", "response", "feedback", "thumbs", "reward_min", "reward_max"})}

    def reply_model(self):
        low, high = self.reward_range
        return create_model("Reward", rationale=(str, Field(min_length=1, max_length=400)),
                            reward=(Literal[tuple(range(low, high + 1))], ...))


def build_requests(df: pl.DataFrame, config: FeedbackConfig, ctx: StageContext) -> list[Request]:
    template = ctx.template(config.prompt)
    schema, sampling = config.reply_model().model_json_schema(), config.sampling.sampling()
    return [Request(tuple(template.render_messages(prompt=p, response=r, feedback=f, thumbs=t,
                                                   reward_min=config.reward_range[0],
                                                   reward_max=config.reward_range[1])), sampling, schema)
            for p, r, f, t in df.select("prompt", "response", "feedback", "thumbs").iter_rows()]


def run(df: pl.DataFrame, config: FeedbackConfig, ctx: StageContext) -> StageOutput:
    results = ask(ctx, config, build_requests(df, config, ctx), config.reply_model())
    # The rationale stands as the answer's one critique, the reward as its score.
    rewards = [[critique_value(r.value["rationale"], float(r.value["reward"]), 0, config.model)] if r.ok else []
               for r in results]
    failures = [first_failure([r]) for r in results]
    scored = split_failed_rows(df.with_columns(reward=pl.Series(rewards, dtype=pl.List(CRITIQUE))), failures,
                               {"calls": len(results)})
    # One row per prompt: its answers and their rewards, for `pair`.
    grouped = (scored.kept.with_columns(_key=pl.col("prompt").map_elements(
        lambda p: json.dumps(p.to_list(), sort_keys=True), return_dtype=pl.Utf8))
        .group_by("_key", maintain_order=True)
        .agg(pl.col("prompt").first(), pl.col("response").alias("responses"),
             pl.col("reward").alias("responses_critiques"), pl.col("source").first())
        .with_columns(row_id=pl.col("_key").map_elements(lambda k: hashlib.sha256(k.encode()).hexdigest()[:16],
                                                        return_dtype=pl.Utf8))
        .drop("_key"))
    scored.metrics["prompts"] = grouped.height
    return StageOutput(grouped.select("row_id", "prompt", "responses", "responses_critiques", "source"),
                       scored.dropped, scored.metrics)
