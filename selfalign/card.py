"""The dataset card (README.md on the Hub): YAML metadata the Hub reads, then what made the data and how
it was filtered.

Metadata: language, license (+ license_name/license_link for `other`), task_categories, tags and
size_categories (both from the rows and formats pushed), source_datasets (the `hf:` inputs), pretty_name and
`configs` (one per trainer format, with its data files). The body: where the input data came from (a Hub id or
a file name, never a local path) with its declared license; the formats and how each trainer loads them;
models, backends, sampling and prompt template hashes; the pipeline YAML and the command to reproduce; the row
funnel with drop reasons; human vs synthetic counts; agreement with the human labels before/after filtering; score histograms (PNG
files uploaded beside the card, under `assets/`); and a few example rows.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from . import __version__
from .evaluate_view import card_section
from .trainer_formats import LENGTHS_NOTE, MARGIN_FORMATS, MARGIN_NOTE, USAGE, length_rows

TAGS = ["selfalign", "preference"]  # true of every push; tags() adds the ones the pushed data supports
PAIR_TAGS = ["reward-modeling", "rlhf", "dpo"]
CRITIQUE_FORMATS = {"critic-rm", "cloud", "critique-sft"}
TASK_CATEGORIES = ["text-generation", "text-classification"]
HISTOGRAMS = {"scores": "assets/scores.png", "margin": "assets/margin.png"}


@dataclass
class CardInputs:
    """Everything the card says, gathered from a run directory (or from a running pipeline)."""

    name: str
    manifest: dict[str, Any]
    frame: pl.DataFrame                         # the final rows, canonical columns
    splits: dict[str, pl.DataFrame]             # the final rows per split (canonical columns)
    formats: dict[str, dict[str, int]]          # format -> split -> rows
    default_format: str | None = None
    pipeline_text: str | None = None
    pipeline_file: str | None = None
    pipeline_matches_run: bool | None = None    # the YAML's hash equals the manifest's config_sha256
    stages: list[Any] | None = None             # validated stage configs, when the pipeline loads
    critique_scores: pl.DataFrame | None = None  # every critique before filtering: target, score
    license: str = "other"
    license_name: str | None = None             # the Hub's id for a license that is `other`
    license_link: str | None = None             # "LICENSE" (a file in the repo) or a URL
    language: list[str] = field(default_factory=list)  # ISO 639 codes, as the user declared them
    # One per load stage: {"kind": "hf" | "file" | "folder", "name": Hub id or file name, "license", "attribution"}.
    sources: list[dict[str, Any]] | None = None
    repo_id: str | None = None
    notes: list[str] = field(default_factory=list)


def size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"),
                         (1_000_000_000, "100M<n<1B")):
        if n < limit:
            return label
    return "n>1T" if n >= 10**12 else "1B<n<10B"


def configs_metadata(formats: dict[str, dict[str, int]], default_format: str | None) -> list[dict[str, Any]]:
    """The `configs:` block as `DatasetDict.push_to_hub(config_name=...)` writes it: `<format>/<split>-*`."""
    configs = []
    for name, splits in formats.items():
        entry: dict[str, Any] = {"config_name": name,
                                 "data_files": [{"split": split, "path": f"{name}/{split}-*"} for split in splits]}
        if name == default_format:
            entry["default"] = True
        configs.append(entry)
    return configs


def source_counts(inputs: CardInputs) -> dict[str, int]:
    """Pushed pairs by their `source` column (human / synthetic / ...), over every split; {} without one."""
    parts = [part for part in inputs.splits.values() if "source" in part.columns]
    if not parts:
        return {}
    return dict(pl.concat([part.select("source") for part in parts]).group_by("source").len().sort("source").rows())


def tags(inputs: CardInputs) -> list[str]:
    """Tags the pushed data bears out: `synthetic` only when some pushed pair was made by a model (a
    `source` other than human), `critic-rm` only when a critique format was pushed."""
    found = list(TAGS)
    if set(inputs.formats) - CRITIQUE_FORMATS:
        found += PAIR_TAGS
    if set(inputs.formats) & CRITIQUE_FORMATS:
        found.append("critic-rm")
    if any(source != "human" for source in source_counts(inputs)):
        found.append("synthetic")
    return found


def metadata(inputs: CardInputs, existing: dict[str, Any] | None = None) -> dict[str, Any]:
    """Card metadata. `existing` (`configs`, `dataset_info` of the repo, merged by the caller) is kept as it is."""
    data = dict(existing or {})
    # The size is the largest pushed config's row count (critique-sft has a row per critique, not per pair).
    pushed_rows = max((sum(splits.values()) for splits in inputs.formats.values()), default=0)
    data.update({
        "license": inputs.license,
        "task_categories": TASK_CATEGORIES,
        "tags": tags(inputs),
        "size_categories": [size_category(pushed_rows)],
        "pretty_name": inputs.name,
    })
    if inputs.language:
        data["language"] = list(inputs.language)
    if inputs.license == "other":
        # The Hub asks for an id (and a link) when the license is not one of its list.
        data["license_name"] = inputs.license_name or "unspecified"
        if inputs.license_link:
            data["license_link"] = inputs.license_link
    hub_sources = [s["name"] for s in inputs.sources or [] if s["kind"] == "hf"]
    if hub_sources:
        data["source_datasets"] = hub_sources
    if not data.get("configs"):
        data["configs"] = configs_metadata(inputs.formats, inputs.default_format)
    return data


# -- histograms ------------------------------------------------------------------------------------


def render_histograms(inputs: CardInputs, directory: Path) -> dict[str, str]:
    """PNG histograms of chosen vs rejected scores (every critique before filtering, and the surviving pairs)
    and of the margin; {name: path relative to `directory`}. Empty when matplotlib is missing or there are no
    scores."""
    try:  # the object API on an Agg canvas: no pyplot, no global backend change for other callers
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        inputs.notes.append("Score histograms were not rendered: install matplotlib (`pip install matplotlib`).")
        return {}

    def figure(width: float, height: float, columns: int = 1):
        fig = Figure(figsize=(width, height))
        FigureCanvasAgg(fig)
        return fig, [fig.add_subplot(1, columns, i + 1) for i in range(columns)]

    frame = inputs.frame
    if not {"chosen_score", "rejected_score"} <= set(frame.columns) or frame.height == 0:
        return {}
    written = {}
    panels = []
    if inputs.critique_scores is not None and inputs.critique_scores.height:
        panels.append(("every critique, before filtering", inputs.critique_scores))
    pair_scores = pl.concat([
        frame.select(target=pl.lit("chosen"), score=pl.col("chosen_score").cast(pl.Float64)),
        frame.select(target=pl.lit("rejected"), score=pl.col("rejected_score").cast(pl.Float64))])
    panels.append(("surviving pairs (mean of kept critiques)", pair_scores))
    fig, axes = figure(5.5 * len(panels), 3.6, len(panels))
    for axis, (title, scores) in zip(axes, panels):
        values = scores.drop_nulls("score")
        low, high = values["score"].min(), values["score"].max()
        bins = [x - 0.5 for x in range(int(low), int(high) + 2)] if low is not None else 10
        for target, color in (("chosen", "tab:green"), ("rejected", "tab:red")):
            data = values.filter(pl.col("target") == target)["score"].to_list()
            axis.hist(data, bins=bins, alpha=0.55, color=color, label=f"{target} (n={len(data)})")
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("score")
        axis.set_ylabel("count")
        axis.legend(fontsize=8)
    fig.tight_layout()
    path = directory / HISTOGRAMS["scores"]
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    written["scores"] = HISTOGRAMS["scores"]
    if "margin" in frame.columns:
        fig, (axis,) = figure(5.5, 3.6)
        axis.hist(frame["margin"].drop_nulls().to_list(), bins=20, color="tab:blue")
        axis.set_title("margin: chosen score - rejected score", fontsize=10)
        axis.set_xlabel("margin")
        axis.set_ylabel("pairs")
        fig.tight_layout()
        fig.savefig(directory / HISTOGRAMS["margin"], dpi=100, metadata={"Software": None})
        written["margin"] = HISTOGRAMS["margin"]
    return written


# -- body ------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _fence(text: str, language: str = "") -> str:
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return f"{ticks}{language}\n{text.rstrip()}\n{ticks}"


def _short(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


_MARKDOWN = re.compile(r"([\\`*_\[\]<>#|~])")


def _inline(text: str, limit: int = 400) -> str:
    """Data shown in running text: shortened, with Markdown/HTML characters escaped so a row cannot restyle
    the card."""
    return _MARKDOWN.sub(r"\\\1", _short(text, limit))


def _formats_section(inputs: CardInputs) -> str:
    repo = inputs.repo_id or "REPO"
    rows = []
    for name, splits in inputs.formats.items():
        usage = USAGE.get(name, "").replace("REPO", repo)
        rows.append([f"`{name}`" + (" (default)" if name == inputs.default_format else ""),
                     ", ".join(f"{split}: {n}" for split, n in splits.items()), usage])
    first = inputs.default_format or next(iter(inputs.formats), "trl")
    return "\n\n".join([
        "## Configs (one per trainer format)",
        _table(["config", "rows", "how to use"], rows),
        _fence(f'from datasets import load_dataset\n\nds = load_dataset("{repo}", "{first}")', "python"),
        "Train and test are split by a hash of the prompt: no prompt appears in both splits.",
        *([MARGIN_NOTE] if set(MARGIN_FORMATS) & set(inputs.formats) else []),
    ])


def _lengths_section(inputs: CardInputs) -> str:
    """Row length percentiles per config, from the export stage's metrics (formats it did not export: none)."""
    rows = length_rows(inputs.manifest, inputs.formats)
    if not rows:
        return ""
    return "\n\n".join(["## Sequence lengths", LENGTHS_NOTE,
                         _table(["config", "unit", "rows", "p50", "p90", "p99", "max"], rows)])


