"""Does the run's data make a better reward model? Arms, held-out human pairs, reward models, bootstrap.

The library behind `selfalign evaluate RUN_DIR` and the `evaluate` stage (stages/evaluate.py); both call
`evaluate_stages` on the frames each stage of the run kept and dropped.

- **Arms**: preference sets made from the run. `human`: the human pairs the load stage read. `synthetic`: the
  same kind of pairs labelled by the model itself, before any consistency filter (the first critique stage's
  mean scores, else the judge's verdicts, else the pair stage's best-vs-worst). `filtered`: the rows the first
  consistency (else judge) stage kept. `final`: the run's last rows (what export wrote). An arm the run cannot
  make is listed with the reason.
- **Held-out human pairs**: an `eval:` dataset, or the run's own split: the human prompts whose hash falls in
  the held-out share (the same hash export splits by, so export's test split is inside it). Every arm's
  training rows are made prompt-disjoint from them: rows sharing a prompt are removed and counted.
- **Same budget per arm**: each arm trains on the same number of pairs (`budget`, default the smallest arm's
  count), drawn anew for each of `seeds` seeds; a reward model is fitted per arm and seed and scores every
  held-out pair (correct when it rates the human-chosen answer higher; a tie counts half).
- **Intervals**: accuracy per arm is the mean over held-out pairs of each pair's correctness averaged over the
  seeds; its 95% interval comes from resampling the held-out pairs (percentile bootstrap). The differences
  `filtered - synthetic` and `final - human` resample the same pairs for both arms (paired bootstrap).

The arms and held-out pairs are made in evaluate_arms.py, the reward models are reward_probe.py and
reward_finetune.py, the tables and the plot are evaluate_view.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import polars as pl
from pydantic import Field, model_validator

from .config_base import Strict
from .embeddings import (EmbeddingConfig, EmbeddingSource, FeatureCache, FeatureStats, LlamaCppEmbedding,
                         embedder_for, features)
from .errors import ConfigError, SelfalignError
from .evaluate_arms import (Arm, EvalData, Pool, Stage, draw, make_arms, make_disjoint, own_split,
                            pairs_of, read_eval_data)
from .reward_finetune import FinetuneSettings
from .reward_probe import ProbeModel, ProbeSettings, correctness

DIFFERENCES = (("filtered", "synthetic"), ("final", "human"))
DEFAULT_HOLDOUT = 0.1
RESULT_FILE = "evaluate.json"
FEATURES_FILE = "features.sqlite"


class EvaluationError(SelfalignError):
    """The run cannot be evaluated as asked: says what is missing and what to do (exit 2)."""


# -- settings ------------------------------------------------------------------------------------------------

class EvaluateSettings(Strict):
    """What `selfalign evaluate` and the `evaluate` stage do; every field has a default but finetune's model."""

    eval: EvalData | None = Field(None, description="held-out human pairs; default: the run's own split")
    holdout: float | None = Field(None, gt=0, lt=1, description="without eval: the share of human prompts held out "
                                  "(by prompt hash); default: the export stage's test_size, else 0.1")
    reward_model: Literal["probe", "finetune"] = Field("probe", description="probe: logistic regression on frozen "
                                                       "embeddings (CPU); finetune: TRL RewardTrainer")
    embedding: EmbeddingConfig = Field(default_factory=LlamaCppEmbedding,
                                       description="where the probe's features come from")
    probe: ProbeSettings = Field(default_factory=ProbeSettings, description="the probe's settings")
    finetune: FinetuneSettings | None = Field(None, description="the finetuned reward model's settings")
    budget: int | None = Field(None, ge=1, description="training pairs per arm; default: the smallest arm's count")
    seeds: int = Field(5, ge=1, le=1000, description="draws of the budget from each arm, one model each")
    bootstrap: int = Field(2000, ge=100, le=1_000_000, description="resamples of the held-out pairs")
    seed: int = Field(0, description="seeds the draws and the bootstrap")

    @model_validator(mode="after")
    def _finetune_needs_a_model(self):
        if self.reward_model == "finetune" and self.finetune is None:
            raise ValueError("reward_model: finetune needs `finetune: {model: FOLDER}` (a local model folder)")
        return self


