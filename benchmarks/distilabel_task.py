"""The overhead benchmark's task in distilabel 1.5.3 (run by distilabel's own venv).

Not imported by selfalign: ``benchmarks/distilabel_env.py`` runs it as
``<venv>/bin/python benchmarks/distilabel_task.py --base-url URL --requests-file F``.

Pipeline: ``LoadDataFromDicts -> ChatGeneration(llm=OpenAILLM(base_url=URL,
api_key="x", model=...))``, where each row holds the exact ``messages`` of one
request from the JSONL file (the same prompts the raw loops send).

How distilabel bounds concurrency (1.5.3 source): the task's step process takes
one batch of ``input_batch_size`` rows, and ``AsyncLLM.generate`` runs
``asyncio.gather`` over one ``agenerate`` (one HTTP request, ``n=num_generations``)
per row, then waits for the whole batch before the next. So ``input_batch_size``
is its "requests in flight" (with a barrier per batch); we set it, and the
loader's ``batch_size``, to ``--concurrency``.

``--mode expand`` (default) sends one request per sample, as the raw loops do
(rows × samples rows, ``num_generations=1``): the same number of requests.
``--mode n`` sends one request per row with ``n=samples`` (distilabel's natural
``num_generations`` path; fewer, larger requests) — reported for reference.

Structured output: ``response_format={"type": "json_object"}`` through
``generation_kwargs``; distilabel's ``agenerate`` types it ``Dict[str, str]``, so
a nested ``json_schema`` is rejected, and ``structured_output=`` needs the
``instructor`` package. Per-request ``seed`` is not passed (``agenerate`` has no
such parameter). Temperature and max tokens come from the first request.

The cache is off (``use_cache=False``) and the pipeline's cache dir is a temp
dir, so every request is really sent. Prints one JSON line: ``{"requests",
"seconds", "req_per_s", ...}`` where ``seconds`` is the whole ``pipeline.run``
(process start-up included), plus ``window_seconds``/``window_req_per_s``: first
to last request as seen by the instant server when it has ``/stats``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import urllib.request


def _stats(base_url: str, reset: bool = False):
    try:
        req = urllib.request.Request(base_url.rstrip("/") + "/stats", method="DELETE" if reset else "GET")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())
    except Exception:  # noqa: BLE001 - a server without /stats
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", required=True)
    p.add_argument("--requests-file", required=True, help="JSONL, one chat-completion request per line")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--mode", choices=["expand", "n"], default="expand")
    p.add_argument("--samples", type=int, default=4, help="for --mode n: consecutive requests per row")
    args = p.parse_args(argv)

    with open(args.requests_file) as f:
        requests = [json.loads(line) for line in f if line.strip()]
    if not requests:
        raise SystemExit("no requests")
    first = requests[0]
    if args.mode == "expand":
        rows = [{"messages": r["messages"]} for r in requests]
        num_generations = 1
    else:
        rows = [{"messages": r["messages"]} for r in requests[:: args.samples]]
        num_generations = args.samples

    tmp = tempfile.mkdtemp(prefix="distilabel-bench-")
    os.environ["DISTILABEL_CACHE_DIR"] = tmp
    os.environ.setdefault("DISTILABEL_LOG_LEVEL", "WARNING")

    from distilabel.models import OpenAILLM
    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromDicts
    from distilabel.steps.tasks import ChatGeneration

    generation_kwargs = {
        "max_new_tokens": int(first.get("max_tokens") or 256),
        "temperature": float(first.get("temperature", 1.0)),
    }
    if first.get("response_format"):
        generation_kwargs["response_format"] = {"type": "json_object"}

    with Pipeline(name="selfalign-overhead-bench", cache_dir=tmp) as pipeline:
        load = LoadDataFromDicts(data=rows, batch_size=args.concurrency)
        gen = ChatGeneration(
            llm=OpenAILLM(
                model=first.get("model", "instant"),
                base_url=args.base_url,
                api_key="x",
                generation_kwargs=generation_kwargs,
            ),
            num_generations=num_generations,
            group_generations=True,
            input_batch_size=args.concurrency,
        )
        load >> gen

    _stats(args.base_url, reset=True)
    t0 = time.perf_counter()
    distiset = pipeline.run(use_cache=False, logging_handlers=[logging.NullHandler()])
    seconds = time.perf_counter() - t0
    st = _stats(args.base_url)

    out_rows = distiset["default"]["train"]
    generations = out_rows["generation"]
    flat = [g for gs in generations for g in (gs if isinstance(gs, list) else [gs])]
    ok = 0
    for g in flat:
        try:
            if g is not None and "score" in json.loads(g):
                ok += 1
        except (ValueError, TypeError):
            pass

    n_requests = len(rows)
    result = {
        "requests": n_requests,
        "seconds": round(seconds, 4),
        "req_per_s": round(n_requests / seconds, 1),
        "generations": len(flat),
        "valid_generations": ok,
        "mode": args.mode,
        "input_batch_size": args.concurrency,
        "num_generations": num_generations,
    }
    if st and st.get("completions") and st.get("first") is not None:
        window = max(st["last"] - st["first"], 1e-9)
        result["server_completions"] = st["completions"]
        result["window_seconds"] = round(window, 4)
        result["window_req_per_s"] = round(st["completions"] / window, 1)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
