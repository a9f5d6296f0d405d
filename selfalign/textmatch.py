"""Text normalised for matching, and hashed word n-grams of many texts at once (decontaminate, dedupe).

Normalisation: NFKC, Unicode case folding, and every run of characters that are not letters or digits
(punctuation, symbols, whitespace, `_`) becomes one space; the words are what is left between spaces.
"Hello,   WORLD!" and "hello world" normalise to the same words. Pure-ASCII text (most of it) takes a
byte-table fast path that gives the same result.

Hashing works on a whole batch of texts at once: polars splits and hashes the words (64 bits each), and
numpy gives every n-gram (and every whole text) the hash of a polynomial over its word hashes, taken from
one prefix sum, the same for the same words wherever they stand. Different words can (very rarely) share a hash, so callers confirm
every hit on the words themselves.

Texts are grouped in two levels: a *segment* is one string (one chat message, one answer); a *unit* is
one or more consecutive segments read as one text (a whole conversation). N-grams run across the
segments of a unit, never across units.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import numpy as np
import polars as pl

_NON_WORD = re.compile(r"[\W_]+")
# ASCII: letters lower-cased, digits kept, every other byte a space (what the Unicode path does to ASCII).
_ASCII_TABLE = bytes((c | 0x20 if chr(c).isalpha() else c) if chr(c).isalnum() else 0x20 for c in range(128)) \
    + bytes(range(128, 256))

# An odd 64-bit base: odd numbers are invertible modulo 2**64, which lets a window's hash be divided out of a
# prefix sum of hash * base**position.
_WORD_BASE = 0xD6E8FEB86659FD93
_WORD_SEED = 0x5E1FA1

# Non-ASCII characters that the Unicode path turns into spaces (punctuation and spaces, also after NFKC), and
# that are common in English text: replaced at the byte level so that their text takes the ASCII path.
_COMMON_MARKS = tuple(mark.encode("utf-8") for mark in "\u2019\u2018\u201c\u201d\u2013\u2014\u2026\u00a0\u00b4\u2022")


def normalise(text: str) -> bytes:
    """The text's words, lower-cased and separated by spaces (runs of spaces are harmless: see words()).

    ASCII bytes go through a byte table (letters lower-cased, other non-alphanumerics to spaces); only words
    that still hold other characters take the Unicode path, word by word: NFKC, case folding, and each run of
    non-letters/digits to a space. Word by word gives what the whole text would, because ASCII spaces and
    punctuation separate words under both (tests/test_decontaminate.py compares the two on real data)."""
    data = text.encode("utf-8").translate(_ASCII_TABLE)
    if text.isascii():
        return data
    for mark in _COMMON_MARKS:
        data = data.replace(mark, b" ")
    if data.isascii():
        return data
    return b" ".join(word if word.isascii() else _unicode_word(word) for word in data.split())


def _unicode_word(word: bytes) -> bytes:
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", word.decode("utf-8")).casefold()).strip().encode("utf-8")


def normalise_slowly(text: str) -> bytes:
    """The definition normalise() implements quickly: the whole text through the Unicode path."""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip().encode("utf-8")


def words(text: str) -> list[bytes]:
    return normalise(text).split()


def ngrams(tokens: list[bytes], n: int) -> set[tuple[bytes, ...]]:
    """The distinct word n-grams of a text (none when it has fewer than n words)."""
    return set(zip(*(tokens[k:] for k in range(n))))


class _Powers:
    """base**i and base**-i modulo 2**64 for i < size, grown on demand (numpy's uint64 arithmetic wraps)."""

    def __init__(self, base: int):
        self.base, self.inverse = base, pow(base, -1, 2**64)
        self.up = self.down = np.ones(1, np.uint64)

    def get(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        if size > len(self.up):
            size = max(size, 2 * len(self.up))
            self.up = np.cumprod(np.r_[np.uint64(1), np.full(size - 1, self.base, np.uint64)], dtype=np.uint64)
            self.down = np.cumprod(np.r_[np.uint64(1), np.full(size - 1, self.inverse, np.uint64)], dtype=np.uint64)
        return self.up, self.down


_POWERS = _Powers(_WORD_BASE)


def _window_hashes(prefix: np.ndarray, down: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Hash of words [start, end) from a prefix sum of hash * base**position, made position-independent."""
    return (prefix[end] - prefix[start]) * down[start]


@dataclass
class Hashed:
    """Hashes of a batch of units: every n-gram (with the unit it belongs to), every segment and unit."""

    ngram_hashes: np.ndarray  # uint64, one per n-gram position (repeats kept)
    ngram_units: np.ndarray  # int64, the unit of each n-gram
    segment_hashes: np.ndarray  # uint64, a hash of each segment's words (for exact matches)
    segment_words: np.ndarray  # int64, words per segment
    unit_hashes: np.ndarray  # uint64, a hash of each unit's words
    unit_words: np.ndarray  # int64, words per unit


def hash_batch(segments: list[bytes], segment_units: np.ndarray, units: int, n: int) -> Hashed:
    """Hashes of normalised `segments` (from normalise()); segment i belongs to unit segment_units[i], and a
    unit's segments are consecutive. Units without segments have 0 words.

    Word hashes are polars' hash of the word (the same for the same polars version; compare hashes made by one
    process)."""
    segment_units = np.asarray(segment_units, dtype=np.int64)
    # Split and hash in polars: a third of the CPU time of bytes.split() and hash() per word in Python.
    words = pl.DataFrame({"segment": np.arange(len(segments)),
                          "word": pl.Series(segments, dtype=pl.Binary).cast(pl.Utf8).str.split(" ")}) \
        .explode("word").filter(pl.col("word") != "")  # runs of spaces leave empty strings
    segment_words = np.bincount(words["segment"].to_numpy(), minlength=len(segments)).astype(np.int64)
    count = int(segment_words.sum())
    word_hashes = words["word"].hash(_WORD_SEED).to_numpy()
    seg_word_end = np.cumsum(segment_words)
    seg_word_start = seg_word_end - segment_words
    unit_words = np.bincount(segment_units, weights=segment_words, minlength=units).astype(np.int64)
    unit_word_end = np.cumsum(unit_words)
    unit_word_start = unit_word_end - unit_words

    up, down = _POWERS.get(count + 1)
    prefix = np.zeros(count + 1, np.uint64)
    np.cumsum(word_hashes * up[:count], out=prefix[1:])
    word_units = np.repeat(segment_units, segment_words)
    starts = np.arange(max(count - n + 1, 0))
    starts = starts[word_units[starts] == word_units[starts + n - 1]]
    return Hashed(_window_hashes(prefix, down, starts, starts + n), word_units[starts],
                  _window_hashes(prefix, down, seg_word_start, seg_word_end), segment_words,
                  _window_hashes(prefix, down, unit_word_start, unit_word_end), unit_words)


class HashSet:
    """A sorted array of 64-bit hashes with a bitmap in front: most lookups of absent hashes stop at the
    bitmap (2**24 bits, 2 MiB), the rest are settled by binary search."""

    BITS = 24

    def __init__(self, hashes: np.ndarray):
        self.sorted = np.unique(np.asarray(hashes, np.uint64))
        self.bitmap = np.zeros(2 ** self.BITS, bool)
        self.bitmap[self.sorted >> np.uint64(64 - self.BITS)] = True

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        maybe = np.flatnonzero(self.bitmap[hashes >> np.uint64(64 - self.BITS)])
        found = np.zeros(len(hashes), bool)
        if len(maybe) and len(self.sorted):
            candidates = hashes[maybe]
            at = np.minimum(np.searchsorted(self.sorted, candidates), len(self.sorted) - 1)
            found[maybe] = self.sorted[at] == candidates
        return found
