"""The report's plots, one function per PNG; the dataset card draws its histograms with the same
`plot_scores` (and `plot_margin`), so the two show scores alike.

Each `plot_*` function takes the run's manifest and/or polars frames (or a table made by the matching
`*_table` function, which the HTML report also prints), writes one PNG and returns its path. When the run
has nothing to show for a plot, it raises `NoData` with a sentence saying why, for the report to print.

matplotlib is used through its object API on the Agg canvas (no pyplot, no global backend state), so
importing this module never opens a window or changes another caller's backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import polars as pl

from .manifest import Manifest
from .markup import shorten
from .metrics import CRITIQUE_COLUMNS, VERDICTS, agreement_share, critique_verdict, human_verdicts

# Colours that stay apart in print and for the common colour-vision deficiencies (Okabe-Ito).
KEPT, CHOSEN, REJECTED, NEUTRAL = "#009E73", "#0072B2", "#D55E00", "#999999"
PALETTE = ["#E69F00", "#56B4E9", "#CC79A7", "#F0E442", "#D55E00", "#0072B2", "#000000", "#999999"]
DPI = 110
# A stage and the frames it wrote: (index, kind, rows kept, rows dropped or None).
Stage = tuple[int, str, pl.DataFrame, "pl.DataFrame | None"]


class NoData(Exception):
    """The run has no data for this plot; the message says what is missing."""


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    # No "Software" tag: the same run gives byte-identical PNGs across matplotlib patch versions.
    figure.savefig(path, format="png", metadata={"Software": None})
    return path


def _count_formatter():
    from matplotlib.ticker import FuncFormatter

    def short(value, _position):
        for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(value) >= size:
                return f"{value / size:.3g}{suffix}"
        return f"{value:g}"
    return FuncFormatter(short)


def stage_label(index: int, kind: str) -> str:
    return f"{index} {kind}"


# -- row funnel -----------------------------------------------------------------------------------------

def plot_funnel(manifest: Manifest, path: Path) -> Path:
    """Horizontal stacked bars, one per stage: the rows it kept, then the rows it dropped split by reason."""
    funnel = manifest["rows"]
    if not funnel:
        raise NoData("the manifest lists no stages")
    reasons = sorted({r for stage in funnel for r in stage["drop_reasons"]})
    colours = {reason: PALETTE[i % len(PALETTE)] for i, reason in enumerate(reasons)}
    figure = _figure(8.5, 0.55 * len(funnel) + 1.6 + 0.22 * len(reasons))
    axis = figure.add_subplot()
    labels = [stage_label(s["stage"], s["kind"]) for s in funnel][::-1]
    for y, stage in enumerate(funnel[::-1]):
        axis.barh(y, stage["out"], color=KEPT, label="kept" if y == 0 else None)
        axis.text(stage["out"], y, f" {stage['out']:,}", va="center", ha="left" if not stage["dropped"] else "right",
                  fontsize=8, color="black" if not stage["dropped"] else "white")
        left = stage["out"]
        for reason in reasons:
            count = stage["drop_reasons"].get(reason, 0)
            if count:
                axis.barh(y, count, left=left, color=colours[reason])
                left += count
        notes = []
        if stage["dropped"]:
            notes.append(f"{stage['dropped']:,} dropped")
        if stage["out"] + stage["dropped"] > stage["in"]:  # e.g. mix adds rows from other data sets
            notes.append(f"{stage['out'] + stage['dropped'] - stage['in']:,} added")
        if notes:
            axis.text(left, y, " " + ", ".join(notes), va="center", fontsize=8)
    for reason in reasons:  # one legend entry per reason, in a stable order
        axis.barh(0, 0, color=colours[reason], label=shorten(reason, 70))
    axis.set_yticks(range(len(labels)), labels)
    axis.set_xlabel("rows (kept + dropped = rows in)")
    axis.set_title("Rows per stage: kept, and dropped by reason", fontsize=10)
    axis.margins(x=0.12)
    axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22 if len(funnel) < 4 else -0.12),
                ncol=2, frameon=False)
    return _save(figure, path)


# -- score histograms -----------------------------------------------------------------------------------

def critique_scores(df: pl.DataFrame) -> pl.DataFrame:
    """Every single critique score in a frame: columns target (chosen | rejected) and score."""
    parts = []
    for target in ("chosen", "rejected"):
        column = f"{target}_critiques"
        if column in df.columns:
            parts.append(df.select(pl.col(column).list.eval(pl.element().struct.field("score")).alias("score"))
                         .explode("score").drop_nulls().select(target=pl.lit(target), score=pl.col("score")))
    return pl.concat(parts) if parts else pl.DataFrame(schema={"target": pl.Utf8, "score": pl.Float64})


def pair_scores(final: pl.DataFrame | None, manifest: Manifest | None = None) -> pl.DataFrame:
    """The final pairs' chosen_score / rejected_score (from the frame, else the manifest's histograms)."""
    if final is not None and {"chosen_score", "rejected_score"} <= set(final.columns):
        return pl.concat([final.select(target=pl.lit(t), score=pl.col(f"{t}_score").cast(pl.Float64)).drop_nulls()
                          for t in ("chosen", "rejected")])
    # A histogram per score column the final rows have: none at all for rows without scores.
    histograms = manifest["dataset"]["score_histograms"] if manifest is not None else {}
    rows = [(target, float(value)) for target in ("chosen", "rejected")
            for value, count in histograms.get(f"{target}_score", {}).items() for _ in range(count)]
    return pl.DataFrame(rows, schema={"target": pl.Utf8, "score": pl.Float64}, orient="row")


def plot_scores(path: Path, final: pl.DataFrame | None = None, critiques: pl.DataFrame | None = None,
                manifest: Manifest | None = None, critique_title: str = "every critique, before filtering",
                final_title: str = "final pairs (chosen_score, rejected_score)") -> Path:
    """Histograms of chosen vs rejected scores: each raw critique (`critiques`, from `critique_scores`) and
    the final pairs (`final` with chosen_score/rejected_score, or the manifest's score_histograms)."""
    panels = []
    if critiques is not None and critiques.height:
        panels.append((critique_title, critiques))
    pairs = pair_scores(final, manifest)
    if pairs.height:
        panels.append((final_title, pairs))
    if not panels:
        raise NoData("no stage wrote critique scores or chosen_score/rejected_score")
    figure = _figure(4.6 * len(panels), 3.3)
    for number, (title, scores) in enumerate(panels, start=1):
        axis = figure.add_subplot(1, len(panels), number)
        low, high = scores["score"].min(), scores["score"].max()
        step = 1.0 if scores["score"].round(0).eq(scores["score"]).all() else 0.5
        start = (int(low / step) - 0.5) * step
        bins = [start + step * i for i in range(int((high - start) / step) + 2)]
        for target, colour in (("chosen", CHOSEN), ("rejected", REJECTED)):
            data = scores.filter(pl.col("target") == target)["score"]
            if data.len():
                axis.hist(data.to_list(), bins=bins, histtype="stepfilled", alpha=0.35, color=colour)
                axis.hist(data.to_list(), bins=bins, histtype="step", linewidth=1.6, color=colour,
                          label=f"{target} (n={data.len():,}, mean {data.mean():.2f})")
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("score")
        axis.set_ylabel("count")
        axis.legend(fontsize=7)
    return _save(figure, path)


def critiques_title(stage_labels: Sequence[str]) -> str:
    """The title of plot_scores' left panel for the critiques written by these stages."""
    return "every critique after " + ", ".join(stage_labels)


def pairs_title(stage: str) -> str:
    """The title of plot_scores' right panel for the pairs in this stage's rows."""
    return f"pairs after {stage}: chosen_score, rejected_score"


def plot_margin(final: pl.DataFrame, path: Path) -> Path:
    """Histogram of the pairs' `margin` (chosen_score - rejected_score), 20 bins."""
    margins = final["margin"].drop_nulls() if "margin" in final.columns else pl.Series("margin", [], pl.Float64)
    if margins.len() == 0:
        raise NoData("the rows carry no margin")
    figure = _figure(4.6, 3.3)
    axis = figure.add_subplot()
    axis.hist(margins.to_list(), bins=20, color=CHOSEN)
    axis.set_title("margin: chosen score - rejected score", fontsize=9)
    axis.set_xlabel("margin")
    axis.set_ylabel("pairs")
    return _save(figure, path)


# -- agreement with the human labels --------------------------------------------------------------------

VERDICT_TITLES = {"agrees": "critique prefers chosen (agrees)", "tied": "tied",
                  "disagrees": "critique prefers rejected", "no_scores": "no scores"}


def agreement_table(stages: Sequence[Stage]) -> pl.DataFrame:
    """For the human rows after each stage that carries critiques: how many the critique scores order as the
    human did (chosen mean above rejected mean), tie, reverse, or cannot score (`metrics.human_verdicts`). The
    human's preferred answer is always `chosen`, so this is the confusion table's one human row per stage;
    `agreement` is `metrics.agreement_with_human`, as the manifest records it."""
    rows = []
    for index, kind, df, _ in stages:
        verdicts = human_verdicts(df)
        if verdicts is None:
            continue
        rows.append({"stage": index, "kind": kind, "human_rows": sum(verdicts.values()), **verdicts,
                     "agreement": agreement_share(verdicts)})
    schema = {"stage": pl.Int64, "kind": pl.Utf8, "human_rows": pl.Int64, **{v: pl.Int64 for v in VERDICTS},
              "agreement": pl.Float64}
    return pl.DataFrame(rows, schema=schema)


def plot_agreement(table: pl.DataFrame, path: Path) -> Path:
    """Heatmap of `agreement_table`: a row per stage, a column per critique verdict, share of human rows."""
    table = table.filter(pl.col("human_rows") > 0)
    if table.height == 0:
        raise NoData("no stage has critiques of human pairs (chosen_critiques, rejected_critiques, source=human)")
    columns = [v for v in VERDICTS if v != "no_scores" or table["no_scores"].sum() > 0]
    shares = [[row[v] / row["human_rows"] for v in columns] for row in table.iter_rows(named=True)]
    figure = _figure(1.6 * len(columns) + 2.6, 0.45 * table.height + 1.5)
    axis = figure.add_subplot()
    image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for y, row in enumerate(table.iter_rows(named=True)):
        for x, verdict in enumerate(columns):
            share = shares[y][x]
            axis.text(x, y, f"{row[verdict]:,}\n{share:.0%}", ha="center", va="center", fontsize=8,
                      color="white" if share > 0.6 else "black")
    axis.set_xticks(range(len(columns)), [VERDICT_TITLES[v].replace(" (", "\n(") for v in columns], fontsize=8)
    axis.set_yticks(range(table.height), [f"after {stage_label(r['stage'], r['kind'])}\n(n={r['human_rows']:,})"
                                          for r in table.iter_rows(named=True)], fontsize=8)
    axis.set_title("Human pairs (human prefers chosen) by critique verdict", fontsize=10)
    figure.colorbar(image, ax=axis, fraction=0.04, pad=0.02, label="share of human rows")
    return _save(figure, path)


# -- position consistency of the pairwise judge ---------------------------------------------------------

JUDGE_OUTCOMES = ("agrees with label", "disagrees with label", "position inconsistent", "call failed")


def judge_table(stages: Sequence[Stage]) -> pl.DataFrame:
    """Per judge stage and source: outcomes of the two-order comparison, from its kept and dropped rows."""
    rows = []
    for index, kind, kept, dropped in stages:
        if kind != "judge":
            continue
        parts = []
        if "judge_verdict" in kept.columns and "source" in kept.columns:
            # With on_disagreement: swap a "rejected" verdict was flipped but still disagreed with the label.
            parts.append(kept.select("source", outcome=pl.when(pl.col("judge_verdict") == "chosen")
                                     .then(pl.lit(JUDGE_OUTCOMES[0])).otherwise(pl.lit(JUDGE_OUTCOMES[1]))))
        if dropped is not None and dropped.height and {"drop_reason", "source"} <= set(dropped.columns):
            reason = pl.col("drop_reason")
            parts.append(dropped.select("source", outcome=pl.when(reason == "position_inconsistent")
                                        .then(pl.lit(JUDGE_OUTCOMES[2]))
                                        .when(reason == "judge_disagrees_with_label").then(pl.lit(JUDGE_OUTCOMES[1]))
                                        .otherwise(pl.lit(JUDGE_OUTCOMES[3]))))
        if not parts:
            continue
        counts = pl.concat(parts).group_by("source", "outcome").len()
        for source in sorted(counts["source"].unique().to_list()):
            mine = dict(counts.filter(pl.col("source") == source).select("outcome", "len").rows())
            row = {"stage": index, "kind": kind, "source": source, **{o: mine.get(o, 0) for o in JUDGE_OUTCOMES}}
            judged = sum(row[o] for o in JUDGE_OUTCOMES[:3])
            consistent = row[JUDGE_OUTCOMES[0]] + row[JUDGE_OUTCOMES[1]]
            row["position_consistency"] = round(consistent / judged, 4) if judged else None
            row["agreement_with_label"] = round(row[JUDGE_OUTCOMES[0]] / consistent, 4) if consistent else None
            rows.append(row)
    schema = {"stage": pl.Int64, "kind": pl.Utf8, "source": pl.Utf8, **{o: pl.Int64 for o in JUDGE_OUTCOMES},
              "position_consistency": pl.Float64, "agreement_with_label": pl.Float64}
    return pl.DataFrame(rows, schema=schema)


def plot_position_consistency(table: pl.DataFrame, path: Path) -> Path:
    """Stacked bars per (judge stage, source): verdicts consistent across both orders (agreeing with the
    label or not), verdicts that flipped with the order, failed calls; annotated with the consistency."""
    if table.height == 0:
        raise NoData("no judge stage ran (pairwise judgments in both orders)")
    figure = _figure(8, 0.55 * table.height + 1.9)
    axis = figure.add_subplot()
    colours = dict(zip(JUDGE_OUTCOMES, (KEPT, REJECTED, "#E69F00", NEUTRAL)))
    labels = []
    for y, row in enumerate(table.iter_rows(named=True)):
        total = sum(row[o] for o in JUDGE_OUTCOMES) or 1
        left = 0.0
        for outcome in JUDGE_OUTCOMES:
            share = row[outcome] / total
            axis.barh(y, share, left=left, color=colours[outcome], label=outcome if y == 0 else None)
            if share >= 0.06:
                axis.text(left + share / 2, y, f"{row[outcome]:,}", ha="center", va="center", fontsize=8)
            left += share
        consistency = row["position_consistency"]
        axis.text(1.01, y, "consistent\n" + (f"{consistency:.0%}" if consistency is not None else "-"),
                  va="center", fontsize=8)
        labels.append(f"{stage_label(row['stage'], row['kind'])}\n{row['source']}")
    axis.set_yticks(range(len(labels)), labels, fontsize=8)
    axis.invert_yaxis()
    axis.set_xlim(0, 1)
    axis.set_xlabel("share of pairs judged in both orders (A/B, then B/A)")
    axis.set_title("Pairwise judge: position consistency and agreement with the label", fontsize=10)
    axis.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.3 if table.height < 3 else -0.15),
                frameon=False)
    return _save(figure, path)


