"""decontaminate: drop rows whose prompt (or answers) overlap the prompts of evaluation sets.

A reward model judged on RewardBench must not have trained on RewardBench's prompts. `against:` lists the
evaluation sets (a local file in any format the load stage reads, or a `datasets` id), each with the
`column` that holds its prompts (text, a list of chat messages, or a list of turns) and an optional
`id_column`. The row texts compared are those of `fields` (default: the prompt, all its messages).

Every text is normalised first (textmatch.normalise: NFKC, case folded, every run of characters that are
not letters or digits made one space), so "What is 2+2?" and "what is 2 + 2" are the same words.
A row is dropped when any of its texts

1. **exact** (`benchmark_exact_match`): the whole text of a field (a conversation, an answer) or one of its
   messages has the same words as an evaluation prompt (a whole prompt, or one message/turn of it); or
2. **n-gram** (`benchmark_ngram_overlap`): shares word n-grams (`n`, 13 by default) with an evaluation
   prompt, and the shared distinct n-grams are at least `threshold` of the distinct n-grams of the
   shorter of the two texts: `shared / min(row text's n-grams, prompt's n-grams) >= threshold`
   (default 0.5; `threshold: 0` drops on any shared n-gram, GPT-3's rule).

Measured against the shorter text, a benchmark prompt copied into a longer prompt (a span) scores 1.0, and
so does a row that quotes a long benchmark prompt in part; a single boilerplate 13-gram shared by two long
texts scores low. A text with fewer than `n` words has no n-grams: it can only match exactly. For n-grams a
conversation is one text (n-grams run across its messages); each answer in `responses` is its own text.

Each dropped row keeps `drop_reason`, `benchmark` (the set's name), `benchmark_id` (the matched prompt's
`id_column` value, or its row number in the set when there is none), `benchmark_field` (which text of the
row matched: `prompt`, `prompt[2]` for its third message, `chosen`, `responses[1]`) and `overlap` (the share
above; 1.0 for an exact match). An exact match wins over an n-gram one; among n-gram matches the highest
share wins, then the earliest set and prompt.

Speed: rows are read in batches; numpy hashes every word n-gram and text to 64 bits (textmatch.hash_batch)
and looks them up among the evaluation set's hashes; only rows with a hit are then compared word by word,
so a hash collision can cost time but never drops a row. benchmarks/case_decontaminate.py measures it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import polars as pl
from pydantic import Field, model_validator

from ..config_base import Strict
from ..errors import DataError
from ..textmatch import HashSet, hash_batch, ngrams, normalise
from .base import StageConfig, StageContext, StageOutput
from .load import LoadConfig, read_source

TextField = Literal["prompt", "chosen", "rejected", "response", "responses"]
BATCH_ROWS = 20_000


class EvalSet(Strict):
    """One evaluation set whose prompts must not be in the training data."""

    name: str | None = Field(None, description="its name in dropped/ and the manifest; default: the hf id or the "
                                               "file's name")
    path: str | None = Field(None, description="local file: .jsonl, .jsonl.gz, .json, .parquet, .csv")
    hf: str | None = Field(None, description="a `datasets` id or local dataset folder, read with load_dataset, "
                                             "e.g. allenai/reward-bench")
    split: str = Field("test", description="the split of an hf: set, e.g. filtered for allenai/reward-bench")
    config: str | None = Field(None, description="the configuration (subset) of an hf: set")
    revision: str | None = Field(None, description="the revision (branch, tag, commit) of an hf: set")
    column: str = Field("prompt", description="the column holding the prompts: text, a list of {role, content} "
                                              "messages, or a list of turns")
    id_column: str | None = Field(None, description="the column with each prompt's id (for dropped/); default: "
                                                    "its row number in the set, from 1")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.hf is None):
            raise ValueError("give exactly one of `path:` (a local file) or `hf:` (a datasets id)")
        return self

    def label(self) -> str:
        return self.name or self.hf or Path(self.path).name


class DecontaminateConfig(StageConfig):
    kind: Literal["decontaminate"]
    against: list[EvalSet] = Field(min_length=1, description="the evaluation sets, e.g. [{hf: allenai/reward-bench, "
                                                             "split: filtered, column: prompt, id_column: id}]")
    fields: list[TextField] = Field(["prompt"], min_length=1,
                                    description="the row texts compared with the evaluation prompts")
    n: int = Field(13, ge=1, le=100, description="words per n-gram; texts shorter than this match exactly only")
    threshold: float = Field(0.5, ge=0, le=1, description="drop when the shared distinct n-grams are at least "
                                                          "this share of the shorter text's (0: any shared n-gram)")

    @model_validator(mode="after")
    def _distinct(self):
        labels = [s.label() for s in self.against]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"two evaluation sets are named {repeated[0]!r}; give each a distinct `name:`")
        if len(set(self.fields)) != len(self.fields):
            raise ValueError("fields lists a column twice; list each once")
        return self

    def needs(self) -> set[str]:
        return set(self.fields)

    def local_set_problems(self, resolve) -> list[tuple[tuple, str]]:
        """(place in the stage, message) for every local evaluation set that cannot be read as configured, so that
        `selfalign validate` (and a run, before its first stage) fails on it. hf: sets are read at run time."""
        problems = []
        for index, eval_set in enumerate(self.against):
            if eval_set.path is None:
                continue
            try:
                read_eval_set(eval_set, SimpleNamespace(resolve=resolve))
            except DataError as exc:
                problems.append((("against", index, "path"), str(exc)))
        return problems


def read_eval_set(eval_set: EvalSet, ctx: StageContext) -> list[tuple[str, list[str]]]:
    """(id, texts) per prompt: texts is [the prompt] or its messages/turns. Empty prompts are left out."""
    source = LoadConfig(kind="load", path=eval_set.path, hf=eval_set.hf, split=eval_set.split,
                        config=eval_set.config, revision=eval_set.revision, format="prompts")
    rows, name = read_source(source, ctx)
    prompts = []
    for number, row in rows:
        for column in (eval_set.column, eval_set.id_column):
            if column is not None and column not in row:
                raise DataError(f"missing; the row has {sorted(row)} (set `column:`/`id_column:` to one of them)",
                                file=name, row=number, column=column)
        texts = _texts(row[eval_set.column], name, number, eval_set.column)
        if texts:
            prompts.append((str(number if eval_set.id_column is None else row[eval_set.id_column]), texts))
    if not prompts:
        raise DataError(f"has no prompts in column {eval_set.column!r}; point `column:` at the prompts", file=name)
    return prompts


def _texts(value: Any, name: str, number: int, column: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        texts = []
        for item in value:
            if isinstance(item, str):
                texts.append(item)
            elif isinstance(item, dict) and isinstance(item.get("content"), str):
                texts.append(item["content"])
            else:
                raise DataError("expected text, a list of {role, content} messages or a list of texts, got a list "
                                f"holding {type(item).__name__}", file=name, row=number, column=column)
        return texts
    raise DataError(f"expected text or a list of messages, got {type(value).__name__}", file=name, row=number,
                    column=column)


class Index:
    """The evaluation prompts: by their exact words and by their n-grams, each also as a set of hashes."""

    def __init__(self, config: DecontaminateConfig, ctx):
        self.n, self.threshold = config.n, config.threshold
        self.sets: list[str] = []  # per prompt: its set's label
        self.ids: list[str] = []  # per prompt: its id
        self.counts: dict[str, int] = {}  # prompts per set
        segments, segment_units = [], []
        for eval_set in config.against:
            rows = read_eval_set(eval_set, ctx)
            self.counts[eval_set.label()] = len(rows)
            for identity, texts in rows:
                segment_units.extend([len(self.ids)] * len(texts))
                segments.extend(normalise(text) for text in texts)
                self.sets.append(eval_set.label())
                self.ids.append(identity)
        prompts = len(self.ids)
        hashed = hash_batch(segments, np.array(segment_units, np.int64), prompts, self.n)
        prompt_words: list[list[bytes]] = [[] for _ in range(prompts)]
        self.exact: dict[bytes, int] = {}  # words -> the first prompt that is (or has a message with) these words
        for segment, prompt in zip(segments, segment_units):
            tokens = segment.split()
            if tokens:
                prompt_words[prompt].extend(tokens)
                self.exact.setdefault(b" ".join(tokens), prompt)
        for prompt, tokens in enumerate(prompt_words):
            if tokens:
                whole = b" ".join(tokens)
                self.exact[whole] = min(prompt, self.exact.get(whole, prompt))
        self.exact_hashes = HashSet(np.r_[hashed.segment_hashes[hashed.segment_words > 0],
                                          hashed.unit_hashes[hashed.unit_words > 0]])
        self.ngram_hashes = HashSet(hashed.ngram_hashes)
        self.ngram_prompts: dict[tuple[bytes, ...], list[int]] = defaultdict(list)
        self.ngram_counts: list[int] = []
        for prompt, tokens in enumerate(prompt_words):
            grams = ngrams(tokens, self.n)
            self.ngram_counts.append(len(grams))
            for gram in grams:
                self.ngram_prompts[gram].append(prompt)

    def ngram_match(self, tokens: list[bytes]) -> tuple[int, float] | None:
        """(prompt, share) of the prompt that this text's n-grams overlap most, if that share reaches the
        threshold; ties go to the earlier prompt."""
        grams = ngrams(tokens, self.n)
        shared: dict[int, int] = defaultdict(int)
        for gram in grams:
            for prompt in self.ngram_prompts.get(gram, ()):
                shared[prompt] += 1
        best = None
        for prompt in sorted(shared):
            share = shared[prompt] / min(len(grams), self.ngram_counts[prompt])
            if share >= self.threshold and (best is None or share > best[1]):
                best = (prompt, share)
        return best


@dataclass
class Texts:
    """A batch of rows as texts. A *unit* is one text of a row: a field, or one answer of `responses`; its
    *segments* are the strings it is made of (the messages of a conversation, else the text itself)."""

    segments: list[str]
    segment_units: np.ndarray
    segment_messages: np.ndarray  # the message index of a conversation's segment, else -1
    unit_rows: np.ndarray
    unit_fields: np.ndarray  # index into config.fields
    unit_items: np.ndarray  # the answer's index in `responses`, else -1


def batch_texts(frame: pl.DataFrame, fields: list[str]) -> Texts:
    segments: list[str] = []
    parts: dict[str, list[np.ndarray]] = defaultdict(list)
    units = 0
    rows = np.arange(frame.height)
    for field_index, name in enumerate(fields):
        series = frame[name]
        array = series.to_arrow()
        if series.dtype == pl.Utf8:
            values, unit_rows, unit_items = array.to_pylist(), rows, np.full(frame.height, -1)
            segment_units, messages = np.arange(frame.height), np.full(frame.height, -1)
        else:
            lengths = np.asarray(array.value_lengths().fill_null(0), np.int64)
            flat = array.flatten()
            owner = np.repeat(rows, lengths)
            position = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            if series.dtype.inner == pl.Utf8:  # a list of answers: a unit each
                values, unit_rows, unit_items = flat.to_pylist(), owner, position
                segment_units, messages = np.arange(len(flat)), np.full(len(flat), -1)
            else:  # a conversation: one unit, a segment per message
                # StructArray.flatten() applies the array's offset (a batch is a slice); .field() would not.
                content = flat.flatten()[flat.type.get_field_index("content")]
                values, unit_rows, unit_items = content.to_pylist(), rows, np.full(frame.height, -1)
                segment_units, messages = owner, position
        present = np.array([value is not None for value in values], bool)
        segments.extend(value for value in values if value is not None)
        parts["segment_units"].append(units + segment_units[present])
        parts["segment_messages"].append(messages[present])
        parts["unit_rows"].append(unit_rows)
        parts["unit_fields"].append(np.full(len(unit_rows), field_index))
        parts["unit_items"].append(unit_items)
        units += len(unit_rows)
    joined = {key: np.concatenate(value).astype(np.int64) for key, value in parts.items()}
    return Texts(segments, **joined)


def _field_label(fields: list[str], texts: Texts, unit: int, message: int = -1) -> str:
    label = fields[texts.unit_fields[unit]]
    if texts.unit_items[unit] >= 0:
        label += f"[{texts.unit_items[unit]}]"
    return label + (f"[{message}]" if message >= 0 else "")


def _matches(frame: pl.DataFrame, config: DecontaminateConfig, index: Index) -> tuple[dict[int, tuple], int]:
    """row -> (reason, prompt, field label, overlap) for the rows of `frame` that match; and how many rows the
    hash lookup passed on to be compared word by word."""
    texts = batch_texts(frame, config.fields)
    normalised = [normalise(text) for text in texts.segments]
    hashed = hash_batch(normalised, texts.segment_units, len(texts.unit_rows), config.n)
    exact_units = np.r_[texts.segment_units[(hashed.segment_words > 0)
                                            & index.exact_hashes.contains(hashed.segment_hashes)],
                        np.flatnonzero((hashed.unit_words > 0) & index.exact_hashes.contains(hashed.unit_hashes))]
    ngram_units = np.unique(hashed.ngram_units[index.ngram_hashes.contains(hashed.ngram_hashes)])
    candidate_units = np.union1d(exact_units, ngram_units)
    candidate_rows = np.unique(texts.unit_rows[candidate_units])
    if not len(candidate_units):
        return {}, 0
    # The segments of each candidate unit (segments are in unit order).
    first_segment = np.searchsorted(texts.segment_units, candidate_units, side="left")
    end_segment = np.searchsorted(texts.segment_units, candidate_units, side="right")
    found: dict[int, tuple] = {}
    for unit, start, end in zip(candidate_units.tolist(), first_segment.tolist(), end_segment.tolist()):
        row = int(texts.unit_rows[unit])
        if row in found and found[row][0] == "benchmark_exact_match":
            continue
        pieces = [normalised[i].split() for i in range(start, end)]
        tokens = list(chain.from_iterable(pieces))
        match = None
        whole = index.exact.get(b" ".join(tokens)) if tokens else None
        if whole is not None:
            match = ("benchmark_exact_match", whole, _field_label(config.fields, texts, unit), 1.0)
        else:
            for i, piece in zip(range(start, end), pieces):
                prompt = index.exact.get(b" ".join(piece)) if piece else None
                if prompt is not None:
                    match = ("benchmark_exact_match", prompt,
                             _field_label(config.fields, texts, unit, int(texts.segment_messages[i])), 1.0)
                    break
        if match is None and len(tokens) >= config.n:
            overlap = index.ngram_match(tokens)
            if overlap is not None:
                match = ("benchmark_ngram_overlap", overlap[0], _field_label(config.fields, texts, unit), overlap[1])
        if match is not None and (row not in found or match[0] == "benchmark_exact_match"
                                  or match[3] > found[row][3]):
            found[row] = match
    return found, len(candidate_rows)


def run(df: pl.DataFrame, config: DecontaminateConfig, ctx: StageContext) -> StageOutput:
    index = Index(config, ctx)
    found: dict[int, tuple] = {}
    candidates = 0
    for start in range(0, df.height, BATCH_ROWS):
        batch, checked = _matches(df.slice(start, BATCH_ROWS), config, index)
        found.update({start + row: match for row, match in batch.items()})
        candidates += checked
    rows = sorted(found)
    matches = [found[row] for row in rows]
    dropped_mask = np.zeros(df.height, bool)
    dropped_mask[rows] = True
    dropped = df[np.array(rows, np.int64)].with_columns(
        drop_reason=pl.Series([m[0] for m in matches], dtype=pl.Utf8),
        benchmark=pl.Series([index.sets[m[1]] for m in matches], dtype=pl.Utf8),
        benchmark_id=pl.Series([index.ids[m[1]] for m in matches], dtype=pl.Utf8),
        benchmark_field=pl.Series([m[2] for m in matches], dtype=pl.Utf8),
        overlap=pl.Series([round(m[3], 4) for m in matches], dtype=pl.Float64))
    per_set = {label: {"prompts": count, "exact": 0, "ngram": 0} for label, count in index.counts.items()}
    for reason, prompt, _, _ in matches:
        per_set[index.sets[prompt]]["exact" if reason == "benchmark_exact_match" else "ngram"] += 1
    metrics = {"benchmarks": per_set, "n": config.n, "threshold": config.threshold, "fields": list(config.fields),
               "rows_compared_word_by_word": candidates}
    return StageOutput(df.filter(pl.Series(~dropped_mask)), dropped, metrics)
