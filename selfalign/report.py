"""`selfalign report RUN_DIR` (argparse in cli.py, which calls `write_report`): one self-contained HTML page
about a finished run, plus its plots as PNGs.

`report/index.html` embeds every plot as a data: URI and carries its own CSS, so it opens from disk (or as
an e-mail attachment) with no network request; the same PNGs are written beside it (`report/*.png`). A plot
the run has no data for is left out with a note saying why. The plots are drawn by plots.py, which the dataset
card's histograms use too.
"""

from __future__ import annotations

import base64
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .errors import RunError
from .manifest import Attempt, Manifest
from .markup import esc, html_table
from .metrics import AGREEMENT_AFTER, AGREEMENT_BEFORE
from .rundir import DROPPED, REPORT, STAGES, check_run_dir, read_manifest, stage_name, stage_path

if TYPE_CHECKING:  # imported where used, so that `selfalign --help` does not pay for polars and matplotlib
    import polars as pl

    from . import plots

# Columns the plots and the sample table read; the rest of a stage file (often most of its bytes) stays on disk.
COLUMNS = ("row_id", "source", "prompt", "chosen", "rejected", "chosen_critiques", "rejected_critiques",
           "chosen_score", "rejected_score", "margin", "category", "judge_verdict", "drop_reason")


@dataclass
class RunData:
    run_dir: Path
    manifest: Manifest
    stages: list[plots.Stage] = field(default_factory=list)

    @property
    def final(self) -> pl.DataFrame | None:
        return self.stages[-1][2] if self.stages else None


def read_frame(path: Path, columns: tuple[str, ...] = COLUMNS) -> pl.DataFrame:
    """The `columns` of a stage file that it has."""
    import polars as pl

    present = pl.read_parquet_schema(path)
    return pl.read_parquet(path, columns=[c for c in columns if c in present])


