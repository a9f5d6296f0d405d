"""The stage vocabulary: one module per stage, one literal dict from `kind` to (config class, run function)."""

from __future__ import annotations

from . import (consistency, critique, evaluate, export, feedback, filter, generate, judge, load, mix, pair, publish,
               refine)

STAGES = {
    "load": (load.LoadConfig, load.run),
    "generate": (generate.GenerateConfig, generate.run),
    "critique": (critique.CritiqueConfig, critique.run),
    "judge": (judge.JudgeConfig, judge.run),
    "consistency": (consistency.ConsistencyConfig, consistency.run),
    "refine": (refine.RefineConfig, refine.run),
    "pair": (pair.PairConfig, pair.run),
    "feedback": (feedback.FeedbackConfig, feedback.run),
    "filter": (filter.FilterConfig, filter.run),
    "mix": (mix.MixConfig, mix.run),
    "export": (export.ExportConfig, export.run),
    "publish": (publish.PublishConfig, publish.run),
    "evaluate": (evaluate.EvaluateConfig, evaluate.run),
}

# Stages that call a model, and the function that builds their requests (for `selfalign render`).
REQUEST_BUILDERS = {
    "generate": generate.build_requests,
    "critique": critique.build_requests,
    "judge": judge.build_requests,
    "refine": refine.build_requests,
    "feedback": feedback.build_requests,
}
