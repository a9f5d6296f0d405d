"""Case 7 (evaluate): seconds per 1,000 pairs of `selfalign evaluate` with the probe, features cached vs not.

Workload: the ready Critic-RM pipeline with a fake critic on the first `pairs` HH-RLHF rows (../shared/data),
then `evaluate_run_dir` with its defaults (the embedded SmolLM2 model's embeddings, 5 seeds, 2,000 bootstrap
resamples, the run's own held-out split) three times in the same run directory:

- features not cached (a fresh features.sqlite): embedding dominates;
- features cached (the same command again): reading the cache, drawing, fitting 4 arms x 5 seeds, bootstrap;
- baseline for the first: `Llama.embed` called directly on the very same texts with the same model settings
  and batches (the floor: what embedding alone costs), so the ratio is the evaluation's cost over embedding;
- baseline for the second: the uncached run (the ratio is what a re-run costs of the first).

Figures are seconds per 1,000 pairs of the run (its input rows).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from .measure import REPO, median, ratio, rounded, timed

HH_DATA = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-test-1500.jsonl.gz"


def _per_1000(seconds: float | None, pairs: int) -> float | None:
    return None if seconds is None else seconds * 1000 / pairs


def raw_embed_seconds(texts: list[str], identity: dict[str, Any]) -> float:
    """`Llama.embed` over `texts` with the evaluation's model and settings."""
    import os

    import llama_cpp

    from selfalign.embeddings import LlamaCppEmbedding
    from selfalign.backends.bundled_model import bundled_model_path
    from selfalign.backends.llamacpp_cpu import new_llama, params_for_this_cpu

    path, n_ctx, n_seq = bundled_model_path(), identity["n_ctx"], LlamaCppEmbedding().n_seq
    llm = new_llama(path, params_for_this_cpu(path), n_ctx=n_ctx * n_seq, n_batch=n_ctx, n_ubatch=n_ctx,
                    n_seq_max=n_seq, n_threads=os.cpu_count() or 1, embedding=True,
                    pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, verbose=False)
    try:  # as the evaluation asks: 32 texts per call, n_seq per decode
        _, seconds, _ = timed(lambda: [llm.embed(texts[i:i + 32]) for i in range(0, len(texts), 32)])
    finally:
        llm.close()
    return seconds


class Recording:
    """The evaluation's embedding source, keeping the texts it embeds (for the raw baseline)."""

    def __init__(self, inner):
        self.inner, self.identity, self.texts = inner, inner.identity, []

    def embed(self, texts: list[str]) -> list[list[float]]:
        self.texts += texts
        return self.inner.embed(texts)

    def close(self) -> None:
        self.inner.close()


def run(pairs: int = 300, repeats: int = 1, log: Callable[[str], None] = print) -> dict[str, Any]:
    from selfalign.config import load_pipeline
    from selfalign.embeddings import LlamaCppEmbedding, embedder_for
    from selfalign.evaluate import FEATURES_FILE
    from selfalign.evaluate_run import evaluate_run_dir
    from selfalign.runner import run_pipeline

    if not HH_DATA.exists():
        return {"status": f"skipped: {HH_DATA} is missing", "rows": []}
    tmp = Path(tempfile.mkdtemp(prefix="selfalign-bench-evaluate-"))
    try:
        run_dir = tmp / "run"
        overrides = ["models.critic.backend=fake", f"stages.0.path={HH_DATA}", "stages.0.on_bad_row=drop"]
        run_pipeline(load_pipeline(REPO / "pipelines" / "critic_rm.yaml", overrides), output=run_dir, limit=pairs,
                     quiet=True)
        uncached, cached, raw = [], [], []
        result = None
        for attempt in range(repeats):
            (run_dir / FEATURES_FILE).unlink(missing_ok=True)
            source = Recording(embedder_for(LlamaCppEmbedding()))
            result, seconds, _ = timed(lambda: evaluate_run_dir(run_dir, source=source))
            uncached.append(seconds)
            log(f"   uncached: {seconds:.1f} s, {result['features']['computed']} texts embedded")
            again, seconds, _ = timed(lambda: evaluate_run_dir(run_dir))
            assert again["features"]["computed"] == 0 and again["arms"] == result["arms"]
            cached.append(seconds)
            log(f"   cached: {seconds:.2f} s")
            texts = source.texts
            assert len(texts) == result["features"]["computed"]
            raw.append(raw_embed_seconds(texts, result["features"]["source"]))
            log(f"   raw Llama.embed of the same {len(texts)} texts: {raw[-1]:.1f} s")
        first, second, floor = (_per_1000(median(values), pairs) for values in (uncached, cached, raw))
        rows = [
            {"case": "7 evaluate", "metric": "probe, features not cached: s per 1,000 pairs", "selfalign":
             rounded(first, 1), "baseline_name": "raw Llama.embed of the same texts", "baseline": rounded(floor, 1),
             "ratio": ratio(first, floor), "target": None, "met": None},
            {"case": "7 evaluate", "metric": "probe, features cached (re-run): s per 1,000 pairs", "selfalign":
             rounded(second, 2), "baseline_name": "features not cached", "baseline": rounded(first, 1),
             "ratio": ratio(second, first), "target": "< 0.05", "met": ratio(second, first) is not None
             and ratio(second, first) < 0.05},
        ]
        details = {"pairs": pairs, "held_out": result["held_out"], "budget": result["budget"],
                   "seeds": result["seeds"], "texts": result["features"]["texts"],
                   "seconds_uncached": uncached, "seconds_cached": cached, "seconds_raw_embed": raw,
                   "arms": {arm["name"]: arm.get("accuracy") for arm in result["arms"]}}
        return {"status": "ok", "rows": rows, "details": details}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
