"""The output contract: canonical pairs -> the columns each reward-model trainer reads.

Each function maps the final polars frame to a frame in one trainer's format. Splits are made by a hash
of the prompt, so a prompt never appears in both train and test.
"""

from __future__ import annotations

import hashlib

import polars as pl

ASSISTANT = pl.Struct({"role": pl.Utf8, "content": pl.Utf8})


def _as_assistant_message(column: str) -> pl.Expr:
    return pl.concat_list(pl.struct(role=pl.lit("assistant"), content=pl.col(column))).alias(column)


def _critique_texts(column: str) -> pl.Expr:
    return pl.col(column).list.eval(pl.element().struct.field("text")).alias(column)


def _optional(df: pl.DataFrame, *columns: str) -> list[str]:
    return [c for c in columns if c in df.columns]


def to_trl(df: pl.DataFrame) -> pl.DataFrame:
    """TRL conversational preference data with explicit prompt (+ `margin` and critiques when present)."""
    extras = [_critique_texts(c) for c in _optional(df, "chosen_critiques", "rejected_critiques")]
    extras += [pl.col(c) for c in _optional(df, "chosen_score", "rejected_score", "margin")]
    return df.select(pl.col("prompt"), _as_assistant_message("chosen"), _as_assistant_message("rejected"),
                     *extras, *[pl.col(c) for c in _optional(df, "source", "row_id")])


def to_critic_rm(df: pl.DataFrame) -> pl.DataFrame:
    """Pairs with their filtered critiques and scores, for joint critique + reward training."""
    return df.select(pl.col("prompt"), pl.col("chosen"), pl.col("rejected"),
                     _critique_texts("chosen_critiques"), _critique_texts("rejected_critiques"),
                     *[pl.col(c) for c in _optional(df, "chosen_score", "rejected_score", "margin", "source",
                                                     "row_id")])


FORMATS = {"trl": to_trl, "critic-rm": to_critic_rm}
NEEDS = {"trl": {"prompt", "chosen", "rejected"},
         "critic-rm": {"prompt", "chosen", "rejected", "chosen_critiques", "rejected_critiques"}}


def prompt_bucket(prompt: list[dict[str, str]]) -> float:
    """A stable number in [0, 1) from the prompt's text: the same prompt always lands in the same split."""
    text = "\n".join(f"{m['role']}:{m['content'].strip().lower()}" for m in prompt)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def split_by_prompt(df: pl.DataFrame, test_size: float) -> dict[str, pl.DataFrame]:
    if test_size <= 0 or df.height == 0:
        return {"train": df}
    buckets = pl.Series([prompt_bucket(p) for p in df["prompt"].to_list()], dtype=pl.Float64)
    is_test = buckets < test_size
    return {"train": df.filter(~is_test), "test": df.filter(is_test)}
