"""Errors a user can act on. Each names the file, the place in it, and what to do."""

from __future__ import annotations


class SelfalignError(Exception):
    """Base for errors that the CLI prints without a traceback and exits with status 2."""

    exit_code = 2


class ConfigError(SelfalignError):
    """A problem in a pipeline file, printed as `FILE:LINE: stage N (kind): field: message`."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 stage: int | None = None, kind: str | None = None, field: str | None = None):
        self.message, self.file, self.line = message, file, line
        self.stage, self.kind, self.field = stage, kind, field
        super().__init__(self.format())

    def format(self) -> str:
        place = ""
        if self.file:
            place = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        if self.stage is not None:
            place += f"stage {self.stage} ({self.kind or '?'}): "
        if self.field:
            place += f"{self.field}: "
        return place + self.message


class ConfigErrors(SelfalignError):
    """Several config problems found in one pass, so the user fixes them all at once."""

    def __init__(self, errors: list[ConfigError]):
        self.errors = errors
        super().__init__("\n".join(e.format() for e in errors))


class DataError(SelfalignError):
    """Bad input data: names the file, the row (1-based) and the column."""

    def __init__(self, message: str, *, file: str, row: int | None = None, column: str | None = None):
        place = file
        if row is not None:
            place += f", row {row}"
        if column:
            place += f", column {column!r}"
        super().__init__(f"{place}: {message}")


class RunError(SelfalignError):
    """A run cannot start or continue (locked output dir, unwritable disk, missing model file)."""


# Disk failures arrive as OSError (our writes), polars' ComputeError ("... (os error 28)") or sqlite3's
# OperationalError ("database or disk is full"); each is matched by errno or by the OS's message.
_DISK_FAILURES = (
    (28, "No space left on device", "the disk is full"),
    (122, "Disk quota exceeded", "the disk quota is exceeded"),
    (30, "Read-only file system", "the file system is read-only"),
    (27, "File too large", "the file size limit is reached"),
    (None, "database or disk is full", "the disk is full"),
    (None, "attempt to write a readonly database", "the file system is read-only"),
)


def disk_failure(exc: BaseException, run_dir: str) -> RunError | None:
    """A clear RunError for a write that failed because of the disk, or None for any other error."""
    errno_ = getattr(exc, "errno", None)
    text = str(exc)
    for number, message, reason in _DISK_FAILURES:
        if (number is not None and errno_ == number) or message in text:
            where = getattr(exc, "filename", None) or run_dir
            return RunError(f"cannot write {where}: {reason}. Free space (or fix the mount) and run the same "
                            "command again: every finished model call is in the run's cache and is not paid "
                            "for twice; or pass --output DIR to write elsewhere")
    return None