def _sampling_rows(inputs: CardInputs) -> list[list[Any]]:
    rows = []
    if inputs.stages is not None:
        for index, stage in enumerate(inputs.stages):
            if stage.kind not in ("critique", "generate"):
                continue
            sampling = stage.sampling.model_dump() if getattr(stage, "sampling", None) else {}
            extra = {"samples": stage.samples}
            if stage.kind == "critique":
                extra["score_range"] = list(stage.score_range)
                if stage.rubric:
                    extra["rubric"] = [c.name for c in stage.rubric]
            rows.append([index, stage.kind, stage.model, getattr(stage, "prompt", None) or "(conversation as is)",
                         {**extra, **sampling}])
    return rows


def _made_section(inputs: CardInputs) -> str:
    manifest = inputs.manifest
    parts = ["## How it was made",
             f"Made with selfalign {manifest.get('selfalign_version', '?')} "
             f"from the pipeline `{manifest.get('name', inputs.name)}` (config hash "
             f"`{manifest.get('config_sha256', '?')}`), started {manifest.get('started', '?')}, "
             f"{manifest.get('seconds', '?')} s."]
    models = manifest.get("models") or {}
    if models:
        parts += ["### Models and backends", _table(
            ["name", "backend", "model / identity", "calls (requested / cached / sent / failed)"],
            [[name, info.get("identity", {}).get("backend", "?"),
              {k: v for k, v in info.get("identity", {}).items() if k != "backend"},
              " / ".join(str(info.get("calls", {}).get(k, 0)) for k in ("requested", "cached", "sent", "failed"))]
             for name, info in models.items()])]
    sampling = _sampling_rows(inputs)
    if sampling:
        parts += ["### Sampling", _table(["stage", "kind", "model", "prompt", "settings"], sampling)]
    templates = manifest.get("templates") or {}
    if templates:
        parts += ["### Prompt templates", _table(["template", "sha256 (first 16 hex)"],
                                                  [[f"`{path}`", f"`{sha}`"] for path, sha in templates.items()])]
    tokens = manifest.get("tokens") or {}
    calls = manifest.get("model_calls") or {}
    if calls:
        parts.append(f"Model calls: {calls.get('requested', 0)} requested, {calls.get('cached', 0)} from the cache, "
                     f"{calls.get('sent', 0)} sent, {calls.get('failed', 0)} failed; tokens: "
                     f"{tokens.get('prompt', 0)} prompt, {tokens.get('completion', 0)} completion.")
    packages = manifest.get("packages") or {}
    if packages:
        parts.append("Packages: " + ", ".join(f"{name} {version}" for name, version in sorted(packages.items())) + ".")
    parts.append("### The pipeline")
    if inputs.pipeline_text is not None:
        if inputs.pipeline_matches_run is False:
            parts.append("Note: this file differs from the configuration the run used (its hash is not the "
                         "manifest's `config_sha256`; the run may have used `--set` overrides or the file was "
                         "edited since).")
        parts.append(_fence(inputs.pipeline_text, "yaml"))
        parts.append("It is also in this repository as `selfalign/pipeline.yaml`.")
    else:
        parts.append(f"The pipeline file (`{inputs.pipeline_file}`) was not available when this card was made.")
    limit = manifest.get("limit")
    command = "selfalign run pipeline.yaml" + (f" --limit {limit}" if limit else "")
    parts += ["### Reproduce", f"With selfalign {manifest.get('selfalign_version', __version__)} installed, the "
              "pipeline file above saved as `pipeline.yaml` and its input data beside it (local paths are shown "
              "by file name only):",
              _fence(command, "bash"),
              "Every model call is cached in the run directory; with the same models, sampling seeds and "
              "templates (hashes above) the run is repeatable."]
    return "\n\n".join(parts)


