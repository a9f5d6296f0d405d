"""The dataset card and the report draw scores with the same plot functions and count agreement with the human
labels the same way, on one small fake-backend Critic-RM run."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from selfalign import metrics, plots
from selfalign.config import load_pipeline
from selfalign.finished_run import load_run
from selfalign.publish import write_card
from selfalign.report import write_report
from selfalign.runner import run_pipeline
from tests.support.fake_pipeline import CRITIQUE_CONSISTENCY_EXPORT, fake_pipeline_yaml


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from tests.conftest import HH_DATA

    if not HH_DATA.exists():
        pytest.fail(f"{HH_DATA} is missing: the tests need ../shared/data beside the project (CI has it)")
    folder = tmp_path_factory.mktemp("card_plots")
    pipeline = folder / "pipeline.yaml"
    load = {"kind": "load", "path": HH_DATA, "format": "hh-rlhf", "on_bad_row": "drop"}
    pipeline.write_text(fake_pipeline_yaml("card-plots", [load, *CRITIQUE_CONSISTENCY_EXPORT]))
    run_pipeline(load_pipeline(pipeline), output=folder / "run", limit=40, quiet=True)
    return folder / "run"


def test_the_cards_score_histogram_is_the_reports_png(run_dir, tmp_path):
    write_report(run_dir)
    write_card(load_run(run_dir), tmp_path / "card")
    card_png = (tmp_path / "card" / "assets" / "scores.png").read_bytes()
    assert card_png.startswith(b"\x89PNG")
    assert card_png == (run_dir / "report" / "scores.png").read_bytes()
    assert (tmp_path / "card" / "assets" / "margin.png").read_bytes().startswith(b"\x89PNG")


def test_one_agreement_computation_for_manifest_and_report(run_dir):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    critique = pl.read_parquet(run_dir / "stages" / "01-critique.parquet")
    verdicts = metrics.human_verdicts(critique)
    assert sum(verdicts.values()) == critique.height and set(verdicts) == set(metrics.VERDICTS)
    # The consistency filter drops exactly the pairs whose critiques tie or contradict the label.
    consistency = manifest["rows"][2]
    assert verdicts["tied"] == consistency["drop_reasons"].get("scores_tied", 0)
    assert verdicts["disagrees"] == consistency["drop_reasons"].get("scores_contradict_label", 0)
    assert verdicts["agrees"] == consistency["out"] > 0
    share = metrics.agreement_with_human(critique)
    assert share == round(verdicts["agrees"] / critique.height, 4) == manifest["rows"][1]["agreement_with_human"]
    table = plots.agreement_table([(1, "critique", critique, None)])
    assert table.row(0, named=True) == {"stage": 1, "kind": "critique", "human_rows": critique.height,
                                        **verdicts, "agreement": share}
