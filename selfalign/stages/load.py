"""load: read human data (local jsonl/json/parquet/csv, or a `datasets` id) into canonical columns.

Bad input fails closed by default, naming the file, row and column; `on_bad_row: drop` keeps going and
writes each bad row to `dropped/` with the reason instead.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from pathlib import Path
from typing import Any, Iterator, Literal

import orjson
import polars as pl
from pydantic import Field, model_validator

from ..errors import DataError
from ..input_formats import INPUT_FORMATS, InputFormatName, RowError
from .base import StageConfig, StageContext, StageOutput, lists, strings, structs

MESSAGES = pl.List(pl.Struct({"role": pl.Utf8, "content": pl.Utf8}))


class LoadConfig(StageConfig):
    kind: Literal["load"]
    path: str | None = Field(None, description="local file: .jsonl, .jsonl.gz, .json, .parquet, .csv")
    hf: str | None = Field(None, description="a `datasets` id or local dataset folder, read with load_dataset")
    split: str = "train"
    config: str | None = None
    revision: str | None = None
    format: InputFormatName
    on_bad_row: Literal["error", "drop"] = "error"
    max_chars: int = Field(200_000, ge=1, description="longest text accepted in one field")
    keep_columns: list[str] = Field(default_factory=list, description="source columns to carry along as they "
                                    "are, e.g. [category] for per-category agreement in the report")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.hf is None):
            raise ValueError("give exactly one of `path:` (a local file) or `hf:` (a datasets id)")
        return self

    def adds(self) -> set[str]:
        return {"row_id", "source", *INPUT_FORMATS[self.format].columns, *self.keep_columns}


# One encoder for every row: json.dumps with options builds a new encoder per call. Same output as
# json.dumps(row, sort_keys=True, ensure_ascii=False), so row ids do not change.
_ROW_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=False)


def row_id(row: dict[str, Any]) -> str:
    return hashlib.sha256(_ROW_JSON.encode(row).encode()).hexdigest()[:16]


# What a file's first bytes say it is. A data file that is really compressed (or UTF-16) otherwise fails as
# "not UTF-8" or "invalid JSON" on row 1, which sends the user looking for the wrong fix.
_MAGIC = [(b"\x1f\x8b", "gzip-compressed"), (b"\x28\xb5\x2f\xfd", "zstd-compressed"),
          (b"\xfd7zXZ\x00", "xz-compressed"), (b"PK\x03\x04", "a zip archive"), (b"PAR1", "a parquet file"),
          (b"\xff\xfe", "UTF-16 text"), (b"\xfe\xff", "UTF-16 text"),
          *((b"BZh" + str(level).encode(), "bzip2-compressed") for level in range(1, 10))]
_UTF8_BOM = b"\xef\xbb\xbf"  # what Windows editors put first; the text is UTF-8 all the same
_TEXT_TYPES = (".jsonl", ".ndjson", ".json", ".csv")


def _sniff(path: Path) -> str | None:
    """What the file is by its first bytes (see _MAGIC), or None for anything else (text, presumably)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError as exc:
        raise DataError(f"cannot read the file: {(exc.strerror or str(exc)).lower()}; check its permissions",
                        file=str(path)) from None
    return next((what for magic, what in _MAGIC if head.startswith(magic)), None)


def _looks(what: str | None) -> str:
    return f"it is {what}" if what else "it may be plain text"


def _wrong_content(path: Path, what: str) -> DataError:
    """The error for a file whose bytes do not match its name, with the fix for that case."""
    name = path.name.lower()
    if what == "UTF-16 text":
        fix = f"re-encode it as UTF-8, e.g. iconv -f UTF-16 -t UTF-8 {path.name} > fixed{path.suffix}"
    elif what == "gzip-compressed" and name.endswith((".jsonl", ".ndjson")):
        fix = f"rename it to {path.name}.gz (gzip is read directly) or decompress it"
    elif what == "a parquet file":
        fix = f"rename it to {path.stem}.parquet"
    else:
        fix = "decompress it (only .jsonl.gz is read compressed) and point `path:` at the result"
    return DataError(f"is {what}, not the text its name ({path.suffix}) says; {fix}", file=str(path))


