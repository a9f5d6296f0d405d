"""Frozen features of (prompt, response) texts for reward-model probes, cached on disk like model calls.

Three sources, named in an evaluate stage's `embedding:` (or `selfalign evaluate --set embedding.source=...`):

- `llamacpp` (the default): the embedded llama.cpp model (the bundled SmolLM2-135M-Instruct GGUF, or a
  `model_path:`), loaded with `embedding=True` and mean pooling, with the params this CPU can execute
  (backends/llamacpp_cpu.py). `n_seq` texts share one decode: 4-5 times faster than one at a time on a busy
  2-core machine (one text per decode pays a thread barrier per graph node per text), and the vectors agree
  with one-at-a-time ones to a cosine of 0.99998 (measured on HH-RLHF texts).
- `openai`: any OpenAI-compatible `/v1/embeddings` endpoint, through the openai client (its retries).
- `transformers`: a Hugging Face model from a local folder (never downloaded), mean-pooled last hidden states.

`FeatureCache` (RUN_DIR/features.sqlite) keys each vector by a hash of the source's identity (backend, model
file or endpoint, pooling, truncation; never a key) and the exact text, so a re-run, or another arm that holds
the same answer, costs nothing; vectors are committed a batch at a time, so a killed evaluation keeps them.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Protocol, Union
from urllib.parse import urlsplit

import numpy as np
from pydantic import Field, field_validator

from .cache import canonical_json
from .errors import RunError
from .config_base import Strict


class LlamaCppEmbedding(Strict):
    """The embedded llama.cpp model's mean-pooled hidden states."""

    source: Literal["llamacpp"] = "llamacpp"
    model_path: str | None = Field(None, description="a GGUF file; default: the bundled SmolLM2-135M-Instruct")
    n_ctx: int = Field(1024, ge=64, le=131072, description="longest text in tokens; a longer one keeps its end")
    n_threads: int | None = Field(None, ge=1, description="default: all cores")
    n_seq: int = Field(8, ge=1, le=256, description="texts per llama.cpp decode (a batch of several sequences)")