# -- intervals --------------------------------------------------------------------------------------------

def bootstrap_interval(values: np.ndarray, resamples: np.ndarray) -> tuple[float, float]:
    """Percentile 95% interval of the mean of `values` (one per held-out pair) over the resampled index rows."""
    means = values[resamples].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def verdict(low: float, high: float) -> str:
    if low > 0:
        return "higher"
    if high < 0:
        return "lower"
    return "no clear difference (the interval holds 0)"


# -- the evaluation ---------------------------------------------------------------------------------------

@dataclass
class RunView:
    """What an evaluation reads of a run, from a finished run directory or from a pipeline still running."""

    name: str
    run_dir: Path
    stages: list[Stage]
    stage_configs: list[Any] | None       # the pipeline's validated stages, when known
    resolve: Callable[[str], Path] = Path
    state: dict[str, Any] | None = None   # run_state() of the rows evaluated


def _export_test_size(configs: list[Any] | None) -> float | None:
    export = next((s for s in configs or [] if getattr(s, "kind", None) == "export"), None)
    return export.test_size if export is not None and export.test_size > 0 else None


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def _error(message: str, place: dict[str, Any] | None) -> SelfalignError:
    return ConfigError(message, **place) if place else EvaluationError(message)


def run_state(config_sha256: str | None, rows_out: int) -> dict[str, Any]:
    """What the evaluation was made from, to tell a stale evaluate.json (the run was re-run since) from a current
    one: the pipeline's config hash and the run's final row count, as the manifest records them."""
    return {"config_sha256": config_sha256, "rows_out": rows_out}


def is_current(result: dict[str, Any], manifest: dict[str, Any]) -> bool:
    return result.get("run_state") == run_state(manifest.get("config_sha256"), manifest.get("rows_out"))


def held_out_pairs(view: RunView, settings: EvaluateSettings, human: pl.DataFrame | None,
                   place: dict[str, Any] | None) -> tuple[pl.DataFrame, dict[str, Any]]:
    """The held-out human pairs (the eval: dataset or the run's own split) and how they were chosen."""
    if settings.eval is not None:
        held_out, how = read_eval_data(settings.eval, view.resolve), {"kind": "eval", "name": settings.eval.describe()}
    else:
        if human is None:
            raise _error("this run has no human pairs to hold out; give `eval:` (held-out human preference pairs, "
                         "e.g. eval: {path: heldout.jsonl, format: hh-rlhf}, or --eval FILE --eval-format F)", place)
        holdout = settings.holdout or _export_test_size(view.stage_configs) or DEFAULT_HOLDOUT
        held_out = own_split(human, holdout)
        how = {"kind": "split", "holdout": holdout,
               "name": f"the run's own split: human prompts whose hash is below {holdout:g}"}
    held_out = pairs_of(held_out)
    if held_out.height == 0:
        fix = ("give `eval:` pairs with chosen and rejected answers" if settings.eval else
               f"none of the {human.height:,} human prompts hashes below {how['holdout']:g}; raise `holdout:` "
               "(e.g. --set holdout=0.3), read more rows, or give `eval:` with held-out pairs")
        raise _error(f"no held-out pairs ({how['name']}): {fix}", place)
    return held_out, how


