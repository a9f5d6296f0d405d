"""`selfalign inspect RUN_DIR` (argparse in cli.py, which calls `inspect`): read rows of a run in a terminal,
with their prompt, answers, critiques, scores.

- `row_id` (`--row-id ID`, a unique prefix is enough) follows one row through the stages and shows it where it
  ended: in the last stage, or in the stage that dropped it, with the reason;
- `dropped` (`--dropped REASON`) lists the rows dropped with that reason (exact, else a case-insensitive
  substring);
- neither: the first `limit` rows of a stage (`stage`, default the last). `stage` takes an index, a kind or a
  file name (`2`, `consistency`, `02-consistency`).

Works on an unfinished run too (it reads stages/ and dropped/, not the manifest), which is when it helps most.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import RunError
from .markup import as_text
from .rundir import DROPPED, MANIFEST, check_run_dir, stage_files

if TYPE_CHECKING:  # imported where used, so that `selfalign --help` does not pay for polars
    import polars as pl

RAW_LIMIT = 2000  # characters of a raw input row or raw model output shown
SHOWN = {"row_id", "source", "prompt", "chosen", "rejected", "chosen_critiques", "rejected_critiques", "chosen_score",
         "rejected_score", "margin", "chosen_critiques_kept", "rejected_critiques_kept", "responses",
         "responses_critiques", "response", "feedback", "thumbs", "judge_verdict", "judge_reasoning", "drop_reason",
         "status", "error", "attempts", "raw_output", "source_row", "raw"}


# -- finding stages and rows -------------------------------------------------------------------------------

def _stages(run_dir: Path) -> list[tuple[int, str, Path, Path | None]]:
    dropped = {i: p for i, _, p in stage_files(run_dir, DROPPED)}
    stages = [(i, k, p, dropped.get(i)) for i, k, p in stage_files(run_dir)]
    if not stages:
        raise RunError(f"{run_dir}/stages/ has no stage files yet: the run stopped before its first stage "
                       "finished; re-run the same `selfalign run` command")
    return stages


def resolve_stage(stages: list[tuple[int, str, Path, Path | None]], value: str | int) -> tuple[int, str, Path,
                                                                                               Path | None]:
    text = str(value).strip().removesuffix(".parquet")
    names = ", ".join(f"{i} ({k})" for i, k, _, _ in stages)
    if text.isdigit():
        match = [s for s in stages if s[0] == int(text)]
    elif "-" in text and text.split("-", 1)[0].isdigit():
        match = [s for s in stages if f"{s[0]:02d}-{s[1]}" == text]
    else:
        match = [s for s in stages if s[1] == text]
        if len(match) > 1:
            raise RunError(f"stage {text!r} is ambiguous: the run has {len(match)} {text} stages "
                           f"({', '.join(str(s[0]) for s in match)}); pass its index, e.g. --stage {match[0][0]}")
    if not match:
        raise RunError(f"no stage {text!r} in this run; its stages are {names} (--stage takes an index or a kind)")
    return match[0]


def _read(path: Path | None) -> pl.DataFrame:
    import polars as pl

    return pl.read_parquet(path) if path is not None and path.exists() else pl.DataFrame()


def _match_ids(df: pl.DataFrame, row_id: str) -> pl.DataFrame:
    import polars as pl

    if "row_id" not in df.columns or df.height == 0:
        return df.clear()
    exact = df.filter(pl.col("row_id") == row_id)
    return exact if exact.height else df.filter(pl.col("row_id").str.starts_with(row_id))


# -- text layout -------------------------------------------------------------------------------------------

class Writer:
    def __init__(self, width: int):
        self.width = max(40, width)
        self.lines: list[str] = []

    def line(self, text: str = "") -> None:
        self.lines.append(text)

    def rule(self, title: str, char: str = "-") -> None:
        title = f"{char * 2} {title} "
        if len(title) > self.width - 2:
            title = title[:self.width - 6] + "... "
        self.lines.append(title + char * (self.width - len(title)))

    def wrap(self, text: Any, indent: int = 2) -> None:
        """Wrap each line of `text` on its own, so paragraphs and lists in an answer stay as written."""
        prefix = " " * indent
        text = "" if text is None else str(text)
        if not text.strip():
            self.lines.append(prefix + "(empty)")
            return
        for paragraph in text.strip("\n").splitlines():
            if not paragraph.strip():
                self.lines.append("")
                continue
            lead = len(paragraph) - len(paragraph.lstrip())
            self.lines.extend(textwrap.wrap(paragraph.strip(), width=self.width, initial_indent=prefix + " " * lead,
                                            subsequent_indent=prefix + " " * lead, break_long_words=True,
                                            break_on_hyphens=False) or [prefix])

    def text(self) -> str:
        return "\n".join(self.lines).rstrip() + "\n"


def _score(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def _critiques(out: Writer, critiques: list[dict[str, Any]] | None, indent: int = 4) -> None:
    if not critiques:
        out.line(" " * indent + "(no critiques)")
        return
    mean = sum(c["score"] for c in critiques) / len(critiques)
    out.line(" " * (indent - 2) + f"critiques: {len(critiques)}, mean score {mean:.2f}")
    for number, critique in enumerate(critiques, start=1):
        where = [f"score {_score(critique.get('score'))}"]
        if critique.get("sample_index") is not None:
            where.append("refined" if critique["sample_index"] < 0 else f"sample {critique['sample_index']}")
        if critique.get("model"):
            where.append(f"model {critique['model']}")
        out.line(" " * indent + f"[{number}] " + ", ".join(where))
        if critique.get("criterion_scores"):
            out.wrap("criteria: " + ", ".join(f"{c['name']} {_score(c['score'])}"
                                              for c in critique["criterion_scores"]), indent + 4)
        out.wrap(critique.get("text"), indent + 4)


def _prompt(out: Writer, prompt: Any) -> None:
    out.rule("prompt")
    if isinstance(prompt, list):
        for message in prompt:
            out.line(f"  [{message.get('role')}]")
            out.wrap(message.get("content"), 4)
    else:
        out.wrap(prompt, 2)


def _answer(out: Writer, row: dict[str, Any], side: str) -> None:
    facts = []
    if row.get(f"{side}_score") is not None:
        facts.append(f"{side}_score {_score(row[f'{side}_score'])}")
    if row.get(f"{side}_critiques_kept") is not None:
        facts.append(f"{row[f'{side}_critiques_kept']} critiques kept by consistency")
    out.rule(side + (" (" + ", ".join(facts) + ")" if facts else ""))
    out.wrap(row.get(side), 2)
    if f"{side}_critiques" in row:
        out.line()
        _critiques(out, row[f"{side}_critiques"])


def _limited(value: Any) -> str:
    text = as_text(value)
    return text if len(text) <= RAW_LIMIT else text[:RAW_LIMIT] + f" [... {len(text) - RAW_LIMIT:,} more characters]"


def render_row(out: Writer, row: dict[str, Any], where: str) -> None:
    head = [f"row {row.get('row_id') or '(no id)'}", where]
    if row.get("source"):
        head.append(f"source {row['source']}")
    out.rule(" | ".join(head), "=")
    if row.get("drop_reason"):
        out.wrap(f"dropped: {row['drop_reason']}", 2)
    if row.get("source_row") is not None:
        out.line(f"  input file row: {row['source_row']}")
    if row.get("status") or row.get("error"):
        out.line(f"  model call: {row.get('status') or '-'} after {row.get('attempts') or '?'} attempts")
        out.wrap(f"error: {row.get('error')}", 2)
        if row.get("raw_output") is not None:
            out.line("  last raw output:")
            out.wrap(_limited(row["raw_output"]), 4)
    if "prompt" in row:
        _prompt(out, row["prompt"])
    for field in ("response", "feedback", "thumbs"):
        if row.get(field) is not None:
            out.rule(field)
            out.wrap(row[field], 2)
    for side in ("chosen", "rejected"):
        if row.get(side) is not None or f"{side}_critiques" in row:
            _answer(out, row, side)
    if row.get("margin") is not None:
        out.line(f"  margin (chosen - rejected score): {_score(row['margin'])}")
    if row.get("responses") is not None:
        critiques = row.get("responses_critiques") or []
        for number, text in enumerate(row["responses"]):
            mine = critiques[number] if number < len(critiques) else None
            mean = f", mean score {sum(c['score'] for c in mine) / len(mine):.2f}" if mine else ""
            out.rule(f"response {number}{mean}")
            out.wrap(text, 2)
            if mine is not None:
                out.line()
                _critiques(out, mine)
    if row.get("judge_verdict") is not None:
        out.rule(f"judge: {row['judge_verdict']}")
        for order, reasoning in zip(("chosen shown as A", "rejected shown as A"), row.get("judge_reasoning") or []):
            out.line(f"  {order}:")
            out.wrap(reasoning, 4)
    if row.get("raw") is not None:
        out.rule("raw input row")
        try:
            raw = json.loads(row["raw"])
        except (TypeError, ValueError):
            raw = None
        if isinstance(raw, dict):  # one field after the other, with the text's own line breaks
            for key, value in raw.items():
                out.line(f"  {key}:")
                out.wrap(_limited(value), 4)
        else:
            out.wrap(_limited(row["raw"]), 2)
    others = {k: v for k, v in row.items() if k not in SHOWN and v is not None}
    if others:
        out.rule("other columns")
        for key, value in others.items():
            out.wrap(f"{key}: {_limited(value)}", 2)
    out.line()


# -- the three views -----------------------------------------------------------------------------------------

def _trail(stages, row_id: str) -> tuple[list[str], tuple[dict[str, Any], str] | None, list[str]]:
    """(trail of stage marks, (row, where) to show, other ids matching the prefix)."""
    trail, last, ids = [], None, set()
    for index, kind, kept_path, dropped_path in stages:
        kept = _match_ids(_read(kept_path), row_id)
        if kept.height:
            ids.update(kept["row_id"].to_list())
            trail.append(f"{index} {kind}: kept")
            last = (kept.row(0, named=True), f"stage {index} ({kind}), kept")
            continue
        dropped = _match_ids(_read(dropped_path), row_id)
        if dropped.height:
            ids.update(dropped["row_id"].to_list())
            row = dropped.row(0, named=True)
            trail.append(f"{index} {kind}: DROPPED ({row.get('drop_reason')})")
            return trail, (row, f"stage {index} ({kind}), dropped"), sorted(ids)
        if last is not None:
            trail.append(f"{index} {kind}: not present")
            break
    return trail, last, sorted(ids)


def _show_row(run_dir: Path, stages, stage, row_id: str, out: Writer) -> None:
    if stage is not None:
        index, kind, kept_path, dropped_path = resolve_stage(stages, stage)
        for path, state in ((kept_path, "kept"), (dropped_path, "dropped")):
            found = _match_ids(_read(path), row_id)
            if found.height > 1 and found["row_id"].n_unique() > 1:
                raise RunError(f"row id prefix {row_id!r} matches {found['row_id'].n_unique()} rows in stage {index}: "
                               f"{', '.join(found['row_id'].unique().sort().head(5).to_list())}...; give more of it")
            if found.height:
                render_row(out, found.row(0, named=True), f"stage {index} ({kind}), {state}")
                return
        raise RunError(f"row {row_id!r} is not in stage {index} ({kind}), kept or dropped; run `selfalign inspect "
                       f"{run_dir} --row-id {row_id}` without --stage to see where it went")
    trail, found, ids = _trail(stages, row_id)
    if len(ids) > 1:
        raise RunError(f"row id prefix {row_id!r} matches {len(ids)} rows ({', '.join(ids[:5])}"
                       f"{', ...' if len(ids) > 5 else ''}); give more of it")
    if found is None:
        raise RunError(f"no row {row_id!r} in {run_dir} (kept or dropped, any stage); row ids are the `row_id` "
                       f"column, e.g. from `selfalign inspect {run_dir}`")
    out.wrap("trail: " + " -> ".join(trail), 0)
    out.line()
    render_row(out, *found)


def _show_dropped(run_dir: Path, stages, stage, reason: str, limit: int, out: Writer) -> None:
    import polars as pl

    chosen = [resolve_stage(stages, stage)] if stage is not None else stages
    frames = [(i, k, _read(d)) for i, k, _, d in chosen]
    frames = [(i, k, df) for i, k, df in frames if df.height and "drop_reason" in df.columns]
    matched = [(i, k, df.filter(pl.col("drop_reason") == reason)) for i, k, df in frames]
    if not any(df.height for _, _, df in matched):
        matched = [(i, k, df.filter(pl.col("drop_reason").str.to_lowercase().str.contains(reason.lower(),
                                                                                            literal=True)))
                   for i, k, df in frames]
    matched = [(i, k, df) for i, k, df in matched if df.height]
    if not matched:
        counts = [f"  {i} {k}: {r} ({n:,})" for i, k, df in frames
                  for r, n in df.group_by("drop_reason").len().sort("len", descending=True).rows()]
        where = "" if stage is None else f" at stage {stage}"
        raise RunError(f"no rows dropped with reason {reason!r}{where}; the drop reasons in this run are:\n"
                       + ("\n".join(counts) if counts else "  (no row was dropped)"))
    total = sum(df.height for _, _, df in matched)
    reasons = sorted({r for _, _, df in matched for r in df["drop_reason"].unique().to_list()})
    out.wrap(f"{total:,} {'row' if total == 1 else 'rows'} dropped with reason "
             f"{', '.join(repr(r) for r in reasons)}: " + ", ".join(f"stage {i} ({k}) {df.height:,}"
                                                                    for i, k, df in matched), 0)
    out.line()
    shown = 0
    for index, kind, df in matched:
        for row in df.head(max(0, limit - shown)).iter_rows(named=True):
            render_row(out, row, f"stage {index} ({kind}), dropped")
            shown += 1
    if shown < total:
        out.line(f"... {total - shown:,} more; --limit N shows more")


def _show_stage(run_dir: Path, stages, stage, limit: int, out: Writer) -> None:
    index, kind, kept_path, dropped_path = resolve_stage(stages, stage if stage is not None else stages[-1][0])
    kept, dropped = _read(kept_path), _read(dropped_path)
    out.line(f"stage {index} ({kind}): {kept.height:,} rows kept, {dropped.height:,} dropped")
    if dropped.height and "drop_reason" in dropped.columns:
        for reason, count in dropped.group_by("drop_reason").len().sort("len", descending=True).rows():
            out.line(f"  dropped {count:,}: {reason}")
    out.wrap(f"columns: {', '.join(kept.columns)}", 0)
    out.line()
    for row in kept.head(limit).iter_rows(named=True):
        render_row(out, row, f"stage {index} ({kind}), kept")
    if kept.height > limit:
        out.line(f"... {kept.height - limit:,} more; --limit N shows more, --row-id ID shows one")


def inspect(run_dir: str | Path, stage: str | int | None = None, row_id: str | None = None,
            dropped: str | None = None, limit: int = 3, width: int | None = None) -> str:
    """Text for a terminal: one row (`row_id`), the rows dropped for a reason (`dropped`), or a stage's first
    `limit` rows. Raises RunError, with what to do, when the run, stage, row or reason does not exist."""
    if row_id is not None and dropped is not None:
        raise RunError("give --row-id or --dropped, not both")
    run_dir = Path(run_dir)
    check_run_dir(run_dir, need_manifest=False)
    stages = _stages(run_dir)
    if width is None:
        width = min(shutil.get_terminal_size((100, 24)).columns, 110)
    out = Writer(width)
    if not (run_dir / MANIFEST).exists():
        out.line(f"note: {run_dir} has no manifest.json: the run has not finished; showing the stages written so far")
    if row_id is not None:
        _show_row(run_dir, stages, stage, row_id.strip(), out)
    elif dropped is not None:
        _show_dropped(run_dir, stages, stage, dropped, limit, out)
    else:
        _show_stage(run_dir, stages, stage, limit, out)
    return out.text()
