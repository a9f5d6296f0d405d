"""An instant local OpenAI-compatible server for the overhead benchmark.

It answers ``POST /v1/chat/completions`` at once with a valid critique
(``{"critique": "...", "score": 7}``) as the message content, plus usage token
counts, so that the client under test is the only bottleneck. It is a raw
asyncio HTTP/1.1 server (keep-alive, Content-Length bodies; no chunked request
bodies), with no dependency outside the standard library (``orjson`` and
``uvloop`` are used when importable), so any virtual environment can run it.

Run it in its own process so it does not steal the client's CPU::

    url, proc = start_instant_server()   # url == "http://127.0.0.1:PORT/v1"
    ...
    stop_instant_server(proc)

or ``python benchmarks/instant_server.py [--port N]``, which prints
``READY http://127.0.0.1:PORT/v1`` once listening.

Request fields are read only for ``model`` and ``n`` (``n`` choices are
returned, default 1); ``seed``, sampling fields and ``response_format`` may be
present and are ignored. ``GET /v1/models`` lists one model. ``GET /v1/stats``
returns ``{"completions", "first", "last"}`` (count and wall-clock times of the
first and last completion since start or the last reset); ``DELETE /v1/stats``
returns them and resets. :func:`server_stats` wraps both.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

try:  # optional speed-ups; the server works without them
    import orjson as _orjson

    def _loads(b: bytes):
        return _orjson.loads(b)

    def _dumps(o) -> bytes:
        return _orjson.dumps(o)

except ImportError:  # pragma: no cover - depends on the environment
    import json as _json

    def _loads(b: bytes):
        return _json.loads(b)

    def _dumps(o) -> bytes:
        return _json.dumps(o, separators=(",", ":")).encode()


CRITIQUE_CONTENT = (
    '{"critique": "The response answers the question directly and is mostly '
    'accurate, but it omits one relevant detail and could be more concise.", '
    '"score": 7}'
)
COMPLETION_TOKENS = 32
DEFAULT_MODEL = "instant"

_STATUS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed"}


def _response(status: int, body: bytes, keep_alive: bool) -> bytes:
    head = (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: %s\r\n\r\n"
        % (status, _STATUS.get(status, b"Error"), len(body), b"keep-alive" if keep_alive else b"close")
    )
    return head + body


class _State:
    def __init__(self) -> None:
        self.counter = 0
        self.created = int(time.time())
        self.reset()

    def reset(self) -> None:
        self.completions = 0  # chat completions answered since the last reset
        self.first = None  # wall time (time.time()) of the first and last of them
        self.last = None

    def stats(self) -> bytes:
        return _dumps({"completions": self.completions, "first": self.first, "last": self.last})


def _completion(state: _State, body: bytes) -> tuple[int, bytes]:
    try:
        req = _loads(body) if body else {}
        if not isinstance(req, dict):
            raise ValueError("body is not an object")
    except Exception as exc:  # noqa: BLE001 - report any malformed body as 400
        return 400, _dumps({"error": {"message": f"invalid JSON body: {exc}", "type": "invalid_request_error"}})
    n = req.get("n") or 1
    try:
        n = max(1, int(n))
    except (TypeError, ValueError):
        n = 1
    state.counter += 1
    state.completions += 1
    now = time.time()
    if state.first is None:
        state.first = now
    state.last = now
    prompt_tokens = max(1, len(body) // 4)  # rough, deterministic
    resp = {
        "id": f"chatcmpl-instant-{state.counter}",
        "object": "chat.completion",
        "created": state.created,
        "model": req.get("model") or DEFAULT_MODEL,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": CRITIQUE_CONTENT},
                "logprobs": None,
                "finish_reason": "stop",
            }
            for i in range(n)
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": COMPLETION_TOKENS * n,
            "total_tokens": prompt_tokens + COMPLETION_TOKENS * n,
        },
        "system_fingerprint": "instant",
    }
    return 200, _dumps(resp)


def _models() -> bytes:
    return _dumps({"object": "list", "data": [{"id": DEFAULT_MODEL, "object": "model", "created": 0, "owned_by": "bench"}]})


class _HTTPProtocol(asyncio.Protocol):
    """Minimal HTTP/1.1 server protocol: pipelining-safe, keep-alive by default."""

    __slots__ = ("state", "transport", "buf")

    def __init__(self, state: _State) -> None:
        self.state = state
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out = []
        close = False
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = bytes(self.buf[:end])
            lines = head.split(b"\r\n")
            try:
                method, target, version = lines[0].split(b" ", 2)
            except ValueError:
                out.append(_response(400, b'{"error":{"message":"bad request line"}}', False))
                close = True
                break
            length = 0
            keep_alive = version != b"HTTP/1.0"
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                lname = name.strip().lower()
                if lname == b"content-length":
                    length = int(value.strip())
                elif lname == b"connection":
                    v = value.strip().lower()
                    if v == b"close":
                        keep_alive = False
                    elif v == b"keep-alive":
                        keep_alive = True
                elif lname == b"expect" and value.strip().lower() == b"100-continue":
                    out.append(b"HTTP/1.1 100 Continue\r\n\r\n")
            total = end + 4 + length
            if len(self.buf) < total:
                break
            body = bytes(self.buf[end + 4 : total])
            del self.buf[:total]
            path = target.split(b"?", 1)[0].rstrip(b"/")
            if path.endswith(b"/chat/completions"):
                if method == b"POST":
                    status, payload = _completion(self.state, body)
                else:
                    status, payload = 405, b'{"error":{"message":"use POST"}}'
            elif path.endswith(b"/models") and method == b"GET":
                status, payload = 200, _models()
            elif path.endswith(b"/stats"):
                status, payload = 200, self.state.stats()
                if method == b"DELETE":
                    self.state.reset()
            else:
                status, payload = 404, b'{"error":{"message":"not found"}}'
            out.append(_response(status, payload, keep_alive))
            if not keep_alive:
                close = True
                break
        if out and self.transport is not None:
            self.transport.write(b"".join(out))
        if close and self.transport is not None:
            self.transport.close()


async def serve(host: str = "127.0.0.1", port: int = 0, ready=None) -> None:
    """Serve forever; ``ready(url)`` is called once listening."""
    state = _State()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _HTTPProtocol(state), host, port, backlog=4096, reuse_address=True)
    actual = server.sockets[0].getsockname()[1]
    url = f"http://{host}:{actual}/v1"
    if ready is not None:
        ready(url)
    async with server:
        await server.serve_forever()


def _install_uvloop() -> None:
    try:
        import uvloop  # type: ignore

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)

    def ready(url: str) -> None:
        print(f"READY {url}", flush=True)

    _install_uvloop()
    try:
        asyncio.run(serve(args.host, args.port, ready))
    except KeyboardInterrupt:
        pass


def start_instant_server(host: str = "127.0.0.1", port: int = 0, timeout: float = 15.0,
                         python: str | None = None) -> tuple[str, subprocess.Popen]:
    """Start the server in a separate process; return ``(base_url, process)``.

    ``base_url`` ends in ``/v1`` (what ``AsyncOpenAI(base_url=...)`` expects).
    Stop it with :func:`stop_instant_server` (or ``process.terminate()``).
    """
    import selectors
    import tempfile

    cmd = [python or sys.executable, os.path.abspath(__file__), "--host", host, "--port", str(port)]
    err = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    ready = sel.select(timeout)
    sel.close()
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("READY "):
        proc.kill()
        proc.wait()
        err.seek(0)
        raise RuntimeError(f"instant server failed to start: {line!r} {err.read()[-2000:]}")
    err.close()
    return line.split(" ", 1)[1].strip(), proc


def server_stats(base_url: str, reset: bool = False) -> dict:
    """The server's completion count and first/last request times (optionally reset)."""
    import json
    import urllib.request

    req = urllib.request.Request(base_url.rstrip("/") + "/stats", method="DELETE" if reset else "GET")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def stop_instant_server(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for f in (proc.stdout, proc.stderr):
        if f is not None:
            f.close()


if __name__ == "__main__":
    main()
