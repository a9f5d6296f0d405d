"""The request cache: every model reply ever received, keyed by a hash of what was asked.

A run never pays twice for the same call: a re-run finds each reply here. Each reply is committed the
moment it arrives, before the next one is handled (WAL mode with synchronous=NORMAL, so a commit is a
write to the WAL without fsync: tens of microseconds), so a kill -9 loses only the calls in flight.

The same file keeps one row per attempt at the run (`attempts`): when it started and ended, how many calls
it sent, and how it ended. An attempt killed before it could record its end is marked `killed` by the next
one, so the manifest can show the calls paid over the run's whole life, not only the last attempt's.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
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
    created REAL NOT NULL,
    attempt INTEGER
);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY,
    started REAL NOT NULL,
    ended REAL,
    unanswered INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL
)
"""
# An attempt's sent calls = its replies in `replies` (tagged with its id, so a reply costs one INSERT and no
# counter update) + `unanswered`: calls that brought no reply to keep, and kept replies forgotten later.
# How an attempt ended: `running` until it records its end; one still `running` when the next attempt takes
# the run's lock was killed (the lock is held for the whole of a run, so its process is gone).
RUNNING, KILLED = "running", "killed"


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
    def __init__(self, path: Path):
        self.path = path
        self.attempt: int | None = None  # the attempts row this process counts its sent calls in
        # Replies may arrive on a backend's worker thread; one lock keeps each write one whole transaction.
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a committed reply survives a process kill (not a power loss), at no fsync cost.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        if "attempt" not in {row[1] for row in self._db.execute("PRAGMA table_info(replies)")}:
            self._db.execute("ALTER TABLE replies ADD COLUMN attempt INTEGER")  # a cache from before attempts

    def get_many(self, keys: list[str]) -> dict[str, tuple[str, int, int]]:
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
        """Store one reply (counted as sent by this attempt), committed before this returns."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?, ?)",
                             (key, text, prompt_tokens, completion_tokens, time.time(), self.attempt))

    def count_unanswered(self, calls: int = 1) -> None:
        """Count calls this attempt sent that brought no reply to keep (a failure may be paid for too)."""
        if self.attempt is None:
            return
        with self._lock:
            self._db.execute("UPDATE attempts SET unanswered = unanswered + ? WHERE id = ?", (calls, self.attempt))

    def delete(self, keys: list[str]) -> None:
        """Forget replies (a re-run asks them afresh); the attempts that paid for them still count them."""
        with self._lock, self._db:
            self._db.execute("BEGIN")
            for start in range(0, len(keys), 500):
                chunk = keys[start:start + 500]
                marks = ",".join("?" * len(chunk))
                paid = self._db.execute(f"SELECT attempt, COUNT(*) FROM replies WHERE key IN ({marks}) "
                                        "AND attempt IS NOT NULL GROUP BY attempt", chunk).fetchall()
                self._db.executemany("UPDATE attempts SET unanswered = unanswered + ? WHERE id = ?",
                                     [(count, attempt) for attempt, count in paid])
                self._db.execute(f"DELETE FROM replies WHERE key IN ({marks})", chunk)

    # ------------------------------------------------------------------ attempts at the run

    def begin_attempt(self) -> int:
        """Record a new attempt (the caller holds the run's lock); earlier ones still `running` were killed."""
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.execute("UPDATE attempts SET status = ? WHERE status = ?", (KILLED, RUNNING))
            self.attempt = self._db.execute("INSERT INTO attempts (started, status) VALUES (?, ?)",
                                            (time.time(), RUNNING)).lastrowid
        return self.attempt

    def end_attempt(self, status: str) -> None:
        if self.attempt is None:
            return
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.execute("UPDATE attempts SET ended = ?, status = ? WHERE id = ?",
                             (time.time(), status, self.attempt))

    def attempts(self) -> list[dict[str, Any]]:
        """Every attempt at this run, oldest first: id, started, ended (None if killed), sent, status."""
        rows = self._db.execute(
            "SELECT id, started, ended, unanswered + (SELECT COUNT(*) FROM replies WHERE attempt = attempts.id), "
            "status FROM attempts ORDER BY id")
        return [{"id": id_, "started": started, "ended": ended, "sent": sent, "status": status}
                for id_, started, ended, sent, status in rows]

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        self._db.close()
