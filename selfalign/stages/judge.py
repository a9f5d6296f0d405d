"""judge: pairwise A/B comparison, asked in both orders; a verdict counts only when both orders agree.

Order 1 shows chosen as A and rejected as B, order 2 the reverse. If the two verdicts pick different
answers the judge was swayed by position and the row is dropped (`position_inconsistent`). A consistent
verdict for the rejected answer contradicts the label: dropped (`judge_disagrees_with_label`) or, with
`on_disagreement: swap`, the pair is flipped (for synthetic pairs whose label came from a weaker signal).
"""

from __future__ import annotations

from typing import Literal

import polars as pl
from pydantic import Field, create_model

from ..backends import DEFAULT_MODEL_NAME
from ..backends.base import Request
from ..calibration import CalibrateConfig
from .base import ModelStageConfig, StageContext, StageOutput
from .model_calls import SamplingConfig, ask, first_failure, split_failed_rows

Verdict = create_model("Verdict", reasoning=(str, Field(min_length=1, max_length=800)),
                       winner=(Literal["A", "B"], ...))


class JudgeConfig(ModelStageConfig):
    kind: Literal["judge"]
    model: str = DEFAULT_MODEL_NAME
    prompt: str = "prompts/judge_pairwise.jinja"
    sampling: SamplingConfig = SamplingConfig(temperature=0.0, max_tokens=256)
    on_disagreement: Literal["drop", "swap"] = "drop"
    max_attempts: int = Field(3, ge=1, le=10)
    calibrate: CalibrateConfig | None = Field(None, description="first judge a held-out slice of human-labelled "
                                              "pairs and report agreement; with min_agreement, stop when it is low")

    def needs(self) -> set[str]:
        return {"prompt", "chosen", "rejected"}

    def adds(self) -> set[str]:
        return {"judge_verdict", "judge_reasoning"}

    def templates(self) -> dict[str, tuple[str, set[str]]]:
        return {"prompt": (self.prompt, {"prompt", "answer_a", "answer_b"})}


def build_requests(df: pl.DataFrame, config: JudgeConfig, ctx: StageContext) -> list[Request]:
    """Two requests per row: (A=chosen, B=rejected), then (A=rejected, B=chosen)."""
    template = ctx.template(config.prompt)
    schema, sampling = Verdict.model_json_schema(), config.sampling.sampling()
    requests = []
    for prompt, chosen, rejected in df.select("prompt", "chosen", "rejected").iter_rows():
        for a, b in ((chosen, rejected), (rejected, chosen)):
            messages = tuple(template.render_messages(prompt=prompt, answer_a=a, answer_b=b))
            requests.append(Request(messages, sampling, schema))
    return requests


def pair_verdict(first_winner: str, second_winner: str) -> str:
    """"chosen", "rejected" or "inconsistent", from the winners of order 1 (A=chosen) and order 2 (A=rejected)."""
    pick_1 = "chosen" if first_winner == "A" else "rejected"
    pick_2 = "chosen" if second_winner == "B" else "rejected"
    return pick_1 if pick_1 == pick_2 else "inconsistent"


def run(df: pl.DataFrame, config: JudgeConfig, ctx: StageContext) -> StageOutput:
    results = ask(ctx, config, build_requests(df, config, ctx), Verdict)
    verdicts, reasoning, failures = [], [], []
    for row in range(df.height):
        first, second = results[2 * row], results[2 * row + 1]
        failure = first_failure((first, second))
        failures.append(failure)
        if failure is not None:
            verdicts.append(None)
            reasoning.append([])
            continue
        verdicts.append(pair_verdict(first.value["winner"], second.value["winner"]))
        reasoning.append([first.value["reasoning"], second.value["reasoning"]])
    out = df.with_columns(judge_verdict=pl.Series(verdicts, dtype=pl.Utf8),
                          judge_reasoning=pl.Series(reasoning, dtype=pl.List(pl.Utf8)))
    split = split_failed_rows(out, failures, {})
    judged = split.kept
    consistent = judged.filter(pl.col("judge_verdict") != "inconsistent")
    agree = consistent.filter(pl.col("judge_verdict") == "chosen")
    disagree = consistent.filter(pl.col("judge_verdict") == "rejected")
    dropped = [split.dropped, judged.filter(pl.col("judge_verdict") == "inconsistent").with_columns(
        drop_reason=pl.lit("position_inconsistent"))]
    if config.on_disagreement == "swap":
        # The flipped label is the model's, not a person's: those rows count as synthetic from here on.
        swapped_columns = {"chosen": pl.col("rejected"), "rejected": pl.col("chosen"), "source": pl.lit("synthetic")}
        for name in ("critiques", "score", "critiques_kept"):
            if f"chosen_{name}" in disagree.columns:
                swapped_columns[f"chosen_{name}"] = pl.col(f"rejected_{name}")
                swapped_columns[f"rejected_{name}"] = pl.col(f"chosen_{name}")
        if "margin" in disagree.columns:
            swapped_columns["margin"] = -pl.col("margin")
        kept = pl.concat([agree, disagree.with_columns(**swapped_columns)])
    else:
        kept = agree
        dropped.append(disagree.with_columns(drop_reason=pl.lit("judge_disagrees_with_label")))
    metrics = {
        "position_consistency": round(consistent.height / judged.height, 4) if judged.height else None,
        "agreement_with_label": round(agree.height / consistent.height, 4) if consistent.height else None,
    }
    return StageOutput(kept, pl.concat(dropped, how="diagonal_relaxed"), metrics)
