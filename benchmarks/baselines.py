"""Raw client loops: the baselines for the overhead benchmark (issue #6, case 1).

Each runner takes a base URL (ending in ``/v1``, as :func:`start_instant_server`
returns), a list of requests, and a concurrency (requests in flight, bounded by
an ``asyncio.Semaphore``), sends every request once, checks that each reply's
message content parses as JSON, and returns ``{"requests", "seconds",
"req_per_s", "cpu_seconds", "cpu_ms_per_req"}`` (``cpu_*`` is this process's
CPU time, i.e. the client's cost per request).

A request is a dict of chat-completion keyword arguments, as for
``client.chat.completions.create(**request)``: ``model``, ``messages``,
sampling fields (``temperature``, ``top_p``, ``max_tokens``, ``seed``) and
``response_format``. :func:`make_requests` builds a critique-like set.

The two baselines of the issue are :func:`run_raw_openai` (stock
``AsyncOpenAI``) and :func:`run_raw_aiohttp` (aiohttp + orjson, the fastest
client). The other ``run_openai_*`` runners are transport variants measured to
choose a lean path for selfalign's ``openai`` backend. ``python -m
benchmarks.baselines`` prints a table of all of them against the instant server.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, Sequence

import orjson

Request = dict[str, Any]

CRITIQUE_SCHEMA = {
    "type": "object",
    "properties": {
        "critique": {"type": "string"},
        "score": {"type": "integer", "minimum": 1, "maximum": 10},
    },
    "required": ["critique", "score"],
    "additionalProperties": False,
}

SYSTEM_PROMPT = (
    "You are a strict reviewer. Critique the assistant's answer to the user's question, "
    "then give it an integer score from 1 (useless) to 10 (perfect). Reply with JSON only: "
    '{"critique": "...", "score": N}.'
)


def critique_messages(question: str, answer: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"Question:\n{question}\n\nAnswer:\n{answer}\n\nYour critique as JSON:"},
    ]


def make_requests(rows: int = 2000, samples: int = 4, model: str = "instant",
                  temperature: float = 0.7, max_tokens: int = 256) -> list[Request]:
    """``rows`` × ``samples`` critique requests (one request per sample, seeds differ)."""
    out: list[Request] = []
    for i in range(rows):
        q = f"Question {i}: explain why the sum of the first {i + 2} odd numbers is a perfect square."
        a = f"Because 1 + 3 + ... + (2n-1) = n^2; for n = {i + 2} that is {(i + 2) ** 2}."
        msgs = critique_messages(q, a)
        for s in range(samples):
            out.append({
                "model": model,
                "messages": msgs,
                "temperature": temperature,
                "max_tokens": max_tokens,
                "seed": i * samples + s,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "critique", "schema": CRITIQUE_SCHEMA, "strict": True},
                },
            })
    return out


def _check_content(content: str | bytes | None) -> None:
    if content is None:
        raise ValueError("empty message content")
    obj = orjson.loads(content)
    if "score" not in obj:
        raise ValueError(f"no score in {content!r}")


async def _drive(requests: Sequence[Request], concurrency: int,
                 send: Callable[[Request], Awaitable[None]]) -> dict[str, float]:
    sem = asyncio.Semaphore(concurrency)

    async def one(req: Request) -> None:
        async with sem:
            await send(req)

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(r) for r in requests))
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    n = len(requests)
    return {
        "requests": n,
        "seconds": round(seconds, 4),
        "req_per_s": round(n / seconds, 1) if seconds > 0 else float("inf"),
        "cpu_seconds": round(cpu, 4),
        "cpu_ms_per_req": round(1000 * cpu / n, 3) if n else 0.0,
    }


# --------------------------------------------------------------------------- aiohttp


async def _raw_aiohttp(base_url: str, requests: Sequence[Request], concurrency: int,
                       retry: str | None = None) -> dict[str, float]:
    import aiohttp

    url = base_url.rstrip("/") + "/chat/completions"
    headers = {"Authorization": "Bearer x", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=600, connect=5)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def post(req: Request) -> None:
            async with session.post(url, data=orjson.dumps(req), headers=headers) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {body[:200]!r}")
            _check_content(orjson.loads(body)["choices"][0]["message"]["content"])

        send = post
        if retry:
            import tenacity

            retryable = (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError)
            retrying = tenacity.AsyncRetrying(
                stop=tenacity.stop_after_attempt(3),
                wait=tenacity.wait_random_exponential(multiplier=0.5, max=8),
                retry=tenacity.retry_if_exception_type(retryable),
                reraise=True,
            )

            async def with_tenacity(req: Request) -> None:
                async for attempt in retrying.copy():
                    with attempt:
                        await post(req)

            async def fast_path(req: Request) -> None:
                # first attempt outside tenacity; only a failure enters the retry loop
                try:
                    await post(req)
                except retryable:
                    await with_tenacity(req)

            send = with_tenacity if retry == "always" else fast_path  # type: ignore[assignment]

        return await _drive(requests, concurrency, send)


def run_raw_aiohttp(base_url: str, requests: Sequence[Request], concurrency: int = 64) -> dict[str, float]:
    """Baseline (b): raw aiohttp loop, JSON via orjson — the fastest client."""
    return asyncio.run(_raw_aiohttp(base_url, requests, concurrency))


def run_aiohttp_tenacity(base_url: str, requests: Sequence[Request], concurrency: int = 64) -> dict[str, float]:
    """The raw aiohttp loop with each request wrapped in tenacity ``AsyncRetrying``."""
    return asyncio.run(_raw_aiohttp(base_url, requests, concurrency, retry="always"))


def run_aiohttp_tenacity_fast(base_url: str, requests: Sequence[Request], concurrency: int = 64) -> dict[str, float]:
    """The raw aiohttp loop; a request enters tenacity ``AsyncRetrying`` only after a first failure."""
    return asyncio.run(_raw_aiohttp(base_url, requests, concurrency, retry="fastpath"))


# --------------------------------------------------------------------------- openai


def _httpx():
    """The HTTP library of the installed ``openai``: ``httpx2`` (openai >= 3) or ``httpx``."""
    try:
        import httpx2 as httpx
    except ImportError:  # older openai releases
        import httpx  # type: ignore[no-redef]
    return httpx


def _openai_client(base_url: str, concurrency: int, transport: str):
    import openai

    kw: dict[str, Any] = {"base_url": base_url, "api_key": "x", "max_retries": 0}
    if transport == "httpx":  # stock client, stock retries
        kw.pop("max_retries")
    elif transport == "httpx-tuned":
        httpx = _httpx()
        kw["http_client"] = openai.DefaultAsyncHttpxClient(
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency,
                                keepalive_expiry=60),
            http1=True, http2=False,
        )
    elif transport == "aiohttp":
        httpx = _httpx()
        kw["http_client"] = openai.DefaultAioHttpClient(
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency,
                                keepalive_expiry=60),
        )
    else:
        raise ValueError(transport)
    return openai.AsyncOpenAI(**kw)


async def _openai(base_url: str, requests: Sequence[Request], concurrency: int, transport: str,
                  raw: bool | str) -> dict[str, float]:
    client = _openai_client(base_url, concurrency, transport)
    try:
        if raw == "post":
            httpx = _httpx()

            post = client.post
            options = {"headers": {"Content-Type": "application/json"}}

            async def send(req: Request) -> None:
                # the client's generic POST: its auth, retries, errors and transport, but
                # no typed-params transform of the body (pre-serialized with orjson) and
                # no pydantic model of the reply
                resp = await post("/chat/completions", cast_to=httpx.Response,
                                  content=orjson.dumps(req), options=options)
                data = orjson.loads(resp.content)
                _check_content(data["choices"][0]["message"]["content"])
        elif raw:
            create = client.chat.completions.with_raw_response.create

            async def send(req: Request) -> None:
                resp = await create(**req)
                data = orjson.loads(resp.content)  # skip the pydantic ChatCompletion model
                _check_content(data["choices"][0]["message"]["content"])
        else:
            create = client.chat.completions.create

            async def send(req: Request) -> None:
                completion = await create(**req)
                _check_content(completion.choices[0].message.content)

        return await _drive(requests, concurrency, send)
    finally:
        await client.close()


def run_raw_openai(base_url: str, requests: Sequence[Request], concurrency: int = 64) -> dict[str, float]:
    """Baseline (a): stock ``AsyncOpenAI`` (httpx transport, its default retries) with a semaphore."""
    return asyncio.run(_openai(base_url, requests, concurrency, "httpx", raw=False))


def run_openai_httpx_tuned(base_url, requests, concurrency=64):
    """AsyncOpenAI with an httpx client sized to the concurrency (keep-alive pool), max_retries=0."""
    return asyncio.run(_openai(base_url, requests, concurrency, "httpx-tuned", raw=False))


def run_openai_aiohttp(base_url, requests, concurrency=64):
    """AsyncOpenAI(http_client=DefaultAioHttpClient(...)) — the ``openai[aiohttp]`` extra, max_retries=0."""
    return asyncio.run(_openai(base_url, requests, concurrency, "aiohttp", raw=False))


def run_openai_httpx_raw(base_url, requests, concurrency=64):
    """Tuned httpx client + ``with_raw_response`` + orjson (no pydantic model of the reply)."""
    return asyncio.run(_openai(base_url, requests, concurrency, "httpx-tuned", raw=True))


def run_openai_aiohttp_raw(base_url, requests, concurrency=64):
    """aiohttp transport + ``with_raw_response`` + orjson (no pydantic model of the reply)."""
    return asyncio.run(_openai(base_url, requests, concurrency, "aiohttp", raw=True))


def run_openai_httpx_post(base_url, requests, concurrency=64):
    """Tuned httpx client; ``client.post(..., content=orjson bytes, cast_to=httpx.Response)`` + orjson."""
    return asyncio.run(_openai(base_url, requests, concurrency, "httpx-tuned", raw="post"))


def run_openai_aiohttp_post(base_url, requests, concurrency=64):
    """aiohttp transport; ``client.post(..., content=orjson bytes, cast_to=httpx.Response)`` + orjson."""
    return asyncio.run(_openai(base_url, requests, concurrency, "aiohttp", raw="post"))


RUNNERS: dict[str, Callable[..., dict[str, float]]] = {
    "raw_aiohttp": run_raw_aiohttp,
    "aiohttp+tenacity": run_aiohttp_tenacity,
    "aiohttp+tenacity on failure": run_aiohttp_tenacity_fast,
    "raw_openai (stock)": run_raw_openai,
    "openai httpx tuned": run_openai_httpx_tuned,
    "openai aiohttp": run_openai_aiohttp,
    "openai httpx tuned raw+orjson": run_openai_httpx_raw,
    "openai aiohttp raw+orjson": run_openai_aiohttp_raw,
    "openai httpx tuned client.post+orjson": run_openai_httpx_post,
    "openai aiohttp client.post+orjson": run_openai_aiohttp_post,
}


def main(argv: list[str] | None = None) -> None:
    import argparse
    import statistics

    from benchmarks.instant_server import start_instant_server, stop_instant_server

    p = argparse.ArgumentParser(description="raw client loops against the instant server")
    p.add_argument("--requests", type=int, default=8000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--only", nargs="*", help="runner names (substring match)")
    p.add_argument("--uvloop", action="store_true", help="run the client loops on uvloop")
    args = p.parse_args(argv)
    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    reqs = make_requests(rows=(args.requests + 3) // 4, samples=4)[: args.requests]
    url, proc = start_instant_server()
    try:
        run_raw_aiohttp(url, reqs[:200], args.concurrency)  # warm-up
        results = {}
        for name, fn in RUNNERS.items():
            if args.only and not any(o in name for o in args.only):
                continue
            runs = [fn(url, reqs, args.concurrency) for _ in range(args.repeats)]
            results[name] = {
                "req_per_s": statistics.median(r["req_per_s"] for r in runs),
                "cpu_ms_per_req": statistics.median(r["cpu_ms_per_req"] for r in runs),
                "runs": [r["req_per_s"] for r in runs],
            }
        base = results.get("raw_aiohttp", {}).get("req_per_s")
        print(f"| variant | req/s (median of {args.repeats}) | client CPU ms/req | × raw aiohttp |")
        print("|---|---:|---:|---:|")
        for name, r in results.items():
            ratio = f"{r['req_per_s'] / base:.2f}" if base else "-"
            print(f"| {name} | {r['req_per_s']:.0f} {r['runs']} | {r['cpu_ms_per_req']:.2f} | {ratio} |")
    finally:
        stop_instant_server(proc)


if __name__ == "__main__":
    main()
