"""Progress for model stages: rows done/total, cached vs sent, tokens/s, errors, ETA.

A live line on a terminal, a plain log line every few seconds otherwise (CI logs), nothing with --quiet.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


class Progress:
    def __init__(self, quiet: bool = False, stream: TextIO | None = None, log_every_s: float = 10.0):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.log_every_s = log_every_s

    def bar(self, label: str, total: int, done: int = 0, note: Callable[[], str] | None = None) -> "Bar":
        """`note`: more to show at the end of the line, asked at each draw (e.g. budget spent vs cap)."""
        return Bar(self, label, total, done, note)

    def log(self, message: str) -> None:
        if not self.quiet:
            print(message, file=self.stream, flush=True)


class Bar:
    def __init__(self, progress: Progress, label: str, total: int, cached: int,
                 note: Callable[[], str] | None = None):
        self.progress, self.label, self.total, self.note = progress, label, total, note
        self.cached, self.sent, self.errors, self.tokens = cached, 0, 0, 0
        self.started = self.last_draw = time.monotonic()
        self.live = not progress.quiet and progress.stream.isatty()
        self._draw(force=True)

    def advance(self, completion) -> None:
        self.sent += 1
        self.errors += 0 if completion.ok else 1
        self.tokens += completion.completion_tokens
        self._draw()

    def close(self) -> None:
        self._draw(force=True)
        if self.live:
            print(file=self.progress.stream, flush=True)

    def _line(self) -> str:
        done = self.cached + self.sent
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.sent / elapsed
        eta = f"{(self.total - done) / rate:.0f}s" if rate > 0 and done < self.total else "-"
        width = 24
        filled = int(width * done / self.total) if self.total else width
        return (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
                f"cached {self.cached} sent {self.sent} errors {self.errors} "
                f"{self.tokens / elapsed:.0f} tok/s ETA {eta}" + (f" {self.note()}" if self.note else ""))

    def _draw(self, force: bool = False) -> None:
        if self.progress.quiet:
            return
        now = time.monotonic()
        if self.live:
            if force or now - self.last_draw > 0.1:
                print("\r" + self._line(), end="", file=self.progress.stream, flush=True)
                self.last_draw = now
        elif force or now - self.last_draw > self.progress.log_every_s:
            print(self._line(), file=self.progress.stream, flush=True)
            self.last_draw = now