def _read_jsonl(path: Path, compressed: bool) -> Iterator[tuple[int, dict[str, Any]]]:
    opener = gzip.open if compressed else open
    number = 0
    try:
        with opener(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if number == 1 and raw.startswith(_UTF8_BOM):
                    raw = raw[len(_UTF8_BOM):]
                try:
                    value = orjson.loads(raw)  # fast; whatever it refuses gets the exact checks and messages below
                except orjson.JSONDecodeError:
                    value = _parse_line(raw, path, number)
                    if value is None:
                        continue
                if not isinstance(value, dict):
                    raise DataError(f"expected a JSON object per line, got {type(value).__name__}",
                                    file=str(path), row=number)
                yield number, value
    # The gzip stream breaks while row `number + 1` is being read; rows before it were whole.
    except EOFError:
        raise DataError("the gzip data ends early: the file is truncated (an interrupted download or copy?); "
                        "download or compress it again", file=str(path), row=number + 1) from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"damaged gzip data ({exc}); download or compress the file again", file=str(path),
                        row=number + 1) from None


def _parse_line(raw: bytes, path: Path, number: int) -> Any:
    """One JSON line with Python's json (NaN, huge integers, ...); None for a blank line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 ({exc.reason} at byte {exc.start}); re-encode the file as UTF-8",
                        file=str(path), row=number) from None
    if not line.strip():
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON ({exc.msg} at column {exc.colno})", file=str(path), row=number) from None


def _read_json(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))  # -sig: a leading byte-order mark is fine
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 ({exc.reason} at byte {exc.start}); re-encode the file as UTF-8",
                        file=str(path)) from None
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})", file=str(path)) \
            from None
    if not isinstance(data, list):
        raise DataError(f"a .json file must hold a list of objects, this one holds a {type(data).__name__} "
                        "(or use .jsonl, one object per line)", file=str(path))
    for number, value in enumerate(data, start=1):
        if not isinstance(value, dict):
            raise DataError(f"expected a JSON object, got {type(value).__name__}", file=str(path), row=number)
        yield number, value


def _read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    name = path.name.lower()
    compressed = name.endswith(".jsonl.gz")
    if not compressed and not name.endswith((*_TEXT_TYPES, ".parquet")):
        raise DataError("unknown file type; use .jsonl, .jsonl.gz, .json, .parquet or .csv (decompress other "
                        "archives first)", file=str(path))
    what = _sniff(path)
    # A binary type whose bytes are something else (an empty .jsonl.gz is just empty: "has no rows" below).
    if compressed and what != "gzip-compressed" and path.stat().st_size > 0:
        raise DataError(f"is not gzip-compressed ({_looks(what)}); rename it to what it is (e.g. .jsonl) or "
                        "compress it with gzip", file=str(path))
    if name.endswith(".parquet") and what != "a parquet file":
        looks = "it is empty" if path.stat().st_size == 0 else _looks(what)
        raise DataError(f"is not a parquet file ({looks}); rename it to what it is (e.g. .jsonl) or write it "
                        "with a parquet writer", file=str(path))
    # polars decompresses a gzip or zstd .csv by itself; anything else whose bytes do not match is refused.
    csv_it_reads = name.endswith(".csv") and what in ("gzip-compressed", "zstd-compressed")
    if what is not None and name.endswith(_TEXT_TYPES) and not csv_it_reads:
        raise _wrong_content(path, what)
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        yield from _read_jsonl(path, compressed)
        return
    if name.endswith(".json"):
        yield from _read_json(path)
        return
    try:
        if name.endswith(".parquet"):
            frame = pl.read_parquet(path)
        else:
            frame = pl.read_csv(path, infer_schema=False)
    except (UnicodeDecodeError, pl.exceptions.PolarsError, OSError) as exc:
        raise DataError(f"cannot read: {exc}", file=str(path)) from None
    yield from enumerate(frame.iter_rows(named=True), start=1)


def _read_hf(config: LoadConfig) -> Iterator[tuple[int, dict[str, Any]]]:
    import datasets

    try:
        dataset = datasets.load_dataset(config.hf, config.config, split=config.split, revision=config.revision)
    except Exception as exc:  # datasets raises many types; the user needs the message and the id
        raise DataError(f"cannot load with datasets.load_dataset: {type(exc).__name__}: {exc}", file=config.hf) \
            from None
    yield from enumerate(dataset, start=1)


def read_source(config: LoadConfig, ctx: StageContext) -> tuple[Iterator[tuple[int, dict[str, Any]]], str]:
    """(the source's rows numbered from 1, its name for messages): the local file of `path:` or the `datasets`
    id of `hf:`. Also used by stages that read other data sets (decontaminate's evaluation sets)."""
    if config.path is not None:
        path = ctx.resolve(config.path)
        if path.is_dir():
            raise DataError("is a directory, not a file; point `path:` at a .jsonl, .jsonl.gz, .json, .parquet "
                            "or .csv file in it (or read a saved dataset folder with `hf:`)", file=config.path)
        if not path.is_file():
            # is_file() is also False for a link to nothing and for a loop of links: say which.
            broken = " (a symbolic link to a missing file, or a loop of links)" if path.is_symlink() else ""
            raise DataError(f"file not found{broken}; fix `path:` (relative paths are read from the current "
                            "directory or the pipeline file's directory)", file=config.path)
        return _read_rows(path), str(path)
    return _read_hf(config), config.hf


def run(df: pl.DataFrame, config: LoadConfig, ctx: StageContext) -> StageOutput:
    rows, source_name = read_source(config, ctx)
    mapper, columns = INPUT_FORMATS[config.format]
    kept = KeptRows(["row_id", *columns, "source"])
    dropped: list[dict[str, Any]] = []
    seen: set[str] = set()
    extras: dict[str, list[Any]] = {name: [] for name in config.keep_columns}  # keep_columns values
    count = 0
    for number, raw in rows:
        if ctx.limit is not None and count >= ctx.limit:
            break
        count += 1
        try:
            row = mapper(raw)
            _check_lengths(row, config.max_chars)
            missing = [c for c in config.keep_columns if c not in raw]
            if missing:
                raise RowError("missing, but named in keep_columns", missing[0])
        except RowError as exc:
            if config.on_bad_row == "error":
                raise DataError(f"{exc} (format {config.format})", file=source_name, row=number,
                                column=exc.column) from None
            dropped.append({"source_row": number, "drop_reason": f"bad_input: {exc.column}: {exc}",
                            "raw": json.dumps(raw, ensure_ascii=False, default=str)[:10_000]})
            continue
        identity = row_id(row)
        if identity in seen:
            dropped.append({"source_row": number, "drop_reason": "duplicate_row",
                            "raw": json.dumps(raw, ensure_ascii=False, default=str)[:10_000]})
            continue
        seen.add(identity)
        kept.add({"row_id": identity, **row, "source": "human"})
        for name, values in extras.items():
            values.append(raw[name])
    if count == 0:
        raise DataError("has no rows; point `path:` at a file with data", file=source_name)
    frame = kept.frame().with_columns(pl.Series(name, values) for name, values in extras.items())
    dropped_frame = pl.DataFrame(dropped, schema={"source_row": pl.Int64, "drop_reason": pl.Utf8, "raw": pl.Utf8})
    return StageOutput(frame, dropped_frame, metrics={"rows_read": count})


class KeptRows:
    """The kept rows: at most CHUNK_ROWS of them as Python values, the rest already turned into polars
    frames, so that memory stays near the size of the data rather than of a Python object per value."""

    CHUNK_ROWS = 50_000

    def __init__(self, columns: list[str]):
        self.columns = columns
        self.frames: list[pl.DataFrame] = [self._empty()]
        self._clear()

    def _empty(self) -> pl.DataFrame:
        return pl.DataFrame(schema={c: MESSAGES if c == "prompt" else pl.Utf8 for c in self.columns})

    def _clear(self) -> None:
        self.texts: dict[str, list[str | None]] = {c: [] for c in self.columns if c != "prompt"}
        self.prompt_offsets, self.roles, self.contents = [0], [], []

    def add(self, row: dict[str, Any]) -> None:
        for column, values in self.texts.items():
            values.append(row[column])
        for message in row["prompt"]:  # every format has a prompt
            self.roles.append(message["role"])
            self.contents.append(message["content"])
        self.prompt_offsets.append(len(self.roles))
        if len(self.prompt_offsets) > self.CHUNK_ROWS:
            self._flush()

    def _flush(self) -> None:
        series = {column: pl.Series(column, values, dtype=pl.Utf8) for column, values in self.texts.items()}
        messages = structs(role=strings(self.roles), content=strings(self.contents))
        series["prompt"] = pl.Series("prompt", lists(self.prompt_offsets, messages)).cast(MESSAGES)
        self.frames.append(pl.DataFrame([series[c] for c in self.columns]))
        self._clear()

    def frame(self) -> pl.DataFrame:
        self._flush()
        return pl.concat(self.frames)


def _check_lengths(row: dict[str, Any], max_chars: int) -> None:
    for column, value in row.items():
        if value is None:
            continue
        size = len(value) if isinstance(value, str) else sum(len(m["content"]) for m in value)
        if size > max_chars:
            raise RowError(f"{size:,} characters, over max_chars ({max_chars:,}); raise `max_chars:` or drop "
                           f"such rows (on_bad_row: drop)", column)
