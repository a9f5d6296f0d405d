"""The run directory: the one module that names, locks and reads the files a run leaves.

```
outputs/<name>/
  pipeline.yaml          the YAML the run used, verbatim (--set overrides are in the manifest)
  manifest.json          what the run made and cost (types in manifest.py)
  cache.sqlite           every model reply and every attempt (cache.py)
  stages/NN-kind.parquet the rows each stage kept        dropped/NN-kind.parquet  the rows it dropped, with why
  reuse/NN-kind.json     a model stage's fingerprint, so a re-run can read it back (reuse.py)
  export/<format>/       trainer-format files (export stage)     dataset/  the same rows for load_from_disk
  report/                the HTML report and its PNGs (selfalign report)
  .lock                  held (flock) by the run writing the directory
```
Readers of a run (report, inspect, publish, evaluate) start at `check_run_dir` / `read_manifest` / `stage_files`
/ `stage_path` (finished_run.load_run adds the pipeline it ran); the runner writes through `stage_path` and holds
`RunLock`. Nothing here knows the pipeline schema, so any module may import it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
from pathlib import Path

from .errors import DISK_REASONS, RunError
from .manifest import Manifest, StageEntry

MANIFEST = "manifest.json"
PIPELINE_COPY = "pipeline.yaml"
CACHE = "cache.sqlite"
LOCK = ".lock"
STAGES = "stages"
DROPPED = "dropped"
REUSE = "reuse"
EXPORT = "export"
DATASET = "dataset"
REPORT = "report"

_STAGE_FILE = re.compile(r"^(\d+)-([a-z_]+)\.parquet$")


def stage_name(index: int, kind: str) -> str:
    """`02-consistency`: how stage files, drop files and reuse records of stage `index` are named."""
    return f"{index:02d}-{kind}"


def stage_path(run_dir: Path, index: int, kind: str, folder: str = STAGES) -> Path:
    """stages/NN-kind.parquet (or dropped/ with folder=DROPPED)."""
    return run_dir / folder / f"{stage_name(index, kind)}.parquet"


def stage_files(run_dir: Path, folder: str = STAGES) -> list[tuple[int, str, Path]]:
    """(index, kind, path) of every stage file in stages/ (or dropped/), by index."""
    found = []
    for path in sorted((run_dir / folder).glob("*.parquet")):
        match = _STAGE_FILE.match(path.name)
        if match:
            found.append((int(match.group(1)), match.group(2), path))
    return sorted(found)


# -- writing: the runner's side ----------------------------------------------------------------------------

class RunLock:
    """One run per directory. flock is released by the OS when a process dies, even by kill -9."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self.handle = None

    def __enter__(self) -> "RunLock":
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "unknown"
            self.handle.close()
            raise RunError(f"{self.path.parent} is in use by another selfalign run (PID {holder}); wait for it "
                           "to finish, stop it, or pass --output to use another directory") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(str(os.getpid()))
        self.handle.flush()
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def prepare_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        reason = {**DISK_REASONS, errno.EACCES: "permission denied"}.get(exc.errno, exc.strerror)
        raise RunError(f"cannot write the run directory {run_dir}: {reason}; free space, fix permissions or "
                       "pass --output DIR") from None


def remove_leftovers(run_dir: Path) -> None:
    """Temp files of a killed run (see atomic.py): never read, so safe to remove once we hold the lock."""
    for leftover in [*run_dir.rglob(".*.tmp"), *run_dir.rglob(".*.old")]:
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


# -- reading: a finished (or unfinished) run ---------------------------------------------------------------

def check_run_dir(run_dir: Path, need_manifest: bool = True) -> None:
    """RunError with the fix when run_dir is not a run directory, is still being written, or did not finish."""
    if not run_dir.is_dir():
        raise RunError(f"{run_dir} is not a run directory: no such run directory exists; run a pipeline first "
                       "(`selfalign run FILE`, which writes outputs/<name>/) or pass the --output DIR it used")
    if not (run_dir / STAGES).is_dir() and not (run_dir / MANIFEST).exists():
        raise RunError(f"{run_dir} is not a selfalign run directory (no stages/ and no manifest.json); pass the "
                       "directory `selfalign run` wrote, e.g. outputs/<pipeline name>")
    lock = run_dir / LOCK
    if lock.exists():
        with open(lock) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = handle.read().strip() or "unknown"
                raise RunError(f"{run_dir} is being written by a running `selfalign run` (PID {holder}); wait for "
                               "it to finish, then try again") from None
            fcntl.flock(handle, fcntl.LOCK_UN)
    if not need_manifest:
        return
    status = read_manifest(run_dir)["status"]
    if status != "complete":
        raise RunError(f"{run_dir}: the run is not complete (manifest status {status!r}); re-run the same "
                       "`selfalign run` command to finish it")


def read_manifest(run_dir: Path) -> Manifest:
    """manifest.json as the runner wrote it; RunError with the fix when it is missing or unreadable."""
    path = run_dir / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{run_dir} has no manifest.json: the run has not finished; run `selfalign run` again with "
                       "the same pipeline and options (a run that did not finish re-runs only what is missing: "
                       "the rest comes from its cache), then try again") from None
    except (OSError, ValueError) as exc:
        raise RunError(f"{path} cannot be read ({exc}); re-run the same `selfalign run` command to rewrite "
                       "it") from None


def funnel_from_files(run_dir: Path, stages: list, start: int = 0) -> list[StageEntry]:
    """Funnel entries recounted from the stage files of `stages` (numbered from `start`), for a stage run on
    its own after them. Counts only: what the files say (no timings, calls or stage metrics, which are zero);
    stops at the first stage whose files are missing."""
    import polars as pl  # here: `selfalign --help` and the lock check do not pay for polars

    from .metrics import agreement_with_human

    entries: list[StageEntry] = []
    for number, stage in enumerate(stages, start):
        try:
            kept = pl.read_parquet(stage_path(run_dir, number, stage.kind))
            dropped = pl.read_parquet(stage_path(run_dir, number, stage.kind, DROPPED))
        except (OSError, pl.exceptions.PolarsError):
            break
        reasons = (dict(dropped.group_by("drop_reason").len().sort("drop_reason").rows())
                   if dropped.height and "drop_reason" in dropped.columns else {})
        entries.append({"stage": number, "kind": stage.kind, "in": kept.height + dropped.height, "out": kept.height,
                        "dropped": dropped.height, "drop_reasons": reasons, "seconds": 0.0,
                        "agreement_with_human": agreement_with_human(kept), "metrics": {},
                        "model_calls": {"requested": 0, "cached": 0, "sent": 0, "failed": 0},
                        "tokens": {"prompt": 0, "completion": 0}})
    return entries

