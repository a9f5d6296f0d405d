"""`python -m benchmarks`: every benchmark case, results as JSON and a markdown table.

Writes `benchmarks/results/<YYYY-MM-DD>.json` (everything: per-run numbers, machine, package versions)
and `benchmarks/results/<YYYY-MM-DD>.md` (the table). Every figure is a ratio against a baseline
measured in the same run, on the same machine. Cases (see each module's docstring):

1. overhead  (case_overhead.py) critique stage vs raw aiohttp / raw AsyncOpenAI / distilabel 1.5.3
2. engine    (case_engine.py)   critique stage vs a raw loop against llama.cpp's server, tokens/s
3. vllm      (case_vllm.py)     vllm backend vs raw LLM.chat, tokens/s (skipped without vLLM)
4. resume    (case_overhead.py) re-running the finished case-1 pipeline: 0 calls, time ratio
5. scale     (case_scale.py)    1M rows load -> filter -> export (RSS, linearity); 100k rows critique (fake)
6. ray       (case_ray.py)      rows/s with 1 vs 2 Ray worker processes (two-node cluster on 127.0.0.x)
7. decontaminate (case_decontaminate.py) rows/s at 100k and 1M rows vs 3,000 prompts, vs a naive n-gram loop
8. dedupe    (case_dedupe.py)   MinHash LSH on 100k prompts: rensa (shipped) vs datasketch, recall on planted pairs
9. evaluate  (case_evaluate.py) `selfalign evaluate` probe: s per 1,000 pairs, features cached vs not

`--quick` shrinks every case (a few minutes in all). `--cases overhead scale` runs a subset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from .measure import machine

RESULTS = Path(__file__).resolve().parent / "results"
CASES = ("overhead", "engine", "vllm", "scale", "ray", "decontaminate", "dedupe", "evaluate")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_case(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    log(f"== {name}")
    started = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # one broken case must not lose the others' numbers
        result = {"status": f"error: {type(exc).__name__}: {exc}", "rows": [],
                  "details": {"traceback": traceback.format_exc()[-4000:]}}
    result["seconds"] = round(time.perf_counter() - started, 1)
    log(f"   {name}: {result['status']} ({result['seconds']} s)")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--repeats", type=int, default=None, help="runs per measurement (default 2; quick 1)")
    parser.add_argument("--no-distilabel", action="store_true", help="skip distilabel (recorded as skipped)")
    parser.add_argument("--no-vllm-venv", action="store_true",
                        help="run the vLLM case only if this interpreter has vllm")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    parser.add_argument("--name", default=None, help="file name stem (default: today's date)")
    args = parser.parse_args(argv)
    quick = args.quick
    repeats = args.repeats or (1 if quick else 2)

    from . import (case_decontaminate, case_dedupe, case_engine, case_evaluate, case_overhead, case_ray, case_scale,
                   case_vllm)

    started = time.time()
    info = machine()
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": quick, "repeats": repeats,
                              "machine": info, "cases": {}}
    plan = {
        "overhead": lambda: case_overhead.run(rows=500 if quick else 2000, samples=4, repeats=repeats,
                                              distilabel=not args.no_distilabel, log=log),
        "engine": lambda: case_engine.run(rows=4 if quick else 8, samples=1, repeats=max(repeats, 2 if quick else 3),
                                          log=log),
        "vllm": lambda: case_vllm.run(rows=4 if quick else 16, samples=1 if quick else 2, repeats=repeats,
                                      use_venv=not args.no_vllm_venv, log=log),
        "scale": lambda: case_scale.run(sizes=(10_000, 30_000, 100_000) if quick else (100_000, 300_000, 1_000_000),
                                        critique_sizes=(2_000, 10_000) if quick else (10_000, 100_000), log=log),
        "ray": lambda: case_ray.run({"embedded": 8, "fake, 10 ms per call": 1000} if quick else None,
                                    repeats=1 if quick else repeats, log=log),
        "decontaminate": lambda: case_decontaminate.run((10_000, 100_000) if quick else (100_000, 1_000_000), log=log),
        "dedupe": lambda: case_dedupe.run(20_000 if quick else 100_000, 500 if quick else 2_000, log=log),
        "evaluate": lambda: case_evaluate.run(pairs=60 if quick else 300, repeats=1, log=log),
    }
    for name in CASES:
        if name in args.cases:
            report["cases"][name] = run_case(name, plan[name])
        else:
            report["cases"][name] = {"status": "skipped: not selected (--cases)", "rows": []}
    try:
        info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    report["seconds"] = round(time.time() - started, 1)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or time.strftime("%Y-%m-%d") + ("-quick" if quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    table = markdown(report)
    (args.out / f"{stem}.md").write_text(table)
    print(table)
    log(f"wrote {args.out / (stem + '.json')} and {args.out / (stem + '.md')} in {report['seconds']:.0f} s")
    return 0


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"# selfalign benchmarks, {report['date']}{' (--quick)' if report['quick'] else ''}", "",
             f"{m.get('cpus')} CPUs, Python {m.get('python')}, load average {m.get('loadavg_start')} at start, "
             f"{m.get('loadavg_end')} at end (a shared machine: figures are ratios against baselines measured "
             f"in the same run); commit {m.get('git_commit')}{' + local changes' if m.get('git_dirty') else ''}; "
             f"medians of {report['repeats']} run(s). Packages: "
             + ", ".join(f"{k} {v}" for k, v in m.get("packages", {}).items()) + ".", "",
             "| case | measure | selfalign | baseline | value | ratio | target | met |",
             "|---|---|---:|---|---:|---:|---|---|"]
    notes = []
    for name, case in report["cases"].items():
        if not case.get("rows"):
            lines.append(f"| {name} | {case['status']} | | | | | | |")
            continue
        for row in case["rows"]:
            met = {True: "yes", False: "**no**", None: "-"}[row.get("met")]
            lines.append(f"| {row['case']} | {row['metric']} | {_fmt(row['selfalign'])} | {row['baseline_name']} | "
                         f"{_fmt(row['baseline'])} | {_fmt(row['ratio'])} | {row.get('target') or '-'} | {met} |")
            if row.get("note"):
                notes.append(f"- {row['case']}, {row['metric']}: {row['note']}")
        if case["status"] != "ok":
            notes.append(f"- {name}: {case['status']}")
    overhead = report["cases"].get("overhead", {}).get("details", {})
    if overhead.get("median_req_per_s"):
        lines += ["", "Case 1, requests/s and client CPU per request (medians):", "",
                  "| client | req/s | client CPU ms/req |", "|---|---:|---:|"]
        cpu = overhead.get("median_client_cpu_ms_per_req", {})
        names = {"selfalign_stage": "selfalign critique stage", "selfalign_whole_run": "selfalign whole run_pipeline",
                 "raw_aiohttp": "raw aiohttp loop", "raw_openai": "raw AsyncOpenAI loop (stock)",
                 "backend": "OpenAIBackend.generate alone",
                 "backend_lean_http_variant": "backend, http_client straight to aiohttp (variant)",
                 "backend_aiohttp_variant": "backend over bare aiohttp, no SDK (variant, not shipped)",
                 "selfalign_stage_aiohttp_variant": "critique stage with the bare-aiohttp backend (variant)",
                 "distilabel_window": "distilabel 1.5.3 (server window)",
                 "distilabel_whole_run": "distilabel 1.5.3 (whole pipeline.run)"}
        cpu_key = {"selfalign_stage": "selfalign", "selfalign_whole_run": None, "raw_aiohttp": "raw_aiohttp",
                   "raw_openai": "raw_openai", "backend": "backend", "backend_lean_http_variant": "backend_lean_http",
                   "backend_aiohttp_variant": "backend_aiohttp", "selfalign_stage_aiohttp_variant": "selfalign_aiohttp",
                   "distilabel_window": None, "distilabel_whole_run": "distilabel"}
        for key, label in names.items():
            value = overhead["median_req_per_s"].get(key)
            lines.append(f"| {label} | {_fmt(value)} | {_fmt(cpu.get(cpu_key[key])) if cpu_key[key] else '-'} |")
        floor = overhead.get("sdk_post_cpu_ms_no_io")
        if floor:
            lines += ["", "CPU ms per call over a transport that does no I/O (the client library's own cost): "
                      + ", ".join(f"{k} {v}" for k, v in floor.items()) + "."]
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