def training_budget(pools: list[Pool], settings: EvaluateSettings, place: dict[str, Any] | None) \
        -> tuple[list[Pool], int]:
    """The pools that can train at one budget for all (`budget:`, else the smallest pool), and that budget; the
    others get their reason in `arm.why_not`."""
    for pool in pools:
        if pool.rows.height == 0:
            pool.arm.why_not = (f"no training rows left: all {pool.removed:,} share a prompt with the held-out pairs"
                                if pool.removed else "the arm has no rows")
    usable = [pool for pool in pools if pool.rows.height > 0]
    budget = settings.budget if settings.budget is not None else min((p.rows.height for p in usable), default=0)
    for pool in usable:
        if pool.rows.height < budget:
            pool.arm.why_not = f"{pool.rows.height:,} training rows, fewer than budget {budget:,}; lower `budget:`"
    usable = [pool for pool in usable if pool.rows.height >= budget]
    if not usable:
        reasons = "; ".join(f"{pool.arm.name}: {pool.arm.why_not}" for pool in pools if pool.arm.why_not)
        raise _error(f"no arm can be trained ({reasons or 'the run made no pairs'})", place)
    return usable, budget


def reward_model_for(view: RunView, settings: EvaluateSettings, texts_of: list[pl.DataFrame],
                     source: EmbeddingSource | None, log: Callable[[str], None]):
    """The reward model to fit per arm and seed (`.scores(train, held_out, seed)`), and the feature stats (the
    probe's features are computed here, for every frame in `texts_of`, from the cache where they are)."""
    if settings.reward_model == "finetune":
        from .reward_finetune import FinetuneModel

        return FinetuneModel(settings.finetune, view.resolve, view.run_dir, log), None
    source = source or embedder_for(settings.embedding, view.resolve)
    probe, stats = ProbeModel(settings.probe, {}), FeatureStats()
    cache = FeatureCache(view.run_dir / FEATURES_FILE)
    try:
        probe.vectors = features([text for frame in texts_of for text in probe.texts(frame)], source, cache, stats,
                                 log=log)
    finally:
        cache.close()
        source.close()
    return probe, stats


def _arm_entry(arm: Arm, pool: Pool | None, correct: np.ndarray | None, budget: int,
               resamples: np.ndarray) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": arm.name, "origin": arm.origin, "available": correct is not None,
                             "why_not": None if correct is not None else arm.why_not,
                             "rows": arm.frame.height if arm.frame is not None else 0}
    if pool is not None:
        entry.update(sharing_a_held_out_prompt=pool.shared, removed=pool.removed, training_rows=pool.rows.height)
    if correct is not None:
        per_pair, per_seed = correct.mean(axis=0), correct.mean(axis=1)
        low, high = bootstrap_interval(per_pair, resamples)
        entry.update(budget=budget, accuracy=_round(per_pair.mean()), ci=[_round(low), _round(high)],
                     seed_accuracies=[_round(a) for a in per_seed],
                     seed_sd=_round(per_seed.std(ddof=1) if len(per_seed) > 1 else 0.0))
    return entry


def _difference_entry(a: str, b: str, correct: dict[str, np.ndarray], arms: dict[str, Arm],
                      resamples: np.ndarray) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": f"{a} - {b}", "a": a, "b": b}
    missing = [name for name in (a, b) if name not in correct]
    if missing:
        return {**entry, "available": False,
                "why_not": "; ".join(f"no {name} arm: {arms[name].why_not}" for name in missing)}
    values = correct[a].mean(axis=0) - correct[b].mean(axis=0)  # paired: the same held-out pair in both
    low, high = bootstrap_interval(values, resamples)
    return {**entry, "available": True, "difference": _round(values.mean()), "ci": [_round(low), _round(high)],
            "verdict": verdict(low, high)}


