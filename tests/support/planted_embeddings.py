"""Embeddings with a planted signal, so that an evaluation's results are known before it runs.

A text's features are read off markers in it: `<<a+>>` / `<<a->>` put +1 / -1 on axis a, `<<b+>>` / `<<b->>` on
axis b, and a third feature is always 1 (it cancels in a pair's difference). A reward model trained on
correctly labelled pairs of both kinds then ranks every held-out pair right; one trained where the b labels
are reversed ranks every b pair wrong; one that never saw a b pair has no b weight and ties on them.

`PlantedEmbedder` is an embedding source (evaluate.evaluate_stages(source=...)) that counts its calls;
`EmbeddingsServer` serves the same vectors as an OpenAI-compatible `POST /v1/embeddings` on 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import threading

import numpy as np
from aiohttp import web

from .fake_openai_server import BackgroundLoop


def planted_vector(text: str) -> list[float]:
    return [float(text.count("<<a+>>") - text.count("<<a->>")), float(text.count("<<b+>>") - text.count("<<b->>")),
            1.0]


class PlantedEmbedder:
    identity = {"source": "planted", "model": "markers"}

    def __init__(self):
        self.calls = 0
        self.texts: list[str] = []

    def embed(self, texts: list[str]) -> list[list[float]]:
        self.calls += 1
        self.texts += texts
        return [planted_vector(text) for text in texts]

    def close(self) -> None:
        pass


class EmbeddingsServer:
    """`with EmbeddingsServer() as server: server.url` (ends in /v1); `server.texts` counts texts embedded."""

    def __init__(self, model: str = "planted"):
        self.model = model
        self.texts = 0
        self.requests = 0
        self._lock = threading.Lock()
        self._server = BackgroundLoop(self._app, "embeddings-server")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.port}/v1"

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/embeddings", self._embeddings)
        return app

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        if body.get("model") != self.model:
            return web.json_response({"error": {"message": f"model {body.get('model')!r} not found"}}, status=404)
        with self._lock:
            self.requests += 1
            self.texts += len(texts)
        data = []
        for index, text in enumerate(texts):
            vector = planted_vector(text)
            if body.get("encoding_format") == "base64":  # what the openai client asks for by default
                vector = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
            data.append({"object": "embedding", "index": index, "embedding": vector})
        return web.json_response({"object": "list", "data": data, "model": self.model,
                                  "usage": {"prompt_tokens": 0, "total_tokens": 0}})

    def __enter__(self) -> "EmbeddingsServer":
        self._server.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop()