class OpenAIEmbedding(Strict):
    """An OpenAI-compatible `/v1/embeddings` endpoint (OpenAI, vLLM serve --task embed, llama.cpp --embedding)."""

    source: Literal["openai"]
    base_url: str = Field(description="the API root, e.g. http://127.0.0.1:8000/v1")
    model: str = Field(description="the embedding model's name on that endpoint")
    api_key_env: str | None = Field(None, description="name of the environment variable holding the key")
    batch_size: int = Field(64, ge=1, le=4096, description="texts per request")
    timeout_s: float = Field(60.0, gt=0, description="seconds per request")
    max_retries: int = Field(6, ge=0, le=50, description="retries per request (429/5xx/timeouts)")

    @field_validator("base_url")
    @classmethod
    def _a_url_with_scheme(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{value!r} is not an http(s) URL; write the scheme, e.g. http://{value.split('://')[-1]}")
        if parts.path.rstrip("/").endswith("/embeddings"):
            raise ValueError(f"{value!r} is an endpoint; base_url is the API root that the client adds /embeddings "
                             f"to: write {value.strip().rstrip('/')[:-len('/embeddings')]}")
        return value


class TransformersEmbedding(Strict):
    """A Hugging Face model read from a local folder (offline), mean-pooled over its last hidden states."""

    source: Literal["transformers"]
    path: str = Field(description="a local folder with config.json, weights and tokenizer files")
    max_length: int = Field(512, ge=8, le=131072, description="longest text in tokens; a longer one keeps its end")
    batch_size: int = Field(16, ge=1, le=1024, description="texts per forward pass")


EmbeddingConfig = Annotated[Union[LlamaCppEmbedding, OpenAIEmbedding, TransformersEmbedding],
                            Field(discriminator="source")]


class EmbeddingSource(Protocol):
    """`identity` names the source for cache keys (never a secret); `embed` returns one vector per text."""

    identity: dict[str, Any]

    def embed(self, texts: list[str]) -> list[list[float]]: ...

    def close(self) -> None: ...


# -- the text a (prompt, response) pair is embedded as -------------------------------------------------------

def pair_text(prompt: list[dict[str, str]], response: str, prompt_turns: int | None, max_chars: int) -> str:
    """The conversation's last `prompt_turns` messages (all when None) and the response, one `role: text` per
    message; only the last `max_chars` characters are kept (the response matters most).

    >>> pair_text([{"role": "user", "content": "hi"}], "hello", 1, 100)
    'user: hi\\n\\nassistant: hello'
    """
    turns = list(prompt) if prompt_turns is None else (list(prompt)[-prompt_turns:] if prompt_turns else [])
    text = "\n\n".join([*(f"{m['role']}: {m['content']}" for m in turns), f"assistant: {response}"])
    return text[-max_chars:]


# -- the sources ------------------------------------------------------------------------------------------

class LlamaCppEmbedder:
    def __init__(self, config: LlamaCppEmbedding):
        from .backends.bundled_model import bundled_model_path
        from .backends.llamacpp import model_identity

        self.config = config
        self.path = Path(config.model_path) if config.model_path else bundled_model_path()
        self.identity = {"source": "llamacpp", **{k: v for k, v in model_identity(str(self.path)).items()
                                                  if k != "backend"}, "pooling": "mean", "n_ctx": config.n_ctx}
        self._llm = None

    def _model(self):
        if self._llm is None:
            try:
                import llama_cpp
            except ImportError:
                raise RunError("llama-cpp-python is not installed; run: pip install 'selfalign[embedded]'") from None
            from .backends.llamacpp_cpu import new_llama, params_for_this_cpu

            if not self.path.is_file():
                raise RunError(f"model file {self.path} not found; fix embedding.model_path")
            # n_seq texts per decode (up to n_ctx tokens in all); the context holds n_seq whole texts, so each
            # sequence has room for n_ctx tokens whether llama.cpp splits the KV cache per sequence or not.
            config = self.config
            self._llm = new_llama(self.path, params_for_this_cpu(self.path), n_ctx=config.n_ctx * config.n_seq,
                                  n_batch=config.n_ctx, n_ubatch=config.n_ctx, n_seq_max=config.n_seq,
                                  n_threads=config.n_threads or os.cpu_count() or 1, embedding=True,
                                  pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, verbose=False)
        return self._llm

    def _fit(self, text: str) -> str:
        """The text cut to its last n_ctx tokens (llama.cpp's own truncation would keep the beginning)."""
        llm = self._model()
        tokens = llm.tokenize(text.encode("utf-8"))
        room = self.config.n_ctx - 8  # the BOS token and a re-tokenisation that comes out a little longer
        if len(tokens) <= room:
            return text
        return llm.detokenize(tokens[-room:]).decode("utf-8", errors="ignore")

    def embed(self, texts: list[str]) -> list[list[float]]:
        return [list(vector) for vector in self._model().embed([self._fit(text) or " " for text in texts])]

    def close(self) -> None:
        if self._llm is not None and hasattr(self._llm, "close"):
            self._llm.close()
        self._llm = None


class OpenAIEmbedder:
    def __init__(self, config: OpenAIEmbedding):
        self.config = config
        self.identity = {"source": "openai", "base_url": config.base_url.rstrip("/"), "model": config.model}
        self._client = None

    def _connect(self):
        if self._client is None:
            from openai import OpenAI

            key = "not-needed"  # local servers ignore the key; the client insists on one
            if self.config.api_key_env:
                key = os.environ.get(self.config.api_key_env)
                if not key:
                    raise RunError(f"environment variable {self.config.api_key_env} is not set; export it with "
                                   "the API key (embedding.api_key_env names it)")
            self._client = OpenAI(base_url=self.config.base_url, api_key=key, timeout=self.config.timeout_s,
                                  max_retries=self.config.max_retries)
        return self._client

    def embed(self, texts: list[str]) -> list[list[float]]:
        import openai

        try:
            reply = self._connect().embeddings.create(model=self.config.model, input=texts)
        except openai.APIError as exc:  # the key is never in these messages: the client does not quote it
            raise RunError(f"the embeddings endpoint {self.identity['base_url']} (model {self.config.model!r}) "
                           f"failed: {type(exc).__name__}: {exc}; check embedding.base_url and embedding.model, "
                           "or that the server serves embeddings (llama.cpp: --embedding; vLLM: --task embed). "
                           "Vectors already received are cached: run the same command again to go on") from None
        vectors = [item.embedding for item in sorted(reply.data, key=lambda item: item.index)]
        if len(vectors) != len(texts):
            raise RunError(f"the embeddings endpoint {self.identity['base_url']} returned {len(vectors)} vectors "
                           f"for {len(texts)} texts; it does not follow the OpenAI embeddings API")
        return vectors

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None


def _folder_identity(path: Path) -> dict[str, Any]:
    """A local model folder by name, config hash and weight bytes (not its absolute path, as for GGUF files)."""
    config = path / "config.json"
    weights = sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    return {"model": path.name, "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest()[:16],
            "weights_bytes": weights}


class TransformersEmbedder:
    def __init__(self, config: TransformersEmbedding, resolve: Callable[[str], Path] = Path):
        self.config = config
        self.path = resolve(config.path)
        if not (self.path / "config.json").is_file():
            raise RunError(f"embedding.path {config.path!r} is not a model folder (no config.json in {self.path}); "
                           "give a local folder saved with save_pretrained (models are never downloaded here)")
        self.identity = {"source": "transformers", **_folder_identity(self.path), "pooling": "mean",
                         "max_length": config.max_length}
        self._loaded = None

    def _model(self):
        if self._loaded is None:
            try:
                import torch  # noqa: F401
                from transformers import AutoModel, AutoTokenizer
            except ImportError:
                raise RunError("embedding.source transformers needs torch and transformers; pip install torch "
                               "transformers") from None
            tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            tokenizer.truncation_side = "left"  # keep the response, at the end
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
            model = AutoModel.from_pretrained(str(self.path), local_files_only=True)
            model.eval()
            self._loaded = tokenizer, model
        return self._loaded

    def embed(self, texts: list[str]) -> list[list[float]]:
        import torch

        tokenizer, model = self._model()
        vectors: list[list[float]] = []
        for start in range(0, len(texts), self.config.batch_size):
            batch = tokenizer(texts[start:start + self.config.batch_size], padding=True, truncation=True,
                              max_length=self.config.max_length, return_tensors="pt")
            with torch.no_grad():
                hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            vectors.extend(pooled.float().tolist())
        return vectors

    def close(self) -> None:
        self._loaded = None


def embedder_for(config: LlamaCppEmbedding | OpenAIEmbedding | TransformersEmbedding,
                 resolve: Callable[[str], Path] = Path) -> EmbeddingSource:
    """The source for a config; nothing heavy (a model load, a connection) happens until the first `embed`."""
    if isinstance(config, LlamaCppEmbedding):
        if config.model_path:
            config = config.model_copy(update={"model_path": str(resolve(config.model_path))})
        return LlamaCppEmbedder(config)
    if isinstance(config, OpenAIEmbedding):
        return OpenAIEmbedder(config)
    return TransformersEmbedder(config, resolve)


# -- the cache ---------------------------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS features (
    key TEXT PRIMARY KEY,
    dim INTEGER NOT NULL,
    vector BLOB NOT NULL,
    created REAL NOT NULL
)
"""


def feature_key(identity: dict[str, Any], text: str) -> str:
    return hashlib.sha256(canonical_json({"source": identity, "text": text}).encode()).hexdigest()


class FeatureCache:
    """Vectors by `feature_key`, float32, in sqlite (WAL: a committed batch survives a kill)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def get_many(self, keys: list[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):
            chunk = unique[start:start + 500]
            rows = self._db.execute(f"SELECT key, vector FROM features WHERE key IN ({','.join('?' * len(chunk))})",
                                    chunk)
            for key, blob in rows:
                found[key] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put_many(self, items: list[tuple[str, np.ndarray]]) -> None:
        """One transaction for the batch."""
        now = time.time()
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO features VALUES (?, ?, ?, ?)",
                                 [(key, len(vector), np.asarray(vector, dtype=np.float32).tobytes(), now)
                                  for key, vector in items])

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM features").fetchone()[0]

    def close(self) -> None:
        self._db.close()


