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
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import polars as pl
from pydantic import Field, model_validator

from .embeddings import (EmbeddingConfig, EmbeddingSource, FeatureCache, FeatureStats, LlamaCppEmbedding,
                         embedder_for, features, pair_text)
from .errors import ConfigError, RunError, SelfalignError
from .config_base import Strict

ARMS = ("human", "synthetic", "filtered", "final")
DIFFERENCES = (("filtered", "synthetic"), ("final", "human"))
DEFAULT_HOLDOUT = 0.1
RESULT_FILE = "evaluate.json"
FEATURES_FILE = "features.sqlite"
# A stage and the frames it wrote: (index, kind, rows kept, rows dropped or None), as report.load_run reads them.
Stage = tuple[int, str, pl.DataFrame, "pl.DataFrame | None"]


class EvaluationError(SelfalignError):
    """The run cannot be evaluated as asked: says what is missing and what to do (exit 2)."""


# -- settings ------------------------------------------------------------------------------------------------

class EvalData(Strict):
    """Held-out human preference pairs from outside the run, read as the load stage reads its input."""

    path: str | None = Field(None, description="local file: .jsonl, .jsonl.gz, .json, .parquet, .csv")
    hf: str | None = Field(None, description="a `datasets` id or local dataset folder, read with load_dataset")
    split: str = Field("test", description="the split of an hf: dataset")
    config: str | None = Field(None, description="the config of an hf: dataset")
    revision: str | None = Field(None, description="the revision of an hf: dataset")
    format: Literal["hh-rlhf", "trl"] = Field(description="how the pairs are written (as for the load stage)")
    on_bad_row: Literal["error", "drop"] = Field("error", description="drop: skip rows that do not parse")
    limit: int | None = Field(None, ge=1, description="read only the first N rows")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.hf is None):
            raise ValueError("give exactly one of `path:` (a local file) or `hf:` (a datasets id)")
        return self

    def describe(self) -> str:
        return f"hf:{self.hf} ({self.split})" if self.hf else Path(self.path).name


class ProbeSettings(Strict):
    """A Bradley-Terry model on frozen features: logistic regression on feature differences, no intercept."""

    c: float = Field(1.0, gt=0, le=1e6, description="scikit-learn's C (inverse L2 strength) of the regression")
    prompt_turns: int | None = Field(1, ge=0, description="how many of the prompt's last messages are embedded "
                                                         "with the response (null: all of them)")
    max_chars: int = Field(2000, ge=16, description="the embedded text's last N characters")


class FinetuneSettings(Strict):
    """TRL's RewardTrainer on a small model for a fixed number of steps, a fresh copy per arm and seed."""

    model: str = Field(description="a local model folder (weights, config, tokenizer with a chat template), "
                                   "loaded as AutoModelForSequenceClassification with one label")
    steps: int = Field(100, ge=1, le=1_000_000, description="optimizer steps per arm and seed")
    batch_size: int = Field(8, ge=1, le=4096, description="pairs per step")
    learning_rate: float = Field(1e-5, gt=0, le=1, description="AdamW learning rate")
    max_length: int = Field(512, ge=16, description="tokens per conversation; longer ones keep their end")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: a GPU when there is one")


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


# -- arms ------------------------------------------------------------------------------------------------------

@dataclass
class Arm:
    name: str
    origin: str                          # where its rows come from, in words
    frame: pl.DataFrame | None = None    # prompt, chosen, rejected (chosen preferred)
    why_not: str | None = None           # when the run cannot make this arm


def _has_pairs(df: pl.DataFrame | None) -> bool:
    return (df is not None and {"prompt", "chosen", "rejected"} <= set(df.columns)
            and df.schema["chosen"] == pl.Utf8 and df.schema["rejected"] == pl.Utf8)


def _pairs(df: pl.DataFrame) -> pl.DataFrame:
    return df.select("prompt", "chosen", "rejected").filter(
        pl.col("chosen").is_not_null() & pl.col("rejected").is_not_null())


def _mean_score(column: str) -> pl.Expr:
    return pl.col(column).list.eval(pl.element().struct.field("score")).list.mean()


def _swapped(df: pl.DataFrame, swap: pl.Expr) -> pl.DataFrame:
    return df.with_columns(chosen=pl.when(swap).then(pl.col("rejected")).otherwise(pl.col("chosen")),
                           rejected=pl.when(swap).then(pl.col("chosen")).otherwise(pl.col("rejected")))