def _funnel_section(inputs: CardInputs) -> str:
    funnel = inputs.manifest.get("rows") or []
    rows = [[f["stage"], f["kind"], f["in"], f["out"], f["dropped"],
             ", ".join(f"{reason}: {n}" for reason, n in (f.get("drop_reasons") or {}).items()) or "-"]
            for f in funnel]
    parts = ["## Row funnel", "Rows in and out of each stage, and why rows were dropped (every dropped row is kept "
             "with its reason in the run directory's `dropped/`).",
             _table(["stage", "kind", "in", "out", "dropped", "drop reasons"], rows)]
    critiques = [f["metrics"] for f in funnel if "critiques_before" in (f.get("metrics") or {})]
    for metrics in critiques:
        parts.append(f"Critiques kept by the consistency filter: {metrics.get('critiques_kept')} of "
                     f"{metrics.get('critiques_before')}.")
    return "\n\n".join(parts)


def _sources_section(inputs: CardInputs) -> str:
    frame = inputs.frame
    parts = ["## Human vs synthetic"]
    if "source" not in frame.columns:
        parts.append("The rows carry no `source` column.")
        return "\n\n".join(parts)
    counts = frame.group_by("source").len().sort("source").rows()
    rows = []
    for source, n in counts:
        per_split = {split: part.filter(pl.col("source") == source).height for split, part in inputs.splits.items()}
        share = f"{100 * n / frame.height:.1f}%" if frame.height else "-"
        rows.append([source, n, share, ", ".join(f"{s}: {c}" for s, c in per_split.items())])
    parts.append("Pairs by origin: `human` pairs come with a human preference label (the critiques were checked "
                 "against it); other sources were made by a model.")
    parts.append(_table(["source", "pairs", "share", "per split"], rows))
    return "\n\n".join(parts)


