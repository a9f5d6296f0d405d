"""Transport variants of selfalign's `openai` backend, measured for comparison only (never shipped).

:class:`AiohttpOpenAIBackend` is `OpenAIBackend` with one change: `_open` posts the same pre-serialised
bytes through a bare `aiohttp.ClientSession` instead of `openai.AsyncOpenAI.post`. Workers, retries
(tenacity after a first failure, Retry-After), reply parsing and error handling are inherited unchanged;
transport failures are mapped onto the SDK's exception types so `is_retryable` treats them the same.
It shows what the backend would cost without the SDK's request pipeline, for the lead to decide.

:class:`LeanHttpClientOpenAIBackend` keeps `AsyncOpenAI.post` but gives it an `http_client` whose `send`
goes straight to aiohttp (no httpx auth/redirect layers, no adaptor, no response stream): what is left
is the SDK's own request pipeline. :func:`sdk_post_floor_ms` measures that pipeline alone.
"""

from __future__ import annotations

import asyncio

import aiohttp
import openai

from selfalign.backends.openai_backend import CHAT_PATH, OpenAIBackend, httpx as _http


class AiohttpOpenAIBackend(OpenAIBackend):
    async def _open(self):
        url = self.base_url.rstrip("/") + CHAT_PATH
        headers = {"Authorization": f"Bearer {self._api_key}", "Content-Type": "application/json",
                   "Accept": "application/json"}
        connector = aiohttp.TCPConnector(limit=self.max_concurrency, limit_per_host=self.max_concurrency,
                                         keepalive_timeout=60)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout_s, sock_read=self.timeout_s)
        session = aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers)
        post = session.post

        async def send(body: bytes) -> bytes:
            try:
                async with post(url, data=body) as response:
                    payload = await response.read()
                    status = response.status
                    if status < 300:
                        return payload
                    raw_headers = list(response.raw_headers)
            except asyncio.TimeoutError as exc:
                raise openai.APITimeoutError(request=_http.Request("POST", url)) from exc
            except aiohttp.ClientError as exc:
                raise openai.APIConnectionError(request=_http.Request("POST", url)) from exc
            reply = _http.Response(status, headers=raw_headers, content=payload,
                                   request=_http.Request("POST", url))
            raise openai.APIStatusError(f"Error code: {status} - {payload[:300]!r}", response=reply, body=None)

        return send, session.close


class _AiohttpSendClient(_http.AsyncClient):
    """An httpx client whose `send` goes straight to one aiohttp session (no httpx auth/redirect layers,
    no transport adaptor, no response stream): the leanest `http_client` the SDK accepts."""

    def __init__(self, limit: int, read_timeout: float, **kwargs):
        super().__init__(**kwargs)
        self._limit, self._read_timeout = limit, read_timeout
        self._session: aiohttp.ClientSession | None = None

    async def send(self, request, *, stream: bool = False, **kwargs):
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
                limit=self._limit, limit_per_host=self._limit, keepalive_timeout=60),
                timeout=aiohttp.ClientTimeout(total=None, sock_read=self._read_timeout,
                                              sock_connect=self._read_timeout))
        try:
            async with self._session.request(request.method, str(request.url), headers=request.headers,
                                             data=request.content) as response:
                payload = await response.read()
        except asyncio.TimeoutError as exc:
            raise _http.ReadTimeout(str(exc), request=request) from exc
        except aiohttp.ClientError as exc:
            raise _http.ReadError(str(exc), request=request) from exc
        return _http.Response(response.status, headers=response.raw_headers, content=payload, request=request)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
        await super().aclose()


class LeanHttpClientOpenAIBackend(OpenAIBackend):
    """`OpenAIBackend` (AsyncOpenAI.post) with `http_client=` an httpx client that sends through aiohttp directly."""

    def _http_client(self):
        return _AiohttpSendClient(self.max_concurrency, self.timeout_s, timeout=self.timeout_s)


def sdk_post_floor_ms(calls: int = 3000) -> dict[str, float]:
    """CPU ms per call of `AsyncOpenAI.post` (as the backend calls it) and of a bare httpx client's `post`,
    both over a transport that answers at once without any I/O: the SDK's own per-request cost."""
    import time

    import orjson

    from selfalign.backends.openai_backend import parse_reply

    reply = orjson.dumps({"choices": [{"message": {"role": "assistant", "content": '{"critique": "x", "score": 7}'},
                                       "finish_reason": "stop"}], "usage": {"prompt_tokens": 5, "completion_tokens": 3}})
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 600}], "temperature": 0.7})

    def handler(request):
        return _http.Response(200, content=reply, headers={"content-type": "application/json"})

    async def measure() -> dict[str, float]:
        client = openai.AsyncOpenAI(base_url="http://127.0.0.1:9/v1", api_key="x", max_retries=0,
                                    http_client=_http.AsyncClient(transport=_http.MockTransport(handler)))
        bare = _http.AsyncClient(transport=_http.MockTransport(handler))
        out = {}
        for name, call in (
                ("AsyncOpenAI.post", lambda: client.post(CHAT_PATH, cast_to=_http.Response, content=body)),
                ("httpx2 AsyncClient.post", lambda: bare.post("http://127.0.0.1:9/v1" + CHAT_PATH, content=body,
                                                              headers={"content-type": "application/json"}))):
            for _ in range(200):
                await call()
            cpu = time.process_time()
            for _ in range(calls):
                parse_reply((await call()).content)
            out[name] = round(1000 * (time.process_time() - cpu) / calls, 4)
        await client.close()
        await bare.aclose()
        return out

    return asyncio.run(measure())
