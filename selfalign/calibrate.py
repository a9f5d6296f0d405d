"""Run a stage's calibration before the stage: its own prompt and model on held-out human-labelled pairs.

The runner calls `before_stage` for a critique or judge stage with `calibrate:`. The pairs are a seeded sample
of the stage's human-labelled input rows (`rows:`), or of a labelled dataset (`path:`/`hf:`, read by the load
stage's own code). Their requests are built by the stage's own request builder and sent through the same
cached client, so for input rows they are the very calls (same cache keys) the stage makes next: the stage
finds them in the cache and calibrating costs nothing extra. The verdict for each pair is written to
`calibration/NN-kind.parquet`; the numbers (calibration.py) go into the stage's metrics. Below `min_agreement`
the run stops with CalibrationFailed (exit 6) before the stage sends anything else.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import polars as pl

from .atomic import write_parquet
from .calibration import CHOSEN, FAILED, PAIR_SCHEMA, REJECTED, TIE, describe, failure_message, passed, summarize
from .calls import json_parser
from .errors import CalibrationFailed, ConfigError, DataError
from .stages import consistency, critique, judge, load


@dataclass
class _ReadAll:
    """What the load stage uses of a run context, to read a calibration dataset whole (no --limit)."""

    resolve: Callable[[str], Path]
    limit: int | None = None


def _critique_pairs(pairs: pl.DataFrame, stage: critique.CritiqueConfig, ctx) -> pl.DataFrame:
    """Scores through the critique stage itself (both answers of each pair), each pair's verdict by the
    consistency stage's rule: the mean critique scores order the pair, equal means are a tie."""
    both = stage.model_copy(update={"targets": ["chosen", "rejected"]})
    output = critique.run(pairs, both, ctx)
    rule = consistency.ConsistencyConfig(kind="consistency")
    verdicts: dict[str, dict[str, Any]] = {}
    for row_id, chosen, rejected in output.kept.select("row_id", "chosen_critiques", "rejected_critiques").iter_rows():
        reason, _, _ = consistency.judge_pair(chosen, rejected, rule)
        prefers = {"scores_tied": TIE, "scores_contradict_label": REJECTED}.get(reason, CHOSEN)
        verdicts[row_id] = {"prefers": prefers, "chosen_score": _mean(chosen), "rejected_score": _mean(rejected)}
    for row_id, error in output.dropped.select("row_id", "error").iter_rows():
        verdicts[row_id] = {"prefers": FAILED, "error": error}
    return _frame(pairs, [verdicts[row_id] for row_id in pairs["row_id"]])


def _mean(critiques: list[dict[str, Any]]) -> float:
    return sum(c["score"] for c in critiques) / len(critiques)


def _judge_pairs(pairs: pl.DataFrame, stage: judge.JudgeConfig, ctx) -> pl.DataFrame:
    """Both orders of each pair through the judge stage's own requests; the verdict by its own rule."""
    results = ctx.client(stage.model).run(judge.build_requests(pairs, stage, ctx), json_parser(judge.Verdict),
                                          label=f"calibrate judge ({stage.model})", max_attempts=stage.max_attempts)
    verdicts = []
    for row in range(pairs.height):
        first, second = results[2 * row], results[2 * row + 1]
        bad = first if not first.ok else second if not second.ok else None
        if bad is not None:
            verdicts.append({"prefers": FAILED, "error": bad.error})
            continue
        winners = first.value["winner"], second.value["winner"]
        verdicts.append({"prefers": judge.pair_verdict(*winners), "winner_order_1": winners[0],
                         "winner_order_2": winners[1]})
    return _frame(pairs, verdicts)


CALIBRATORS = {"critique": (_critique_pairs, False), "judge": (_judge_pairs, True)}  # kind -> (run, pairwise)


PAIR_COLUMNS = ("row_id", "prompt", "chosen", "rejected")  # from the pairs; the other PAIR_SCHEMA columns: verdicts


