"""dedupe: drop near-duplicate prompts, within and across sources, keeping the first by a declared order.

The text of a row is its `fields` (default: the prompt, all its messages), normalised as decontaminate
does (textmatch.normalise: NFKC, case folded, punctuation and spacing made one space). Two rows are
near-duplicates when the Jaccard similarity of their sets of word `ngram`s (2 by default; a text shorter
than that is one shingle) is at least `threshold` (0.7). Near-duplicate pairs join into clusters (a chain
A~B, B~C is one cluster even if A and C are further apart). Each cluster keeps one row: the first by
`keep.order` of the `keep.column` value (default `source`: human before synthetic), then by row order;
the others go to dropped/ with `drop_reason: near_duplicate`, `cluster_id` (the row_id of the row kept)
and `similarity` (their Jaccard similarity with it). Exact duplicates are near-duplicates too; the load
stage and mix's exact dedupe (same normalised prompt and answers) run as before.

Finding the pairs: MinHash signatures (`num_perm` permutations) in an LSH index with bands chosen so that
a pair at the threshold is found with probability ~0.99 or more; every candidate pair is then checked on
its exact shingle sets, so no pair below the threshold is merged, and only pairs LSH missed are lost
(benchmarks/case_dedupe.py measures recall on planted near-duplicates).

The library: rensa (MinHash and LSH in Rust, MIT, no dependencies), not datasketch (MIT, numpy + scipy).
Both are maintained; measured on 100k prompts with 2,000 planted near-duplicates, the same shingles, 128
permutations and 32 bands (benchmarks/case_dedupe.py, results/2026-12-02-dedupe.md): both found every planted
pair (recall 1.0) with the same share of true pairs among the candidates (0.77% vs 0.79%: the bands are set for
recall, the exact check does the rest), and rensa built the signatures and the index and queried every prompt
in 3.9 s of CPU (10 s wall) against datasketch's 41.3 s (88 s) (MinHash.bulk hashes each shingle with SHA-1 from Python; its LSH
index is Python dicts).

The same options are `near_duplicates:` of the mix stage, applied after its exact dedupe.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import polars as pl
from pydantic import Field, model_validator

from ..config_base import Strict
from ..errors import DataError
from ..textmatch import words
from .base import StageConfig, StageContext, StageOutput

NEAR_DUPLICATE = "near_duplicate"


class KeepOrder(Strict):
    column: str = Field("source", description="the column whose value ranks the rows of a cluster")
    order: list[str] = Field(["human", "synthetic"], min_length=1,
                             description="its values, best first; every value in the data must be listed")

    @model_validator(mode="after")
    def _distinct(self):
        if len(set(self.order)) != len(self.order):
            raise ValueError("order lists a value twice; list each once")
        return self


class NearDuplicates(Strict):
    """Near-duplicate removal with MinHash LSH (the dedupe stage, and mix's near_duplicates:)."""

    fields: list[Literal["prompt", "chosen", "rejected", "response"]] = Field(
        ["prompt"], min_length=1, description="the columns whose text is compared (joined, in this order)")
    threshold: float = Field(0.7, gt=0, le=1, description="Jaccard similarity of the word n-gram sets at which "
                                                          "two rows are near-duplicates")
    ngram: int = Field(2, ge=1, le=10, description="words per shingle")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (more: fewer missed pairs, slower)")
    keep: KeepOrder = Field(default_factory=KeepOrder, description="which row of a cluster stays: the first by "
                                                                   "this order, then the earliest row")
    seed: int = Field(0, description="MinHash seed")

    @model_validator(mode="after")
    def _distinct_fields(self):
        if len(set(self.fields)) != len(self.fields):
            raise ValueError("fields lists a column twice; list each once")
        return self

    def columns(self) -> set[str]:
        return {*self.fields, self.keep.column}


class DedupeConfig(StageConfig, NearDuplicates):
    kind: Literal["dedupe"]

    def needs(self) -> set[str]:
        return self.columns()


def bands_for(threshold: float, num_perm: int) -> int:
    """The number of LSH bands (a divisor of num_perm, as rensa requires): the fewest, so the fewest candidate
    pairs to check, with which a pair exactly at the threshold is still found with probability >= 0.99.
    >>> bands_for(0.7, 128)
    32
    """
    divisors = [bands for bands in range(1, num_perm + 1) if num_perm % bands == 0]
    return next((bands for bands in divisors if 1 - (1 - threshold ** (num_perm // bands)) ** bands >= 0.99),
                num_perm)


def shingles(text_words: list[bytes], n: int) -> list[bytes]:
    """The distinct word n-grams of a text, or the whole text when it has fewer than n words."""
    if len(text_words) < n:
        return [b" ".join(text_words)]
    return list(dict.fromkeys(b" ".join(text_words[i:i + n]) for i in range(len(text_words) - n + 1)))


def row_texts(df: pl.DataFrame, fields: list[str]) -> list[str]:
    """Each row's compared text: the fields' texts (a conversation's messages) joined by newlines."""
    parts = []
    for name in fields:
        column = pl.col(name)
        if df.schema[name] == pl.Utf8:
            parts.append(column.fill_null(""))
        else:
            parts.append(column.list.eval(pl.element().struct.field("content")).list.join("\n").fill_null(""))
    return df.select(pl.concat_str(parts, separator="\n").alias("text"))["text"].to_list()


def candidate_pairs(shingle_lists: list[list[bytes]], config: NearDuplicates) -> list[tuple[int, int]]:
    """(i, j) with i < j for every pair of rows that share an LSH band (rensa)."""
    from rensa import RMinHash, RMinHashLSH

    bands = bands_for(config.threshold, config.num_perm)
    signatures = RMinHash.from_token_sets(shingle_lists, config.num_perm, config.seed)
    index = RMinHashLSH(config.threshold, config.num_perm, bands)
    index.insert_many(signatures)
    flagged = np.flatnonzero(index.query_duplicate_flags(signatures))
    pairs = set()
    for row, found in zip(flagged.tolist(), index.query_all([signatures[i] for i in flagged])):
        pairs.update((row, other) for other in found if other > row)
    return sorted(pairs)


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def near_duplicates(df: pl.DataFrame, config: NearDuplicates, pairs_of=candidate_pairs) \
        -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """(kept rows, dropped rows with drop_reason/cluster_id/similarity, metrics)."""
    ranks = _ranks(df, config.keep)
    texts = [words(text) for text in row_texts(df, config.fields)]
    present = [i for i, tokens in enumerate(texts) if tokens]  # an empty text is nobody's duplicate
    shingle_lists = [shingles(texts[i], config.ngram) for i in present]
    sets: dict[int, set] = {}

    def shingle_set(i: int) -> set:
        if i not in sets:
            sets[i] = set(shingle_lists[i])
        return sets[i]

    parent = list(range(len(present)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    candidates = pairs_of(shingle_lists, config) if len(present) > 1 else []
    confirmed = 0
    for i, j in candidates:
        if jaccard(shingle_set(i), shingle_set(j)) >= config.threshold:
            confirmed += 1
            a, b = root(i), root(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    clusters: dict[int, list[int]] = {}
    for i in range(len(present)):
        clusters.setdefault(root(i), []).append(i)
    drop_rows, keeper_rows, similarity = [], [], []
    for members in clusters.values():
        if len(members) < 2:
            continue
        keeper = min(members, key=lambda i: (ranks[present[i]], present[i]))
        for i in members:
            if i != keeper:
                drop_rows.append(present[i])
                keeper_rows.append(present[keeper])
                similarity.append(round(jaccard(shingle_set(i), shingle_set(keeper)), 4))
    order = np.argsort(drop_rows, kind="stable")
    drop_rows = np.array(drop_rows, np.int64)[order]
    row_ids = df["row_id"]
    dropped = df[drop_rows].with_columns(
        drop_reason=pl.lit(NEAR_DUPLICATE, dtype=pl.Utf8),
        cluster_id=row_ids[np.array(keeper_rows, np.int64)[order]] if len(order) else pl.Series([], dtype=pl.Utf8),
        similarity=pl.Series(np.array(similarity, np.float64)[order], dtype=pl.Float64))
    mask = np.ones(df.height, bool)
    mask[drop_rows] = False
    column = config.keep.column
    by_value = dict(dropped.group_by(column).len().rows()) if dropped.height else {}
    metrics = {"clusters": sum(1 for m in clusters.values() if len(m) > 1), "near_duplicates_dropped": dropped.height,
               f"dropped_by_{column}": {str(k): v for k, v in sorted(by_value.items(), key=lambda kv: str(kv[0]))},
               "candidate_pairs": len(candidates), "confirmed_pairs": confirmed, "threshold": config.threshold,
               "ngram": config.ngram, "num_perm": config.num_perm,
               "bands": bands_for(config.threshold, config.num_perm), "library": "rensa"}
    return df.filter(pl.Series(mask)), dropped, metrics


def _ranks(df: pl.DataFrame, keep: KeepOrder) -> list[int]:
    """Each row's place in keep.order; a value it does not list is an error (a typo would silently rank)."""
    position = {value: rank for rank, value in enumerate(keep.order)}
    values = df[keep.column].cast(pl.Utf8).to_list()
    unknown = sorted({str(v) for v in values if v not in position})
    if unknown:
        raise DataError(f"holds {', '.join(repr(v) for v in unknown)}, which keep.order ({keep.order}) does not "
                        f"list; add every value, best first, e.g. keep: {{column: {keep.column}, order: "
                        f"[{', '.join([*keep.order, *unknown])}]}}", file="the rows reaching near-duplicate removal",
                        column=keep.column)
    return [position[v] for v in values]


def run(df: pl.DataFrame, config: DedupeConfig, ctx: StageContext) -> StageOutput:
    kept, dropped, metrics = near_duplicates(df, config)
    return StageOutput(kept, dropped, metrics)
