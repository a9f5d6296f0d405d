"""Errors a user can act on. Each names the file, the place in it, and what to do."""

from __future__ import annotations

import errno
import os


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


def positive_int(text: str) -> int:
    """argparse type for a count such as --limit: a whole number >= 1, else argparse's own error (exit 2),
    which names the option. (type=int takes 0 and -1, and a run that reads no rows only fails later.)"""
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number, 1 or more, got {text!r}; leave it out to use "
                                         "every row")
    return value


# What a write that failed because of the disk means, by errno.
DISK_REASONS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only", errno.EFBIG: "the file size limit is reached"}
# The same failures arrive without an errno from polars (a ComputeError quoting the OS message) and sqlite3
# (an OperationalError in its own words), so they are also matched by message.
_DISK_MESSAGES = {**{os.strerror(number): reason for number, reason in DISK_REASONS.items()},
                  "database or disk is full": DISK_REASONS[errno.ENOSPC],
                  "attempt to write a readonly database": DISK_REASONS[errno.EROFS]}


def disk_failure(exc: BaseException, run_dir: str) -> RunError | None:
    """A clear RunError for a write that failed because of the disk, or None for any other error."""
    reason = DISK_REASONS.get(getattr(exc, "errno", None))
    if reason is None:
        text = str(exc)
        reason = next((reason for message, reason in _DISK_MESSAGES.items() if message in text), None)
    if reason is None:
        return None
    where = getattr(exc, "filename", None) or run_dir
    return RunError(f"cannot write {where}: {reason}. Free space (or fix the mount) and run the same command "
                    "again: every finished model call is in the run's cache and is not paid for twice; or pass "
                    "--output DIR to write elsewhere")


class PublishError(SelfalignError):
    """A run cannot be exported or pushed: names what is wrong and what to do."""


class RunStopped(SelfalignError):
    """The run stopped itself part-way: too many calls failed, or an endpoint refuses every call.

    Every finished call is in the cache; after fixing the cause the same command resumes. Its own exit
    status (4), so a script can tell it from bad input (2) and from a run that finished with failed calls (3).
    """

    exit_code = 4
    status = "stopped"  # what the manifest and the run's attempt record say


class BudgetExhausted(RunStopped):
    """The next call could pass a budget cap, so the run stopped sending (the calls in flight finished into the
    cache). Its own exit status (5): raise the cap and run the same command to resume; cached calls are free."""

    exit_code = 5
    status = "budget"


class CalibrationFailed(RunStopped):
    """A stage's judge agreed with the human labels of its calibration pairs less than `min_agreement` asks
    (calibrate.py): the run stopped before the stage sent its other calls. Its own exit status (6), so a script
    can tell "the judge cannot judge" from a failure budget or an endpoint that refuses calls (4).
    `calibration` holds the numbers, for the manifest."""

    exit_code = 6
    status = "calibration_failed"

    def __init__(self, message: str, calibration: dict):
        self.calibration = calibration
        super().__init__(message)


# Exit statuses of `selfalign run`, for scripts (README "Exit status" has the table).
EXIT_COMPLETE = 0
EXIT_BAD_INPUT = 2
EXIT_FINISHED_WITH_FAILED_CALLS = 3
EXIT_STOPPED = RunStopped.exit_code
EXIT_BUDGET = BudgetExhausted.exit_code
EXIT_CALIBRATION_FAILED = CalibrationFailed.exit_code
