"""`selfalign report RUN_DIR`: one self-contained HTML page about a finished run, plus its plots as PNGs.

`report/index.html` embeds every plot as a data: URI and carries its own CSS, so it opens from disk (or as
an e-mail attachment) with no network request; the same PNGs are written beside it (`report/*.png`) for the
dataset card. A plot the run has no data for is left out with a note saying why.
"""

from __future__ import annotations

import base64
import fcntl
import html
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .errors import RunError

if TYPE_CHECKING:  # imported where used, so that `selfalign --help` does not pay for polars and matplotlib
    import polars as pl

    from . import plots

STAGE_FILE = re.compile(r"^(\d+)-([a-z_]+)\.parquet$")
# Columns the plots and the sample table read; the rest of a stage file (often most of its bytes) stays on disk.
COLUMNS = ("row_id", "source", "prompt", "chosen", "rejected", "chosen_critiques", "rejected_critiques",
           "chosen_score", "rejected_score", "margin", "category", "judge_verdict", "drop_reason")


@dataclass
class RunData:
    run_dir: Path
    manifest: dict[str, Any]
    stages: list[plots.Stage] = field(default_factory=list)

    @property
    def final(self) -> pl.DataFrame | None:
        return self.stages[-1][2] if self.stages else None


def stage_files(run_dir: Path, folder: str = "stages") -> list[tuple[int, str, Path]]:
    found = []
    for path in sorted((run_dir / folder).glob("*.parquet")):
        match = STAGE_FILE.match(path.name)
        if match:
            found.append((int(match.group(1)), match.group(2), path))
    return sorted(found)


def read_frame(path: Path, columns: tuple[str, ...] | None = COLUMNS) -> pl.DataFrame:
    import polars as pl

    if columns is None:
        return pl.read_parquet(path)
    present = pl.read_parquet_schema(path)
    return pl.read_parquet(path, columns=[c for c in columns if c in present])


def check_run_dir(run_dir: Path, need_manifest: bool = True) -> None:
    """RunError with the fix when run_dir is not a run directory, is still being written, or did not finish."""
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run directory; run a pipeline first (`selfalign run FILE`, which writes "
                       "outputs/<name>/) or pass the --output DIR it used")
    if not (run_dir / "stages").is_dir() and not (run_dir / "manifest.json").exists():
        raise RunError(f"{run_dir} is not a selfalign run directory (no stages/ and no manifest.json); pass the "
                       "directory `selfalign run` wrote, e.g. outputs/<pipeline name>")
    lock = run_dir / ".lock"
    if lock.exists():
        with open(lock) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = handle.read().strip() or "unknown"
                raise RunError(f"{run_dir} is being written by a running `selfalign run` (PID {holder}); wait for "
                               "it to finish, then try again") from None
            fcntl.flock(handle, fcntl.LOCK_UN)
    if not need_manifest:
        return
    manifest = run_dir / "manifest.json"
    if not manifest.exists():
        raise RunError(f"{run_dir} has no manifest.json: the run did not finish; re-run the same `selfalign run` "
                       "command (it resumes from the cache) and report again")
    try:
        status = json.loads(manifest.read_text()).get("status")
    except (OSError, ValueError) as exc:
        raise RunError(f"{manifest} cannot be read ({exc}); re-run the same `selfalign run` command to rewrite "
                       "it") from None
    if status != "complete":
        raise RunError(f"{run_dir}: the run is not complete (manifest status {status!r}); re-run the same "
                       "`selfalign run` command to finish it")


def load_run(run_dir: str | Path) -> RunData:
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    # The manifest names the stages of the last run; files of a longer, older pipeline may linger beside them.
    expected = [(s["stage"], s["kind"]) for s in manifest.get("rows", [])]
    found = {(i, k): p for i, k, p in stage_files(run_dir)}
    missing = [f"stages/{i:02d}-{k}.parquet" for i, k in expected if (i, k) not in found]
    if missing:
        raise RunError(f"{run_dir}: manifest.json lists stages whose files are missing ({', '.join(missing)}); "
                       "re-run the same `selfalign run` command to rewrite them")
    dropped = {(i, k): p for i, k, p in stage_files(run_dir, "dropped")}
    stages = [(i, k, read_frame(found[i, k]), read_frame(dropped[i, k]) if (i, k) in dropped else None)
              for i, k in expected]
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
            return f"every critique after {plots.stage_label(index, kind)}", plots.critique_scores(df)
    return "", None