def _agreement_section(inputs: CardInputs) -> str:
    rows = []
    for f in inputs.manifest.get("rows") or []:
        metrics = f.get("metrics") or {}
        if "agreement_with_human_before" in metrics or "agreement_with_human_after" in metrics:
            fmt = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
            rows.append([f["stage"], f["kind"], fmt(metrics.get("agreement_with_human_before")),
                         fmt(metrics.get("agreement_with_human_after"))])
    if not rows:
        return "## Agreement with human labels\n\nNo stage of this pipeline compared the critiques with human labels."
    return "\n\n".join([
        "## Agreement with human labels",
        "Share of human-labelled pairs whose critique scores order the pair the way the human did, before and after "
        "the consistency filter (after filtering it is 100% by construction: disagreeing pairs are dropped).",
        _table(["stage", "kind", "before filtering", "after filtering"], rows)])


def _scores_section(inputs: CardInputs, images: dict[str, str]) -> str:
    frame = inputs.frame
    parts = ["## Scores"]
    if {"chosen_score", "rejected_score"} <= set(frame.columns) and frame.height:
        stats = frame.select(
            pl.col("chosen_score").mean().alias("chosen"), pl.col("rejected_score").mean().alias("rejected"),
            *([pl.col("margin").mean().alias("margin"), pl.col("margin").min().alias("margin_min"),
               pl.col("margin").max().alias("margin_max")] if "margin" in frame.columns else [])).row(0, named=True)
        line = f"Mean score of the chosen answers {stats['chosen']:.2f}, of the rejected {stats['rejected']:.2f}"
        if "margin" in stats:
            line += f"; margin mean {stats['margin']:.2f} (min {stats['margin_min']:.2f}, max {stats['margin_max']:.2f})"
        parts.append(line + ".")
    else:
        parts.append("These rows carry no critique scores.")
    for name, path in images.items():
        parts.append(f"![{name} histogram]({path})")
    parts += inputs.notes
    return "\n\n".join(parts)


def _examples_section(inputs: CardInputs, count: int = 3) -> str:
    split = inputs.splits.get("train", inputs.frame)
    if split.height == 0:
        return ""
    sample = split.sort("row_id").head(count) if "row_id" in split.columns else split.head(count)
    parts = ["## Examples", f"The first {sample.height} training pairs (by row id), shortened."]
    for number, row in enumerate(sample.iter_rows(named=True), 1):
        prompt = row["prompt"]
        conversation = "\n".join(f"{m['role']}: {_short(m['content'], 300)}" for m in prompt[-3:])
        if len(prompt) > 3:
            conversation = f"({len(prompt) - 3} earlier messages)\n" + conversation
        lines = [f"### Example {number}" + (f" ({row['source']})" if row.get("source") else ""),
                 _fence(conversation), f"**chosen**: {_inline(row['chosen'])}", f"**rejected**: {_inline(row['rejected'])}"]
        if row.get("chosen_score") is not None:
            lines.append(f"Scores: chosen {row['chosen_score']:.2f}, rejected {row['rejected_score']:.2f}"
                         + (f", margin {row['margin']:.2f}" if row.get("margin") is not None else "") + ".")
        for target in ("chosen", "rejected"):
            critiques = row.get(f"{target}_critiques") or []
            if critiques:
                first = critiques[0]
                lines.append(f"A kept critique of the {target} answer (score {first['score']:g}): "
                             f"*{_inline(first['text'], 300)}*")
        parts.append("\n\n".join(lines))
    return "\n\n".join(parts)


