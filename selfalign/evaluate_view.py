"""How an evaluation (evaluate.json / the manifest's `evaluation`) is shown: a plot and a section of the HTML
report, and a section of the dataset card. Each is one call from report.py and card.py."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from .evaluate import RESULT_FILE, evaluation_of, is_current

# Okabe-Ito, as plots.py: arms in one colour each, the same in every plot.
COLOURS = {"human": "#0072B2", "synthetic": "#D55E00", "filtered": "#009E73", "final": "#CC79A7"}
HOW_TO_READ = (
    "A reward model was trained on each arm with the same number of pairs (drawn anew for each seed) and asked, "
    "for each held-out human pair, which answer is better; the dot is its accuracy (0.5 is chance), the bar the "
    "95% bootstrap interval over the held-out pairs. On the right, the paired differences: the same held-out "
    "pairs resampled for both arms. An interval that holds 0 means this evaluation cannot tell the two arms apart; "
    "more held-out pairs narrow it, more seeds steady the estimate (see the seed spread).")


def plot_evaluation(result: dict[str, Any], path: Path) -> Path:
    """Accuracy with its interval per arm (left) and the paired differences (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    arms = [arm for arm in result["arms"] if arm["available"]]
    differences = [d for d in result["differences"] if d["available"]]
    figure = Figure(figsize=(9.5, 0.55 * max(len(arms), 2) + 1.6), dpi=110)
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    for y, arm in enumerate(reversed(arms)):
        low, high = arm["ci"]
        colour = COLOURS.get(arm["name"], "#999999")
        left.plot([low, high], [y, y], color=colour, linewidth=3, solid_capstyle="butt")
        left.plot([arm["accuracy"]], [y], "o", color=colour, markersize=8)
        left.annotate(f"{arm['accuracy']:.3f} [{low:.3f}, {high:.3f}]", (high, y), xytext=(6, 0),
                      textcoords="offset points", va="center", fontsize=8)
    left.axvline(0.5, color="#999999", linestyle="--", linewidth=1)
    left.text(0.5, len(arms) - 0.5, " chance", color="#777777", fontsize=8, va="bottom")
    left.set_yticks(range(len(arms)), [f"{a['name']}\n(n={a['budget']:,})" for a in reversed(arms)], fontsize=9)
    lows = [a["ci"][0] for a in arms] + [0.5]
    start = max(0.0, min(lows) - 0.05)
    left.set_xlim(start, 1.14)  # room on the right for the numbers
    left.set_xticks([tick / 10 for tick in range(int(start * 10), 11)])
    left.set_ylim(-0.6, len(arms) - 0.2)
    left.set_xlabel(f"accuracy on {result['held_out']['pairs']:,} held-out human pairs", fontsize=9)
    left.set_title(f"Reward model ({result['reward_model']['kind']}) trained on each arm", fontsize=10)
    if differences:
        for y, d in enumerate(reversed(differences)):
            low, high = d["ci"]
            colour = "#009E73" if low > 0 else "#D55E00" if high < 0 else "#555555"
            right.plot([low, high], [y, y], color=colour, linewidth=3, solid_capstyle="butt")
            right.plot([d["difference"]], [y], "o", color=colour, markersize=8)
            right.annotate(f"{d['difference']:+.3f}", (d["difference"], y), xytext=(0, 8), textcoords="offset points",
                           ha="center", fontsize=8)
        right.axvline(0, color="#999999", linestyle="--", linewidth=1)
        span = max(0.05, *(abs(v) for d in differences for v in d["ci"])) * 1.3
        right.set_xlim(-span, span)
        right.set_ylim(-0.6, len(differences) - 0.4)
        right.set_yticks(range(len(differences)), [d["name"] for d in reversed(differences)], fontsize=9)
        right.set_xlabel("paired difference in accuracy", fontsize=9)
        right.set_title("Does the filter / the mix help?", fontsize=10)
    else:
        right.axis("off")
        right.text(0.5, 0.5, "no pair of arms to compare", ha="center", va="center", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", metadata={"Software": None})
    return path


def read_result(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(run_dir) / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _interval(values: list[float], signed: bool = False) -> str:
    return f"[{values[0]:+.3f}, {values[1]:+.3f}]" if signed else f"[{values[0]:.3f}, {values[1]:.3f}]"


def report_sections(run_dir: Path, manifest: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The report's (id, title, html) for RUN_DIR/evaluate.json, with its plot in report/evaluation.png;
    nothing when the run was not evaluated."""
    result = read_result(run_dir)
    if result is None:
        return []
    stale = "" if is_current(result, manifest) else (
        "<p class=note>This evaluation was made before the run's latest <code>selfalign run</code> (its config or "
        f"row count differ): run <code>selfalign evaluate {_esc(run_dir)}</code> again for numbers about these rows."
        "</p>")
    png = plot_evaluation(result, Path(run_dir) / "report" / "evaluation.png")
    image = base64.b64encode(png.read_bytes()).decode("ascii")
    held = result["held_out"]
    parts = [stale, f"<p>{_esc(HOW_TO_READ)}</p>",
             f'<img src="data:image/png;base64,{image}" alt="reward-model accuracy per arm" data-file="{png.name}">',
             f"<p>Held out: {held['pairs']:,} human pairs ({_esc(held['name'])}), prompt-disjoint from every arm's "
             f"training rows ({_esc(disjointness_note(result))}). Budget {result['budget']:,} pairs per arm, "
             f"{result['seeds']} seeds, "
             f"{result['bootstrap']:,} bootstrap resamples. Reward model: <code>{_esc(result['reward_model']['kind'])}"
             "</code>.</p>"]
    head = ["arm", "accuracy", "95% interval", "seed sd", "rows", "sharing a held-out prompt", "training rows",
            "trained on", "made from"]
    rows = []
    for arm in result["arms"]:
        if arm["available"]:
            rows.append([arm["name"], f"{arm['accuracy']:.3f}", _interval(arm["ci"]), f"{arm['seed_sd']:.3f}",
                         f"{arm['rows']:,}", f"{arm['sharing_a_held_out_prompt']:,}", f"{arm['training_rows']:,}",
                         f"{arm['budget']:,}", arm["origin"]])
        else:
            rows.append([arm["name"], "-", "-", "-", f"{arm['rows']:,}", "-", "-", "-", f"not made: {arm['why_not']}"])
    parts.append("<table><thead><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr></thead><tbody>"
                 + "".join("<tr>" + "".join(f"<td>{_esc(v)}</td>" for v in row) + "</tr>" for row in rows)
                 + "</tbody></table>")
    items = []
    for d in result["differences"]:
        if d["available"]:
            items.append(f"<li><b>{_esc(d['name'])}</b>: {d['difference']:+.3f} {_interval(d['ci'], True)}, "
                         f"{_esc(d['verdict'])}</li>")
        else:
            items.append(f"<li><b>{_esc(d['name'])}</b>: not measured ({_esc(d['why_not'])})</li>")
    parts.append(f"<ul>{''.join(items)}</ul>")
    return [("evaluation", "Reward-model evaluation: does the data help?", "".join(parts))]


def card_section(manifest: dict[str, Any]) -> str:
    """The dataset card's section on the evaluation in the manifest; "" when the run was not evaluated."""
    evaluation = evaluation_of(manifest)
    if not evaluation:
        return ""
    held = evaluation["held_out"]
    rows, missing = [], []
    for name, arm in evaluation["arms"].items():
        if "accuracy" in arm:
            rows.append(f"| {name} | {arm['accuracy']:.3f} | {_interval(arm['ci'])} | {arm['budget']:,} of "
                        f"{arm['training_rows']:,} |")
        else:
            missing.append(f"no {name} arm: {arm['why_not']}")
    lines = ["## Reward-model evaluation",
             f"A `{evaluation['reward_model']}` reward model was trained on each arm with the same budget "
             f"({evaluation['budget']:,} pairs, {evaluation['seeds']} seeds) and scored on {held['pairs']:,} held-out "
             f"human pairs ({held['name']}), prompt-disjoint from the training rows; 95% bootstrap intervals.", "",
             "| arm | accuracy | 95% interval | trained on (of training rows) |", "| --- | --- | --- | --- |",
             *rows, ""]
    for name, d in evaluation["differences"].items():
        lines.append(f"- {name}: {d['difference']:+.3f} {_interval(d['ci'], True)}, {d['verdict']}" if "difference" in d
                     else f"- {name}: not measured ({d['why_not']})")
    lines += [f"- {line}" for line in missing]
    return "\n".join(lines)


def disjointness_note(result: dict[str, Any]) -> str:
    """One sentence on how the held-out pairs were kept apart from the training rows."""
    held = result["held_out"]
    if held["kind"] == "eval":
        return (f"{held['removed_sharing_a_training_prompt']:,} eval pairs shared a prompt with the run's rows and "
                "were left out of the held-out pairs; every arm trains on its own rows")
    return "rows sharing a prompt with a held-out pair were taken out of every arm's training rows"


def arms_table(result: dict[str, Any]) -> str:
    """The arms as a plain-text table, with the differences and where each arm comes from (or why not)."""
    held = result["held_out"]
    lines = [f"held-out: {held['pairs']:,} human pairs ({held['name']}); budget {result['budget']:,} pairs per arm, "
             f"{result['seeds']} seeds; reward model: {result['reward_model']['kind']}",
             f"prompt-disjoint: {disjointness_note(result)}"]
    header = ("arm", "accuracy", "95% interval", "seed sd", "rows", "shared prompt", "training rows", "trained on")
    rows = []
    for arm in result["arms"]:
        if arm["available"]:
            low, high = arm["ci"]
            rows.append((arm["name"], f"{arm['accuracy']:.3f}", f"[{low:.3f}, {high:.3f}]", f"{arm['seed_sd']:.3f}",
                         f"{arm['rows']:,}", f"{arm['sharing_a_held_out_prompt']:,}", f"{arm['training_rows']:,}",
                         f"{arm['budget']:,}"))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w)  # noqa: E731
                              for i, (v, w) in enumerate(zip(r, widths)))
    lines += [fmt(header), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)]
    for d in result["differences"]:
        if d["available"]:
            low, high = d["ci"]
            lines.append(f"{d['name']}: {d['difference']:+.3f} [{low:+.3f}, {high:+.3f}] {d['verdict']}")
        else:
            lines.append(f"{d['name']}: not measured ({d['why_not']})")
    for arm in result["arms"]:
        lines.append(f"{arm['name']}: {arm['origin']}" if arm["available"] else
                     f"no {arm['name']} arm: {arm['why_not']}")
    return "\n".join(lines)