def _final_pairs(run: RunData) -> tuple[str, pl.DataFrame | None]:
    """The last stage with pair scores (the final stage normally keeps them)."""
    from . import plots

    for index, kind, df, _ in reversed(run.stages):
        if {"chosen_score", "rejected_score"} <= set(df.columns):
            return f"pairs after {plots.stage_label(index, kind)}: chosen_score, rejected_score", df
    return "", None


def render_plots(run: RunData, directory: Path) -> list[Plot]:
    """Write every plot the run has data for into `directory`; return them all, skipped ones with a note.
    The dataset card can call this and embed the same PNGs."""
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

def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (dict, list)):
        return esc(json.dumps(value, ensure_ascii=False))
    return esc(value)


def _table(headers: list[str], rows: list[list[Any]], numeric: set[int] | None = None) -> str:
    numeric = numeric if numeric is not None else {
        i for i in range(len(headers)) if rows and all(isinstance(r[i], (int, float)) or r[i] is None for r in rows)}
    head = "".join(f"<th{' class=num' if i in numeric else ''}>{esc(h)}</th>" for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f"<td{' class=num' if i in numeric else ''}>{_cell(v)}</td>"
                                    for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _table_html(df: pl.DataFrame) -> str:
    return _table(df.columns, [list(r) for r in df.rows()]) if df.height else ""


def _funnel_html(manifest: dict[str, Any]) -> str:
    rows = []
    for s in manifest.get("rows", []):
        reasons = "; ".join(f"{r}: {n:,}" for r, n in s.get("drop_reasons", {}).items())
        metrics = {k: v for k, v in (s.get("metrics") or {}).items()}
        rows.append([s["stage"], s["kind"], s["in"], s["out"], s["dropped"], reasons or "-",
                     f"{s['agreement_with_human']:.1%}" if s.get("agreement_with_human") is not None else "-",
                     json.dumps(metrics, ensure_ascii=False) if metrics else "-"])
    return _table(["stage", "kind", "in", "out", "dropped", "drop reasons", "agreement with human", "metrics"],
                  rows, numeric={0, 2, 3, 4, 6})


def _scores_html(run: RunData, final: pl.DataFrame | None) -> str:
    if final is None or "chosen_score" not in final.columns:
        return ""
    stats = []
    for column in ("chosen_score", "rejected_score", "margin"):
        if column in final.columns and final[column].drop_nulls().len():
            values = final[column].drop_nulls()
            stats.append([column, values.len(), values.mean(), values.median(), values.min(), values.max()])
    return _table(["column", "pairs", "mean", "median", "min", "max"], stats)


def _agreement_html(manifest: dict[str, Any], table: pl.DataFrame) -> str:
    parts = []
    if table.height:
        rows = [[f"after {r['stage']} {r['kind']}", r["human_rows"], r["agrees"], r["tied"], r["disagrees"],
                 r["no_scores"], f"{r['agreement']:.1%}" if r["agreement"] is not None else "-"]
                for r in table.iter_rows(named=True)]
        parts.append("<p>Confusion table for the human pairs: the human prefers <code>chosen</code> in every stored "
                     "pair; the columns say which answer the mean critique score prefers.</p>")
        parts.append(_table(["stage", "human prefers chosen", "critique prefers chosen", "tied",
                             "critique prefers rejected", "no scores", "agreement"], rows, numeric={1, 2, 3, 4, 5, 6}))
    filters = [[s["stage"], s["kind"], s["metrics"].get("agreement_with_human_before"),
                s["metrics"].get("agreement_with_human_after")]
               for s in manifest.get("rows", []) if "agreement_with_human_before" in (s.get("metrics") or {})]
    if filters:
        parts.append("<p>Consistency filters, as recorded in the manifest:</p>")
        parts.append(_table(["stage", "kind", "agreement before", "agreement after"], filters))
    return "".join(parts)


def _lengths_html(manifest: dict[str, Any]) -> str:
    """Row length percentiles per exported format (the export stage's metrics), to choose max_length by."""
    from .trainer_formats import LENGTHS_NOTE, length_rows

    rows = length_rows(manifest)
    if not rows:
        return ""
    note = re.sub(r"`([^`]*)`", r"<code>\1</code>", esc(LENGTHS_NOTE))
    return f"<p>{note}</p>" + _table(["format", "unit", "rows", "p50", "p90", "p99", "max"], rows,
                                     numeric={2, 3, 4, 5, 6})


def _cost_html(manifest: dict[str, Any]) -> str:
    calls, tokens = manifest.get("model_calls") or {}, manifest.get("tokens") or {}
    rows = []
    for name, model in (manifest.get("models") or {}).items():
        c = model.get("calls", {})
        identity = model.get("identity") or {}
        seconds = c.get("seconds") or 0
        rate = c.get("completion_tokens", 0) / seconds if seconds else None
        rows.append([name, f"{identity.get('backend', '?')}: {identity.get('model', '?')}", c.get("requested", 0),
                     c.get("cached", 0), c.get("sent", 0), c.get("failed", 0), c.get("prompt_tokens", 0),
                     c.get("completion_tokens", 0), round(seconds, 2), round(rate, 1) if rate else None])
    if calls:
        rows.append(["all models", "", calls.get("requested", 0), calls.get("cached", 0), calls.get("sent", 0),
                     calls.get("failed", 0), tokens.get("prompt", 0), tokens.get("completion", 0), None, None])
    if not rows:
        return "<p>No model was called.</p>"
    return _table(["model", "backend: model", "calls requested", "cached", "sent", "failed", "prompt tokens",
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


def _attempts_text(attempts: list[dict[str, Any]], sent: int | None) -> str:
    if not attempts:
        return "-"
    ended = Counter(attempt["status"] for attempt in attempts)
    return f"{sent or 0:,} over {len(attempts)} attempt(s): " + ", ".join(f"{n} {status}" for status, n in ended.items())


def _summary_html(run: RunData) -> str:
    m = run.manifest
    funnel = m.get("rows") or []
    calls = m.get("model_calls") or {}
    dataset = m.get("dataset") or {}
    items = [
        ("pipeline", m.get("pipeline_file")), ("started", m.get("started")),
        ("wall time", f"{m.get('seconds', 0):.1f} s"),
        ("rows", f"{funnel[0]['in']:,} in &rarr; {m.get('rows_out', 0):,} out" if funnel else "-"),
        ("sources", ", ".join(f"{k}: {v:,}" for k, v in (dataset.get("sources") or {}).items()) or "-"),
        ("agreement with human (final)", dataset.get("agreement_with_human")),
        ("model calls", ", ".join(f"{k} {calls.get(k, 0):,}" for k in ("requested", "cached", "sent", "failed"))),
        # What was paid over the run's whole life: this attempt's `sent` leaves out earlier (killed) attempts.
        ("calls sent, all attempts", _attempts_text(m.get("attempts") or [], m.get("calls_sent_all_attempts"))),
        ("tokens", ", ".join(f"{k} {v:,}" for k, v in (m.get("tokens") or {}).items())),
        ("config sha256", m.get("config_sha256")), ("selfalign", m.get("selfalign_version")),
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
       "cost": "Tokens & time", "lengths": "Lengths", "evaluation": "Evaluation", "samples": "Samples"}


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def build_html(run: RunData, rendered: list[Plot]) -> str:
    name = run.manifest.get("name") or run.run_dir.name
    sections = [("summary", "Run", _summary_html(run))]
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
    directory = run.run_dir / "report"
    rendered = render_plots(run, directory)
    target = directory / "index.html"
    write_text(build_html(run, rendered), target)
    return target


def cmd_report(args) -> int:
    path = write_report(args.run_dir)
    print(path)
    return 0


def add_cli(subparsers) -> None:
    report = subparsers.add_parser("report", help="write RUN_DIR/report/index.html with plots of a finished run")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, e.g. outputs/<pipeline name>")
    report.set_defaults(func=cmd_report)