# -- length bias ----------------------------------------------------------------------------------------

def length_bias_table(stages: Sequence[Stage]) -> pl.DataFrame:
    """Per stage with pairs and per source: share of pairs whose chosen answer is the longer (0.5 = none)."""
    rows = []
    for index, kind, df, _ in stages:
        if not {"chosen", "rejected", "source"} <= set(df.columns) or df.height == 0:
            continue
        if df.schema["chosen"] != pl.Utf8 or df.schema["rejected"] != pl.Utf8:
            continue
        longer = (pl.col("chosen").str.len_chars() > pl.col("rejected").str.len_chars())
        per = df.drop_nulls(["chosen", "rejected"]).group_by("source").agg(pairs=pl.len(),
                                                                          chosen_longer=longer.mean())
        for source, pairs, share in per.sort("source").rows():
            rows.append({"stage": index, "kind": kind, "source": source, "pairs": pairs,
                         "chosen_longer": round(share, 4)})
    return pl.DataFrame(rows, schema={"stage": pl.Int64, "kind": pl.Utf8, "source": pl.Utf8, "pairs": pl.Int64,
                                      "chosen_longer": pl.Float64})


def plot_length_bias(table: pl.DataFrame, path: Path) -> Path:
    """Grouped bars: for each stage with pairs, the chosen-longer share per source, against the 0.5 line."""
    if table.height == 0:
        raise NoData("no stage has chosen and rejected text answers with a source")
    stages = table.select("stage", "kind").unique(maintain_order=True).rows()
    sources = sorted(table["source"].unique().to_list())
    colours = {"human": CHOSEN, "synthetic": "#E69F00"}
    width = 0.8 / len(sources)
    figure = _figure(max(5.0, 1.1 * len(stages) + 2.5), 3.4)
    axis = figure.add_subplot()
    for number, source in enumerate(sources):
        labelled = False
        for x, (stage, _kind) in enumerate(stages):
            match = table.filter((pl.col("stage") == stage) & (pl.col("source") == source))
            if match.height == 0:
                continue
            share, pairs = match["chosen_longer"][0], match["pairs"][0]
            position = x - 0.4 + width * (number + 0.5)
            colour = colours.get(source, PALETTE[number % len(PALETTE)])
            axis.bar(position, share, width=width * 0.95, color=colour, label=None if labelled else source)
            labelled = True
            axis.text(position, share - 0.02, f"{share:.0%}\nn={pairs:,}", ha="center", va="top", fontsize=7,
                      color="white" if colour in (CHOSEN, "#000000") else "black")
    axis.axhline(0.5, color="black", linewidth=0.8, linestyle="--", label="0.5: no length preference")
    axis.set_xticks(range(len(stages)), [f"after\n{stage_label(s, k)}" for s, k in stages], fontsize=8)
    axis.set_ylim(0, 1.12)
    axis.set_ylabel("chosen answer is the longer")
    axis.set_title("Length bias: share of pairs whose chosen answer is longer", fontsize=10)
    axis.legend(fontsize=8, loc="upper left")
    return _save(figure, path)


