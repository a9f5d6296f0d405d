"""An endpoint that cannot serve the run fails it in seconds, with the cause, the fix and an honest exit status.

Real servers on 127.0.0.1: a port with nothing listening, a server that answers 401, one that does not know
the model, one that rejects every request's schema, one that never answers, and one that fails a share of
the calls. Exit statuses: 0 complete, 2 bad input or an endpoint that cannot be used, 3 finished with failed
calls (their rows in dropped/), 4 stopped (failure budget passed, or every call refused).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections import Counter

import pytest
from aiohttp import web

from selfalign.backends.base import Request, Sampling
from selfalign.backends.openai_backend import OpenAIBackend
from selfalign.cli import main
from tests.support.fake_openai_server import BackgroundLoop, FakeOpenAIServer

ROWS = 10  # x 2 targets x 2 samples = 40 calls


class ScriptedServer:
    """An OpenAI-style server whose answers the test sets: `models` (the ids GET /models lists, or an HTTP
    status), `chat(n, body)` -> (status, reply dict) for the n-th chat request, `hang` to never answer."""

    def __init__(self, models=("m",), chat=None, hang: bool = False):
        self.models, self.hang = models, hang
        self.chat = chat or (lambda n, body: (200, valid_reply(body)))
        self.chat_requests = 0
        self.model_requests = 0
        self.bodies: Counter[str] = Counter()
        self._server = BackgroundLoop(self._app, "scripted-server")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.port}/v1"

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self._list)
        app.router.add_post("/v1/chat/completions", self._chat)
        return app

    async def _list(self, request: web.Request) -> web.Response:
        self.model_requests += 1
        if self.hang:
            await asyncio.sleep(3600)
        if isinstance(self.models, int):
            return web.json_response({"error": {"message": f"status {self.models}"}}, status=self.models)
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.read()
        number = self.chat_requests
        self.chat_requests += 1
        self.bodies[body.decode()] += 1
        status, payload = self.chat(number, json.loads(body))
        return web.json_response(payload, status=status)

    def __enter__(self) -> "ScriptedServer":
        self._server.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop()


def valid_reply(body: dict) -> dict:
    content = json.dumps({"critique": "Clear and correct.", "score": 7})
    return {"id": "x", "object": "chat.completion", "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5}}


def error(status: int, message: str) -> tuple[int, dict]:
    return status, {"error": {"message": message, "type": "invalid_request_error", "code": status}}


def pipeline(tmp_path, base_url: str, model: str = "m", extra: str = "", timeout_s: float = 5) -> str:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}.",
                                        "rejected": f"{2 * i + 1}."}) + "\n" for i in range(ROWS)))
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"""\
schema_version: 1
name: endpoint
{extra}models:
  critic: {{backend: openai, base_url: '{base_url}', model: {model}, max_concurrency: 4, timeout_s: {timeout_s},
            max_retries: 2, backoff_max_s: 0.05}}
stages:
  - {{kind: load, path: {data}, format: trl}}
  - {{kind: critique, model: critic, samples: 2}}
""")
    return str(path)


def run(path: str, run_dir, *more: str) -> tuple[int, float]:
    started = time.monotonic()
    status = main(["run", path, "--output", str(run_dir), "--quiet", *more])
    return status, time.monotonic() - started


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_nothing_listening_fails_in_seconds_and_names_the_refused_connection(tmp_path, capsys):
    path = pipeline(tmp_path, f"http://127.0.0.1:{free_port()}/v1")
    status, seconds = run(path, tmp_path / "run")
    err = capsys.readouterr().err
    assert status == 2, err
    assert seconds < 5, f"took {seconds:.1f}s to notice nothing listens"
    assert "connection refused" in err and "model 'critic'" in err and "base_url" in err, err
    assert "timed out" not in err.lower()
    assert not (tmp_path / "run").exists(), "a run that could not start left its directory behind"


def test_a_refused_connection_during_calls_is_named_as_such():
    """Past the preflight (a server that went away), the failed call's error says what happened."""
    backend = OpenAIBackend(f"http://127.0.0.1:{free_port()}/v1", "m", max_retries=0)
    [completion] = backend.generate([Request(({"role": "user", "content": "hi"},), Sampling())])
    assert not completion.ok
    assert "connection refused" in completion.error, completion.error
    assert "timed out" not in completion.error.lower()


def test_bad_key_fails_the_preflight_with_the_status_and_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SELFALIGN_TEST_KEY", "wrong")
    with ScriptedServer(models=401, chat=lambda n, body: error(401, "Incorrect API key")) as server:
        path = pipeline(tmp_path, server.url)
        path_text = open(path).read().replace("timeout_s: 5,", "timeout_s: 5, api_key_env: SELFALIGN_TEST_KEY,")
        open(path, "w").write(path_text)
        status, seconds = run(path, tmp_path / "run")
    err = capsys.readouterr().err
    assert status == 2, err
    assert "HTTP 401" in err and "SELFALIGN_TEST_KEY" in err, err
    assert server.chat_requests == 0, "chat calls were sent to an endpoint that refused the key"
    assert "wrong" not in err  # never the key itself


