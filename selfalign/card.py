"""The dataset card (README.md on the Hub): YAML metadata the Hub reads, then what made the data and how
it was filtered.

Metadata: language, license (+ license_name/license_link for `other`), task_categories, tags and
size_categories (both from the rows and formats pushed), source_datasets (the `hf:` inputs), pretty_name and
`configs` (one per trainer format, with its data files). The body: where the input data came from (a Hub id or
a file name, never a local path) with its declared license; the formats and how each trainer loads them;
models, backends, sampling and prompt template hashes; the pipeline YAML and the command to reproduce; the row
funnel with drop reasons; human vs synthetic counts; agreement with the human labels before/after filtering;
score and margin histograms (PNG files uploaded beside the card, under `assets/`, drawn by the report's plot
functions); and a few example rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from . import calibration
from .manifest import Manifest
from .markup import fence, markdown_inline, markdown_table, shorten
from .metrics import AGREEMENT_AFTER, AGREEMENT_BEFORE, CRITIQUES_BEFORE, CRITIQUES_KEPT
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
    manifest: Manifest
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
    """The card's PNGs, drawn by the report's plot functions (plots.py: same bins, colours and size);
    {name: path relative to `directory`}, empty when the rows carry no chosen_score/rejected_score.

    - `assets/scores.png`: `plots.plot_scores` of every critique the critique stages wrote (before filtering)
      and of the pushed pairs, with the report's panel titles. From the same run it is the report's
      `scores.png` byte for byte when the critiques come from one critique stage (the usual pipeline).
    - `assets/margin.png`: `plots.plot_margin`, when the rows have a margin.
    """
    from . import plots

    frame = inputs.frame
    if not {"chosen_score", "rejected_score"} <= set(frame.columns) or frame.height == 0:
        return {}
    funnel = inputs.manifest["rows"]
    # The critiques are those of the `critique` stages (publish.card_inputs); the rows are the last stage's.
    critique_stages = [plots.stage_label(entry["stage"], entry["kind"]) for entry in funnel
                       if entry["kind"] == "critique"]
    final_stage = plots.stage_label(funnel[-1]["stage"], funnel[-1]["kind"])
    draw = {"scores": lambda path: plots.plot_scores(path, final=frame, critiques=inputs.critique_scores,
                                                      critique_title=plots.critiques_title(critique_stages),
                                                      final_title=plots.pairs_title(final_stage)),
            "margin": lambda path: plots.plot_margin(frame, path)}
    written = {}
    for name, plot in draw.items():
        try:
            plot(directory / HISTOGRAMS[name])
            written[name] = HISTOGRAMS[name]
        except plots.NoData:
            pass  # only null scores, or no margin column: the card shows the other histogram, or none
    return written


# -- body ------------------------------------------------------------------------------------------


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
        markdown_table(["config", "rows", "how to use"], rows),
        fence(f'from datasets import load_dataset\n\nds = load_dataset("{repo}", "{first}")', "python"),
        "Train and test are split by a hash of the prompt: no prompt appears in both splits.",
        *([MARGIN_NOTE] if set(MARGIN_FORMATS) & set(inputs.formats) else []),
    ])


def _lengths_section(inputs: CardInputs) -> str:
    """Row length percentiles per config, from the export stage's metrics (formats it did not export: none)."""
    rows = length_rows(inputs.manifest, inputs.formats)
    if not rows:
        return ""
    return "\n\n".join(["## Sequence lengths", LENGTHS_NOTE,
                         markdown_table(["config", "unit", "rows", "p50", "p90", "p99", "max"], rows)])


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
             f"Made with selfalign {manifest['selfalign_version']} "
             f"from the pipeline `{manifest['name']}` (config hash "
             f"`{manifest['config_sha256']}`), started {manifest['started']}, "
             f"{manifest['seconds']} s."]
    models = manifest["models"]
    if models:
        parts += ["### Models and backends", markdown_table(
            ["name", "backend", "model / identity", "calls (requested / cached / sent / failed)"],
            [[name, info["identity"]["backend"], {k: v for k, v in info["identity"].items() if k != "backend"},
              " / ".join(str(info["calls"][k]) for k in ("requested", "cached", "sent", "failed"))]
             for name, info in models.items()])]
    sampling = _sampling_rows(inputs)
    if sampling:
        parts += ["### Sampling", markdown_table(["stage", "kind", "model", "prompt", "settings"], sampling)]
    templates = manifest["templates"]
    if templates:
        parts += ["### Prompt templates", markdown_table(["template", "sha256 (first 16 hex)"],
                                                  [[f"`{path}`", f"`{sha}`"] for path, sha in templates.items()])]
    tokens, calls = manifest["tokens"], manifest["model_calls"]
    parts.append(f"Model calls: {calls['requested']} requested, {calls['cached']} from the cache, "
                 f"{calls['sent']} sent, {calls['failed']} failed; tokens: "
                 f"{tokens['prompt']} prompt, {tokens['completion']} completion.")
    packages = manifest["packages"]
    if packages:
        parts.append("Packages: " + ", ".join(f"{name} {version}" for name, version in sorted(packages.items())) + ".")
    parts.append("### The pipeline")
    if inputs.pipeline_text is not None:
        if inputs.pipeline_matches_run is False:
            parts.append("Note: this file differs from the configuration the run used (its hash is not the "
                         "manifest's `config_sha256`; the run may have used `--set` overrides or the file was "
                         "edited since).")
        parts.append(fence(inputs.pipeline_text, "yaml"))
        parts.append("It is also in this repository as `selfalign/pipeline.yaml`.")
    else:
        parts.append(f"The pipeline file (`{inputs.pipeline_file}`) was not available when this card was made.")
    limit = manifest["limit"]
    command = "selfalign run pipeline.yaml" + (f" --limit {limit}" if limit else "")
    parts += ["### Reproduce", f"With selfalign {manifest['selfalign_version']} installed, the "
              "pipeline file above saved as `pipeline.yaml` and its input data beside it (local paths are shown "
              "by file name only):",
              fence(command, "bash"),
              "Every model call is cached in the run directory; with the same models, sampling seeds and "
              "templates (hashes above) the run is repeatable."]
    return "\n\n".join(parts)