def _labelled_by_scores(df: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """Each pair ordered by its mean critique scores (the model's label); tied or unscored pairs left out."""
    scored = df.with_columns(_c=_mean_score("chosen_critiques"), _r=_mean_score("rejected_critiques"))
    known = scored.filter(pl.col("_c").is_not_null() & pl.col("_r").is_not_null())
    untied = known.filter(pl.col("_c") != pl.col("_r"))
    return _pairs(_swapped(untied, pl.col("_c") < pl.col("_r"))), scored.height - untied.height


def _labelled_by_judge(kept: pl.DataFrame, dropped: pl.DataFrame | None) -> pl.DataFrame:
    """The judge's consistent verdicts: kept rows have its pick as `chosen` (swapped already with
    on_disagreement: swap); rows it dropped for disagreeing with the label are swapped here."""
    parts = [_pairs(kept)]
    if _has_pairs(dropped) and "drop_reason" in dropped.columns:
        parts.append(_pairs(_swapped(dropped.filter(pl.col("drop_reason") == "judge_disagrees_with_label"),
                                     pl.lit(True))))
    return pl.concat(parts)


def make_arms(stages: Sequence[Stage], has_export: bool) -> list[Arm]:
    """The four arms from a run's stages (in order, the evaluate stage itself and publish left out)."""
    stages = [s for s in stages if s[1] not in ("evaluate", "publish")]
    label = lambda index, kind: f"stage {index} ({kind})"  # noqa: E731
    arms = []
    load = stages[0] if stages and stages[0][1] == "load" else None
    if load is not None and _has_pairs(load[2]):
        human = load[2].filter(pl.col("source") == "human") if "source" in load[2].columns else load[2]
        arms.append(Arm("human", f"{label(*load[:2])}: the human pairs as read", _pairs(human)))
    else:
        arms.append(Arm("human", "-", why_not="the input has no human pairs (a prompts-only load stage)"))

    synthetic = None
    for index, kind, kept, dropped in stages:
        if kind == "critique" and _has_pairs(kept) and {"chosen_critiques", "rejected_critiques"} <= set(kept.columns):
            frame, left_out = _labelled_by_scores(kept)
            synthetic = Arm("synthetic", f"{label(index, kind)}: each pair ordered by its mean critique score "
                            f"({left_out:,} tied or unscored left out)", frame)
        elif kind == "judge" and _has_pairs(kept):
            synthetic = Arm("synthetic", f"{label(index, kind)}: each pair ordered by the judge's verdict in both "
                            "orders (position-inconsistent ones left out)", _labelled_by_judge(kept, dropped))
        elif kind == "pair" and _has_pairs(kept):
            synthetic = Arm("synthetic", f"{label(index, kind)}: best vs worst answer by the model's scores",
                            _pairs(kept))
        if synthetic is not None:
            break
    arms.append(synthetic or Arm("synthetic", "-", why_not="no stage labels pairs by the model's own scores or "
                                 "verdicts (critique of chosen and rejected, judge, or pair)"))

    filtered = next(((i, k, kept) for i, k, kept, _ in stages if k == "consistency" and _has_pairs(kept)), None) \
        or next(((i, k, kept) for i, k, kept, _ in stages if k == "judge" and _has_pairs(kept)), None)
    if filtered is not None:
        what = "pairs whose critiques agree with the human label" if filtered[1] == "consistency" \
            else "pairs the judge kept"
        arms.append(Arm("filtered", f"{label(*filtered[:2])}: {what}", _pairs(filtered[2])))
    else:
        arms.append(Arm("filtered", "-", why_not="no consistency or judge stage filters the pairs"))

    last = next(((i, k, kept) for i, k, kept, _ in reversed(stages) if k != "export"), None)
    if last is not None and _has_pairs(last[2]):
        what = "the rows export wrote" if has_export else "the last stage's rows (the run has no export stage)"
        arms.append(Arm("final", f"{label(*last[:2])}: {what}", _pairs(last[2])))
    else:
        arms.append(Arm("final", "-", why_not="the run's last rows are not chosen/rejected pairs"))
    return arms


# -- held-out pairs and prompt-disjointness ---------------------------------------------------------------------

def prompt_key(prompt: list[dict[str, str]]) -> str:
    """A prompt's identity for disjointness: roles and text, case and whitespace folded.

    >>> prompt_key([{"role": "user", "content": "Hi  there"}]) == prompt_key([{"role": "user", "content": "hi there"}])
    True
    """
    text = "\n".join(f"{m['role']}:{' '.join(m['content'].lower().split())}" for m in prompt)
    return hashlib.sha256(text.encode()).hexdigest()


def with_prompt_keys(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns(_prompt=pl.Series([prompt_key(p) for p in df["prompt"].to_list()], dtype=pl.Utf8))


def own_split(human: pl.DataFrame, holdout: float) -> pl.DataFrame:
    """The human pairs whose prompt hash is below `holdout`: export's split function, so export's test rows
    are among them whenever holdout >= the export stage's test_size."""
    from .trainer_formats import prompt_buckets

    if human.height == 0:
        return human
    return human.filter(prompt_buckets(human["prompt"]) < holdout)


def read_eval_data(data: EvalData, resolve: Callable[[str], Path]) -> pl.DataFrame:
    """The eval: dataset's pairs, read by the load stage's own readers and mappers."""
    from .stages.load import LoadConfig, run as load

    @dataclass
    class Reading:  # what the load stage uses of a run's context
        limit: int | None

        def resolve(self, value: str) -> Path:
            return resolve(value)

    config = LoadConfig(kind="load", path=data.path, hf=data.hf, split=data.split, config=data.config,
                        revision=data.revision, format=data.format, on_bad_row=data.on_bad_row)
    return _pairs(load(None, config, Reading(data.limit)).kept)


@dataclass
class Pool:
    """An arm's training rows, none of which shares a prompt with a held-out pair."""

    arm: Arm
    rows: pl.DataFrame           # prompt, chosen, rejected, _prompt, _pair
    shared: int                  # the arm's rows whose prompt is also a held-out prompt
    removed: int                 # of those, removed from the training rows (all with the run's own split)


def make_disjoint(arms: list[Arm], held_out: pl.DataFrame, remove_from: Literal["arms", "held_out"]) \
        -> tuple[list[Pool], pl.DataFrame, int]:
    """Make every arm's training rows prompt-disjoint from the held-out pairs, and check it.

    With the run's own split (`remove_from="arms"`) the rows sharing a held-out prompt leave every arm (the
    held-out pairs are the run's own rows). With an eval: dataset (`"held_out"`) the eval pairs sharing a prompt
    with any arm's rows leave the held-out set instead: the arms stay what the run made, and every arm is scored
    on the same pairs. Returns (pools, held-out pairs, held-out pairs removed)."""
    keyed_arms = [(arm, with_prompt_keys(arm.frame)) for arm in arms if arm.frame is not None]
    held = with_prompt_keys(held_out)
    removed_held = 0
    if remove_from == "held_out":
        training = set().union(*(set(keyed["_prompt"].to_list()) for _, keyed in keyed_arms))
        clean = held.filter(~pl.col("_prompt").is_in(list(training)))
        removed_held = held.height - clean.height
    else:
        clean = held
    held_keys = set(held["_prompt"].to_list())
    clean_keys = set(clean["_prompt"].to_list())
    pools = []
    for arm, keyed in keyed_arms:
        shared = keyed.filter(pl.col("_prompt").is_in(list(held_keys))).height
        rows = keyed.filter(~pl.col("_prompt").is_in(list(clean_keys)))
        left = set(rows["_prompt"].to_list()) & clean_keys
        if left:  # cannot happen; the check is the promise, so it is made, not assumed
            raise RuntimeError(f"arm {arm.name}: {len(left)} held-out prompts are still in the training rows")
        # A pair's identity whichever answer it prefers: the synthetic arm's copy of a human pair is the same pair.
        rows = rows.with_columns(_pair=pl.Series(
            [hashlib.sha256("\0".join([p, *sorted((c, r))]).encode()).hexdigest() for p, c, r in
             rows.select("_prompt", "chosen", "rejected").iter_rows()], dtype=pl.Utf8))
        pools.append(Pool(arm, rows, shared, keyed.height - rows.height))
    return pools, clean.drop("_prompt"), removed_held


def draw(rows: pl.DataFrame, budget: int, seed: int) -> pl.DataFrame:
    """`budget` rows by a seeded, order-independent shuffle (the same rows whatever order the pool is in).

    Every arm ranks a pair alike for a seed (common random numbers): where two arms hold the same pair, with the
    same label or not, one draws it whenever the other would at that point of its ranking. Arms then differ in
    their labels and in what their filters removed, not in the luck of the draw, which tightens the paired
    differences; and their answers' features are shared, so fewer texts are embedded."""
    ranks = [hashlib.sha256(f"{seed}:{key}".encode()).hexdigest() for key in rows["_pair"].to_list()]
    return rows.with_columns(_rank=pl.Series(ranks, dtype=pl.Utf8)).sort("_rank").head(budget).drop("_rank")


# -- reward models ------------------------------------------------------------------------------------------

class ProbeModel:
    """Bradley-Terry on frozen features: P(a preferred to b) = sigmoid(w . (phi(a) - phi(b))), fitted by
    scikit-learn's logistic regression on the differences of training pairs, each also shown reversed (so the
    two classes are balanced and the fit has no intercept to learn)."""

    def __init__(self, settings: ProbeSettings, vectors: dict[str, np.ndarray]):
        self.settings, self.vectors = settings, vectors

    def text(self, prompt, response: str) -> str:
        return pair_text(prompt, response, self.settings.prompt_turns, self.settings.max_chars)

    def texts(self, frame: pl.DataFrame) -> list[str]:
        return [self.text(p, answer) for p, c, r in frame.select("prompt", "chosen", "rejected").iter_rows()
                for answer in (c, r)]

    def differences(self, frame: pl.DataFrame) -> np.ndarray:
        rows = [self.vectors[self.text(p, c)] - self.vectors[self.text(p, r)]
                for p, c, r in frame.select("prompt", "chosen", "rejected").iter_rows()]
        return np.vstack(rows).astype(np.float64)

    def scores(self, train: pl.DataFrame, held_out: pl.DataFrame, seed: int) -> np.ndarray:
        """w . (phi(chosen) - phi(rejected)) of every held-out pair: > 0 means the human-chosen answer wins."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        diffs = self.differences(train)
        x = np.vstack([diffs, -diffs])
        y = np.concatenate([np.ones(len(diffs)), np.zeros(len(diffs))])
        scaler = StandardScaler(with_mean=False).fit(x)  # the data is symmetric: its mean is 0 already
        model = LogisticRegression(C=self.settings.c, fit_intercept=False, max_iter=5000, random_state=seed)
        model.fit(scaler.transform(x), y)
        return model.decision_function(scaler.transform(self.differences(held_out)))


def correctness(scores: np.ndarray) -> np.ndarray:
    """1 where the human-chosen answer scores higher, 0 where lower, 1/2 for a tie."""
    return np.where(scores > 0, 1.0, np.where(scores < 0, 0.0, 0.5))


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
    held_out = _pairs(held_out)
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


def disjointness_note(result: dict[str, Any]) -> str:
    """One sentence on how the held-out pairs were kept apart from the training rows."""
    held = result["held_out"]
    if held["kind"] == "eval":
        return (f"{held['removed_sharing_a_training_prompt']:,} eval pairs shared a prompt with the run's rows and were "
                "left out of the held-out pairs; every arm trains on its own rows")
    return "rows sharing a prompt with a held-out pair were taken out of every arm's training rows"


def arms_table(result: dict[str, Any]) -> str:
    """The arms as a plain-text table, with the differences and where each arm comes from (or why not)."""
    held = result["held_out"]
    lines = [f"held-out: {held['pairs']:,} human pairs ({held['name']}); budget {result['budget']:,} pairs per arm, "
             f"{result['seeds']} seeds; reward model: {result['reward_model']['kind']}",
             f"prompt-disjoint: {disjointness_note(result)}"]
    header = ("arm", "accuracy", "95% interval", "seed sd", "rows", "shared prompt", "training rows", "trained on")
    rows = []
    for arm in result["arms"]:
        if arm["available"]:
            low, high = arm["ci"]
            rows.append((arm["name"], f"{arm['accuracy']:.3f}", f"[{low:.3f}, {high:.3f}]", f"{arm['seed_sd']:.3f}",
                         f"{arm['rows']:,}", f"{arm['sharing_a_held_out_prompt']:,}", f"{arm['training_rows']:,}",
                         f"{arm['budget']:,}"))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w)  # noqa: E731
                              for i, (v, w) in enumerate(zip(r, widths)))
    lines += [fmt(header), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)]
    for d in result["differences"]:
        if d["available"]:
            low, high = d["ci"]
            lines.append(f"{d['name']}: {d['difference']:+.3f} [{low:+.3f}, {high:+.3f}] {d['verdict']}")
        else:
            lines.append(f"{d['name']}: not measured ({d['why_not']})")
    for arm in result["arms"]:
        lines.append(f"{arm['name']}: {arm['origin']}" if arm["available"] else
                     f"no {arm['name']} arm: {arm['why_not']}")
    return "\n".join(lines)
