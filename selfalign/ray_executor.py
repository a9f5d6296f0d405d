"""Model calls on a Ray cluster (`executor: {kind: ray}` or `selfalign run FILE --executor ray`).

Only the calls move. Stages, the cache and the run directory stay on the driver, in polars, exactly as in a
local run: `ModelClient` (calls.py) looks every request up in the cache and hands the misses to a backend.
With the Ray executor that backend is `RayBackend`: it ships the missed requests as a Ray Dataset through
`map_batches` over a pool of `ModelReplica` actors, each holding the real backend (a vLLM engine, an
OpenAI-compatible client with its own concurrency limit, in-process llama.cpp, or the fake), and streams
the replies back; the driver writes each one to the cache as it arrives. So:

- results equal a local run's: the same requests reach the same backend code, and cache keys are unchanged
  (a local and a Ray run of one pipeline share `cache.sqlite`);
- a killed worker loses only its batch in flight: Ray Data restarts a dead actor and retries its task
  (actor pools default to max_restarts=-1, max_task_retries=-1 in Ray 2.60);
- a killed driver loses only the calls in flight, as locally: every finished reply is already in the cache,
  and Ray ends the dead driver's actors.

Every worker node needs selfalign and the model's backend installed (as on the driver), and, for llamacpp
and vllm, the model files at the same path.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from .backends import BACKENDS
from .backends.base import Completion, OnResult, Request, Sampling, finish
from .errors import RunError

_connections = 0  # RayBackends open in this process; the last one to close shuts Ray down if we started it
_started_ray = False


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise RunError("the ray executor needs Ray; run: pip install 'selfalign[ray]' (on every node of the "
                       "cluster), or use executor kind: local") from None
    return ray


def connect(executor) -> None:
    """Attach to the cluster at `executor.address`, or start a private Ray on this machine when none is given."""
    global _connections, _started_ray
    ray = _import_ray()
    if not ray.is_initialized():
        # "local" rather than None: None would join whatever cluster `ray start` last left on this machine.
        address = executor.address or "local"
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise RunError(f"cannot reach the Ray cluster at {address}: {exc}; start it (ray start --head) or fix "
                           "executor.address / --address") from None
        _started_ray = True
        # selfalign's own bar counts the replies as they arrive: no Ray Data bars, plans or "bars disabled" notes.
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    _connections += 1


def disconnect() -> None:
    global _connections, _started_ray
    _connections = max(0, _connections - 1)
    if _connections == 0 and _started_ray:
        import ray
        ray.shutdown()
        _started_ray = False


def request_to_json(request: Request) -> str:
    return json.dumps({"messages": list(request.messages), "sampling": request.sampling.as_dict(),
                       "json_schema": request.json_schema, "sample_index": request.sample_index})


def request_from_json(text: str) -> Request:
    data = json.loads(text)
    return Request(messages=tuple(data["messages"]), sampling=Sampling(**data["sampling"]),
                   json_schema=data["json_schema"], sample_index=data["sample_index"])


class ModelReplica:
    """One Ray actor: builds the backend once, then answers batches of requests (the `map_batches` UDF)."""

    def __init__(self, model_config, num_cpus: float):
        # The backend's row says how a replica holding `num_cpus` cores configures it (llama.cpp: its threads).
        entry = BACKENDS[model_config.backend]
        self.backend = entry.start(entry.for_replica(model_config, num_cpus))

    def __call__(self, batch):
        import pyarrow as pa

        requests = [request_from_json(text) for text in batch["request"].to_pylist()]
        completions = self.backend.generate(requests)
        return pa.table({
            "index": batch["index"],
            "text": pa.array([c.text for c in completions], pa.string()),
            "prompt_tokens": pa.array([c.prompt_tokens for c in completions], pa.int64()),
            "completion_tokens": pa.array([c.completion_tokens for c in completions], pa.int64()),
            "error": pa.array([c.error for c in completions], pa.string()),
            "extra": pa.array([json.dumps(c.extra) for c in completions], pa.string()),
        })


class RayBackend:
    """The Backend protocol (backends/base.py) over a Ray Data actor pool; `identity` is the real backend's."""

    def __init__(self, model_config, identity: dict[str, Any], executor):
        connect(executor)
        self.identity = identity
        self.model_config = model_config
        self.executor = executor
        self._open = True

    def generate(self, requests: list[Request], on_result: OnResult | None = None) -> list[Completion]:
        import pyarrow as pa
        import ray

        size = self.executor.batch_size
        # One block per batch, so the pool's replicas share the work from the first batch on.
        blocks = [pa.table({"index": pa.array(range(start, min(start + size, len(requests))), pa.int64()),
                            "request": pa.array([request_to_json(r) for r in requests[start:start + size]],
                                                pa.string())})
                  for start in range(0, len(requests), size)]
        if not blocks:
            return []
        replies = ray.data.from_arrow(blocks).map_batches(
            ModelReplica, batch_size=size, batch_format="pyarrow",
            fn_constructor_kwargs={"model_config": self.model_config, "num_cpus": self.executor.num_cpus},
            # Fixed size, but no more replicas than batches: each replica loads a model.
            compute=ray.data.ActorPoolStrategy(size=min(self.executor.replicas, len(blocks))),
            num_cpus=self.executor.num_cpus, num_gpus=self.executor.num_gpus)
        results: list[Completion | None] = [None] * len(requests)
        for batch in replies.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                index = row["index"]
                if results[index] is not None:  # a retried batch may repeat replies already reported
                    continue
                completion = Completion(row["text"], row["prompt_tokens"], row["completion_tokens"], row["error"],
                                        json.loads(row["extra"]))
                results[index] = completion
                if on_result:
                    on_result(index, completion)
        return finish(results)

    def close(self) -> None:
        if self._open:
            self._open = False
            disconnect()


def ray_backend_factory(model_config, identity: dict[str, Any], executor):
    """For `RunContext.client`: started lazily, like every backend, so a fully cached re-run never starts Ray."""
    return lambda: RayBackend(model_config, identity, executor)
