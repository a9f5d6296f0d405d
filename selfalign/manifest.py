"""What `manifest.json` holds: the typed record of one run, written by the runner and read by everyone else.

The runner builds it (`runner.build_manifest`, the only place): while the run goes (a `kind: publish` stage
pushes the manifest so far, status "running") and at the end. Card, report, plots, publish and inspect read these types
with plain `manifest["key"]`: every key below is always written. `read_manifest` in rundir.py reads one back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from typing_extensions import NotRequired

if TYPE_CHECKING:
    import polars as pl

# complete: every stage ran. stopped: the failure budget or a refusing endpoint stopped it (exit 4). budget: a
# budget cap (exit 5). calibration_failed: a stage's judge disagreed with the human labels (exit 6). running: the
# manifest so far, as a publish stage pushes it. error/killed are attempt statuses (cache.py) only.
RunStatus = Literal["complete", "stopped", "budget", "calibration_failed", "running"]


class CallCounts(TypedDict):
    requested: int   # calls the stage asked for (samples included)
    cached: int      # served from cache.sqlite
    sent: int        # sent to the backend in this attempt
    failed: int      # answered with an error or an invalid reply after every try


class Tokens(TypedDict):
    prompt: int
    completion: int


# One stage of the funnel (`manifest["rows"]`). Functional syntax because `in` is a Python keyword; the keys
# are the ones manifests have always had, so scripts reading manifest.json keep working.
StageEntry = TypedDict("StageEntry", {
    "stage": int,                          # index in the pipeline
    "kind": str,
    "in": int,                             # rows in (for the first stage: rows read)
    "out": int,                            # rows kept
    "dropped": int,
    "drop_reasons": dict[str, int],
    "seconds": float,
    "agreement_with_human": float | None,  # metrics.agreement_with_human; None without human pairs + critiques
    "metrics": dict[str, Any],             # what the stage reports (its own keys)
    "model_calls": CallCounts,
    "tokens": Tokens,
})


class ModelEntry(TypedDict):
    identity: dict[str, Any]            # `backend` and `model` (+ endpoint/model path); never a secret
    calls: dict[str, float]             # calls.CallStats.as_dict(): counts, tokens and `seconds`


class Attempt(TypedDict):
    """One `selfalign run` of this directory (cache.py's attempts table), killed ones included."""

    id: int
    started: str | None
    ended: str | None
    sent: int
    unanswered: int
    status: str


class DatasetSummary(TypedDict):
    rows: int
    sources: dict[str, int]
    length_bias_chosen_longer: dict[str, float]
    score_histograms: dict[str, dict[str, int]]
    agreement_with_human: float | None


class Manifest(TypedDict):
    name: str
    pipeline_file: str
    config_sha256: str
    selfalign_version: str
    packages: dict[str, str]
    limit: int | None
    overrides: list[str]
    started: str                        # local time the run started, %Y-%m-%dT%H:%M:%S
    seconds: float                      # wall time of this attempt so far
    rows: list[StageEntry]              # the funnel, one entry per stage that finished
    rows_out: int                       # rows the last stage kept
    dataset: DatasetSummary
    model_calls: CallCounts
    tokens: Tokens
    models: dict[str, ModelEntry]
    templates: dict[str, str]           # template path as written in the YAML -> sha256 of its text
    attempts: list[Attempt]
    calls_sent_all_attempts: int
    status: RunStatus
    error: NotRequired[str]             # only when the run stopped (stopped, budget, calibration_failed): why
    calibration: NotRequired[dict[str, Any]]  # only with calibration_failed: the numbers (calibration.summarize)


@dataclass
class RunContents:
    """A run as publishing reads it: its manifest, its final rows and the pipeline it ran. Made by
    `rundir.load_run` for a finished run directory, and by the publish stage for the run it is part of."""

    run_dir: Path
    manifest: Manifest
    frame: pl.DataFrame                      # the final rows (canonical columns)
    pipeline_text: str | None = None         # the YAML text, for the card
    pipeline_file: str | None = None
    pipeline_matches_run: bool | None = None  # whether that file alone gives the run's config (None: unknown)
    loaded: Any = None                       # config.LoadedPipeline when the YAML loads, else None
    test_row_ids: set[str] | None = None     # the test split the run's export stage made, if any

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def stages(self) -> list[Any] | None:
        return self.loaded.pipeline.stages if self.loaded is not None else None
