"""A deterministic backend for tests: schema-valid replies derived from the request hash.

It records every request it receives (to assert exact payloads) and can be scripted: `responder` maps a
request to a reply text (or raises to simulate a failed call), e.g. bad JSON first and good JSON after.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Callable, Literal

from pydantic import Field

from ..model_costs import ModelCosts
from .base import Completion, OnResult, Request


class FakeModel(ModelCosts):
    """Deterministic, schema-valid replies derived from the request hash. For tests."""

    backend: Literal["fake"]
    model: str = "fake"
    latency_s: float = Field(0.0, ge=0, le=10, description="sleep per call, to make crash tests catch a run midway")


def fake_identity(model: str) -> dict[str, Any]:
    return {"backend": "fake", "model": model}


def request_digest(request: Request) -> bytes:
    payload = json.dumps([list(request.messages), request.sampling.as_dict(), request.json_schema,
                          request.sample_index], sort_keys=True)
    return hashlib.sha256(payload.encode()).digest()


def value_for_schema(schema: dict[str, Any], seed: bytes, defs: dict[str, Any] | None = None) -> Any:
    """A value valid under a (simple, pydantic-generated) JSON schema, chosen by `seed`."""
    defs = defs if defs is not None else schema.get("$defs", {})
    if "$ref" in schema:
        return value_for_schema(defs[schema["$ref"].split("/")[-1]], seed, defs)
    number = int.from_bytes(seed[:8], "big")
    kind = schema.get("type")
    if "enum" in schema:
        return schema["enum"][number % len(schema["enum"])]
    if kind == "object":
        return {name: value_for_schema(sub, hashlib.sha256(seed + name.encode()).digest(), defs)
                for name, sub in schema.get("properties", {}).items()}
    if kind == "integer":
        low, high = schema.get("minimum", 0), schema.get("maximum", 100)
        return low + number % (high - low + 1)
    if kind == "number":
        low, high = schema.get("minimum", 0.0), schema.get("maximum", 1.0)
        return round(low + (number % 1000) / 999 * (high - low), 3)
    if kind == "boolean":
        return bool(number % 2)
    if kind == "array":
        count = max(schema.get("minItems", 1), 1)
        return [value_for_schema(schema.get("items", {"type": "string"}), seed + bytes([i]), defs)
                for i in range(count)]
    return f"fake text {seed[:4].hex()}"


class FakeBackend:
    def __init__(self, model: str = "fake", responder: Callable[[Request], str] | None = None,
                 latency_s: float = 0.0):
        self.identity = fake_identity(model)
        self.latency_s = latency_s
        self.responder = responder
        self.requests: list[Request] = []

    def reply(self, request: Request) -> str:
        if self.responder is not None:
            return self.responder(request)
        seed = request_digest(request)
        if request.json_schema is not None:
            return json.dumps(value_for_schema(request.json_schema, seed))
        return f"fake response {seed[:6].hex()}"

    def generate(self, requests: list[Request], on_result: OnResult | None = None) -> list[Completion]:
        results = []
        for index, request in enumerate(requests):
            self.requests.append(request)
            if self.latency_s:
                time.sleep(self.latency_s)
            try:
                text = self.reply(request)
                completion = Completion(text, prompt_tokens=sum(len(m["content"].split()) for m in request.messages),
                                        completion_tokens=len(text.split()))
            except Exception as exc:  # a scripted failure stands for a failed call, never a crashed batch
                completion = Completion(None, error=f"{type(exc).__name__}: {exc}")
            results.append(completion)
            if on_result:
                on_result(index, completion)
        return results

    def close(self) -> None:
        pass


def identity(config: FakeModel) -> dict[str, Any]:
    return fake_identity(config.model)


def start(config: FakeModel) -> FakeBackend:
    return FakeBackend(config.model, latency_s=config.latency_s)
