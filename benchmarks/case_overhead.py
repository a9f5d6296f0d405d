"""Cases 1 (overhead) and 4 (resume): selfalign's critique stage against an instant local server.

Workload: `rows` generated TRL rows, a critique stage with `samples` samples of the chosen answer
(rows × samples requests; 2,000 × 4 = 8,000 by default) against `benchmarks/instant_server.py`, an
`openai` model with max_concurrency 64 and structured_output json_schema, run through the library
(`load_pipeline` + `run_pipeline`). In the same run and against the same server, with the very same
request bodies (recorded from selfalign, serialised as the backend serialises them) and 64 in flight:

- raw aiohttp loop (aiohttp + orjson, a semaphore) — the fastest client, the limit;
- raw AsyncOpenAI loop (`client.chat.completions.create(**body)`, the stock client);
- distilabel 1.5.3 in its own venv (ChatGeneration over OpenAILLM, one request per sample);
- selfalign's `OpenAIBackend.generate` alone on the recorded requests (no cache, no validation);
- for comparison (`benchmarks/variants.py`, not shipped): the backend with an `http_client` that sends
  straight through aiohttp (what is left is the SDK's request pipeline), the backend over a bare aiohttp
  session (no SDK at all), and the whole critique stage with that bare-aiohttp backend; plus the SDK's
  CPU per `post` over a transport that does no I/O.

selfalign's figure is requests / seconds of the critique stage as the run manifest reports it (request
building, cache lookups and writes, backend, validation, the stage's parquet); the whole `run_pipeline`
(load stage, manifest) is reported beside it. distilabel's is the request window the server saw (first
to last completion: the most favourable reading for distilabel; its whole `pipeline.run` is beside it).

Resume (case 4) re-runs each finished pipeline in the same run directory: `model_calls.sent` must be 0
and the time is compared with the first run's. The unchanged critique stage is then read back from its
parquet (stage reuse); a second re-run with the reuse records removed measures the cache-only path.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .measure import median, ratio, rounded, timed

CONCURRENCY = 64


def run(rows: int = 2000, samples: int = 4, repeats: int = 2, distilabel: bool = True,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    from selfalign.backends.openai_backend import OpenAIBackend
    from selfalign.config import load_pipeline
    from selfalign.runner import run_pipeline

    from . import baselines, workload
    from .distilabel_env import run_distilabel
    from .instant_server import server_stats, start_instant_server, stop_instant_server
    from .variants import AiohttpOpenAIBackend, LeanHttpClientOpenAIBackend, sdk_post_floor_ms

    tmp = Path(tempfile.mkdtemp(prefix="selfalign-bench-overhead-"))
    url, server = start_instant_server()
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in (
        "raw_aiohttp", "raw_openai", "backend", "backend_lean_http", "backend_aiohttp", "selfalign",
        "selfalign_aiohttp", "resume", "resume_cache_only", "distilabel")}
    try:
        data = workload.write_trl_jsonl(tmp / "pairs.jsonl", rows)
        model = {"backend": "openai", "base_url": url, "model": "instant", "max_concurrency": CONCURRENCY,
                 "structured_output": "json_schema"}
        pipeline = workload.write_pipeline(tmp / "overhead.yaml", "bench-overhead",
                                           [workload.load_stage(data), workload.critique_stage("m", samples)],
                                           models={"m": model})
        loaded = load_pipeline(pipeline)
        backend = OpenAIBackend(url, "instant", max_concurrency=CONCURRENCY)
        requests = workload.collect_requests(pipeline, "m", identity=backend.identity)
        bodies = [dict(backend.request_body(r), messages=list(r.messages)) for r in requests]
        n = len(requests)
        log(f"  overhead: {rows} rows x {samples} samples = {n} requests, {CONCURRENCY} in flight, server {url}")
        baselines.run_raw_aiohttp(url, bodies[:500], CONCURRENCY)  # warm-up (server, imports)

        def record(name: str, result: dict[str, Any]) -> None:
            runs[name].append(result)
            shown = result.get("req_per_s", result.get("unavailable", result))
            log(f"    {name:16s} {shown} req/s" if isinstance(shown, (int, float)) else f"    {name:16s} {shown}")

        def backend_run(cls) -> dict[str, Any]:
            be = cls(url, "instant", max_concurrency=CONCURRENCY)
            out, wall, cpu = timed(lambda: be.generate(requests, on_result=lambda i, c: None))
            bad = sum(1 for c in out if not c.ok)
            return {"requests": n, "seconds": round(wall, 4), "req_per_s": round(n / wall, 1),
                    "cpu_ms_per_req": round(1000 * cpu / n, 3), "failed": bad}

        def pipeline_run(out_dir: Path, backend_override=None) -> dict[str, Any]:
            overrides = {"m": backend_override} if backend_override is not None else None
            manifest, wall, cpu = timed(lambda: run_pipeline(loaded, output=out_dir, quiet=True,
                                                             backend_overrides=overrides))
            stage = next(s for s in manifest["rows"] if s["kind"] == "critique")
            calls = manifest["model_calls"]
            return {"requests": n, "sent": calls["sent"], "failed": calls["failed"], "rows_out": manifest["rows_out"],
                    "stage_seconds": stage["seconds"], "req_per_s": round(n / stage["seconds"], 1),
                    "run_seconds": round(wall, 4), "run_req_per_s": round(n / wall, 1),
                    "cpu_ms_per_req": round(1000 * cpu / n, 3)}

        sdk_floor = sdk_post_floor_ms()
        log(f"    CPU ms per call over a no-I/O transport: {sdk_floor}")
        for repeat in range(repeats):
            log(f"  repeat {repeat + 1}/{repeats}")
            record("raw_aiohttp", baselines.run_raw_aiohttp(url, bodies, CONCURRENCY))
            record("backend", backend_run(OpenAIBackend))
            record("backend_lean_http", backend_run(LeanHttpClientOpenAIBackend))
            record("backend_aiohttp", backend_run(AiohttpOpenAIBackend))

            out_dir = tmp / f"run{repeat}"
            record("selfalign", pipeline_run(out_dir))
            record("raw_aiohttp", baselines.run_raw_aiohttp(url, bodies, CONCURRENCY))
            variant_dir = tmp / f"variant{repeat}"
            record("selfalign_aiohttp", pipeline_run(variant_dir, AiohttpOpenAIBackend(
                url, "instant", max_concurrency=CONCURRENCY)))
            shutil.rmtree(variant_dir, ignore_errors=True)
            wall = runs["selfalign"][-1]["run_seconds"]

            server_stats(url, reset=True)
            manifest2, wall2, _ = timed(lambda: run_pipeline(loaded, output=out_dir, quiet=True))
            stats = server_stats(url)
            record("resume", {
                "first_seconds": round(wall, 4), "rerun_seconds": round(wall2, 4), "ratio": round(wall2 / wall, 4),
                "sent": manifest2["model_calls"]["sent"], "cached": manifest2["model_calls"]["cached"],
                "server_completions": stats.get("completions"), "rows_out": manifest2["rows_out"],
                "req_per_s": f"{wall2:.2f}s vs {wall:.2f}s"})
            # The same re-run without the stage-reuse records: every reply is read from the cache and checked.
            shutil.rmtree(out_dir / "reuse", ignore_errors=True)
            manifest3, wall3, _ = timed(lambda: run_pipeline(loaded, output=out_dir, quiet=True))
            record("resume_cache_only", {
                "first_seconds": round(wall, 4), "rerun_seconds": round(wall3, 4), "ratio": round(wall3 / wall, 4),
                "sent": manifest3["model_calls"]["sent"], "req_per_s": f"{wall3:.2f}s vs {wall:.2f}s"})
            shutil.rmtree(out_dir, ignore_errors=True)

            record("raw_openai", baselines.run_raw_openai(url, bodies, CONCURRENCY))
            if distilabel:
                record("distilabel", run_distilabel(url, bodies, CONCURRENCY, mode="expand"))
    finally:
        stop_instant_server(server)
        shutil.rmtree(tmp, ignore_errors=True)
    return summarise(runs, n, rows, samples, repeats, distilabel, sdk_floor)


def summarise(runs: dict[str, list[dict[str, Any]]], n: int, rows: int, samples: int, repeats: int,
              distilabel: bool, sdk_floor: dict[str, float]) -> dict[str, Any]:
    def med(name: str, key: str = "req_per_s") -> float | None:
        return median([r.get(key) for r in runs[name] if isinstance(r.get(key), (int, float))])

    sa, sa_run = med("selfalign"), med("selfalign", "run_req_per_s")
    raw_aio, raw_oai = med("raw_aiohttp"), med("raw_openai")
    be, be_lean, be_aio = med("backend"), med("backend_lean_http"), med("backend_aiohttp")
    sa_aio = med("selfalign_aiohttp")
    dl_window, dl_whole = med("distilabel", "window_req_per_s"), med("distilabel")
    dl_unavailable = next((r["unavailable"] for r in runs["distilabel"] if "unavailable" in r), None)
    if not distilabel:
        dl_unavailable = "unavailable: skipped (--no-distilabel)"
    cpu = {name: med(name, "cpu_ms_per_req") for name in ("raw_aiohttp", "raw_openai", "backend", "backend_lean_http",
                                                           "backend_aiohttp", "selfalign", "selfalign_aiohttp",
                                                           "distilabel")}
    resume_ratio = med("resume", "ratio")
    resume_sent = max((r["sent"] for r in runs["resume"]), default=None)
    cache_only_ratio = med("resume_cache_only", "ratio")
    cache_only_sent = max((r["sent"] for r in runs["resume_cache_only"]), default=None)
    rows_out = [
        _row("1 overhead", "critique stage req/s vs raw aiohttp loop", sa, "raw aiohttp", raw_aio, ">= 0.8", 0.8),
        _row("1 overhead", "critique stage req/s vs distilabel 1.5.3", sa, "distilabel (server window)",
             dl_window, ">= 3", 3.0, note=dl_unavailable),
        _row("1 overhead", "critique stage req/s vs raw AsyncOpenAI loop", sa, "raw AsyncOpenAI", raw_oai, None),
        _row("1 overhead", "whole run_pipeline req/s vs raw aiohttp", sa_run, "raw aiohttp", raw_aio, None),
        _row("1 overhead", "OpenAIBackend.generate alone vs raw aiohttp", be, "raw aiohttp", raw_aio, None),
        _row("1 overhead", "backend, http_client sending straight to aiohttp (variant) vs raw aiohttp", be_lean,
             "raw aiohttp", raw_aio, None),
        _row("1 overhead", "backend over bare aiohttp, no SDK (variant, not shipped) vs raw aiohttp", be_aio,
             "raw aiohttp", raw_aio, None),
        _row("1 overhead", "critique stage with the bare-aiohttp backend (variant, not shipped) vs raw aiohttp",
             sa_aio, "raw aiohttp", raw_aio, None),
        {"case": "4 resume", "metric": "re-run of the finished case-1 pipeline: time rerun/first, calls sent",
         "selfalign": resume_ratio, "baseline_name": "first run", "baseline": 1.0, "ratio": resume_ratio,
         "target": "< 0.05 and 0 calls", "met": None if resume_ratio is None else
         bool(resume_ratio < 0.05 and resume_sent == 0), "note": f"calls sent on re-run: {resume_sent}; the "
         "unchanged critique stage is read back from stages/ (selfalign/reuse.py)"},
        {"case": "4 resume", "metric": "the same re-run without stage reuse (every reply from the cache, validated)",
         "selfalign": cache_only_ratio, "baseline_name": "first run", "baseline": 1.0, "ratio": cache_only_ratio,
         "target": None, "met": None, "note": f"calls sent: {cache_only_sent}"},
    ]
    return {"status": "ok", "rows": rows_out, "details": {
        "requests": n, "rows": rows, "samples": samples, "concurrency": CONCURRENCY, "repeats": repeats,
        "median_req_per_s": {"selfalign_stage": sa, "selfalign_whole_run": sa_run, "raw_aiohttp": raw_aio,
                             "raw_openai": raw_oai, "backend": be, "backend_lean_http_variant": be_lean,
                             "backend_aiohttp_variant": be_aio, "selfalign_stage_aiohttp_variant": sa_aio,
                             "distilabel_window": dl_window, "distilabel_whole_run": dl_whole},
        "median_client_cpu_ms_per_req": cpu, "sdk_post_cpu_ms_no_io": sdk_floor,
        "distilabel": dl_unavailable or "ok", "runs": runs}}


def _row(case: str, metric: str, value: float | None, base_name: str, base: float | None, target: str | None,
         threshold: float | None = None, note: str | None = None) -> dict[str, Any]:
    r = ratio(value, base)
    return {"case": case, "metric": metric, "selfalign": rounded(value), "baseline_name": base_name,
            "baseline": rounded(base), "ratio": r, "target": target,
            "met": None if threshold is None or r is None else r >= threshold, "note": note}


if __name__ == "__main__":  # python -m benchmarks.case_overhead [rows] [repeats]
    import json
    import sys

    started = time.time()
    result = run(rows=int(sys.argv[1]) if len(sys.argv) > 1 else 2000,
                 repeats=int(sys.argv[2]) if len(sys.argv) > 2 else 1, distilabel="--no-distilabel" not in sys.argv)
    print(json.dumps({k: v for k, v in result.items() if k != "details"} | {"details": {
        k: v for k, v in result["details"].items() if k != "runs"}}, indent=1))
    print(f"{time.time() - started:.0f} s")
