"""Case 5 (scale): generated TRL rows through load -> filter -> export at growing sizes, and the critique
stage on the `fake` backend; each run in its own child process so its peak RSS is its own.

- load -> filter -> export (no model stages) at 100k / 300k / 1M rows (`--quick`: 10k / 30k / 100k):
  wall time of `run_pipeline`, time per row, peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss` in
  the child). Targets: peak RSS < 2 GB at the largest size; time per row at the largest size within
  1.25x of the smallest (linear growth).
- load -> critique (fake backend, 4 samples of the chosen answer) at 10k and 100k rows (`--quick`: 2k /
  10k): time per row and per call, peak RSS; the baseline is the smaller run (growth).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .measure import peak_rss_mb, ratio, run_child

FILTER = "LENGTH(chosen) >= 100"
RSS_LIMIT_MB = 2048


def run(sizes: tuple[int, ...] = (100_000, 300_000, 1_000_000), critique_sizes: tuple[int, ...] = (10_000, 100_000),
        samples: int = 4, log: Callable[[str], None] = print) -> dict[str, Any]:
    from . import workload

    tmp = Path(tempfile.mkdtemp(prefix="selfalign-bench-scale-"))
    results: dict[str, Any] = {"export": {}, "critique": {}}
    try:
        for size in sizes:
            data = workload.write_trl_jsonl(tmp / f"pairs-{size}.jsonl", size)
            pipeline = workload.write_pipeline(tmp / f"export-{size}.yaml", f"bench-scale-{size}", [
                workload.load_stage(data), {"kind": "filter", "where": FILTER, "reason": "short chosen answer"},
                {"kind": "export", "formats": ["trl"], "test_size": 0.1}])
            result = run_child(["benchmarks.case_scale", "--child", str(pipeline), str(tmp / f"out-{size}")],
                               timeout=1800)
            data.unlink()
            shutil.rmtree(tmp / f"out-{size}", ignore_errors=True)
            results["export"][size] = result
            log(f"  scale: load->filter->export {size:,} rows: {_show(result)}")
        for size in critique_sizes:
            data = workload.write_trl_jsonl(tmp / f"crit-{size}.jsonl", size)
            pipeline = workload.write_pipeline(tmp / f"critique-{size}.yaml", f"bench-fake-{size}",
                                               [workload.load_stage(data), workload.critique_stage("m", samples)],
                                               models={"m": {"backend": "fake"}})
            result = run_child(["benchmarks.case_scale", "--child", str(pipeline), str(tmp / f"cout-{size}")],
                               timeout=3600)
            data.unlink()
            shutil.rmtree(tmp / f"cout-{size}", ignore_errors=True)
            if "error" not in result:
                result["ms_per_call"] = round(1000 * result["seconds"] / (size * samples), 4)
            results["critique"][size] = result
            log(f"  scale: load->critique(fake, {samples} samples) {size:,} rows: {_show(result)}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summarise(results, sizes, critique_sizes, samples)


def _show(result: dict[str, Any]) -> str:
    if "error" in result:
        return result["error"]
    return f"{result['seconds']} s, {result['us_per_row']} us/row, peak RSS {result['peak_rss_mb']} MB"


def summarise(results: dict[str, Any], sizes, critique_sizes, samples: int) -> dict[str, Any]:
    rows = []
    export, critique = results["export"], results["critique"]
    errors = [f"{kind} {size}: {r['error']}" for kind in ("export", "critique") for size, r in results[kind].items()
              if "error" in r]
    ok_sizes = [s for s in sizes if "error" not in export.get(s, {"error": 1})]
    if ok_sizes:
        big, small = ok_sizes[-1], ok_sizes[0]
        rss = export[big]["peak_rss_mb"]
        rows.append({"case": "5 scale", "metric": f"load->filter->export {big:,} rows: peak RSS (MB)",
                     "selfalign": rss, "baseline_name": "2 GB limit", "baseline": RSS_LIMIT_MB,
                     "ratio": ratio(rss, RSS_LIMIT_MB), "target": "< 2 GB", "met": rss < RSS_LIMIT_MB,
                     "note": "peak RSS by size: " + ", ".join(f"{s:,}: {export[s]['peak_rss_mb']} MB"
                                                               for s in ok_sizes)})
        growth = ratio(export[big]["us_per_row"], export[small]["us_per_row"])
        rows.append({"case": "5 scale", "metric": f"load->filter->export time per row (us) at {big:,} vs {small:,}",
                     "selfalign": export[big]["us_per_row"], "baseline_name": f"{small:,} rows",
                     "baseline": export[small]["us_per_row"], "ratio": growth, "target": "linear (<= 1.25)",
                     "met": None if growth is None else growth <= 1.25,
                     "note": "seconds by size: " + ", ".join(f"{s:,}: {export[s]['seconds']} s" for s in ok_sizes)})
    ok_crit = [s for s in critique_sizes if "error" not in critique.get(s, {"error": 1})]
    if ok_crit:
        big, small = ok_crit[-1], ok_crit[0]
        growth = ratio(critique[big]["us_per_row"], critique[small]["us_per_row"])
        rows.append({"case": "5 scale", "metric": f"critique on the fake backend, {big:,} rows x {samples} samples: "
                                                  f"time per row (us)",
                     "selfalign": critique[big]["us_per_row"], "baseline_name": f"{small:,} rows",
                     "baseline": critique[small]["us_per_row"], "ratio": growth, "target": "linear (<= 1.25)",
                     "met": None if growth is None else growth <= 1.25,
                     "note": f"{critique[big]['seconds']} s, {critique[big]['ms_per_call']} ms per call, peak RSS "
                             f"{critique[big]['peak_rss_mb']} MB"})
    status = "ok" if not errors else "error: " + "; ".join(errors)
    return {"status": status, "rows": rows, "details": {"filter": FILTER, "samples": samples, **results}}


def child(pipeline: str, out: str) -> dict[str, Any]:
    from selfalign.config import load_pipeline
    from selfalign.runner import run_pipeline

    t0 = time.perf_counter()
    manifest = run_pipeline(load_pipeline(pipeline), output=out, quiet=True)
    seconds = time.perf_counter() - t0
    rows_in = manifest["rows"][0]["in"]
    return {"rows": rows_in, "rows_out": manifest["rows_out"], "seconds": round(seconds, 3),
            "us_per_row": round(1e6 * seconds / rows_in, 2), "peak_rss_mb": peak_rss_mb(),
            "stages": {f"{s['stage']}-{s['kind']}": s["seconds"] for s in manifest["rows"]},
            "calls": manifest["model_calls"]}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3])), flush=True)
    else:
        print(json.dumps(run(), indent=1))