def evaluate_stages(view: RunView, settings: EvaluateSettings, *, source: EmbeddingSource | None = None,
                    log: Callable[[str], None] = lambda message: None,
                    place: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate the run's arms; returns what evaluate.json holds. `source` replaces the configured embedding
    source (tests); `place` (file, line, stage, kind) makes errors point at the evaluate stage's YAML."""
    import importlib.util

    started = time.perf_counter()
    if settings.reward_model == "probe" and importlib.util.find_spec("sklearn") is None:
        raise _error("reward_model: probe needs scikit-learn: pip install 'selfalign[evaluate]'", place)
    has_export = any(getattr(s, "kind", None) == "export" for s in view.stage_configs or []) \
        or any(kind == "export" for _, kind, _, _ in view.stages)
    arms = {arm.name: arm for arm in make_arms(view.stages, has_export)}
    held_out, how = held_out_pairs(view, settings, arms["human"].frame, place)
    pools, held_out, how["removed_sharing_a_training_prompt"] = make_disjoint(
        list(arms.values()), held_out, "held_out" if settings.eval else "arms")
    if held_out.height == 0:
        raise _error(f"every one of the {how['removed_sharing_a_training_prompt']:,} held-out pairs shares a prompt "
                     "with the run's training rows; give `eval:` pairs from another split (e.g. the test split of "
                     "the data the run read)", place)
    usable, budget = training_budget(pools, settings, place)
    draws = {pool.arm.name: [draw(pool.rows, budget, settings.seed + s) for s in range(settings.seeds)]
             for pool in usable}
    model, feature_stats = reward_model_for(view, settings, [held_out, *(f for fs in draws.values() for f in fs)],
                                            source, log)
    correct: dict[str, np.ndarray] = {}   # arm -> seeds x held-out pairs: 1 right, 0 wrong, 1/2 tied
    for name, frames in draws.items():
        log(f"arm {name}: {settings.seeds} x {settings.reward_model} on {budget:,} pairs")
        correct[name] = np.vstack([correctness(model.scores(frame, held_out, settings.seed + s))
                                   for s, frame in enumerate(frames)])
    rng = np.random.default_rng(settings.seed)
    resamples = rng.integers(0, held_out.height, size=(settings.bootstrap, held_out.height))
    pool_of = {pool.arm.name: pool for pool in pools}
    reward_model: dict[str, Any] = {"kind": settings.reward_model}
    if feature_stats is not None:
        reward_model.update(settings.probe.model_dump(), embedding=feature_stats.identity)
    else:
        reward_model.update(settings.finetune.model_dump(exclude={"model"}), model=Path(settings.finetune.model).name)
    return {
        "schema_version": 1,
        "run": view.name,
        "run_state": view.state,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "reward_model": reward_model,
        "held_out": {**how, "pairs": held_out.height},
        "budget": budget,
        "seeds": settings.seeds,
        "bootstrap": settings.bootstrap,
        "confidence": 0.95,
        "arms": [_arm_entry(arm, pool_of.get(name), correct.get(name), budget, resamples)
                 for name, arm in arms.items()],
        "differences": [_difference_entry(a, b, correct, arms, resamples) for a, b in DIFFERENCES],
        "features": feature_stats.as_dict() if feature_stats is not None else None,
        "seconds": round(time.perf_counter() - started, 3),
    }


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The manifest's `evaluation`: the numbers a card or report shows, without per-seed detail."""
    return {
        "file": RESULT_FILE,
        "reward_model": result["reward_model"]["kind"],
        "held_out": result["held_out"],
        "budget": result["budget"],
        "seeds": result["seeds"],
        "arms": {arm["name"]: ({k: arm.get(k) for k in ("accuracy", "ci", "training_rows", "budget")}
                               if arm["available"] else {"why_not": arm["why_not"]}) for arm in result["arms"]},
        "differences": {d["name"]: ({k: d[k] for k in ("difference", "ci", "verdict")} if d["available"]
                                    else {"why_not": d["why_not"]}) for d in result["differences"]},
    }


def evaluation_of(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The evaluation summary in a manifest: from `selfalign evaluate` (top level) or an evaluate stage."""
    if manifest.get("evaluation"):
        return manifest["evaluation"]
    for entry in reversed(manifest.get("rows") or []):
        if entry.get("kind") == "evaluate" and (entry.get("metrics") or {}).get("evaluation"):
            return entry["metrics"]["evaluation"]
    return None
