"""A real HTTP proxy on 127.0.0.1 that injects faults in front of an OpenAI-compatible server.

    with FaultProxy(upstream.url, faults={"429": 0.2, "reset": 0.1}, seed=0) as proxy:
        proxy.url            # http://127.0.0.1:PORT/v1, give it to the client instead of the upstream
        proxy.counts         # Counter: fault name -> times injected ("ok" for clean pass-throughs)
        proxy.requests       # chat requests received
        proxy.forwarded      # requests sent on to the upstream
        proxy.log            # [(request number, fault or "ok", body fingerprint, arrival time)]
        proxy.bodies         # body fingerprint -> request body bytes

Faults apply to `POST .../chat/completions` only (GET /models always passes through). Request number n
(0, 1, 2, ... in arrival order) draws its fault from `random.Random(f"{seed}:{n}")`, so the sequence of
faults is the same on every run whatever the concurrency. Rates are probabilities per request and must
add up to at most 1; the rest pass through untouched.

| fault              | what the client sees                                                           |
| ------------------ | ------------------------------------------------------------------------------ |
| `429_retry_after`  | 429 with `Retry-After: <retry_after_s>`                                        |
| `429`              | 429 without Retry-After                                                        |
| `500` `502` `503`  | that status with an OpenAI-style error body                                    |
| `hang`             | nothing for `hang_s` seconds (set it past the client's timeout), then a close |
| `reset`            | the connection reset (RST, SO_LINGER 0) without any response                   |
| `truncated`        | the upstream's 200 headers with the full Content-Length, half the body, close  |
| `not_json`         | 200 `application/json` whose body is an HTML error page                        |
| `schema_violation` | the upstream's 200 with message content that is JSON but breaks the schema     |
|                    | (score out of range, a missing field, or wrong types; chosen by the seed)      |
| `empty_choices`    | the upstream's 200 with `choices: []`                                          |

The server is a small HTTP/1.1 implementation on asyncio streams (keep-alive, Content-Length or chunked
request bodies), so that every fault is byte-exact: a library server would not let us send a short body
or reset a socket. Upstream calls go through aiohttp. Everything runs on one event loop in a daemon thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import socket
import struct
import threading
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

import aiohttp

FAULTS = ("429_retry_after", "429", "500", "502", "503", "hang", "reset", "truncated", "not_json",
          "schema_violation", "empty_choices")
TRANSIENT = FAULTS  # every fault here is transient: a retry (or a re-ask) can succeed
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error",
           502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024


def mixed_faults(total: float = 0.2, kinds: tuple[str, ...] = FAULTS) -> dict[str, float]:
    """Every fault kind at an equal share of `total`."""
    return {kind: total / len(kinds) for kind in kinds}


class _BadRequest(Exception):
    pass


class FaultProxy:
    def __init__(self, upstream_url: str, faults: dict[str, float] | None = None, seed: int = 0,
                 retry_after_s: float = 1, hang_s: float = 5.0, upstream_timeout_s: float = 300.0):
        self.upstream_url = upstream_url.rstrip("/")
        self.seed = seed
        self.retry_after_s = retry_after_s
        self.hang_s = hang_s
        self.upstream_timeout_s = upstream_timeout_s
        self.faults: dict[str, float] = {}
        self.set_faults(faults or {})
        self.counts: Counter[str] = Counter()
        self.requests = 0
        self.forwarded = 0
        # (request number, fault or "ok", body fingerprint, time.monotonic() on arrival)
        self.log: list[tuple[int, str, str, float]] = []
        self.bodies: dict[str, bytes] = {}  # body fingerprint -> the request body, to see what was asked
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task] = set()
        self.port: int | None = None
        # Requests are sent to the upstream under its own path prefix (normally /v1).
        self._upstream_prefix = urlsplit(self.upstream_url).path.rstrip("/")

    # ------------------------------------------------------------------ configuration and counters

    def set_faults(self, faults: dict[str, float]) -> None:
        unknown = set(faults) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown fault(s) {sorted(unknown)}; known: {', '.join(FAULTS)}")
        if any(rate < 0 for rate in faults.values()) or sum(faults.values()) > 1 + 1e-9:
            raise ValueError(f"fault rates must be >= 0 and add up to at most 1: {faults}")
        self.faults = dict(faults)

    def reset_counts(self) -> None:
        """Zero the counters and the log; request numbering (and so the fault sequence) starts again."""
        with self._lock:
            self.counts.clear()
            self.requests = 0
            self.forwarded = 0
            self.log.clear()
            self.bodies.clear()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": self.requests, "forwarded": self.forwarded, "faults": dict(self.counts)}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _draw(self, body: bytes) -> tuple[int, str]:
        with self._lock:
            number = self.requests
            self.requests += 1
            draw = random.Random(f"{self.seed}:{number}").random()
            fault = "ok"
            edge = 0.0
            for kind in FAULTS:  # fixed order, so the mapping from draw to fault never depends on dict order
                edge += self.faults.get(kind, 0.0)
                if draw < edge:
                    fault = kind
                    break
            self.counts[fault] += 1
            fingerprint = hashlib.sha256(body).hexdigest()[:16]
            self.log.append((number, fault, fingerprint, time.monotonic()))
            self.bodies.setdefault(fingerprint, body)
            return number, fault

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "FaultProxy":
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._open())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._close())
            loop.close()

        self._thread = threading.Thread(target=main, name="fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fault proxy did not start within 10 s")
        if failure:
            raise RuntimeError(f"fault proxy failed to start: {failure[0]!r}") from failure[0]
        return self

    async def _open(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.upstream_timeout_s),
            connector=aiohttp.TCPConnector(limit=256, force_close=False))
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0, backlog=512,
                                                  limit=MAX_HEADER_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):  # hung responses and idle keep-alive connections
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._session is not None:
            await self._session.close()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(15)

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ HTTP

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            for _ in range(100_000):  # keep-alive, bounded
                try:
                    request = await self._read_request(reader)
                except _BadRequest as exc:
                    await self._respond(writer, 400, json.dumps({"error": {"message": str(exc)}}).encode(),
                                        keep_alive=False)
                    return
                if request is None:
                    return
                method, path, headers, body = request
                keep_alive = headers.get("connection", "").lower() != "close"
                if not await self._handle(writer, method, path, headers, body, keep_alive) or not keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)
            if not writer.is_closing():
                writer.close()

    async def _read_request(self, reader: asyncio.StreamReader):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                raise _BadRequest("incomplete request head") from None
            return None  # the client closed the keep-alive connection
        except asyncio.LimitOverrunError:
            raise _BadRequest("request head too large") from None
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, path, _version = lines[0].split(" ", 2)
        except ValueError:
            raise _BadRequest(f"bad request line {lines[0]!r}") from None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = bytearray()
            for _ in range(1_000_000):
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")  # (no trailers expected)
                    break
                body += await reader.readexactly(size)
                await reader.readexactly(2)
                if len(body) > MAX_BODY_BYTES:
                    raise _BadRequest("body too large")
            return method, path, headers, bytes(body)
        length = int(headers.get("content-length") or 0)
        if length > MAX_BODY_BYTES:
            raise _BadRequest("body too large")
        return method, path, headers, await reader.readexactly(length) if length else b""

    async def _respond(self, writer: asyncio.StreamWriter, status: int, body: bytes,
                       content_type: str = "application/json", extra: dict[str, str] | None = None,
                       keep_alive: bool = True, declared_length: int | None = None) -> None:
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}",
                 f"Content-Type: {content_type}",
                 f"Content-Length: {len(body) if declared_length is None else declared_length}",
                 f"Connection: {'keep-alive' if keep_alive else 'close'}"]
        lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()

    async def _forward(self, method: str, path: str, headers: dict[str, str], body: bytes) \
            -> tuple[int, str, bytes, dict[str, str]]:
        assert self._session is not None
        suffix = path[3:] if path.startswith("/v1") else path
        url = self.upstream_url + suffix
        send = {k: v for k, v in headers.items() if k in ("content-type", "authorization", "accept")}
        with self._lock:
            self.forwarded += 1
        async with self._session.request(method, url, data=body or None, headers=send) as response:
            payload = await response.read()
            passed = {k: v for k, v in response.headers.items() if k.lower() in ("retry-after", "retry-after-ms")}
            return response.status, response.headers.get("content-type", "application/json"), payload, passed

    async def _handle(self, writer: asyncio.StreamWriter, method: str, path: str, headers: dict[str, str],
                      body: bytes, keep_alive: bool) -> bool:
        """Answer one request. Returns False when the connection must end (the fault closed it)."""
        is_chat = method == "POST" and path.split("?")[0].endswith("/chat/completions")
        number, fault = self._draw(body) if is_chat else (-1, "ok")
        rng = random.Random(f"{self.seed}:{number}:detail")
        if fault in ("429_retry_after", "429", "500", "502", "503"):
            status = 429 if fault.startswith("429") else int(fault)
            extra = {"Retry-After": f"{self.retry_after_s:g}"} if fault == "429_retry_after" else None
            error = {"error": {"message": f"injected {fault} (request {number})", "type": "fault_proxy",
                               "code": status}}
            await self._respond(writer, status, json.dumps(error).encode(), extra=extra, keep_alive=keep_alive)
            return True
        if fault == "hang":
            await asyncio.sleep(self.hang_s)  # bounded: the client has given up by now
            return False
        if fault == "reset":
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if fault == "not_json":
            page = b"<html><head><title>502 Bad Gateway</title></head><body>upstream hiccup</body></html>"
            await self._respond(writer, 200, page, keep_alive=keep_alive)
            return True
        try:
            status, content_type, payload, passed = await self._forward(method, path, headers, body)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            error = {"error": {"message": f"fault proxy: upstream failed: {type(exc).__name__}: {exc}"}}
            await self._respond(writer, 502, json.dumps(error).encode(), keep_alive=keep_alive)
            return True
        if fault == "truncated" and status == 200:
            writer.write(f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {len(payload)}\r\n"
                         f"Connection: keep-alive\r\n\r\n".encode("latin-1") + payload[:len(payload) // 2])
            await writer.drain()
            writer.close()
            return False
        if fault in ("schema_violation", "empty_choices") and status == 200:
            payload = _mangle(payload, fault, rng)
        await self._respond(writer, status, payload, content_type=content_type, extra=passed, keep_alive=keep_alive)
        return True


def _mangle(payload: bytes, fault: str, rng: random.Random) -> bytes:
    try:
        data = json.loads(payload)
    except ValueError:
        return payload
    if fault == "empty_choices":
        data["choices"] = []
        return json.dumps(data).encode()
    try:
        content = json.loads(data["choices"][0]["message"]["content"])
    except (ValueError, KeyError, IndexError, TypeError):
        content = {}
    if not isinstance(content, dict):
        content = {}
    kind = rng.choice(("out_of_range", "missing_field", "wrong_type"))
    if kind == "out_of_range":
        if "scores" in content and isinstance(content["scores"], dict):
            content["scores"] = {k: 999 for k in content["scores"]}
        else:
            content["score"] = 999
    elif kind == "missing_field":
        content.pop("score", None)
        content.pop("scores", None)
    else:
        content = {"critique": 12345, "score": "excellent"}
    data["choices"][0]["message"]["content"] = json.dumps(content)
    return json.dumps(data).encode()
