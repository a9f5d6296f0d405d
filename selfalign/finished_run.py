"""A finished run as export, push and evaluate read it: its manifest and final rows (through rundir.py) plus the
pipeline it ran, loaded again from the YAML copy in the run directory."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from .config import config_hash, load_pipeline
from .errors import PublishError
from .manifest import Manifest, RunContents
from .rundir import EXPORT, PIPELINE_COPY, check_run_dir, read_manifest, stage_path


def _pipeline_source(run_dir: Path, manifest: Manifest) -> tuple[Path | None, str | None]:
    """The YAML the run used: its copy in the run directory, else the file the manifest names."""
    for path in (run_dir / PIPELINE_COPY, Path(manifest["pipeline_file"])):
        try:
            return path, path.read_text(encoding="utf-8")
        except OSError:
            continue
    return None, None


def _exported_test_ids(run_dir: Path, manifest: Manifest) -> set[str] | None:
    """Row ids of the test split an export stage wrote (export/<format>/test.parquet), if any."""
    for entry in manifest["rows"]:
        for name in entry["metrics"].get("exported", {}):  # stage metrics are the stage's own keys
            try:
                frame = pl.read_parquet(run_dir / EXPORT / name / "test.parquet", columns=["row_id"])
            except Exception:  # noqa: BLE001 - missing file or no row_id: try the next format
                continue
            return set(frame["row_id"].to_list())
    return None


def load_run(run_dir: str | Path) -> RunContents:
    """A finished run, to export or push: PublishError with the fix when it is not one."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir, need_manifest=False)  # a directory that is a run and is not being written
    manifest = read_manifest(run_dir)
    funnel = manifest["rows"]
    if manifest["status"] != "complete" or not funnel:
        raise PublishError(f"{run_dir}: the run is not complete (status {manifest['status']!r}); re-run "
                           "`selfalign run PIPELINE.yaml` to finish it")
    final = stage_path(run_dir, funnel[-1]["stage"], funnel[-1]["kind"])
    try:
        frame = pl.read_parquet(final)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise PublishError(f"{final} cannot be read ({exc}); re-run the pipeline to rewrite it") from None
    run = RunContents(run_dir, manifest, frame, pipeline_file=manifest["pipeline_file"])
    path, text = _pipeline_source(run_dir, manifest)
    if text is not None:
        run.pipeline_text, run.pipeline_file = text, str(path)
        try:
            run.loaded = load_pipeline(path)
            run.pipeline_matches_run = config_hash(run.loaded) == manifest["config_sha256"]
        except Exception:  # noqa: BLE001 - the card then shows the YAML text only
            run.loaded = None
    run.test_row_ids = _exported_test_ids(run_dir, manifest)
    return run