def _data_source_section(inputs: CardInputs) -> str:
    """Where the input rows came from and under what terms, as declared by the user (never a local path)."""
    parts = ["## Source data and license"]
    if inputs.sources is None:
        parts.append("The pipeline file was not available, so the input data's source is not recorded here.")
    elif inputs.sources:
        rows = []
        for source in inputs.sources:
            if source["kind"] == "hf":
                where = f"[{source['name']}](https://huggingface.co/datasets/{source['name']}) (Hub dataset)"
            else:
                where = f"`{source['name']}` (a local {source['kind']}, named without its path)"
            rows.append([where, source.get("license") or "not declared", source.get("attribution") or "-"])
        parts.append(_table(["input", "license", "attribution"], rows))
        if any(not source.get("license") for source in inputs.sources):
            parts.append("The input data's license was not declared: check its terms before sharing this dataset "
                         "(declare it with `source_license:` / `source_attribution:` under the publish stage's "
                         "`hub:`, or `selfalign push --source-license ... --source-attribution ...`).")
    if inputs.license != "other":
        parts.append(f"This dataset's license: `{inputs.license}`.")
    elif inputs.license_name:
        link = f", see {inputs.license_link}" if inputs.license_link else ""
        parts.append(f"This dataset's license: `{inputs.license_name}` (not one of the Hub's list{link}).")
    else:
        parts.append("No license was declared for this dataset (`license: other`, `license_name: unspecified`).")
    parts.append("The critiques, scores and any generated answers were written by the model(s) below; their terms "
                 "of use may apply too.")
    return "\n\n".join(parts)


def card_body(inputs: CardInputs, images: dict[str, str]) -> str:
    counts = source_counts(inputs)
    pairs = sum(part.height for part in inputs.splits.values())
    kinds = {entry.get("kind") for entry in inputs.manifest.get("rows") or []}
    intro = f"# {inputs.name}\n\nA preference dataset of {pairs} pairs"
    if counts:
        intro += " (" + ", ".join(f"{n} {'human-labelled' if source == 'human' else source}"
                                  for source, n in counts.items()) + ")"
    intro += ", made by selfalign"
    # Say only what this pipeline did: a pairs-only run has no critiques and filtered nothing by them.
    if "critique" in kinds:
        intro += ": a model wrote scored critiques of each answer (Critic-RM, arXiv 2411.16646)"
        if "consistency" in kinds:
            intro += ", and only pairs and critiques that agree with the human labels were kept"
    intro += "."
    sections = [intro, _data_source_section(inputs), _formats_section(inputs), _made_section(inputs),
                _funnel_section(inputs),
                _sources_section(inputs), _agreement_section(inputs), _scores_section(inputs, images),
                _lengths_section(inputs), card_section(inputs.manifest), _examples_section(inputs)]
    return "\n\n".join(s for s in sections if s) + "\n"


def render_card(inputs: CardInputs, images: dict[str, str], existing_metadata: dict[str, Any] | None = None) -> str:
    """The README.md text: YAML front matter + body, parse-checked with huggingface_hub's card tools."""
    from huggingface_hub import DatasetCard, DatasetCardData

    data = DatasetCardData(**metadata(inputs, existing_metadata))
    text = f"---\n{data.to_yaml()}\n---\n\n" + card_body(inputs, images)
    check_card(text)
    return text


def check_card(text: str):
    """Parse the card as the Hub's client does; raise ValueError when its metadata is not what the Hub needs."""
    from huggingface_hub import DatasetCard

    card = DatasetCard(text)
    data = card.data.to_dict()
    missing = [key for key in ("license", "task_categories", "tags", "size_categories", "configs") if not data.get(key)]
    if missing:
        raise ValueError(f"dataset card metadata lacks {missing}")
    for config in data["configs"]:
        if not config.get("config_name") or not config.get("data_files"):
            raise ValueError(f"dataset card config {config!r} needs config_name and data_files")
    return card
