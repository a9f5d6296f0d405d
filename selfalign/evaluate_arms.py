"""The preference sets an evaluation compares, and the held-out human pairs it scores them on.

`make_arms` reads a run's stages into the four arms (human, synthetic, filtered, final; see evaluate.py);
`own_split` / `read_eval_data` give the held-out pairs; `make_disjoint` keeps every arm's training rows apart
from them by prompt (and checks it); `draw` takes a budget of pairs from an arm for one seed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import polars as pl
from pydantic import Field, model_validator

from .config_base import Strict

ARMS = ("human", "synthetic", "filtered", "final")
# A stage and the frames it wrote: (index, kind, rows kept, rows dropped or None), as report.load_run reads them.
Stage = tuple[int, str, pl.DataFrame, "pl.DataFrame | None"]


class EvalData(Strict):
    """Held-out human preference pairs from outside the run, read as the load stage reads its input."""

    path: str | None = Field(None, description="local file: .jsonl, .jsonl.gz, .json, .parquet, .csv")
    hf: str | None = Field(None, description="a `datasets` id or local dataset folder, read with load_dataset")
    split: str = Field("test", description="the split of an hf: dataset")
    config: str | None = Field(None, description="the config of an hf: dataset")
    revision: str | None = Field(None, description="the revision of an hf: dataset")
    format: Literal["hh-rlhf", "trl"] = Field(description="how the pairs are written (as for the load stage)")
    on_bad_row: Literal["error", "drop"] = Field("error", description="drop: skip rows that do not parse")
    limit: int | None = Field(None, ge=1, description="read only the first N rows")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.hf is None):
            raise ValueError("give exactly one of `path:` (a local file) or `hf:` (a datasets id)")
        return self

    def describe(self) -> str:
        return f"hf:{self.hf} ({self.split})" if self.hf else Path(self.path).name


@dataclass
class Arm:
    name: str
    origin: str                          # where its rows come from, in words
    frame: pl.DataFrame | None = None    # prompt, chosen, rejected (chosen preferred)
    why_not: str | None = None           # when the run cannot make this arm


def _has_pairs(df: pl.DataFrame | None) -> bool:
    return (df is not None and {"prompt", "chosen", "rejected"} <= set(df.columns)
            and df.schema["chosen"] == pl.Utf8 and df.schema["rejected"] == pl.Utf8)


def pairs_of(df: pl.DataFrame) -> pl.DataFrame:
    """prompt, chosen, rejected of the rows that have both answers."""
    return df.select("prompt", "chosen", "rejected").filter(
        pl.col("chosen").is_not_null() & pl.col("rejected").is_not_null())


def _mean_score(column: str) -> pl.Expr:
    return pl.col(column).list.eval(pl.element().struct.field("score")).list.mean()


def _swapped(df: pl.DataFrame, swap: pl.Expr) -> pl.DataFrame:
    return df.with_columns(chosen=pl.when(swap).then(pl.col("rejected")).otherwise(pl.col("chosen")),
                           rejected=pl.when(swap).then(pl.col("chosen")).otherwise(pl.col("rejected")))


def _labelled_by_scores(df: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """Each pair ordered by its mean critique scores (the model's label); tied or unscored pairs left out."""
    scored = df.with_columns(_c=_mean_score("chosen_critiques"), _r=_mean_score("rejected_critiques"))
    known = scored.filter(pl.col("_c").is_not_null() & pl.col("_r").is_not_null())
    untied = known.filter(pl.col("_c") != pl.col("_r"))
    return pairs_of(_swapped(untied, pl.col("_c") < pl.col("_r"))), scored.height - untied.height


def _labelled_by_judge(kept: pl.DataFrame, dropped: pl.DataFrame | None) -> pl.DataFrame:
    """The judge's consistent verdicts: kept rows have its pick as `chosen` (swapped already with
    on_disagreement: swap); rows it dropped for disagreeing with the label are swapped here."""
    parts = [pairs_of(kept)]
    if _has_pairs(dropped) and "drop_reason" in dropped.columns:
        parts.append(pairs_of(_swapped(dropped.filter(pl.col("drop_reason") == "judge_disagrees_with_label"),
                                     pl.lit(True))))
    return pl.concat(parts)


def make_arms(stages: Sequence[Stage], has_export: bool) -> list[Arm]:
    """The four arms from a run's stages (in order, the evaluate stage itself and publish left out)."""
    stages = [s for s in stages if s[1] not in ("evaluate", "publish")]
    label = lambda index, kind: f"stage {index} ({kind})"  # noqa: E731
    arms = []
    load = stages[0] if stages and stages[0][1] == "load" else None
    if load is not None and _has_pairs(load[2]):
        human = load[2].filter(pl.col("source") == "human") if "source" in load[2].columns else load[2]
        arms.append(Arm("human", f"{label(*load[:2])}: the human pairs as read", pairs_of(human)))
    else:
        arms.append(Arm("human", "-", why_not="the input has no human pairs (a prompts-only load stage)"))

    synthetic = None
    for index, kind, kept, dropped in stages:
        if kind == "critique" and _has_pairs(kept) and {"chosen_critiques", "rejected_critiques"} <= set(kept.columns):
            frame, left_out = _labelled_by_scores(kept)
            synthetic = Arm("synthetic", f"{label(index, kind)}: each pair ordered by its mean critique score "
                            f"({left_out:,} tied or unscored left out)", frame)
        elif kind == "judge" and _has_pairs(kept):
            synthetic = Arm("synthetic", f"{label(index, kind)}: each pair ordered by the judge's verdict in both "
                            "orders (position-inconsistent ones left out)", _labelled_by_judge(kept, dropped))
        elif kind == "pair" and _has_pairs(kept):
            synthetic = Arm("synthetic", f"{label(index, kind)}: best vs worst answer by the model's scores",
                            pairs_of(kept))
        if synthetic is not None:
            break
    arms.append(synthetic or Arm("synthetic", "-", why_not="no stage labels pairs by the model's own scores or "
                                 "verdicts (critique of chosen and rejected, judge, or pair)"))

    filtered = next(((i, k, kept) for i, k, kept, _ in stages if k == "consistency" and _has_pairs(kept)), None) \
        or next(((i, k, kept) for i, k, kept, _ in stages if k == "judge" and _has_pairs(kept)), None)
    if filtered is not None:
        what = "pairs whose critiques agree with the human label" if filtered[1] == "consistency" \
            else "pairs the judge kept"
        arms.append(Arm("filtered", f"{label(*filtered[:2])}: {what}", pairs_of(filtered[2])))
    else:
        arms.append(Arm("filtered", "-", why_not="no consistency or judge stage filters the pairs"))

    last = next(((i, k, kept) for i, k, kept, _ in reversed(stages) if k != "export"), None)
    if last is not None and _has_pairs(last[2]):
        what = "the rows export wrote" if has_export else "the last stage's rows (the run has no export stage)"
        arms.append(Arm("final", f"{label(*last[:2])}: {what}", pairs_of(last[2])))
    else:
        arms.append(Arm("final", "-", why_not="the run's last rows are not chosen/rejected pairs"))
    return arms


# -- held-out pairs and prompt-disjointness ---------------------------------------------------------------------

def prompt_key(prompt: list[dict[str, str]]) -> str:
    """A prompt's identity for disjointness: roles and text, case and whitespace folded.

    >>> prompt_key([{"role": "user", "content": "Hi  there"}]) == prompt_key([{"role": "user", "content": "hi there"}])
    True
    """
    text = "\n".join(f"{m['role']}:{' '.join(m['content'].lower().split())}" for m in prompt)
    return hashlib.sha256(text.encode()).hexdigest()


def with_prompt_keys(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns(_prompt=pl.Series([prompt_key(p) for p in df["prompt"].to_list()], dtype=pl.Utf8))


def own_split(human: pl.DataFrame, holdout: float) -> pl.DataFrame:
    """The human pairs whose prompt hash is below `holdout`: export's split function, so export's test rows
    are among them whenever holdout >= the export stage's test_size."""
    from .trainer_formats import prompt_buckets

    if human.height == 0:
        return human
    return human.filter(prompt_buckets(human["prompt"]) < holdout)


def read_eval_data(data: EvalData, resolve: Callable[[str], Path]) -> pl.DataFrame:
    """The eval: dataset's pairs, read by the load stage's own readers and mappers."""
    from .stages.load import LoadConfig, run as load

    @dataclass
    class Reading:  # what the load stage uses of a run's context
        limit: int | None

        def resolve(self, value: str) -> Path:
            return resolve(value)

    config = LoadConfig(kind="load", path=data.path, hf=data.hf, split=data.split, config=data.config,
                        revision=data.revision, format=data.format, on_bad_row=data.on_bad_row)
    return pairs_of(load(None, config, Reading(data.limit)).kept)


@dataclass
class Pool:
    """An arm's training rows, none of which shares a prompt with a held-out pair."""

    arm: Arm
    rows: pl.DataFrame           # prompt, chosen, rejected, _prompt, _pair
    shared: int                  # the arm's rows whose prompt is also a held-out prompt
    removed: int                 # of those, removed from the training rows (all with the run's own split)


def make_disjoint(arms: list[Arm], held_out: pl.DataFrame, remove_from: Literal["arms", "held_out"]) \
        -> tuple[list[Pool], pl.DataFrame, int]:
    """Make every arm's training rows prompt-disjoint from the held-out pairs, and check it.

    With the run's own split (`remove_from="arms"`) the rows sharing a held-out prompt leave every arm (the
    held-out pairs are the run's own rows). With an eval: dataset (`"held_out"`) the eval pairs sharing a prompt
    with any arm's rows leave the held-out set instead: the arms stay what the run made, and every arm is scored
    on the same pairs. Returns (pools, held-out pairs, held-out pairs removed)."""
    keyed_arms = [(arm, with_prompt_keys(arm.frame)) for arm in arms if arm.frame is not None]
    held = with_prompt_keys(held_out)
    removed_held = 0
    if remove_from == "held_out":
        training = set().union(*(set(keyed["_prompt"].to_list()) for _, keyed in keyed_arms))
        clean = held.filter(~pl.col("_prompt").is_in(list(training)))
        removed_held = held.height - clean.height
    else:
        clean = held
    held_keys = set(held["_prompt"].to_list())
    clean_keys = set(clean["_prompt"].to_list())
    pools = []
    for arm, keyed in keyed_arms:
        shared = keyed.filter(pl.col("_prompt").is_in(list(held_keys))).height
        rows = keyed.filter(~pl.col("_prompt").is_in(list(clean_keys)))
        left = set(rows["_prompt"].to_list()) & clean_keys
        if left:  # cannot happen; the check is the promise, so it is made, not assumed
            raise RuntimeError(f"arm {arm.name}: {len(left)} held-out prompts are still in the training rows")
        # A pair's identity whichever answer it prefers: the synthetic arm's copy of a human pair is the same pair.
        rows = rows.with_columns(_pair=pl.Series(
            [hashlib.sha256("\0".join([p, *sorted((c, r))]).encode()).hexdigest() for p, c, r in
             rows.select("_prompt", "chosen", "rejected").iter_rows()], dtype=pl.Utf8))
        pools.append(Pool(arm, rows, shared, keyed.height - rows.height))
    return pools, clean.drop("_prompt"), removed_held


def draw(rows: pl.DataFrame, budget: int, seed: int) -> pl.DataFrame:
    """`budget` rows by a seeded, order-independent shuffle (the same rows whatever order the pool is in).

    Every arm ranks a pair alike for a seed (common random numbers): where two arms hold the same pair, with the
    same label or not, one draws it whenever the other would at that point of its ranking. Arms then differ in
    their labels and in what their filters removed, not in the luck of the draw, which tightens the paired
    differences; and their answers' features are shared, so fewer texts are embedded."""
    ranks = [hashlib.sha256(f"{seed}:{key}".encode()).hexdigest() for key in rows["_pair"].to_list()]
    return rows.with_columns(_rank=pl.Series(ranks, dtype=pl.Utf8)).sort("_rank").head(budget).drop("_rank")