# -- per-category agreement -----------------------------------------------------------------------------

def category_table(stages: Sequence[Stage], column: str = "category") -> pl.DataFrame:
    """Per category: human pairs that reached the first critique stage, the share whose critiques agree with
    the human label there (before any filter), and the share of them still in the final stage."""
    with_category = [s for s in stages if column in s[2].columns]
    critiqued = [s for s in with_category if CRITIQUE_COLUMNS <= set(s[2].columns)]
    if not critiqued:
        return pl.DataFrame(schema={column: pl.Utf8, "pairs": pl.Int64, "agreement_before": pl.Float64,
                                    "kept": pl.Int64, "kept_share": pl.Float64})
    first = critiqued[0][2].filter(pl.col("source") == "human")
    first = first.with_columns(_agrees=critique_verdict() == "agrees", _key=pl.col(column).cast(pl.Utf8))
    final = stages[-1][2]
    kept_ids = set(final["row_id"].to_list()) if "row_id" in final.columns else set()
    first = first.with_columns(_kept=pl.col("row_id").is_in(list(kept_ids)) if "row_id" in first.columns
                               else pl.lit(False))
    table = (first.group_by("_key").agg(pairs=pl.len(), agreement_before=pl.col("_agrees").mean(),
                                        kept=pl.col("_kept").sum().cast(pl.Int64))
             .with_columns(kept_share=pl.col("kept") / pl.col("pairs"))
             .rename({"_key": column}).sort("pairs", descending=True))
    return table.with_columns(pl.col("agreement_before", "kept_share").round(4))