def _funnel_section(inputs: CardInputs) -> str:
    funnel = inputs.manifest["rows"]
    rows = [[f["stage"], f["kind"], f["in"], f["out"], f["dropped"],
             ", ".join(f"{reason}: {n}" for reason, n in f["drop_reasons"].items()) or "-"]
            for f in funnel]
    parts = ["## Row funnel", "Rows in and out of each stage, and why rows were dropped (every dropped row is kept "
             "with its reason in the run directory's `dropped/`).",
             markdown_table(["stage", "kind", "in", "out", "dropped", "drop reasons"], rows)]
    # Stage metrics are each stage's own keys: the consistency filter writes both of these.
    for metrics in [f["metrics"] for f in funnel if CRITIQUES_BEFORE in f["metrics"]]:
        parts.append(f"Critiques kept by the consistency filter: {metrics[CRITIQUES_KEPT]} of "
                     f"{metrics[CRITIQUES_BEFORE]}.")
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
    parts.append(markdown_table(["source", "pairs", "share", "per split"], rows))
    return "\n\n".join(parts)


def _agreement_section(inputs: CardInputs) -> str:
    rows = []
    for f in inputs.manifest["rows"]:
        metrics = f["metrics"]  # the filters that compare critiques with the labels write both keys
        if AGREEMENT_BEFORE in metrics:
            fmt = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
            rows.append([f["stage"], f["kind"], fmt(metrics[AGREEMENT_BEFORE]), fmt(metrics[AGREEMENT_AFTER])])
    if not rows:
        return "## Agreement with human labels\n\nNo stage of this pipeline compared the critiques with human labels."
    return "\n\n".join([
        "## Agreement with human labels",
        "Share of human-labelled pairs whose critique scores order the pair the way the human did, before and after "
        "the consistency filter (after filtering it is 100% by construction: disagreeing pairs are dropped).",
        markdown_table(["stage", "kind", "before filtering", "after filtering"], rows)])


def _calibration_section(inputs: CardInputs) -> str:
    rows = calibration.table_rows(inputs.manifest)
    if not rows:
        return ""
    return "\n\n".join(["## Judge calibration", calibration.READING, markdown_table(calibration.HEADERS, rows)])


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
    return "\n\n".join(parts)


def _examples_section(inputs: CardInputs, count: int = 3) -> str:
    split = inputs.splits.get("train", inputs.frame)
    if split.height == 0:
        return ""
    sample = split.sort("row_id").head(count) if "row_id" in split.columns else split.head(count)
    parts = ["## Examples", f"The first {sample.height} training pairs (by row id), shortened."]
    for number, row in enumerate(sample.iter_rows(named=True), 1):
        prompt = row["prompt"]
        conversation = "\n".join(f"{m['role']}: {shorten(m['content'], 300)}" for m in prompt[-3:])
        if len(prompt) > 3:
            conversation = f"({len(prompt) - 3} earlier messages)\n" + conversation
        lines = [f"### Example {number}" + (f" ({row['source']})" if row.get("source") else ""),
                 fence(conversation), f"**chosen**: {markdown_inline(row['chosen'])}", f"**rejected**: {markdown_inline(row['rejected'])}"]
        if row.get("chosen_score") is not None:
            lines.append(f"Scores: chosen {row['chosen_score']:.2f}, rejected {row['rejected_score']:.2f}"
                         + (f", margin {row['margin']:.2f}" if row.get("margin") is not None else "") + ".")
        for target in ("chosen", "rejected"):
            critiques = row.get(f"{target}_critiques") or []
            if critiques:
                first = critiques[0]
                lines.append(f"A kept critique of the {target} answer (score {first['score']:g}): "
                             f"*{markdown_inline(first['text'], 300)}*")
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
        parts.append(markdown_table(["input", "license", "attribution"], rows))
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
    kinds = {entry["kind"] for entry in inputs.manifest["rows"]}
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
                _sources_section(inputs), _calibration_section(inputs), _agreement_section(inputs),
                _scores_section(inputs, images),
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
