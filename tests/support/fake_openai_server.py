"""A fast, deterministic OpenAI-compatible server on 127.0.0.1, for volume and fault tests.

`POST /v1/chat/completions` answers with a valid critique derived from a hash of the request body: the
same request always gets the same reply (byte for byte), different requests get different ones. With a
`response_format` schema the reply is a value valid under that schema (enum scores, string length caps);
without one it is `{"critique": ..., "score": 1..10}`. Replies carry `usage` token counts.
`GET /v1/models` lists one model. It runs an aiohttp server on its own event loop in a daemon thread:

    with FakeOpenAIServer() as server:
        server.url          # http://127.0.0.1:PORT/v1
        server.requests     # chat requests answered so far
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections import Counter
from typing import Any, Awaitable, Callable

from aiohttp import web

WORDS = ("clear", "accurate", "vague", "helpful", "polite", "incomplete", "concise", "wrong", "safe", "detailed",
         "relevant", "rambling", "honest", "evasive", "correct", "thorough")


class BackgroundLoop:
    """An asyncio loop in a daemon thread, running one aiohttp server bound to 127.0.0.1 on a free port."""

    def __init__(self, make_app: Callable[[], web.Application], name: str):
        self._make_app = make_app
        self._name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def start(self) -> None:
        started = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(self._serve())
            except BaseException as exc:  # reported to start()
                failure.append(exc)
                started.set()
                return
            started.set()
            self.loop.run_forever()
            self.loop.run_until_complete(self._runner.cleanup())
            self.loop.close()

        self._thread = threading.Thread(target=main, name=self._name, daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError(f"{self._name} did not start within 10 s")
        if failure:
            raise RuntimeError(f"{self._name} failed to start: {failure[0]!r}") from failure[0]

    async def _serve(self) -> None:
        self._runner = web.AppRunner(self._make_app(), access_log=None, handler_cancellation=True,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=512)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def call(self, coro: Awaitable[Any], timeout: float = 10.0) -> Any:
        """Run a coroutine on the server's loop from another thread."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop is not None and self._thread is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


def _seed(body: dict[str, Any]) -> bytes:
    # The whole request decides the reply, but not the JSON key order or spacing of how it was sent.
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).digest()


def _number(seed: bytes, salt: str) -> int:
    return int.from_bytes(hashlib.sha256(seed + salt.encode()).digest()[:8], "big")


def _text(seed: bytes, salt: str, max_length: int | None = None) -> str:
    words = [WORDS[_number(seed, f"{salt}{i}") % len(WORDS)] for i in range(4 + _number(seed, salt) % 8)]
    text = f"The reply is {' and '.join(words)} ({seed[:4].hex()})."
    if max_length is not None:
        text = text[:max_length]
    return text or "ok"


def value_for(schema: dict[str, Any], seed: bytes, salt: str = "", defs: dict[str, Any] | None = None) -> Any:
    """A value valid under a simple (pydantic-generated) JSON schema, chosen by `seed`."""
    defs = schema.get("$defs", {}) if defs is None else defs
    if "$ref" in schema:
        return value_for(defs[schema["$ref"].split("/")[-1]], seed, salt, defs)
    if "enum" in schema:
        return schema["enum"][_number(seed, salt) % len(schema["enum"])]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            return value_for(schema[key][0], seed, salt, defs)
    kind = schema.get("type")
    if kind == "object":
        return {name: value_for(sub, seed, f"{salt}.{name}", defs)
                for name, sub in schema.get("properties", {}).items()}
    if kind == "integer":
        low, high = schema.get("minimum", 1), schema.get("maximum", 10)
        return low + _number(seed, salt) % (high - low + 1)
    if kind == "number":
        low, high = schema.get("minimum", 0.0), schema.get("maximum", 1.0)
        return round(low + (_number(seed, salt) % 1000) / 999 * (high - low), 3)
    if kind == "boolean":
        return bool(_number(seed, salt) % 2)
    if kind == "array":
        count = max(schema.get("minItems", 1), 1)
        return [value_for(schema.get("items", {"type": "string"}), seed, f"{salt}[{i}]", defs) for i in range(count)]
    return _text(seed, salt, schema.get("maxLength"))


def reply_content(body: dict[str, Any]) -> str:
    seed = _seed(body)
    fmt = body.get("response_format") or {}
    schema = fmt.get("schema") or (fmt.get("json_schema") or {}).get("schema")
    if schema:
        return json.dumps(value_for(schema, seed))
    return json.dumps({"critique": _text(seed, "critique"), "score": 1 + _number(seed, "score") % 10})


def completion_for(body: dict[str, Any]) -> dict[str, Any]:
    """The full chat-completion object answering `body` (deterministic)."""
    content = reply_content(body)
    prompt_words = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
    completion_words = len(content.split())
    return {
        "id": "chatcmpl-" + _seed(body)[:12].hex(),
        "object": "chat.completion",
        "created": 1700000000,
        "model": body.get("model", "fake"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_words, "completion_tokens": completion_words,
                  "total_tokens": prompt_words + completion_words},
    }


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error", "code": status}},
                             status=status)


class FakeOpenAIServer:
    """`with FakeOpenAIServer() as server: ... server.url` (ends in /v1). Optional `delay_s` per reply."""

    def __init__(self, delay_s: float = 0.0, model: str = "fake"):
        self.delay_s = delay_s
        self.model = model
        self.requests = 0
        self.bodies: Counter[str] = Counter()  # request fingerprint -> times asked
        self._lock = threading.Lock()
        self._server = BackgroundLoop(self._app, "fake-openai-server")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.port}/v1"

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        return app

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model",
                                                              "owned_by": "selfalign-tests"}]})

    async def _chat(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as exc:
            return _error(400, f"body is not JSON: {exc}")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
            return _error(400, "messages must be a non-empty list")
        with self._lock:
            self.requests += 1
            self.bodies[_seed(body).hex()] += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return web.json_response(completion_for(body))

    def reset_counts(self) -> None:
        with self._lock:
            self.requests = 0
            self.bodies.clear()

    def start(self) -> "FakeOpenAIServer":
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":  # manual use: python tests/support/fake_openai_server.py
    with FakeOpenAIServer() as server:
        print(server.url, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
