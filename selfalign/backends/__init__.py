"""Backends: the `models:` section of a pipeline names, for each model, the backend that serves it.

Only that section changes between a laptop (llamacpp), a server (openai) and a GPU box (vllm). Every backend
speaks the batch protocol in base.py; `BACKENDS` below is the one table of them, and the YAML union
(`ModelConfig`), `MODEL_CLASSES`, the cache identity and the start of a backend all come from it.

To add a backend:
1. Write `backends/<name>.py` with
   - its config class: a `ModelCosts` (model_costs.py: a `Strict` config with the price:, budget: and
     throughput: every model may declare) with `backend: Literal["<name>"]` and a `description=` on every
     field (`selfalign schema` prints them);
   - `identity(config) -> dict`: what names the model in cache keys (backend, model, anything that changes the
     text; never a secret). The backend object's own `identity` attribute is built by the same code;
   - `start(config) -> Backend`: the backend, ready for calls. Import the engine's library here or in the
     backend's constructor, never at the top of the module: this table imports every backend module, and
     `selfalign --help`, `validate` and a fully cached re-run must not load llama_cpp, vllm or openai.
     (The openai backend's module imports the SDK at its top, so its config and identity live in
     openai_config.py and its row starts it through a function that imports openai_backend.)
2. Add one row below. A row's `for_replica` adapts the config to a Ray replica's share of the machine (the
   cores Ray reserved for it); most backends leave it as is.
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, NamedTuple, Union

from pydantic import Field

from ..config_base import Strict
from . import fake, llamacpp, openai_config, vllm_backend
from .base import Backend

# A stage that names no model uses this one; when the pipeline does not define it, it is the embedded llamacpp.
DEFAULT_MODEL_NAME = "default"


def _unchanged(config: Any, num_cpus: float) -> Any:
    return config


def _start_openai(config: openai_config.OpenAIModel) -> Backend:
    # Imported here: a fully cached re-run never pays for loading the openai SDK.
    from . import openai_backend
    return openai_backend.start(config)


class BackendEntry(NamedTuple):
    config: type[Strict]                                  # the model's YAML block
    identity: Callable[[Any], dict[str, Any]]            # config -> its name in cache keys
    start: Callable[[Any], Backend]                       # config -> a started backend (heavy imports happen here)
    for_replica: Callable[[Any, float], Any] = _unchanged  # (config, cores of a Ray replica) -> the replica's config


BACKENDS: dict[str, BackendEntry] = {
    "llamacpp": BackendEntry(llamacpp.LlamaCppModel, llamacpp.identity, llamacpp.start, llamacpp.for_replica),
    "openai": BackendEntry(openai_config.OpenAIModel, openai_config.identity, _start_openai),
    "vllm": BackendEntry(vllm_backend.VLLMModel, vllm_backend.identity, vllm_backend.start),
    "fake": BackendEntry(fake.FakeModel, fake.identity, fake.start),
}

MODEL_CLASSES: dict[str, type[Strict]] = {name: entry.config for name, entry in BACKENDS.items()}
ModelConfig = Annotated[Union[tuple(MODEL_CLASSES.values())], Field(discriminator="backend")]


def backend_for(config) -> tuple[dict[str, Any], Callable[[], Backend]]:
    """(identity for cache keys, factory that starts the backend). Nothing heavy happens until the factory runs."""
    entry = BACKENDS[config.backend]
    return entry.identity(config), lambda: entry.start(config)
