"""The call layer: cache first, validation, bounded re-asks, failures kept with everything about them."""

import json

from pydantic import BaseModel

from selfalign.backends.base import Request, Sampling
from selfalign.backends.fake import FakeBackend
from selfalign.cache import Cache, request_key, request_keys
from selfalign.calls import CallStats, ModelClient, json_parser
from selfalign.progress import Progress


class Reply(BaseModel):
    critique: str
    score: int


def client_for(backend, cache):
    return ModelClient("m", lambda: backend, backend.identity, cache, CallStats(), Progress(quiet=True))


def request(text="hello", sample=0):
    return Request(({"role": "user", "content": text},), Sampling(0.7, 1.0, 64, 0), Reply.model_json_schema(), sample)


def test_replies_are_cached_and_served_by_a_new_cache_object(tmp_path):
    backend = FakeBackend()
    cache = Cache(tmp_path / "cache.sqlite")
    first = client_for(backend, cache).run([request(), request(sample=1)], json_parser(Reply), "t")
    cache.close()
    assert [r.status for r in first] == ["ok", "ok"] and len(backend.requests) == 2
    reopened = Cache(tmp_path / "cache.sqlite")
    client = client_for(FakeBackend(), reopened)
    second = client.run([request(), request(sample=1)], json_parser(Reply), "t")
    assert [r.value for r in second] == [r.value for r in first]
    assert client.stats.sent == 0 and client.stats.cached == 2


def test_invalid_reply_is_reasked_with_the_error_quoted_and_caller_messages_untouched(tmp_path):
    replies = iter(['{"critique": "ok", "score": "high"}', '{"critique": "ok", "score": 7}'])
    backend = FakeBackend(responder=lambda r: next(replies))
    original = request()
    [result] = client_for(backend, Cache(tmp_path / "c.sqlite")).run([original], json_parser(Reply), "t")
    assert result.ok and result.value == {"critique": "ok", "score": 7} and result.attempts == 2
    reask = backend.requests[1].messages
    assert reask[:1] == original.messages and len(original.messages) == 1
    assert reask[1] == {"role": "assistant", "content": '{"critique": "ok", "score": "high"}'}
    assert "score: Input should be a valid integer" in reask[2]["content"]


def test_exhausted_attempts_keep_status_error_attempts_and_raw_output(tmp_path):
    backend = FakeBackend(responder=lambda r: "I refuse to answer in JSON")
    [result] = client_for(backend, Cache(tmp_path / "c.sqlite")).run([request()], json_parser(Reply), "t",
                                                                    max_attempts=3)
    assert (result.status, result.attempts, result.text) == ("failed", 3, "I refuse to answer in JSON")
    assert result.error.startswith("invalid reply:")


def test_a_request_that_ended_invalid_is_asked_afresh_on_a_rerun(tmp_path):
    cache = Cache(tmp_path / "c.sqlite")
    client_for(FakeBackend(responder=lambda r: "no json"), cache).run([request()], json_parser(Reply), "t")
    assert len(cache) == 0
    fixed = FakeBackend(responder=lambda r: json.dumps({"critique": "ok", "score": 3}))
    client = client_for(fixed, cache)
    [result] = client.run([request()], json_parser(Reply), "t")
    assert result.ok and client.stats.sent == 1


def test_transport_failure_is_an_error_row_not_a_crash_and_is_not_cached(tmp_path):
    def flaky(r):
        if "boom" in r.messages[0]["content"]:
            raise ConnectionError("reset by peer")
        return json.dumps({"critique": "fine", "score": 5})
    cache = Cache(tmp_path / "c.sqlite")
    results = client_for(FakeBackend(responder=flaky), cache).run([request("boom"), request("ok")],
                                                                  json_parser(Reply), "t")
    assert [r.status for r in results] == ["failed", "ok"]
    assert "reset by peer" in results[0].error
    assert len(cache) == 1


def test_fenced_json_from_an_unconstrained_model_is_accepted(tmp_path):
    backend = FakeBackend(responder=lambda r: 'Sure!\n```json\n{"critique": "good", "score": 9}\n```')
    [result] = client_for(backend, Cache(tmp_path / "c.sqlite")).run([request()], json_parser(Reply), "t")
    assert result.value == {"critique": "good", "score": 9}


def test_raw_newlines_inside_json_strings_are_accepted_but_the_schema_still_holds(tmp_path):
    # SmolLM2 writes multi-line critiques with literal newlines inside the JSON string (strict JSON refuses).
    backend = FakeBackend(responder=lambda r: '{"critique": "first line\n\tsecond line", "score": 4}')
    [result] = client_for(backend, Cache(tmp_path / "c.sqlite")).run([request()], json_parser(Reply), "t")
    assert result.ok and result.value == {"critique": "first line\n\tsecond line", "score": 4}
    backend = FakeBackend(responder=lambda r: '{"critique": "a\nb", "score": "very high"}')
    [result] = client_for(backend, Cache(tmp_path / "d.sqlite")).run([request()], json_parser(Reply), "t",
                                                                     max_attempts=2)
    assert not result.ok and "score" in result.error


def test_cache_key_covers_what_changes_a_reply_and_never_the_api_key():
    identity = {"backend": "openai", "base_url": "http://h/v1", "model": "m"}
    base = request_key(identity, request())
    assert base == request_key(dict(identity), request())
    assert base != request_key(identity, request(sample=1))
    assert base != request_key({**identity, "model": "n"}, request())
    assert base != request_key({**identity, "base_url": "http://other/v1"}, request())
    assert base != request_key(identity, Request(request().messages, Sampling(0.0, 1.0, 64, 0),
                                                 request().json_schema, 0))


def test_batched_request_keys_are_the_single_request_keys():
    identity = {"backend": "openai", "base_url": "http://h/v1", "model": "m", "extra": {"b": 1, "a": [1.5, None]}}
    shared = ({"role": "system", "content": "Judge. «ünïcode» \"quoted\"\n"}, {"role": "user", "content": "hi"})
    sampling = Sampling(0.7, 1.0, 64, 3)
    schema = {"type": "object", "properties": {"score": {"enum": [1, 2]}}, "required": ["score"]}
    requests = [Request(shared, sampling, schema, sample_index=s) for s in range(3)]
    requests += [Request(({"content": "x", "role": "user"},), Sampling(0.0, 0.9, 8, None), None, 0),
                 Request(shared, Sampling(0.7, 1.0, 64, 3), dict(schema), 1)]  # equal values, other objects
    keys = request_keys(identity, requests)
    assert keys == [request_key(identity, r) for r in requests]
    assert keys[1] == keys[4] and len(set(keys)) == 4
