"""The straightforward way to decontaminate, for the benchmark's baseline and as the tests' oracle.

Pure Python, no hashing, no numpy: every text normalised with textmatch.normalise_slowly (the definition
that textmatch.normalise implements quickly), its word n-grams as tuples in a set, looked up in a dict from
each evaluation prompt's n-grams to the prompts that have it. The same rules as the decontaminate stage
(see its docstring), written as directly as they read.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

from selfalign.textmatch import normalise_slowly

# A row: its units (texts) in the stage's order, each (label, segments) with its segments' (label, text).
Unit = tuple[str, list[tuple[str, str]]]


def _words(text: str) -> list[bytes]:
    return normalise_slowly(text).split()


def _ngrams(tokens: list[bytes], n: int) -> set[tuple[bytes, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


class NaiveIndex:
    def __init__(self, prompts: list[list[str]], n: int, threshold: float):
        """prompts: each evaluation prompt as its texts (one, or its messages/turns)."""
        self.n, self.threshold = n, threshold
        self.exact: dict[tuple[bytes, ...], int] = {}
        self.by_ngram: dict[tuple[bytes, ...], list[int]] = defaultdict(list)
        self.sizes: list[int] = []
        for index, texts in enumerate(prompts):
            pieces = [_words(text) for text in texts]
            whole = tuple(word for piece in pieces for word in piece)
            for key in (whole, *map(tuple, pieces)):
                if key and key not in self.exact:
                    self.exact[key] = index
            grams = _ngrams(list(whole), n)
            self.sizes.append(len(grams))
            for gram in grams:
                self.by_ngram[gram].append(index)

    def match(self, units: Iterable[Unit]) -> tuple[str, int, str, float] | None:
        """(reason, prompt index, unit or segment label, overlap) of one row, or None."""
        best = None
        for label, segments in units:
            pieces = [(segment_label, _words(text)) for segment_label, text in segments]
            whole = [word for _, piece in pieces for word in piece]
            for key_label, key in [(label, whole), *pieces]:
                if key and tuple(key) in self.exact:
                    return "benchmark_exact_match", self.exact[tuple(key)], key_label, 1.0
            if len(whole) < self.n:
                continue
            grams = _ngrams(whole, self.n)
            shared: dict[int, int] = defaultdict(int)
            for gram in grams:
                for index in self.by_ngram.get(gram, ()):
                    shared[index] += 1
            for index in sorted(shared):
                share = shared[index] / min(len(grams), self.sizes[index])
                if share >= self.threshold and (best is None or share > best[3]):
                    best = ("benchmark_ngram_overlap", index, label, share)
        return best if best is None else (*best[:3], round(best[3], 4))


def row_units(row: dict, fields: list[str]) -> list[Unit]:
    """A canonical row's texts as the stage reads them: a conversation is one unit (a segment per message),
    each answer of `responses` its own unit, any other text one unit."""
    units = []
    for field in fields:
        value = row[field]
        if value is None:
            continue
        if isinstance(value, str):
            units.append((field, [(field, value)]))
        elif value and isinstance(value[0], str):
            units.extend((f"{field}[{i}]", [(f"{field}[{i}]", text)]) for i, text in enumerate(value))
        else:
            units.append((field, [(f"{field}[{i}]", m["content"]) for i, m in enumerate(value)]))
    return units
