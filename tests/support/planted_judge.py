"""An OpenAI-compatible server on 127.0.0.1 acting as a judge whose agreement with the human labels is planted.

The data is made for it (`planted_pairs`): row i asks "Question i?", its human-preferred answer says
"Good answer i." and the other "Bad answer i." (padded on some rows, so lengths vary both ways). For each
request the server finds i and the answer(s) shown, and answers as `agrees(i)` says:

- a critique request (`{critique, score}`): the good answer scores 8 and the bad one 3 on rows it agrees on,
  the other way round elsewhere;
- a pairwise judge request (`{reasoning, winner}`): the winner is the good answer on rows it agrees on, else
  the bad one; on rows where `position_biased(i)` is true it names "A" whatever is shown (its verdict then
  flips when the answers swap places).

`chat_requests` counts chat calls and `bodies` how often each exact body arrived (a body seen twice is a call
paid twice).

    with PlantedJudge(agrees=lambda i: i % 5 < 2) as server:
        server.url          # http://127.0.0.1:PORT/v1
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Callable

from aiohttp import web

from tests.support.fake_openai_server import BackgroundLoop

QUESTION = re.compile(r"Question (\d+)\?")


def planted_pairs(path: Path, rows: int) -> Path:
    """A TRL-format file of `rows` pairs the planted judge understands."""
    lines = []
    for i in range(rows):
        chosen, rejected = f"Good answer {i}.", f"Bad answer {i}."
        if i % 3 == 1:
            rejected += " It goes on and on for a while longer."
        elif i % 3 == 2:
            chosen += " It explains itself at some length."
        lines.append(json.dumps({"prompt": f"Question {i}?", "chosen": chosen, "rejected": rejected}))
    path.write_text("\n".join(lines) + "\n")
    return path


def row_of(text: str) -> int:
    return int(QUESTION.search(text).group(1))


class PlantedJudge:
    def __init__(self, agrees: Callable[[int], bool], position_biased: Callable[[int], bool] = lambda i: False,
                 model: str = "m"):
        self.agrees, self.position_biased, self.model = agrees, position_biased, model
        self.chat_requests = 0
        self.bodies: Counter[str] = Counter()
        self._server = BackgroundLoop(self._app, "planted-judge")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.port}/v1"

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        return app

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _chat(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.chat_requests += 1
        self.bodies[raw.decode()] += 1
        body = json.loads(raw)
        text = body["messages"][-1]["content"]
        i = row_of(text)
        if "Answer A:" in text:
            good_is_a = text.index("Good answer") < text.index("Bad answer")
            if self.position_biased(i):
                winner = "A"
            else:
                winner = "A" if good_is_a == self.agrees(i) else "B"
            content = {"reasoning": "planted", "winner": winner}
        else:
            good = "Good answer" in text.split("next reply:", 1)[-1]
            content = {"critique": "planted", "score": 8 if good == self.agrees(i) else 3}
        return web.json_response({
            "id": "x", "object": "chat.completion", "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": json.dumps(content)},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5}})

    def __enter__(self) -> "PlantedJudge":
        self._server.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop()