@dataclass
class FeatureStats:
    texts: int = 0          # distinct texts asked for
    cached: int = 0         # found in the cache
    computed: int = 0       # embedded now
    seconds: float = 0.0    # spent embedding (not reading the cache)
    calls: int = 0          # calls to the source's embed()
    dims: int | None = None
    identity: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"texts": self.texts, "cached": self.cached, "computed": self.computed,
                "seconds": round(self.seconds, 3), "dims": self.dims, "source": self.identity}


def features(texts: list[str], source: EmbeddingSource, cache: FeatureCache, stats: FeatureStats,
             batch_size: int = 32, log: Callable[[str], None] = lambda message: None) -> dict[str, np.ndarray]:
    """text -> vector for every distinct text, from the cache where it is there, else from `source` (and then
    stored, a batch at a time)."""
    stats.identity = source.identity
    unique = list(dict.fromkeys(texts))
    keys = {text: feature_key(source.identity, text) for text in unique}
    stored = cache.get_many(list(keys.values()))
    out = {text: stored[keys[text]] for text in unique if keys[text] in stored}
    missing = [text for text in unique if keys[text] not in stored]
    stats.texts += len(unique)
    stats.cached += len(out)
    if missing:
        log(f"embedding {len(missing):,} texts ({len(out):,} of {len(unique):,} cached) with "
            f"{source.identity.get('source')}: {source.identity.get('model')}")
    started, last_log = time.perf_counter(), time.monotonic()
    for start in range(0, len(missing), batch_size):
        batch = missing[start:start + batch_size]
        stats.calls += 1
        vectors = [np.asarray(vector, dtype=np.float32) for vector in source.embed(batch)]
        if len(vectors) != len(batch) or len({v.shape for v in vectors}) > 1:
            raise RunError(f"embedding source {source.identity} returned {len(vectors)} vectors of mixed or wrong "
                           f"shape for {len(batch)} texts")
        cache.put_many([(keys[text], vector) for text, vector in zip(batch, vectors)])
        out.update(zip(batch, vectors))
        stats.computed += len(batch)
        if time.monotonic() - last_log > 10:
            log(f"  {start + len(batch):,}/{len(missing):,} texts embedded")
            last_log = time.monotonic()
    stats.seconds += time.perf_counter() - started
    shapes = {vector.shape for vector in out.values()}
    if len(shapes) > 1:
        raise RunError(f"{cache.path} holds vectors of different sizes ({sorted(s[0] for s in shapes)}) for one "
                       "source; delete the file and run again")
    if shapes:
        stats.dims = next(iter(shapes))[0]
    return out