def plot_category_agreement(table: pl.DataFrame, path: Path, column: str = "category", top: int = 20) -> Path:
    """Horizontal bars per category (largest `top`): agreement before filtering and share of pairs kept."""
    if table.height == 0:
        raise NoData(f"the data has no `{column}` column next to critiques of human pairs")
    table = table.head(top)
    figure = _figure(7.5, 0.42 * table.height + 1.5)
    axis = figure.add_subplot()
    labels = [f"{shorten(c or '(none)', 28)} (n={n:,})" for c, n in table.select(column, "pairs").rows()]
    ys = list(range(table.height))
    axis.barh([y - 0.2 for y in ys], table["agreement_before"].to_list(), height=0.38, color=CHOSEN,
              label="critiques agree with human, before filtering")
    axis.barh([y + 0.2 for y in ys], table["kept_share"].to_list(), height=0.38, color=KEPT,
              label="pairs kept in the final data")
    axis.axvline(0.5, color="black", linewidth=0.8, linestyle="--")
    axis.set_yticks(ys, labels, fontsize=8)
    axis.invert_yaxis()
    axis.set_xlim(0, 1)
    axis.set_xlabel("share of the category's human pairs")
    axis.set_title(f"Agreement with the human labels per {column}", fontsize=10)
    axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
    return _save(figure, path)