def _frame(pairs: pl.DataFrame, verdicts: list[dict[str, Any]]) -> pl.DataFrame:
    schema = {name: dtype for name, dtype in PAIR_SCHEMA.items() if name not in PAIR_COLUMNS}
    columns = pl.DataFrame({name: [v.get(name) for v in verdicts] for name in schema}, schema=schema)
    return pl.concat([pairs.select(PAIR_COLUMNS), columns], how="horizontal")


def read_dataset(config, resolve: Callable[[str], Path]):
    """The `path:`/`hf:` calibration dataset, read whole by the load stage (a StageOutput: kept and dropped rows)."""
    reader = load.LoadConfig(kind="load", path=config.path, hf=config.hf, split=config.split, format=config.format,
                             on_bad_row=config.on_bad_row)
    return load.run(pl.DataFrame(), reader, _ReadAll(resolve))


def _labelled_rows(ctx, index: int, stage, df: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """The calibration pairs: a seeded sample of `rows` human-labelled rows of the input or the named dataset;
    and how many rows of the dataset could not be read (left out with on_bad_row: drop)."""
    config = stage.calibrate
    unreadable = 0
    if config.path is not None or config.hf is not None:
        dataset = read_dataset(config, ctx.resolve)
        source, unreadable = dataset.kept, dataset.dropped.height
        where = config.source()
    else:
        # Only a person's label calibrates: rows a model labelled (a pair or mix stage's) do not count.
        source = df.filter(pl.col("source") == "human") if "source" in df.columns else df
        where = "human-labelled rows in the stage's input" + (f" (with --limit {ctx.limit})" if ctx.limit else "")
    wanted = config.rows if config.rows is not None else source.height
    if wanted > source.height:
        place = ctx.loaded.place("stages", index, "calibrate", "rows")
        raise ConfigError(f"asks for {wanted} pairs, but there are only {source.height} {where}; lower "
                          "calibrate.rows, or calibrate on a labelled dataset (calibrate: {path: FILE, format: "
                          "hh-rlhf})", **place, stage=index, kind=stage.kind, field="calibrate.rows")
    picked = sorted(random.Random(ctx.loaded.pipeline.seed).sample(range(source.height), wanted))
    return source[picked], unreadable


def _calls(ctx, model: str) -> dict[str, int]:
    stats = ctx.client(model).stats
    return {"requested": stats.requested, "cached": stats.cached, "sent": stats.sent, "failed": stats.failed}


def before_stage(ctx, index: int, stage, df: pl.DataFrame) -> dict[str, Any] | None:
    """Calibrate `stage` (a no-op without `calibrate:`, and for `render`, which sends no calls); return the
    numbers for its metrics, or raise CalibrationFailed when agreement is below `min_agreement`."""
    config = getattr(stage, "calibrate", None)
    if config is None or ctx.offline:
        return None
    pairs, unreadable = _labelled_rows(ctx, index, stage, df)
    ctx.progress.log(f"stage {index} ({stage.kind}): calibrating on {pairs.height} human-labelled pairs "
                     f"({config.source()})")
    calibrate_pairs, pairwise = CALIBRATORS[stage.kind]
    before = _calls(ctx, stage.model)
    judged = calibrate_pairs(pairs, stage, ctx)
    after = _calls(ctx, stage.model)
    name = f"{index:02d}-{stage.kind}"
    write_parquet(judged, ctx.run_dir / "calibration" / f"{name}.parquet")
    summary = {"stage": index, "kind": stage.kind, "source": config.source(),
               **summarize(judged, pairwise, ctx.loaded.pipeline.seed),
               "unreadable_rows": unreadable, "min_agreement": config.min_agreement, "passed": None,
               "model_calls": {key: after[key] - before[key] for key in after},
               "file": f"calibration/{name}.parquet"}
    summary["passed"] = passed(summary, config.min_agreement)
    ctx.progress.log(f"stage {index} ({stage.kind}): calibration on {summary['pairs']} pairs: {describe(summary)}")
    if not summary["passed"]:
        from_input = config.path is None and config.hf is None
        remaining = (f"the calls for its other {df.height - pairs.height} rows" if from_input
                     else f"any call for its {df.height} rows")
        message = failure_message(index, stage, summary, remaining, str(ctx.run_dir / summary["file"]))
        raise CalibrationFailed(message, summary)
    return summary


# -- selfalign validate -----------------------------------------------------------------------------------------


def check(loaded, index: int, stage, columns: set[str], resolve: Callable[[str], Path]) -> list[ConfigError]:
    """Problems with a stage's `calibrate:` that can be found before the run: where its pairs come from, whether
    they carry a person's label, and whether there are `rows` of them (in a local file; the run checks the rest)."""
    config = stage.calibrate
    stages = loaded.pipeline.stages
    errors: list[ConfigError] = []

    def error(message: str, field: str) -> None:
        place = loaded.place("stages", index, "calibrate", field)
        errors.append(ConfigError(message, **place, stage=index, kind=stage.kind, field=f"calibrate.{field}"))

    if config.path is not None:
        path = resolve(config.path)
        if not path.is_file():
            error(f"file {config.path!r} not found (looked in the current directory and beside the pipeline); fix "
                  "the path", "path")
            return errors
        # Read now as the run will (a calibration set is small), so a bad row fails here and not mid-run.
        try:
            counted = read_dataset(config, resolve).kept.height
        except DataError as exc:
            error(f"{exc}; fix the data, or leave such rows out with on_bad_row: drop", "path")
            return errors
        if config.rows is not None and counted < config.rows:
            error(f"asks for {config.rows} pairs, but {config.path} has only {counted} readable pairs; lower rows",
                  "rows")
        return errors
    if config.hf is not None:
        return errors  # read when the stage runs (a Hub dataset is not downloaded to validate)
    # Pairs from the stage's input: they must be there, and labelled by a person (the load stage), not a model.
    missing = {"chosen", "rejected"} - columns - stage.needs()  # a missing column the stage needs is reported anyway
    if missing:
        error(f"calibrating on input rows needs human-labelled pairs, but the stage's input has no "
              f"{', '.join(sorted(missing))} column (available: {', '.join(sorted(columns)) or 'none'}); calibrate on "
              "a labelled dataset instead: calibrate: {path: FILE, format: hh-rlhf, rows: 50}", "rows")
        return errors
    maker = next((i for i in range(index - 1, -1, -1) if "chosen" in stages[i].adds()), None)
    if maker is not None and stages[maker].kind != "load":
        error(f"the input's chosen/rejected come from stage {maker} ({stages[maker].kind}), labelled by a model, not "
              "a person; calibrate on a labelled dataset instead: calibrate: {path: FILE, format: hh-rlhf, rows: 50}",
              "rows")
        return errors
    if stage.kind == "critique" and not {"chosen", "rejected"} <= set(stage.targets):
        error(f"calibration scores both answers of each pair, but the stage's targets are {stage.targets}, so the "
              "calibration calls would not be the stage's own; set targets: [chosen, rejected], or calibrate on a "
              "labelled dataset (path:)", "rows")
        return errors
    first = stages[0]
    if first.kind == "load" and first.path is not None and resolve(first.path).is_file():
        counted = _count_rows(resolve(first.path), config.rows)
        if counted is not None and counted < config.rows:
            error(f"asks for {config.rows} pairs, but the input ({first.path}) has only {counted} rows; lower rows",
                  "rows")
    return errors


def _count_rows(path: Path, enough: int | None) -> int | None:
    """Rows in a data file, counting no further than `enough`; None when it cannot be read (the stage that reads
    it reports why)."""
    count = 0
    try:
        for _ in load._read_rows(path):
            count += 1
            if enough is not None and count >= enough:
                break
    except DataError:
        return None
    return count