def load_run(run_dir: str | Path) -> RunData:
    """A finished run's manifest and the stage files it names (kept and dropped rows, COLUMNS only); RunError
    with the fix when the run is missing, busy, unfinished or lacks a stage file."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    manifest = read_manifest(run_dir)
    # The manifest names the stages of the last run; files of a longer, older pipeline may linger beside them.
    expected = [(s["stage"], s["kind"]) for s in manifest["rows"]]
    missing = [f"{STAGES}/{stage_name(i, k)}.parquet" for i, k in expected if not stage_path(run_dir, i, k).exists()]
    if missing:
        raise RunError(f"{run_dir}: manifest.json lists stages whose files are missing ({', '.join(missing)}); "
                       "re-run the same `selfalign run` command to rewrite them")
    stages = []
    for index, kind in expected:
        dropped = stage_path(run_dir, index, kind, DROPPED)
        stages.append((index, kind, read_frame(stage_path(run_dir, index, kind)),
                       read_frame(dropped) if dropped.exists() else None))
    return RunData(run_dir, manifest, stages)


# -- plots -------------------------------------------------------------------------------------------------

@dataclass
class Plot:
    name: str                   # section id and PNG stem
    title: str
    path: Path | None = None    # the PNG, or None when skipped
    note: str | None = None     # why it was skipped
    html: str = ""              # a table or numbers printed under the plot


def _first_critiques(run: RunData) -> tuple[str, pl.DataFrame | None]:
    from . import plots

    for index, kind, df, _ in run.stages:
        if {"chosen_critiques", "rejected_critiques"} <= set(df.columns):
            return plots.critiques_title([plots.stage_label(index, kind)]), plots.critique_scores(df)
    return "", None


def _final_pairs(run: RunData) -> tuple[str, pl.DataFrame | None]:
    """The last stage with pair scores (the final stage normally keeps them)."""
    from . import plots

    for index, kind, df, _ in reversed(run.stages):
        if {"chosen_score", "rejected_score"} <= set(df.columns):
            return plots.pairs_title(plots.stage_label(index, kind)), df
    return "", None


def render_plots(run: RunData, directory: Path) -> list[Plot]:
    """Write every plot the run has data for into `directory`; return them all, skipped ones with a note."""
    from . import plots

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    agreement = plots.agreement_table(run.stages)
    judged = plots.judge_table(run.stages)
    lengths = plots.length_bias_table(run.stages)
    categories = plots.category_table(run.stages)
    critique_title, critiques = _first_critiques(run)
    final_title, final = _final_pairs(run)
    jobs: list[tuple[str, str, Callable[[Path], Path], str]] = [
        ("funnel", "Rows per stage and why rows were dropped",
         lambda p: plots.plot_funnel(run.manifest, p), _funnel_html(run.manifest)),
        ("scores", "Scores: chosen vs rejected",
         lambda p: plots.plot_scores(p, final=final, critiques=critiques, manifest=run.manifest,
                                     critique_title=critique_title or "every critique",
                                     final_title=final_title or "final pairs"), _scores_html(run, final)),
        ("agreement", "Agreement with the human labels, stage by stage",
         lambda p: plots.plot_agreement(agreement, p), _agreement_html(run.manifest, agreement)),
        ("position_consistency", "Position consistency of pairwise judgments",
         lambda p: plots.plot_position_consistency(judged, p), _table_html(judged)),
        ("length_bias", "Length bias: is the chosen answer the longer one?",
         lambda p: plots.plot_length_bias(lengths, p), _table_html(lengths)),
        ("category", "Agreement per category",
         lambda p: plots.plot_category_agreement(categories, p), _table_html(categories)),
        ("cost", "Tokens and wall time", lambda p: plots.plot_cost(run.manifest, p), _cost_html(run.manifest)),
    ]
    results = []
    for name, title, draw, extra in jobs:
        target = directory / f"{name}.png"
        try:
            results.append(Plot(name, title, draw(target), None, extra))
        except plots.NoData as exc:
            target.unlink(missing_ok=True)  # a stale PNG from an earlier report must not be mistaken for this one
            results.append(Plot(name, title, None, f"Not drawn: {exc}.", extra))
    return results


# -- HTML pieces -------------------------------------------------------------------------------------------

def _table_html(df: pl.DataFrame) -> str:
    return html_table(df.columns, [list(r) for r in df.rows()]) if df.height else ""


def _funnel_html(manifest: Manifest) -> str:
    rows = []
    for s in manifest["rows"]:
        reasons = "; ".join(f"{r}: {n:,}" for r, n in s["drop_reasons"].items())
        metrics = {k: v for k, v in s["metrics"].items() if k != "calibration"}  # it has a section
        rows.append([s["stage"], s["kind"], s["in"], s["out"], s["dropped"], reasons or "-",
                     f"{s['agreement_with_human']:.1%}" if s["agreement_with_human"] is not None else "-",
                     json.dumps(metrics, ensure_ascii=False) if metrics else "-"])
    return html_table(["stage", "kind", "in", "out", "dropped", "drop reasons", "agreement with human", "metrics"],
                  rows, numeric={0, 2, 3, 4, 6})


def _scores_html(run: RunData, final: pl.DataFrame | None) -> str:
    if final is None or "chosen_score" not in final.columns:
        return ""
    stats = []
    for column in ("chosen_score", "rejected_score", "margin"):
        if column in final.columns and final[column].drop_nulls().len():
            values = final[column].drop_nulls()
            stats.append([column, values.len(), values.mean(), values.median(), values.min(), values.max()])
    return html_table(["column", "pairs", "mean", "median", "min", "max"], stats)


def _agreement_html(manifest: Manifest, table: pl.DataFrame) -> str:
    parts = []
    if table.height:
        rows = [[f"after {r['stage']} {r['kind']}", r["human_rows"], r["agrees"], r["tied"], r["disagrees"],
                 r["no_scores"], f"{r['agreement']:.1%}" if r["agreement"] is not None else "-"]
                for r in table.iter_rows(named=True)]
        parts.append("<p>Confusion table for the human pairs: the human prefers <code>chosen</code> in every stored "
                     "pair; the columns say which answer the mean critique score prefers.</p>")
        parts.append(html_table(["stage", "human prefers chosen", "critique prefers chosen", "tied",
                             "critique prefers rejected", "no scores", "agreement"], rows, numeric={1, 2, 3, 4, 5, 6}))
    # Stage metrics are each stage's own keys: the filters that compare with the labels write both of these.
    filters = [[s["stage"], s["kind"], s["metrics"][AGREEMENT_BEFORE], s["metrics"][AGREEMENT_AFTER]]
               for s in manifest["rows"] if AGREEMENT_BEFORE in s["metrics"]]
    if filters:
        parts.append("<p>Consistency filters, as recorded in the manifest:</p>")
        parts.append(html_table(["stage", "kind", "agreement before", "agreement after"], filters))
    return "".join(parts)


def _lengths_html(manifest: Manifest) -> str:
    """Row length percentiles per exported format (the export stage's metrics), to choose max_length by."""
    from .trainer_formats import LENGTHS_NOTE, length_rows

    rows = length_rows(manifest)
    if not rows:
        return ""
    note = re.sub(r"`([^`]*)`", r"<code>\1</code>", esc(LENGTHS_NOTE))
    return f"<p>{note}</p>" + html_table(["format", "unit", "rows", "p50", "p90", "p99", "max"], rows,
                                     numeric={2, 3, 4, 5, 6})


def _cost_html(manifest: Manifest) -> str:
    calls, tokens = manifest["model_calls"], manifest["tokens"]
    rows = []
    for name, model in manifest["models"].items():
        c, identity = model["calls"], model["identity"]
        seconds = c["seconds"]
        rate = c["completion_tokens"] / seconds if seconds else None
        rows.append([name, f"{identity['backend']}: {identity['model']}", c["requested"], c["cached"], c["sent"],
                     c["failed"], c["prompt_tokens"], c["completion_tokens"], round(seconds, 2),
                     round(rate, 1) if rate else None])
    rows.append(["all models", "", calls["requested"], calls["cached"], calls["sent"], calls["failed"],
                 tokens["prompt"], tokens["completion"], None, None])
    return html_table(["model", "backend: model", "calls requested", "cached", "sent", "failed", "prompt tokens",
                   "completion tokens", "seconds in calls", "completion tok/s"], rows, numeric=set(range(2, 10)))


def _text(value: Any, limit: int = 700) -> str:
    text = "" if value is None else str(value)
    if len(text) <= limit:
        return f"<div class=text>{esc(text)}</div>"
    return (f"<details class=text><summary>{esc(text[:limit])}... <em>({len(text):,} characters, click for "
            f"all)</em></summary>{esc(text)}</details>")


def _critique_html(critiques: Any) -> str:
    if not critiques:
        return ""
    items = "".join(f"<li><b>{c.get('score'):g}</b> {esc(c.get('text'))}</li>" for c in critiques[:4])
    more = f"<li>... {len(critiques) - 4} more</li>" if len(critiques) > 4 else ""
    return f"<ul class=critiques>{items}{more}</ul>"


def _samples_html(run: RunData, count: int = 3) -> str:
    import polars as pl

    final = run.final
    if final is None or final.height == 0 or not {"prompt", "chosen", "rejected"} <= set(final.columns):
        return '<p class=note>No pairs in the final stage to show.</p>'
    if final.schema["chosen"] != pl.Utf8:
        return '<p class=note>The final stage holds no chosen/rejected text pairs.</p>'
    out = [f"<p>The first {min(count, final.height)} of {final.height:,} final rows; "
           f"<code>selfalign inspect {esc(run.run_dir)} --row-id ID</code> shows any row in full.</p>"]
    for row in final.head(count).iter_rows(named=True):
        prompt = row["prompt"]
        turns = "".join(f"<div class=turn><span class=role>{esc(m['role'])}</span>{_text(m['content'], 400)}</div>"
                        for m in (prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]))
        cells = []
        for side in ("chosen", "rejected"):
            score = row.get(f"{side}_score")
            head = f"{side}" + (f" &middot; {side}_score {score:.2f}" if isinstance(score, (int, float)) else "")
            cells.append(f"<div class='answer {side}'><h4>{head}</h4>{_text(row[side])}"
                         f"{_critique_html(row.get(f'{side}_critiques'))}</div>")
        out.append(f"<div class=sample><div class=meta>row {esc(row.get('row_id'))} &middot; "
                   f"{esc(row.get('source'))}</div>{turns}<div class=pair>{''.join(cells)}</div></div>")
    return "".join(out)


