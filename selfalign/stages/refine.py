"""refine: Critic-RM's last step over the critiques that survived consistency.

- `summarize`: the model merges a response's surviving critiques into one critique and score, which
  replaces the list (one critique per answer for critique + reward training).
- `rank`: a meta-judge scores how good each surviving critique is (1-10); the top `top_k` per answer stay.

Refined critiques are what the `critic-rm` and `cloud` formats train on, so they must still agree with the
label: the consistency stage's instance rule (the chosen answer's mean score above the rejected one's) is
applied again to them. A pair they contradict (or tie) is dropped (`refined_scores_contradict_label`,
`refined_scores_tied`), or with `on_contradiction: keep_original` keeps the critiques consistency passed.
The pair's `chosen_score`, `rejected_score` and `margin` are recomputed from the critiques it keeps.
"""

from __future__ import annotations

from typing import Literal

import polars as pl
from pydantic import Field, create_model, model_validator

from ..backends import DEFAULT_MODEL_NAME
from ..backends.base import Request
from .base import ModelStageConfig, StageContext, StageOutput
from .consistency import ConsistencyConfig, judge_pair
from .model_calls import CRITIQUE, RowFailure, SamplingConfig, ask, critique_value, split_failed_rows

SIDES = ("chosen", "rejected")
# The instance rule alone: refined critiques are not filtered one by one, and no margin is asked of them.
ORDER_RULE = ConsistencyConfig(kind="consistency", filter_critiques=False)
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
    on_contradiction: Literal["drop", "keep_original"] = Field(
        "drop", description="a pair whose refined scores contradict (or tie) its label: drop it, or keep the "
                            "critiques the consistency stage passed")

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


def build_requests(df: pl.DataFrame, config: RefineConfig, ctx: StageContext) -> list[Request]:
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


def run(df: pl.DataFrame, config: RefineConfig, ctx: StageContext) -> StageOutput:
    results = iter(ask(ctx, config, build_requests(df, config, ctx), config.reply_model(),
                       label=f"refine/{config.method} ({config.model})"))
    refined: dict[str, list] = {side: [] for side in SIDES}
    failures: list[RowFailure | None] = []
    for row in df.select(*(f"{s}_critiques" for s in SIDES)).iter_rows(named=True):
        failure = None
        for side in SIDES:
            critiques = row[f"{side}_critiques"]
            if config.method == "summarize":
                result = next(results)
                outcome = ([critique_value(result.value["critique"], float(result.value["score"]), -1, config.model)]
                           if result.ok else critiques)
                failed = [] if result.ok else [result]
            else:
                ranked = [(next(results), c) for c in critiques]
                failed = [r for r, _ in ranked if not r.ok]
                ok = sorted(((r.value["quality"], -i, c) for i, (r, c) in enumerate(ranked) if r.ok), reverse=True)
                outcome = [c for _, _, c in ok[:config.top_k]]
            if failed and failure is None:
                failure = RowFailure(failed[0], side)
            refined[side].append(outcome)
        failures.append(failure)
    originals = df.select(*(f"{s}_critiques" for s in SIDES)).rows()
    flips: list[str | None] = []
    for i, (chosen, rejected) in enumerate(zip(refined["chosen"], refined["rejected"])):
        flip = None if failures[i] else judge_pair(chosen, rejected, ORDER_RULE)[0]
        flips.append(flip)
        if flip and config.on_contradiction == "keep_original":
            refined["chosen"][i], refined["rejected"][i] = originals[i]
    out = df.with_columns(pl.Series(f"{side}_critiques", refined[side], dtype=pl.List(CRITIQUE)) for side in SIDES)
    out = _rescore(out)
    # Pairs whose refined critiques no longer order chosen above rejected, by the consistency stage's reason.
    counts = {reason: flips.count(reason) for reason in sorted({f for f in flips if f})}
    refined_pairs = sum(1 for failure in failures if failure is None)
    flipped = sum(counts.values())
    survivors = refined_pairs if config.on_contradiction == "keep_original" else refined_pairs - flipped
    metrics = {"method": config.method, "on_contradiction": config.on_contradiction, "refined_flips": counts,
               # As the consistency stage reports them: the refined scores' agreement, then what is kept.
               "agreement_with_human_before": _share(refined_pairs - flipped, refined_pairs),
               "agreement_with_human_after": 1.0 if survivors else None}
    output = split_failed_rows(out, failures, metrics)
    if config.on_contradiction == "keep_original" or not counts:
        return output
    # Drop the flipped pairs (rows with a failed call are already in `output.dropped`).
    reason = pl.Series("drop_reason", [f"refined_{f}" if f else None for i, f in enumerate(flips)
                                       if failures[i] is None], dtype=pl.Utf8)
    marked = output.kept.with_columns(reason)
    flipped = marked.filter(pl.col("drop_reason").is_not_null())
    return StageOutput(marked.filter(pl.col("drop_reason").is_null()).drop("drop_reason"),
                       pl.concat([output.dropped, flipped], how="diagonal_relaxed"), metrics)


def _rescore(df: pl.DataFrame) -> pl.DataFrame:
    """The pair's scores and margin from the critiques it now holds (consistency's columns, where present)."""
    if "chosen_score" not in df.columns:
        return df
    mean = {side: pl.col(f"{side}_critiques").list.eval(pl.element().struct.field("score")).list.mean()
            for side in SIDES}
    out = df.with_columns(chosen_score=mean["chosen"], rejected_score=mean["rejected"])
    out = out.with_columns(margin=pl.col("chosen_score") - pl.col("rejected_score"))
    for side in SIDES:
        if f"{side}_critiques_kept" in out.columns:
            out = out.with_columns(pl.col(f"{side}_critiques").list.len().cast(pl.Int64).alias(f"{side}_critiques_kept"))
    return out


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None
