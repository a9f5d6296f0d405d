"""The stage vocabulary: one module per stage, one literal dict from `kind` to (config class, run function)."""

from __future__ import annotations

from . import consistency, critique, export, filter, load

STAGES = {
    "load": (load.LoadConfig, load.run),
    "critique": (critique.CritiqueConfig, critique.run),
    "consistency": (consistency.ConsistencyConfig, consistency.run),
    "filter": (filter.FilterConfig, filter.run),
    "export": (export.ExportConfig, export.run),
}

# Stages that call a model, and the function that builds their requests (for `selfalign render`).
REQUEST_BUILDERS = {
    "critique": critique.build_requests,
}
