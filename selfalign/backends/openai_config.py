"""The `openai` backend's config and identity, apart from the backend itself (openai_backend.py) because that
module imports the openai SDK (about a second) as it loads: reading a pipeline, or a fully cached re-run, never
pays for it. The table in backends/__init__.py starts the backend through `openai_backend.start`."""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from ..model_costs import ModelCosts


class OpenAIModel(ModelCosts):
    """Any OpenAI-compatible endpoint: vLLM serve, llama.cpp server, TGI, OpenAI."""

    backend: Literal["openai"]
    base_url: str
    model: str
    api_key_env: str | None = Field(None, description="name of the environment variable holding the key")
    max_concurrency: int = Field(16, ge=1, le=4096)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(6, ge=0, le=50, description="transport retries per call (429/5xx/timeouts)")
    backoff_max_s: float = Field(30.0, gt=0, le=600, description="longest wait between retries (without Retry-After)")
    # llama.cpp's server rejects OpenAI's json_schema type but honours json_object with a schema.
    structured_output: Literal["json_schema", "json_object", "none"] = "json_schema"

    @field_validator("base_url")
    @classmethod
    def _a_url_with_scheme(cls, value: str) -> str:
        # Without a scheme the URL is only found wrong when the first call fails to connect; say so before
        # any call, at the line.
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            bare = value.strip().split("://", 1)[-1]
            raise ValueError(f"{value!r} is not an http(s) URL; write the scheme, e.g. http://{bare}")
        if parts.path.rstrip("/").endswith("/chat/completions"):
            root = value.strip().rstrip("/")[: -len("/chat/completions")]
            raise ValueError(f"{value!r} is an endpoint; base_url is the API root that the client adds "
                             f"/chat/completions to: write {root}")
        return value


def endpoint_identity(base_url: str, model: str) -> dict[str, Any]:
    """What names the endpoint's model in cache keys; never the key."""
    return {"backend": "openai", "base_url": base_url.rstrip("/"), "model": model}


def identity(config: OpenAIModel) -> dict[str, Any]:
    return endpoint_identity(config.base_url, config.model)