def test_401_on_calls_stops_the_stage_at_once(tmp_path, capsys):
    """The model list is public but completions need a key: the first 401 stops the stage, not the 40th."""
    with ScriptedServer(models=("m",), chat=lambda n, body: error(401, "no key")) as server:
        status, _ = run(pipeline(tmp_path, server.url), tmp_path / "run")
    err = capsys.readouterr().err
    assert status == 4, err
    assert server.chat_requests <= 4, f"{server.chat_requests} calls sent after the first 401"
    assert max(server.bodies.values()) == 1, "a 401 was retried"
    assert "api_key_env" in err and "run the same command again" in err, err
    # Nothing was answered, so nothing is kept: the run directory this run created is gone, as for bad input.
    assert not (tmp_path / "run").exists()


def test_unknown_model_fails_the_preflight_with_did_you_mean(tmp_path, capsys):
    with ScriptedServer(models=("qwen2.5-7b-instruct",),
                        chat=lambda n, body: error(404, f"The model `{body['model']}` does not exist.")) as server:
        status, _ = run(pipeline(tmp_path, server.url, model="qwen2.5-7b-instruc"), tmp_path / "run")
    err = capsys.readouterr().err
    assert status == 2, err
    assert "'qwen2.5-7b-instruc' is not served" in err and "Did you mean 'qwen2.5-7b-instruct'?" in err, err
    assert server.chat_requests == 1  # the one-token probe, nothing more


def test_a_server_that_lists_no_models_but_accepts_the_name_runs(tmp_path):
    """TGI and llama.cpp answer for any model name: /models not naming it is not an error."""
    with ScriptedServer(models=404) as server:
        status, _ = run(pipeline(tmp_path, server.url, model="anything"), tmp_path / "run")
    assert status == 0
    assert server.chat_requests == 1 + ROWS * 2 * 2  # the probe, then every call once


def test_rejected_schema_stops_after_a_few_calls_and_points_at_structured_output(tmp_path, capsys):
    with ScriptedServer(chat=lambda n, body: error(400, "response_format type json_schema is not supported")) \
            as server:
        status, _ = run(pipeline(tmp_path, server.url), tmp_path / "run")
    err = capsys.readouterr().err
    assert status == 4, err
    assert server.chat_requests < 12, f"{server.chat_requests} of 40 calls sent to a server rejecting them all"
    assert max(server.bodies.values()) == 1, "a 400 was retried"
    assert "structured_output: json_object" in err, err


def test_hanging_server_fails_the_preflight_within_its_timeout(tmp_path, capsys):
    with ScriptedServer(hang=True) as server:
        status, seconds = run(pipeline(tmp_path, server.url, timeout_s=2), tmp_path / "run")
    err = capsys.readouterr().err
    assert status == 2, err
    assert seconds < 6
    assert "did not answer within 2 s" in err, err


def every_fourth_fails(n: int, body: dict) -> tuple[int, dict]:
    return error(400, "this row is too long") if n % 4 == 1 else (200, valid_reply(body))


def test_failure_budget_then_exit_3_then_resume_sends_only_the_failed(tmp_path, capsys):
    """A quarter of the calls fail (never five in a row): over the default budget (0.1) the run stops with 4;
    with a budget of 0.5 it finishes with 3 and names dropped/; once the server is fixed a re-run sends
    exactly the failed calls and exits 0."""
    run_dir = tmp_path / "run"
    with ScriptedServer(chat=every_fourth_fails) as server:
        path = pipeline(tmp_path, server.url)
        status, _ = run(path, run_dir)
        err = capsys.readouterr().err
        assert status == 4, err
        assert "max_failed_fraction 0.1" in err and "dropped/01-critique.parquet" in err, err
        assert json.loads((run_dir / "manifest.json").read_text())["status"] == "stopped"

        status, _ = run(path, run_dir, "--set", "max_failed_fraction=0.5")
        err = capsys.readouterr().err
        assert status == 3, err
        manifest = json.loads((run_dir / "manifest.json").read_text())
        failed = manifest["model_calls"]["failed"]
        assert failed > 0 and f"finished with {failed} failed model calls" in err, err
        assert "dropped/01-critique.parquet" in err.splitlines()[-1]

        server.chat = lambda n, body: (200, valid_reply(body))  # the cause is fixed
        before = server.chat_requests
        status, _ = run(path, run_dir)
        assert status == 0, capsys.readouterr().err
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert manifest["model_calls"]["sent"] == failed == server.chat_requests - before
        assert manifest["status"] == "complete"
        # Every attempt is on record with what it sent: stopped, complete (with failures), complete.
        assert [a["status"] for a in manifest["attempts"]] == ["stopped", "complete", "complete"]
        assert manifest["calls_sent_all_attempts"] == sum(a["sent"] for a in manifest["attempts"])


def test_a_clean_run_exits_0_and_says_done(tmp_path, capsys):
    with FakeOpenAIServer(model="m") as server:
        status = main(["run", pipeline(tmp_path, server.url), "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 0
    assert err.strip().splitlines()[-1].startswith("done in "), err


@pytest.mark.parametrize("url", ["127.0.0.1:8000/v1", "localhost:8000", "ftp://127.0.0.1/v1"])
def test_base_url_without_http_scheme_fails_validate(tmp_path, capsys, url):
    assert main(["validate", pipeline(tmp_path, url)]) == 2
    err = capsys.readouterr().err
    assert "base_url" in err and "http://" in err, err
