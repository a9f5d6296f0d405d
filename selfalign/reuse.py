"""Stage reuse on a re-run: a model stage whose inputs did not change is read back from its parquet files.

Given the replies in the cache, a model stage's rows are determined by its input rows, its config, the
text of its prompt templates and the identity of its model. After writing a model stage's `stages/` and
`dropped/` parquet files, the runner writes `reuse/<stage>.json`: a fingerprint of these, the calls the
stage made and how many failed. The record is removed before the parquet files are rewritten, so a run
killed in between leaves no record that could describe other files. On a re-run, when the record holds
the current fingerprint and no failed call, the stage is read back instead of re-building, re-hashing and
re-validating every request. A stage that had a failed call is always recomputed, so its failed rows are
asked again (the others come from the cache).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from . import __version__
from .atomic import write_json
from .cache import canonical_json
from .fingerprint import frame_fingerprint
from .rundir import DROPPED, REUSE, STAGES
from .stages.base import StageConfig, StageContext, StageOutput


@dataclass
class StoredStage:
    output: StageOutput
    requested: dict[str, int]  # model name -> calls the stage made when it was computed


def is_model_stage(stage: StageConfig) -> bool:
    return bool(stage.model_names())


def stage_fingerprint(ctx: StageContext, stage: StageConfig, df: pl.DataFrame) -> str:
    templates = {field: ctx.template(path).sha256 for field, (path, _) in stage.templates().items() if path}
    models = {name: ctx.client(name).identity for name in stage.model_names()}
    parts = {"selfalign": __version__, "config": stage.model_dump(mode="json"), "templates": templates,
             "models": models, "input": frame_fingerprint(df)}
    return hashlib.sha256(canonical_json(parts).encode()).hexdigest()


def record_path(run_dir: Path, name: str) -> Path:
    return run_dir / REUSE / f"{name}.json"


def forget(run_dir: Path, name: str) -> None:
    record_path(run_dir, name).unlink(missing_ok=True)


def remember(run_dir: Path, name: str, fingerprint: str, requested: dict[str, int], failed: int,
             metrics: dict[str, Any]) -> None:
    write_json({"fingerprint": fingerprint, "requested": requested, "failed": failed, "metrics": metrics},
               record_path(run_dir, name))


def read_stored(run_dir: Path, name: str, fingerprint: str) -> StoredStage | None:
    """The stage's stored output when its record holds `fingerprint` and no failed call."""
    try:
        record = json.loads(record_path(run_dir, name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != fingerprint or record.get("failed") != 0:
        return None
    try:
        kept = pl.read_parquet(run_dir / STAGES / f"{name}.parquet")
        dropped = pl.read_parquet(run_dir / DROPPED / f"{name}.parquet")
    except (OSError, pl.exceptions.PolarsError):
        return None
    return StoredStage(StageOutput(kept, dropped, record["metrics"]), record["requested"])
