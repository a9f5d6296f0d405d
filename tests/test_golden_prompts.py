"""Golden files: the exact messages (and reply schema) every prompt template sends, in every ready pipeline.

Each case runs a shipped pipeline on its own shipped data with the fake backend (deterministic replies, so
later stages see the same earlier critiques every time), then renders row 0 of each model stage with
`selfalign render` (earlier stages served from the run's cache) and compares the text with
`tests/golden/<case>.stage<N>-<kind>.txt`. A prompt edit shows up here as a diff to review.

After a deliberate prompt change, regenerate with:  SELFALIGN_UPDATE_GOLDEN=1 python -m pytest tests/test_golden_prompts.py
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

import pytest

from selfalign.config import load_pipeline
from selfalign.render import render
from selfalign.runner import run_pipeline
from selfalign.stages import model_stage_kinds
from tests.support.fake_pipeline import fake_pipeline_yaml

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("SELFALIGN_UPDATE_GOLDEN") == "1"

# A pairwise judge is not part of a ready pipeline: this one judges the quickstart pairs in both orders.
JUDGE_PIPELINE = fake_pipeline_yaml("judge_golden", [
    {"kind": "load", "path": ROOT / "pipelines" / "data" / "quickstart_pairs.jsonl", "format": "trl"},
    {"kind": "judge", "model": "judge"},
    {"kind": "export", "formats": ["trl"]},
], models=("judge",))

# (case name, pipeline file, extra overrides). Together they use every template in prompts/.
CASES = [
    ("quickstart", "pipelines/quickstart.yaml", []),
    ("critic_rm", "pipelines/critic_rm.yaml", []),
    ("critic_rm_rank", "pipelines/critic_rm.yaml", ["stages.3.method=rank"]),
    ("self_rewarding", "pipelines/self_rewarding.yaml", []),
    ("rubric_story", "pipelines/rubric_story.yaml", []),
    ("ultrafeedback", "pipelines/ultrafeedback.yaml", []),
    ("feedback_to_reward", "pipelines/feedback_to_reward.yaml", []),
    ("judge", None, []),
]


def fake_models(path: Path) -> list[str]:
    return [f"models.{name}.backend=fake" for name in load_pipeline(path).pipeline.models]


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / f"{name}.txt"
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    assert path.exists(), f"{path} is missing; create it with SELFALIGN_UPDATE_GOLDEN=1 and review it"
    expected = path.read_text(encoding="utf-8")
    if text != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True),
                                            f"golden/{path.name}", "rendered now"))
        pytest.fail(f"the rendered prompt differs from {path} (if the change is deliberate, regenerate with "
                    f"SELFALIGN_UPDATE_GOLDEN=1 and review the diff):\n{diff[:6000]}")


@pytest.mark.parametrize("case,pipeline,extra", CASES, ids=[c[0] for c in CASES])
def test_rendered_prompts_match_golden_files(case, pipeline, extra, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the pipelines name their data and prompts relative to the project
    if pipeline is None:
        path = tmp_path / "judge.yaml"
        path.write_text(JUDGE_PIPELINE)
    else:
        path = ROOT / pipeline
    overrides = fake_models(path) + extra
    run_dir = tmp_path / "run"
    run_pipeline(load_pipeline(path, overrides), output=run_dir, quiet=True)
    stages = load_pipeline(path, overrides).pipeline.stages
    model_stages = [i for i, stage in enumerate(stages) if stage.kind in model_stage_kinds()]
    assert model_stages, f"{case}: no model stage to render"
    for index in model_stages:
        text = render(str(path), index, 0, overrides=overrides, output=str(run_dir))
        # The run directory is a temp path; nothing else in a rendered prompt may vary between runs.
        check_golden(f"{case}.stage{index}-{stages[index].kind}", text + "\n")


def test_every_prompt_template_has_a_golden_file():
    """Adding a template without a golden case fails here, not silently."""
    rendered = "\n".join(path.read_text(encoding="utf-8") for path in GOLDEN.glob("*.txt"))
    for template in sorted((ROOT / "prompts").glob("*.jinja")):
        # Every template's first line of static text (outside Jinja comments, tags and expressions)
        # appears in some golden file.
        source = re.sub(r"\{#.*?#\}|\{%.*?%\}|\{\{.*?\}\}", "\n", template.read_text(encoding="utf-8"),
                        flags=re.DOTALL)
        lines = [line.strip() for line in source.splitlines() if len(line.strip()) > 20]
        assert lines, f"{template.name}: no static line to look for"
        assert lines[0] in rendered, f"{template.name} is not covered by any golden case in tests/golden/"
