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
