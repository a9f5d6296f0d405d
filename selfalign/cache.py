"""The request cache: every model reply ever received, keyed by a hash of what was asked.

A run never pays twice for the same call: a re-run finds each reply here. Writes are committed one
reply at a time (WAL mode, so a commit is cheap), so a killed run loses only the calls in flight.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from .backends.base import Request, Sampling

SCHEMA = """
CREATE TABLE IF NOT EXISTS replies (
    key TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    created REAL NOT NULL
)
"""


# One encoder, built once (json.dumps with options builds one per call); the output is json.dumps's.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(value: Any) -> str:
    return _CANONICAL.encode(value)


def request_key(backend_identity: dict[str, Any], request: Request) -> str:
    """Hash of everything that determines a reply. The identity holds no secrets (never the API key)."""
    payload = {
        "backend": backend_identity,
        "messages": list(request.messages),
        "sampling": request.sampling.as_dict(),
        "schema": request.json_schema,
        "sample_index": request.sample_index,
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def request_keys(backend_identity: dict[str, Any], requests: list[Request]) -> list[str]:
    """`request_key` of every request, the same strings, built faster: what requests share (the backend, the
    sampling, the schema, and the messages of a prompt's samples) is serialised once. Sorted keys put the
    payload's fields in this order: backend, messages, sample_index, sampling, schema."""
    serialised: dict[int, str] = {}  # id -> JSON; ids stay valid because `requests` holds the objects

    def once(value: Any) -> str:
        if id(value) not in serialised:
            serialised[id(value)] = canonical_json(value)
        return serialised[id(value)]

    def sampling(value: Sampling) -> str:
        if id(value) not in serialised:
            serialised[id(value)] = canonical_json(value.as_dict())
        return serialised[id(value)]

    backend = canonical_json(backend_identity)
    return [hashlib.sha256(f'{{"backend":{backend},"messages":{once(r.messages)},"sample_index":'
                           f'{canonical_json(r.sample_index)},"sampling":{sampling(r.sampling)},"schema":'
                           f'{once(r.json_schema)}}}'.encode()).hexdigest() for r in requests]


def holds_replies(path: Path) -> bool:
    """Whether the cache file at `path` holds any reply; read-only, so it never creates the file."""
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            return db.execute("SELECT EXISTS (SELECT 1 FROM replies)").fetchone()[0] == 1
    except sqlite3.Error:  # no file, or no table yet: nothing was paid for
        return False


class Cache:
    FLUSH_EVERY_S = 0.25
    FLUSH_EVERY_ROWS = 256

    def __init__(self, path: Path):
        self.path = path
        self._pending: list[tuple] = []
        self._last_flush = time.monotonic()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a committed reply survives a process kill (not a power loss), at no fsync cost.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(SCHEMA)

    def get_many(self, keys: list[str]) -> dict[str, tuple[str, int, int]]:
        self.flush()
        found: dict[str, tuple[str, int, int]] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):
            chunk = unique[start:start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT key, text, prompt_tokens, completion_tokens FROM replies WHERE key IN ({marks})", chunk)
            for key, text, prompt_tokens, completion_tokens in rows:
                found[key] = (text, prompt_tokens, completion_tokens)
        return found

    def put(self, key: str, text: str, prompt_tokens: int, completion_tokens: int) -> None:
        self._pending.append((key, text, prompt_tokens, completion_tokens, time.time()))
        if len(self._pending) >= self.FLUSH_EVERY_ROWS or time.monotonic() - self._last_flush > self.FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            with self._db:  # one transaction
                self._db.execute("BEGIN")
                self._db.executemany("INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?)", self._pending)
            self._pending = []
        self._last_flush = time.monotonic()

    def delete(self, keys: list[str]) -> None:
        self.flush()
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM replies WHERE key = ?", [(key,) for key in keys])

    def __len__(self) -> int:
        self.flush()
        return self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        self.flush()
        self._db.close()
