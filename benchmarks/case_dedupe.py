"""Case 8 (dedupe): MinHash LSH near-duplicate search on 100k prompts with rensa (what the dedupe stage uses)
and with datasketch, on the same shingles, permutations and bands; and the whole stage.

Workload, from the HH-RLHF file in ../shared/data: 98,000 prompts, each three random sentences of the file
(from its turns and answers) joined, plus 2,000 planted near-duplicates: a copy of one of them re-cased, re-punctuated and
with one word changed. Shingles: word 2-grams of the normalised text (the stage's defaults: threshold 0.7,
128 permutations, 32 bands of 4).

Measured per library: seconds to build the signatures and the LSH index and query every prompt; recall (the
share of planted pairs whose exact Jaccard similarity reaches the threshold that LSH returns as candidates);
precision (the share of candidate pairs that really reach it; the stage then checks every candidate on its
exact shingle sets, so its own precision is 1). Needs `pip install datasketch` for the comparison.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import time
from typing import Any, Callable

from .measure import REPO, ratio, timed

HH_DATA = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-test-1500.jsonl.gz"


def workload(size: int, planted: int, seed: int = 0) -> tuple[list[str], list[tuple[int, int]]]:
    from selfalign.input_formats import RowError, from_hh_rlhf

    texts = []
    for line in gzip.open(HH_DATA):
        try:
            row = from_hh_rlhf(json.loads(line))
        except RowError:
            continue
        texts.extend([m["content"] for m in row["prompt"]] + [row["chosen"], row["rejected"]])
    sentences = [s for t in texts for s in re.split(r"(?<=[.!?])\s+", t) if len(s.split()) >= 4]
    sentences = list(dict.fromkeys(sentences))
    rng = random.Random(seed)
    prompts = [" ".join(rng.sample(sentences, 3)) for _ in range(size - planted)]
    pairs = []
    for k in range(planted):
        original = rng.randrange(len(prompts))
        tokens = prompts[original].upper().replace(",", " ,").replace(".", "!").split()
        tokens[rng.randrange(len(tokens))] = "really"
        pairs.append((original, len(prompts)))
        prompts.append(" ".join(tokens))
    return prompts, pairs


def with_rensa(shingle_lists, num_perm: int, bands: int, seed: int) -> set[tuple[int, int]]:
    from rensa import RMinHash, RMinHashLSH

    signatures = RMinHash.from_token_sets(shingle_lists, num_perm, seed)
    index = RMinHashLSH(0.7, num_perm, bands)
    index.insert_many(signatures)
    pairs = set()
    for row, found in enumerate(index.query_all(signatures)):
        pairs.update((row, other) for other in found if other > row)
    return pairs


def with_datasketch(shingle_lists, num_perm: int, bands: int, seed: int) -> set[tuple[int, int]]:
    from datasketch import MinHash, MinHashLSH

    signatures = MinHash.bulk(shingle_lists, num_perm=num_perm, seed=seed)
    index = MinHashLSH(num_perm=num_perm, params=(bands, num_perm // bands))
    with index.insertion_session() as session:
        for row, signature in enumerate(signatures):
            session.insert(row, signature)
    pairs = set()
    for row, signature in enumerate(signatures):
        pairs.update((row, other) for other in index.query(signature) if other > row)
    return pairs


def run(size: int = 100_000, planted: int = 2_000, log: Callable[[str], None] = print) -> dict[str, Any]:
    import polars as pl

    from selfalign.stages.dedupe import DedupeConfig, bands_for, near_duplicates, shingles
    from selfalign.textmatch import words

    if not HH_DATA.exists():
        return {"status": f"skipped: {HH_DATA} is missing (../shared/data beside the project)", "rows": []}
    config = DedupeConfig(kind="dedupe")
    bands = bands_for(config.threshold, config.num_perm)
    prompts, planted_pairs = workload(size, planted)
    shingle_lists, shingle_wall, _ = timed(lambda: [shingles(words(p), config.ngram) for p in prompts])
    sets = {}

    def jaccard(i: int, j: int) -> float:
        a = sets.setdefault(i, set(shingle_lists[i]))
        b = sets.setdefault(j, set(shingle_lists[j]))
        return len(a & b) / len(a | b)

    truth = [pair for pair in planted_pairs if jaccard(*pair) >= config.threshold]
    results: dict[str, Any] = {}
    for name, fn in (("rensa", with_rensa), ("datasketch", with_datasketch)):
        try:
            candidates, wall, cpu = timed(lambda: fn(shingle_lists, config.num_perm, bands, config.seed))
        except ImportError as exc:
            results[name] = {"unavailable": f"{exc}; pip install {name}"}
            continue
        found = sum(1 for pair in truth if pair in candidates)
        true_candidates = sum(1 for pair in candidates if jaccard(*pair) >= config.threshold)
        results[name] = {"seconds": round(wall, 2), "cpu_seconds": round(cpu, 2), "candidate_pairs": len(candidates),
                         "recall": round(found / len(truth), 4),
                         "precision": round(true_candidates / len(candidates), 4) if candidates else None}
        log(f"  dedupe {size:,} prompts, {name}: {results[name]}")
    frame = pl.DataFrame({"row_id": [f"r{i}" for i in range(len(prompts))], "source": ["human"] * len(prompts),
                          "prompt": [[{"role": "user", "content": p}] for p in prompts]})
    (kept, dropped, metrics), stage_wall, stage_cpu = timed(lambda: near_duplicates(frame, config))
    planted_dropped = len({f"r{j}" for _, j in truth} & set(dropped["row_id"]))
    log(f"  dedupe stage {size:,} prompts: {stage_wall:.1f} s, {dropped.height} dropped, "
        f"{planted_dropped}/{len(truth)} planted")
    stage = {"seconds": round(stage_wall, 2), "cpu_seconds": round(stage_cpu, 2), "dropped": dropped.height,
             "planted_above_threshold": len(truth), "planted_dropped": planted_dropped,
             "metrics": metrics, "shingling_seconds": round(shingle_wall, 2)}
    rensa, sketch = results["rensa"], results.get("datasketch", {})
    rows = [{"case": "8 dedupe", "metric": f"MinHash + LSH build and query, {size:,} prompts (s)",
             "selfalign": rensa["seconds"], "baseline_name": "datasketch", "baseline": sketch.get("seconds"),
             "ratio": ratio(rensa["seconds"], sketch.get("seconds")), "target": None, "met": None,
             "note": f"rensa {rensa}; datasketch {sketch}; shingling {shingle_wall:.1f} s; {len(truth)} of "
                     f"{planted} planted pairs reach the threshold"},
            {"case": "8 dedupe", "metric": "recall on planted near-duplicates (LSH candidates)",
             "selfalign": rensa["recall"], "baseline_name": "datasketch", "baseline": sketch.get("recall"),
             "ratio": ratio(rensa["recall"], sketch.get("recall")), "target": ">= 0.99",
             "met": rensa["recall"] >= 0.99, "note": None},
            {"case": "8 dedupe", "metric": f"whole near-duplicate removal (stage), {size:,} prompts (s)",
             "selfalign": stage["seconds"], "baseline_name": "-", "baseline": None, "ratio": None, "target": None,
             "met": None, "note": f"{dropped.height} dropped in {metrics['clusters']} clusters, "
                                  f"{planted_dropped} of {len(truth)} planted"}]
    import importlib.metadata

    versions = {}
    for name in ("rensa", "datasketch"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    rows[0]["note"] += "; versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())
    return {"status": "ok", "rows": rows, "details": {"libraries": results, "stage": stage, "bands": bands,
                                                      "versions": versions}}


if __name__ == "__main__":
    print(json.dumps(run(20_000, 500), indent=1, default=str))
