"""The pipeline YAML of the tests that run or check a small pipeline on the fake backend.

`fake_pipeline_yaml` writes the text a person would write: block style, one option a line, in the order given.
So the line numbers are fixed (line 4 is the first model, line 5 says `stages:`, stage 0 starts on line 6 when
there is one model) and a test can `str.replace` one line, e.g. `"    samples: 2"`, to make a mistake.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import yaml

# The stages several tests run after their load: two critiques per answer, the consistency check, the export.
CRITIQUE_CONSISTENCY_EXPORT = (
    {"kind": "critique", "model": "critic", "samples": 2},
    {"kind": "consistency"},
    {"kind": "export"},
)


def load_hh_rlhf(path: str | Path) -> dict:
    """The load stage of an HH-RLHF file: a row that holds no preference pair goes to dropped/, not an error."""
    return {"kind": "load", "path": path, "format": "hh-rlhf", "on_bad_row": "drop"}


def fake_pipeline_yaml(name: str, stages: Sequence[dict], *, models: Sequence[str] = ("critic",),
                       latency_s: float | None = None) -> str:
    """A pipeline named `name` whose `models` all use the fake backend (each `latency_s` seconds a reply when
    given), running `stages` (each a dict of its YAML options, `kind` first). No models: no `models:` section."""
    model_options = {"backend": "fake", **({"latency_s": latency_s} if latency_s is not None else {})}
    lines = ["schema_version: 1", f"name: {name}"]
    if models:
        lines.append("models:")
        lines += [f"  {model}: {_flow(model_options)}" for model in models]
    lines.append("stages:")
    for stage in stages:
        for number, (key, value) in enumerate(stage.items()):
            lines.append(f"{'  - ' if number == 0 else '    '}{key}: {_flow(value)}")
    return "\n".join(lines) + "\n"


def _flow(value) -> str:
    """`value` as YAML on one line: lists and mappings in flow style, strings plain where YAML reads them back
    as the same string (a path, a word), else double-quoted (a SQL condition like `margin >= 2`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flow(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_flow(item)}" for key, item in value.items()) + "}"
    text = str(value) if isinstance(value, Path) else value
    if re.fullmatch(r"[\w./-]+", text) and yaml.safe_load(text) == text:
        return text
    return json.dumps(text)
