"""The stage vocabulary: `kind:` in the YAML -> the stage that runs it. One module per stage, one row here.

To add a stage:
1. Write `stages/<kind>.py` with a config class (a `StageConfig`, or `ModelStageConfig` when it calls a model,
   with `kind: Literal["<kind>"]` and a `description=` on every field: `selfalign schema` prints them) and
   `run(df, config, ctx: StageContext) -> StageOutput` (see base.py). Declare the columns it reads and writes
   (`needs()`/`adds()`) so that `selfalign validate` checks the chain before any model call.
2. A model stage builds its requests in `build_requests(df, config, ctx)` and calls the model through
   `model_calls.py` (sampling config, critique struct, the failure record of a call that failed).
3. Add one row below. The YAML union (config.py), `validate`, `schema` and `render` all read this table.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from . import consistency, critique, export, feedback, filter, generate, judge, load, mix, pair, publish, refine
from . import decontaminate, dedupe, evaluate
from .base import StageConfig


class Stage(NamedTuple):
    config: type[StageConfig]
    run: Callable
    # A model stage's request builder (`selfalign render` shows its prompts); None for stages without a model.
    build_requests: Callable | None = None


STAGES: dict[str, Stage] = {
    "load": Stage(load.LoadConfig, load.run),
    "generate": Stage(generate.GenerateConfig, generate.run, generate.build_requests),
    "critique": Stage(critique.CritiqueConfig, critique.run, critique.build_requests),
    "judge": Stage(judge.JudgeConfig, judge.run, judge.build_requests),
    "consistency": Stage(consistency.ConsistencyConfig, consistency.run),
    "refine": Stage(refine.RefineConfig, refine.run, refine.build_requests),
    "pair": Stage(pair.PairConfig, pair.run),
    "feedback": Stage(feedback.FeedbackConfig, feedback.run, feedback.build_requests),
    "filter": Stage(filter.FilterConfig, filter.run),
    "decontaminate": Stage(decontaminate.DecontaminateConfig, decontaminate.run),
    "dedupe": Stage(dedupe.DedupeConfig, dedupe.run),
    "mix": Stage(mix.MixConfig, mix.run),
    "export": Stage(export.ExportConfig, export.run),
    "publish": Stage(publish.PublishConfig, publish.run),
    "evaluate": Stage(evaluate.EvaluateConfig, evaluate.run),
}


def model_stage_kinds() -> list[str]:
    """The kinds whose stages call a model (and have prompts to render)."""
    return [kind for kind, stage in STAGES.items() if stage.build_requests is not None]
