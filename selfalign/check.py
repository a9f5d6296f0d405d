"""Check a whole pipeline before anything runs: model names, prompt files and their variables, and the
column flow from stage to stage. Returns every problem found, each at its file and line."""

from __future__ import annotations

import difflib
from pathlib import Path

from . import calibrate
from .config import LoadedPipeline, effective_models
from .errors import ConfigError
from .paths import PROJECT_ROOT, resolve_path
from .prompts import TemplateError, load_template

def check_pipeline(loaded: LoadedPipeline) -> list[ConfigError]:
    pipeline = loaded.pipeline
    models = effective_models(pipeline)
    errors: list[ConfigError] = []
    columns: set[str] = set()
    for index, stage in enumerate(pipeline.stages):
        def error(message: str, field: str | None = None) -> None:
            place = loaded.place("stages", index, field) if field else loaded.place("stages", index)
            errors.append(ConfigError(message, **place, stage=index, kind=stage.kind, field=field))

        if (index == 0) != (stage.kind == "load"):
            error("the first stage must be `kind: load` (and only the first)", "kind")
        for name in stage.model_names():
            if name not in models:
                close = difflib.get_close_matches(name, list(models), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                error(f"model {name!r} is not defined under models:; {hint}defined: {', '.join(sorted(models))}",
                      "model")
        for field, (template_path, provided) in stage.templates().items():
            path = resolve_path(template_path, loaded.path)
            if path.is_dir():
                error(f"prompt {template_path!r} is a directory; name a .jinja file in it, e.g. "
                      "prompts/critique.jinja", field)
                continue
            if not path.is_file():
                error(f"prompt file {template_path!r} not found (looked in the current directory, beside the "
                      f"pipeline and in {PROJECT_ROOT / 'prompts'}); fix the path", field)
                continue
            try:
                template = load_template(path)
            except TemplateError as exc:
                error(str(exc), field)
                continue
            unknown = template.variables - provided
            if unknown:
                error(f"template {template_path} uses {', '.join(sorted(unknown))}, which this stage does not "
                      f"provide; it provides: {', '.join(sorted(provided))}", field)
        missing = stage.needs() - columns
        if missing and index > 0:
            error(f"needs column(s) {', '.join(sorted(missing))}, which no earlier stage makes; available: "
                  f"{', '.join(sorted(columns)) or 'none'}. Add the stage that makes them earlier in the pipeline",
                  _field_for_missing(stage))
        if getattr(stage, "calibrate", None) is not None:
            errors += calibrate.check(loaded, index, stage, columns, lambda value: resolve_path(value, loaded.path))
        columns |= stage.adds()
        if stage.kind == "export":
            _check_export_order(pipeline.stages, index, error)
        if stage.kind == "decontaminate":  # the local evaluation sets, read as the stage will read them
            for where, message in stage.local_set_problems(lambda value: resolve_path(value, loaded.path)):
                errors.append(ConfigError(message, **loaded.place("stages", index, *where), stage=index,
                                          kind=stage.kind, field=".".join(map(str, where))))
        if stage.kind == "evaluate":
            from .stages.evaluate import check_evaluate
            check_evaluate(pipeline.stages, index, lambda value: resolve_path(value, loaded.path), error)
        if stage.kind == "publish" and not stage.hub.language:
            # The push would refuse a card without it; say so now, before any model call is paid for.
            error("the dataset card needs the data's language: add `language: [en]` (ISO 639 codes) under hub:",
                  "hub")
    errors.extend(_check_budget_prices(loaded, models))
    return errors


def _check_budget_prices(loaded: LoadedPipeline, models: dict) -> list[ConfigError]:
    """A pipeline-wide max_usd is enforced on every model a stage calls, so each of them needs a price."""
    budget = loaded.pipeline.budget
    if budget is None or budget.max_usd is None:
        return []
    used = dict.fromkeys(name for stage in loaded.pipeline.stages for name in stage.model_names() if name in models)
    unpriced = [name for name in used if models[name].price is None]
    if not unpriced:
        return []
    return [ConfigError(f"max_usd needs a price on every model the stages call; {', '.join(map(repr, unpriced))} "
                        f"has none: add price: {{input_per_mtok: ..., output_per_mtok: ...}} (USD per million tokens; "
                        "0 for a local model) under models:" + ("" if unpriced[0] in loaded.pipeline.models else
                        f" (a stage names {unpriced[0]!r} without defining it: define it, e.g. "
                        f"{unpriced[0]}: {{backend: llamacpp, price: {{input_per_mtok: 0, output_per_mtok: 0}}}})"),
                        **loaded.place("budget", "max_usd"), field="budget.max_usd")]


# What may follow an export: publish pushes the same rows (evaluate measures them). Any other stage would change
# rows the export has already written, so the run's result (dataset/, export/) would not hold them.
AFTER_EXPORT = {"publish", "evaluate"}


def _check_export_order(stages: list, index: int, error) -> None:
    """One export, after every stage that changes rows. Refused rather than given a meaning: dataset/ and
    export/<format>/ are fixed paths a trainer loads, so an early or second export would silently hand it
    rows other than the pipeline's result (every stage's own rows are in stages/ anyway)."""
    earlier = [i for i, stage in enumerate(stages[:index]) if stage.kind == "export"]
    if earlier:
        error(f"a second export: it would replace dataset/ (and export/<format>/) written by stage {earlier[0]} "
              "(export); keep one export at the end and list every format there, e.g. formats: [trl, critic-rm]",
              "kind")
        return
    later = [f"{i} ({stage.kind})" for i, stage in enumerate(stages) if i > index and stage.kind != "export"
             and stage.kind not in AFTER_EXPORT]
    if later:
        error(f"export comes before stage{'s' if len(later) > 1 else ''} {', '.join(later)}, so the exported "
              "dataset would not hold their result; move the export to the end (only publish may follow it)",
              "kind")


def _field_for_missing(stage) -> str | None:
    for field in ("where", "targets", "formats", "rule"):
        if field in type(stage).model_fields:
            return field
    return None
