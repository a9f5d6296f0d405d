"""Case 7 (decontaminate): rows/s of the decontaminate stage at 100k and 1M rows against 3,000 evaluation prompts,
against the straightforward implementation (benchmarks/naive_decontaminate.py) in the same process.

Workload, built from the HH-RLHF file in ../shared/data (real text, real length mix: 4 messages and ~80
words per prompt on average):
- evaluation set: 3,000 distinct texts of 6 words or more from rows 0-749 (turns and answers), as a .jsonl file;
- rows: the prompts of rows 750-1499, repeated to 100k / 1M rows, each given a unique last message
  ("variant i") so no two rows are the same; every 1,000th row has an evaluation text planted as a span in
  its first message (and the data repeats some prompts of the first half by itself: ~4% of rows match).

selfalign: `decontaminate.run` on the polars frame (reading the set, hashing, lookups, word-by-word checks,
the kept and dropped frames). Baseline: NaiveIndex (normalise each text, n-gram tuples in a set, a dict from
evaluation n-grams to prompts), timed from Python lists of message texts made beforehand (their making is
not counted against it; they are made after the stage's run, whose frame is built through Arrow as the load
stage builds it: a million Python lists alive would slow the stage through the garbage collector). Both must drop the same rows; the target is "minutes" for 1M rows on 2 cores.
"""

from __future__ import annotations

import gc
import gzip
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .measure import REPO, peak_rss_mb, ratio, timed

HH_DATA = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-test-1500.jsonl.gz"
PROMPTS = 3000


class _Ctx:
    limit = None

    def resolve(self, value: str) -> Path:
        return Path(value)


def workload(rows: int, folder: Path):
    import polars as pl

    from selfalign.input_formats import RowError, from_hh_rlhf
    from selfalign.stages.base import lists, strings, structs

    raw = [json.loads(line) for line in gzip.open(HH_DATA)]
    parsed = []
    for row in raw:
        try:
            parsed.append(from_hh_rlhf(row))
        except RowError:
            parsed.append(None)
    texts = []
    for row in parsed[:750]:
        if row:
            texts.extend(m["content"] for m in row["prompt"])
            texts.extend((row["chosen"], row["rejected"]))
    # Questions and answers of 6 words or more, as evaluation prompts are ("Why?" would match everything).
    bench = list(dict.fromkeys(t for t in texts if len(t.split()) >= 6))[:PROMPTS]
    bench_file = folder / "eval.jsonl"
    bench_file.write_text("".join(json.dumps({"id": f"e{i}", "prompt": t}) + "\n" for i, t in enumerate(bench)))
    prompts = [row["prompt"] for row in parsed[750:] if row]
    spans = [t for t in bench if len(t.split()) >= 20]
    roles, contents, offsets = [], [], [0]
    for i in range(rows):
        messages = [m["content"] for m in prompts[i % len(prompts)]]
        if i % 1000 == 999:
            messages[0] = f"{messages[0]} By the way: {spans[(i // 1000) % len(spans)]} Anyway."
        messages.append(f"variant {i}")
        contents.extend(messages)
        roles.extend("user" if k % 2 == 0 else "assistant" for k in range(len(messages)))
        offsets.append(len(contents))
    # Built through Arrow, as the load stage builds its frames (and with no Python object per row left over).
    prompt = pl.Series("prompt", lists(offsets, structs(role=strings(roles), content=strings(contents))))
    frame = pl.DataFrame([pl.Series("row_id", [f"r{i}" for i in range(rows)]), prompt])
    return frame, bench_file, bench


def measure(rows: int, log: Callable[[str], None]) -> dict[str, Any]:
    import polars as pl

    from selfalign.stages.decontaminate import DecontaminateConfig, EvalSet, run as decontaminate

    from .naive_decontaminate import NaiveIndex

    with tempfile.TemporaryDirectory(prefix="selfalign-bench-decon-") as folder:
        frame, bench_file, bench = workload(rows, Path(folder))
        config = DecontaminateConfig(kind="decontaminate", against=[EvalSet(path=str(bench_file), id_column="id")])
        gc.collect()
        output, wall, cpu = timed(lambda: decontaminate(frame, config, _Ctx()))
        log(f"  decontaminate {rows:,} rows: selfalign {wall:.1f} s ({rows / wall:,.0f} rows/s), "
            f"{output.dropped.height} dropped")
    # The baseline's input, made outside its timing: each row's message texts as a Python list.
    contents = frame["prompt"].list.eval(pl.element().struct.field("content")).to_list()
    gc.collect()

    def naive() -> set[str]:
        index = NaiveIndex([[t] for t in bench], config.n, config.threshold)
        return {f"r{i}" for i, messages in enumerate(contents)
                if index.match([("prompt", [(f"prompt[{k}]", m) for k, m in enumerate(messages)])])}

    expected, naive_wall, naive_cpu = timed(naive)
    log(f"  decontaminate {rows:,} rows: naive {naive_wall:.1f} s ({rows / naive_wall:,.0f} rows/s)")
    same = set(output.dropped["row_id"]) == expected
    return {"rows": rows, "prompts": len(bench), "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
            "rows_per_s": round(rows / wall), "naive_seconds": round(naive_wall, 2),
            "naive_cpu_seconds": round(naive_cpu, 2),
            "naive_rows_per_s": round(rows / naive_wall), "dropped": output.dropped.height,
            "same_rows_as_naive": same, "metrics": output.metrics, "peak_rss_mb": peak_rss_mb()}


def run(sizes: tuple[int, ...] = (100_000, 1_000_000), log: Callable[[str], None] = print) -> dict[str, Any]:
    if not HH_DATA.exists():
        return {"status": f"skipped: {HH_DATA} is missing (../shared/data beside the project)", "rows": []}
    results = {size: measure(size, log) for size in sizes}
    rows = []
    for size, result in results.items():
        rows.append({"case": "7 decontaminate", "metric": f"rows/s, {size:,} rows vs {result['prompts']:,} "
                                                         "evaluation prompts (n=13, threshold 0.5)",
                     "selfalign": result["rows_per_s"], "baseline_name": "naive set-of-n-grams loop",
                     "baseline": result["naive_rows_per_s"],
                     "ratio": ratio(result["rows_per_s"], result["naive_rows_per_s"]),
                     "target": "1M rows in minutes" if size >= 1_000_000 else None,
                     "met": result["seconds"] < 600 if size >= 1_000_000 else None,
                     "note": f"{result['seconds']} s (naive {result['naive_seconds']} s; CPU {result['cpu_seconds']} s vs "
                             f"{result['naive_cpu_seconds']} s), {result['dropped']:,} rows "
                             f"dropped, same rows as the naive loop: {result['same_rows_as_naive']}, "
                             f"{result['metrics']['rows_compared_word_by_word']:,} rows compared word by word"})
    ok = all(r["same_rows_as_naive"] for r in results.values())
    return {"status": "ok" if ok else "error: the stage and the naive loop dropped different rows", "rows": rows,
            "details": {str(size): result for size, result in results.items()}}


if __name__ == "__main__":
    print(json.dumps(run((20_000,)), indent=1, default=str))
