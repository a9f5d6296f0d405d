"""Ray executor scaling: rows/s of a critique stage with 1 vs 2 Ray worker processes (model replicas) on this
machine, on a real two-node Ray cluster on 127.0.0.x (tests/support/ray_cluster.py: head and worker node, one
CPU each, so 2 replicas run one per node).

Two workloads, each run on the local executor (reference), then on Ray with 1 and with 2 replicas, every run in a
fresh run directory (no cache):
- embedded: the bundled SmolLM2-135M through in-process llama.cpp (one thread per replica), temperature 0, a short
  critique prompt, max_tokens 32. CPU-bound: on 2 cores, 2 replicas can at best double rows/s.
- fake, 10 ms per call: the fake backend sleeping 10 ms per call, standing in for a remote endpoint (I/O-bound):
  measures the executor's own scaling without competing for the CPU.

rows/s = rows / seconds of the critique stage (from the manifest: includes starting the replicas and loading the
model); the median of 2 interleaved repeats (`--quick`: smaller, one run). `python -m benchmarks.case_ray [--quick]` writes benchmarks/results/<date>-ray.json and .md.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .measure import REPO, machine, median, ratio

SHORT_PROMPT = """\
{% block system %}You review answers.{% endblock %}
{% block user %}Question: {{ prompt[-1].content }}
Answer: {{ response }}
Critique the answer in one sentence and score it from {{ score_min }} to {{ score_max }}.
Reply in JSON: {"critique": "...", "score": <score>}{% endblock %}
"""
WORKLOADS = {
    "embedded": {"model": {"backend": "llamacpp", "n_threads": 1}, "batch_size": 2,
                 "sampling": {"temperature": 0, "max_tokens": 32, "seed": 0}},
    "fake, 10 ms per call": {"model": {"backend": "fake", "latency_s": 0.01}, "batch_size": 50, "sampling": None},
}


EMBEDDED_NOTE = ("embedded: CPU-bound on a 2-core machine shared with other work, so 2 replicas cannot double rows/s "
                 "here. The local executor reads prompts with llama-cpp-python's default n_threads_batch (every core) "
                 "while Ray runs each replica with OMP_NUM_THREADS=1; on a busy machine the local run is the slower.")


def write_workload(tmp: Path, name: str, rows: int) -> Path:
    spec = WORKLOADS[name]
    data = tmp / f"{rows}.jsonl"
    with open(data, "w") as handle:
        for i in range(rows):
            handle.write(json.dumps({"prompt": f"Question {i}: what is {i} times {i % 7 + 2}?",
                                     "chosen": f"{i} times {i % 7 + 2} is {i * (i % 7 + 2)}.",
                                     "rejected": f"It is {i + 1}, roughly."}) + "\n")
    prompt = tmp / "short.jinja"
    prompt.write_text(SHORT_PROMPT)
    critique = {"kind": "critique", "model": "critic", "prompt": str(prompt), "samples": 1, "targets": ["chosen"]}
    if spec["sampling"]:
        critique["sampling"] = spec["sampling"]
    doc = {"schema_version": 1, "name": "bench-ray", "models": {"critic": spec["model"]},
           "stages": [{"kind": "load", "path": str(data), "format": "trl"}, critique]}
    path = tmp / f"{name.split(',')[0]}.yaml"
    path.write_text(json.dumps(doc))
    return path


def measure(pipeline: Path, out: Path, overrides: list[str]) -> dict[str, Any]:
    from selfalign.config import load_pipeline
    from selfalign.runner import run_pipeline

    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    manifest = run_pipeline(load_pipeline(pipeline, overrides), output=out, quiet=True)
    wall = time.perf_counter() - started
    stage = manifest["rows"][1]
    shutil.rmtree(out, ignore_errors=True)
    return {"rows": stage["in"], "stage_seconds": stage["seconds"], "run_seconds": round(wall, 3),
            "rows_per_s": round(stage["in"] / stage["seconds"], 3), "calls": manifest["model_calls"]}


def run(rows: dict[str, int] | None = None, repeats: int = 2, log: Callable[[str], None] = print) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    from tests.support.ray_cluster import RayCluster

    rows = rows or {"embedded": 16, "fake, 10 ms per call": 4000}
    tmp = Path(tempfile.mkdtemp(prefix="selfalign-bench-ray-"))
    results: dict[str, Any] = {}
    try:
        with RayCluster(head_cpus=1, worker_cpus=1) as cluster:
            os.environ.update(cluster.driver_env())  # before ray is imported (run_pipeline imports it)
            for name, count in rows.items():
                pipeline = write_workload(tmp, name, count)
                ray = ["executor.kind=ray", f"executor.address={cluster.address}",
                       f"executor.batch_size={WORKLOADS[name]['batch_size']}"]
                configs = {"local": [], "ray, 1 worker": ray + ["executor.replicas=1"],
                           "ray, 2 workers": ray + ["executor.replicas=2"]}
                runs: dict[str, list] = {label: [] for label in configs}
                for repeat in range(repeats):  # interleaved, so a busy spell on the shared machine hits all three
                    for label, overrides in configs.items():
                        result = measure(pipeline, tmp / "out", overrides)
                        runs[label].append(result)
                        log(f"  ray: {name}, {label}, run {repeat + 1}: {result['rows_per_s']} rows/s "
                            f"({result['rows']} rows in {result['stage_seconds']} s)")
                results[name] = {label: {"rows": count, "rows_per_s": round(median([x["rows_per_s"] for x in r]), 3),
                                         "rows_per_s_runs": [x["rows_per_s"] for x in r], "runs": r}
                                 for label, r in runs.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summarise(results)


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    table = []
    for name, runs in results.items():
        one, two = runs["ray, 1 worker"]["rows_per_s"], runs["ray, 2 workers"]["rows_per_s"]
        scaling = ratio(two, one)
        target = 1.5 if name.startswith("fake") else None
        table.append({"case": "6 ray", "metric": f"{name}: rows/s with 2 Ray worker processes vs 1",
                      "selfalign": two, "baseline_name": "1 worker", "baseline": one, "ratio": scaling,
                      "target": f">= {target}" if target else "-", "met": None if target is None or scaling is None
                      else scaling >= target,
                      "note": f"local executor {runs['local']['rows_per_s']} rows/s; {runs['local']['rows']} rows; "
                              f"runs: 1 worker {runs['ray, 1 worker']['rows_per_s_runs']}, 2 workers "
                              f"{runs['ray, 2 workers']['rows_per_s_runs']}"})
    return {"status": "ok", "rows": table, "details": results}


def write_report(summary: dict[str, Any], info: dict[str, Any]) -> tuple[Path, Path]:
    import ray

    day = time.strftime("%Y-%m-%d")
    out = REPO / "benchmarks" / "results"
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": info, "ray": ray.__version__, **summary}
    (out / f"{day}-ray.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"# selfalign Ray executor scaling, {report['date']}", "",
             f"{info.get('cpus')} CPUs, Python {info.get('python')}, Ray {ray.__version__}, load average "
             f"{info.get('loadavg_start')} at start, {info.get('loadavg_end')} at end (a shared machine), commit "
             f"{info.get('git_commit')}. Cluster: head node + worker node on 127.0.0.x, 1 CPU each; a worker process "
             "is one model replica (Ray actor). rows/s = rows / critique-stage seconds, replica start-up included; "
             "medians of interleaved repeats (each run's figure in the JSON).",
             "", "| case | measure | 2 workers | baseline | value | ratio | target | met |",
             "|---|---|---:|---|---:|---:|---|---|"]
    for row in summary["rows"]:
        met = {True: "yes", False: "**no**", None: "-"}[row["met"]]
        lines.append(f"| {row['case']} | {row['metric']} | {row['selfalign']} | {row['baseline_name']} | "
                     f"{row['baseline']} | {row['ratio']} | {row['target']} | {met} |")
    lines += ["", "| workload | executor | rows | rows/s (median) | rows/s per run |", "|---|---|---:|---:|---|"]
    for name, runs in summary["details"].items():
        for label, r in runs.items():
            lines.append(f"| {name} | {label} | {r['rows']} | {r['rows_per_s']} | "
                         f"{', '.join(map(str, r['rows_per_s_runs']))} |")
    lines += ["", "Notes:", "", f"- {EMBEDDED_NOTE}"]
    (out / f"{day}-ray.md").write_text("\n".join(lines) + "\n")
    return out / f"{day}-ray.json", out / f"{day}-ray.md"


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    info = machine()
    summary = run({"embedded": 8, "fake, 10 ms per call": 1000}, repeats=1) if quick else run()
    try:
        info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    for path in write_report(summary, info):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