def _attempts_text(attempts: list[Attempt], sent: int) -> str:
    if not attempts:
        return "-"
    ended = Counter(attempt["status"] for attempt in attempts)
    return f"{sent:,} over {len(attempts)} attempt(s): " + ", ".join(f"{n} {status}" for status, n in ended.items())


def _summary_html(run: RunData) -> str:
    m = run.manifest
    funnel, calls, dataset = m["rows"], m["model_calls"], m["dataset"]
    items = [
        ("pipeline", m["pipeline_file"]), ("started", m["started"]),
        ("wall time", f"{m['seconds']:.1f} s"),
        ("rows", f"{funnel[0]['in']:,} in &rarr; {m['rows_out']:,} out" if funnel else "-"),
        ("sources", ", ".join(f"{k}: {v:,}" for k, v in dataset["sources"].items()) or "-"),
        ("agreement with human (final)", dataset["agreement_with_human"]),
        ("model calls", ", ".join(f"{k} {calls[k]:,}" for k in ("requested", "cached", "sent", "failed"))),
        # What was paid over the run's whole life: this attempt's `sent` leaves out earlier (killed) attempts.
        ("calls sent, all attempts", _attempts_text(m["attempts"], m["calls_sent_all_attempts"])),
        ("tokens", ", ".join(f"{k} {v:,}" for k, v in m["tokens"].items())),
        ("config sha256", m["config_sha256"]), ("selfalign", m["selfalign_version"]),
    ]
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{v if k in ('rows',) else esc(v if v is not None else '-')}</td></tr>"
                   for k, v in items)
    return f"<table class=summary>{rows}</table>"


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1b1b1b;
background:#fafafa}
main{max-width:1100px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
nav{font-size:13px;margin:6px 0 12px}nav a{margin-right:12px;color:#0b5cad;text-decoration:none}
section{background:#fff;border:1px solid #e4e4e4;border-radius:6px;padding:4px 16px 14px;margin:14px 0}
img{max-width:100%;height:auto;display:block;margin:8px 0}
table{border-collapse:collapse;font-size:12.5px;margin:8px 0;max-width:100%}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
table.summary th{width:220px}
.note{color:#7a5a00;background:#fff8e1;border-left:3px solid #e6b800;padding:6px 10px}
.sample{border-top:1px solid #eee;padding:8px 0}.meta{color:#666;font-size:12px}
.turn{margin:4px 0}.role{font-weight:600;margin-right:6px;color:#555}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:12px}.answer{padding:6px 10px;border-radius:4px}
.answer h4{margin:2px 0 4px;font-size:13px}.chosen{background:#eef6fc}.rejected{background:#fdf1ea}
.text{white-space:pre-wrap;word-wrap:break-word}ul.critiques{margin:6px 0 0 0;padding-left:18px;font-size:12.5px}
code{background:#f2f2f2;padding:0 3px;border-radius:3px}
"""

EXPLAIN = {
    "funnel": "Each bar is one stage: green is the rows it passed on, the coloured segments the rows it dropped, "
              "by reason (the same rows are in <code>dropped/NN-kind.parquet</code> with <code>drop_reason</code>).",
    "scores": "Left: the score of every single critique as the critic wrote it, for the human-chosen and the "
              "human-rejected answer. Right: the per-pair scores of the final data (the mean of the critiques "
              "that survived). A useful critic separates the two colours before any filtering.",
    "agreement": "For the human pairs after each stage: does the mean critique score prefer the answer the "
                 "human preferred? A consistency filter keeps only the first column; a later model stage that "
                 "rewrites or re-scores critiques (refine) can move pairs out of it again.",
    "position_consistency": "Every pair is judged twice, with the answers shown in both orders. A verdict "
                            "that flips with the order is position-inconsistent and the pair is dropped.",
    "length_bias": "Share of pairs whose chosen answer is longer than the rejected one, per source and stage. "
                   "0.5 is no preference; a filter that pushes this up is selecting for length.",
    "category": "Per value of the data's <code>category</code> column: how often the critiques agreed with the "
                "human label before filtering, and what share of the category's pairs made it to the end.",
    "cost": "Wall time per stage and the tokens spent (prompt + completion). Cached calls cost no time.",
}


NAV = {"summary": "Run", "funnel": "Funnel", "scores": "Scores", "agreement": "Agreement",
       "position_consistency": "Position consistency", "length_bias": "Length bias", "category": "Categories",
       "cost": "Tokens & time", "lengths": "Lengths", "evaluation": "Evaluation", "samples": "Samples",
       "calibration": "Calibration"}


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def build_html(run: RunData, rendered: list[Plot]) -> str:
    from . import calibration

    name = run.manifest["name"]
    sections = [("summary", "Run", _summary_html(run))]
    calibrated = calibration.table_rows(run.manifest)
    if calibrated:  # the stages' `calibrate:` numbers, first: they were measured before anything else was paid for
        sections.append(("calibration", "Judge calibration against human labels",
                         f"<p>{esc(calibration.READING)}</p>" + html_table(calibration.HEADERS, calibrated)))
    for plot in rendered:
        body = f"<p>{EXPLAIN.get(plot.name, '')}</p>"
        if plot.path is not None:
            body += f'<img src="{_data_uri(plot.path)}" alt="{esc(plot.title)}" data-file="{esc(plot.path.name)}">'
        else:
            body += f"<p class=note>{esc(plot.note)}</p>"
        body += plot.html
        sections.append((plot.name, plot.title, body))
    lengths = _lengths_html(run.manifest)
    if lengths:
        sections.append(("lengths", "Sequence lengths", lengths))
    from .evaluate_view import report_sections
    sections.extend(report_sections(run.run_dir, run.manifest))  # the reward-model evaluation, when there is one
    sections.append(("samples", "Sample pairs", _samples_html(run)))
    nav = "".join(f'<a href="#{sid}">{esc(NAV.get(sid, title))}</a>' for sid, title, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{esc(title)}</h2>{content}</section>' for sid, title, content in sections)
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            '<meta name=viewport content="width=device-width,initial-scale=1">'
            f"<title>selfalign report: {esc(name)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>selfalign report: {esc(name)}</h1><div class=meta>{esc(run.run_dir)}</div>"
            f"<nav>{nav}</nav>{body}</main></body></html>\n")


def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report/index.html (self-contained) and RUN_DIR/report/*.png; return the HTML's path."""
    from .atomic import write_text

    run = load_run(run_dir)
    directory = run.run_dir / REPORT
    rendered = render_plots(run, directory)
    target = directory / "index.html"
    write_text(build_html(run, rendered), target)
    return target