# -- tokens and wall time -------------------------------------------------------------------------------

def cost_table(manifest: Manifest) -> pl.DataFrame:
    """Per stage: wall seconds and the tokens its model calls used."""
    rows = []
    for stage in manifest["rows"]:
        rows.append({"stage": stage["stage"], "kind": stage["kind"], "seconds": float(stage["seconds"]),
                     "prompt_tokens": stage["tokens"]["prompt"], "completion_tokens": stage["tokens"]["completion"]})
    return pl.DataFrame(rows, schema={"stage": pl.Int64, "kind": pl.Utf8, "seconds": pl.Float64,
                                      "prompt_tokens": pl.Int64, "completion_tokens": pl.Int64})


def plot_cost(manifest: Manifest, path: Path) -> Path:
    """Wall time per stage, and tokens (prompt + completion) per stage when any model was called."""
    table = cost_table(manifest)
    if table.height == 0:
        raise NoData("the manifest lists no stages")
    labels = [stage_label(s, k) for s, k in table.select("stage", "kind").rows()]
    prompt, completion = table["prompt_tokens"].to_list(), table["completion_tokens"].to_list()
    panels = 2 if sum(prompt) + sum(completion) > 0 else 1
    figure = _figure(4.6 * panels, 0.4 * table.height + 2.0)
    axis = figure.add_subplot(1, panels, 1)
    axis.barh(labels, table["seconds"].to_list(), color=CHOSEN)
    for y, seconds in enumerate(table["seconds"].to_list()):
        axis.text(seconds, y, f" {seconds:.1f}s", va="center", fontsize=8)
    axis.invert_yaxis()
    axis.margins(x=0.2)
    axis.set_xlabel("seconds")
    axis.set_title(f"wall time per stage (run {manifest['seconds']:.1f}s)", fontsize=9)
    if panels == 2:
        axis = figure.add_subplot(1, 2, 2)
        axis.barh(labels, prompt, color="#56B4E9", label="prompt")
        axis.barh(labels, completion, left=prompt, color="#E69F00", label="completion")
        for y, (p, c) in enumerate(zip(prompt, completion)):
            if p + c:
                axis.text(p + c, y, " " + _count_formatter()(p + c, None), va="center", fontsize=8)
        axis.invert_yaxis()
        axis.margins(x=0.2)
        axis.set_xlabel("tokens")
        axis.xaxis.set_major_formatter(_count_formatter())
        axis.set_title("tokens per stage", fontsize=9)
        axis.legend(fontsize=7, loc="lower right")
    return _save(figure, path)
