"""`selfalign evaluate RUN_DIR`: the evaluation (evaluate.py) of a finished run directory, with the settings of
its own evaluate stage, the command's flags and `--set` overrides; writes evaluate.json and the manifest's
`evaluation`."""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from . import report
from .atomic import write_json
from .config import apply_override, load_pipeline, override_path, shown
from .embeddings import EmbeddingSource
from .errors import ConfigError, ConfigErrors, SelfalignError
from .evaluate import (RESULT_FILE, EvaluateSettings, EvaluationError, RunView, evaluate_stages, run_state,
                       summary)
from .finished_run import load_run
from .paths import resolve_path
from .rundir import MANIFEST, PIPELINE_COPY, RunLock, read_manifest


def settings_from_run(configs: list[Any] | None) -> dict[str, Any]:
    """The run's own evaluate stage's settings (what `selfalign evaluate` starts from), else {}."""
    stage = next((s for s in configs or [] if getattr(s, "kind", None) == "evaluate"), None)
    return stage.model_dump(exclude={"kind"}, exclude_unset=True) if stage is not None else {}


def settings_with(base: dict[str, Any], overrides: list[str]) -> EvaluateSettings:
    """`base` (the run's evaluate stage, or nothing) with `--set path=value` overrides applied and validated;
    each error names the --set that wrote the value."""
    data = copy.deepcopy(base)
    for assignment in overrides:
        apply_override(data, assignment)
    if isinstance(data.get("embedding"), dict):
        data["embedding"].setdefault("source", "llamacpp")  # as the default embedding is, when only its fields are set
    try:
        return EvaluateSettings.model_validate(data)
    except ValidationError as exc:
        errors = []
        for error in exc.errors():
            # Without the discriminator's tag: embedding.llamacpp.n_ctx is embedding.n_ctx in the file.
            loc = [str(part) for i, part in enumerate(error["loc"]) if not (i == 1 and error["loc"][0] == "embedding")]
            blamed = next((a for a in reversed(overrides) if tuple(loc[:len(override_path(a))]) == override_path(a)
                           or tuple(loc) == override_path(a)[:len(loc)]), None)
            message = error["msg"]
            if error["type"] == "extra_forbidden":
                owner = EvaluateSettings
                for part in loc[:-1]:
                    annotation = getattr(owner.model_fields.get(part), "annotation", None)
                    owner = next((a for a in getattr(annotation, "__args__", (annotation,))
                                  if hasattr(a, "model_fields")), None) or owner
                close = difflib.get_close_matches(loc[-1], list(owner.model_fields), n=1)
                message = "unknown key" + (f"; did you mean {close[0]!r}?" if close else
                                           f"; allowed: {', '.join(owner.model_fields)}")
            place = f"--set {shown(blamed)}" if blamed else "the run's evaluate stage (RUN_DIR/pipeline.yaml)"
            errors.append(ConfigError(message, file=place, field=".".join(loc)))
        raise ConfigErrors(errors) from None


def flag_overrides(args) -> list[str]:
    """`selfalign evaluate` flags as --set assignments (so they are checked and blamed the same way)."""
    overrides = []
    if args.eval:
        if not args.eval_format:
            raise EvaluationError("--eval needs --eval-format (hh-rlhf or trl): how the held-out pairs are written")
        where = {"hf": args.eval[3:]} if args.eval.startswith("hf:") else {"path": args.eval}
        overrides.append(f"eval={json.dumps({**where, 'format': args.eval_format})}")
    elif args.eval_format:
        raise EvaluationError("--eval-format describes --eval's file; give --eval FILE|hf:ID too")
    for flag, key in (("reward_model", "reward_model"), ("seeds", "seeds"), ("budget", "budget")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={json.dumps(getattr(args, flag))}")
    return overrides


def evaluate_run_dir(run_dir: str | Path, settings: EvaluateSettings | None = None, overrides: list[str] = (),
                     source: EmbeddingSource | None = None, log: Callable[[str], None] = lambda m: None) \
        -> dict[str, Any]:
    """Evaluate a finished run: RUN_DIR/evaluate.json, and `evaluation` in its manifest. Holds the run's lock,
    so no `selfalign run` writes the directory meanwhile."""
    run_dir = Path(run_dir)
    data = report.load_run(run_dir)  # every stage's kept and dropped rows; refuses an unfinished run
    run = load_run(run_dir)  # the pipeline's validated stages, when its YAML still loads
    stages = run.stages
    if run.loaded is not None and data.manifest["overrides"]:
        try:  # the stages as the run had them: its --set overrides (test_size, an evaluate stage's settings)
            stages = load_pipeline(run.loaded.path, data.manifest["overrides"]).pipeline.stages
        except SelfalignError:
            pass
    if settings is None:
        settings = settings_with(settings_from_run(stages), list(overrides))
    pipeline_path = run.loaded.path if run.loaded is not None else run_dir / PIPELINE_COPY
    view = RunView(run.name, run_dir, data.stages, stages, lambda value: resolve_path(value, pipeline_path),
                   run_state(data.manifest["config_sha256"], data.manifest["rows_out"]))
    with RunLock(run_dir):
        result = evaluate_stages(view, settings, source=source, log=log)
        write_json(result, run_dir / RESULT_FILE)
        manifest = read_manifest(run_dir)
        manifest["evaluation"] = summary(result)
        write_json(manifest, run_dir / MANIFEST)
    return result
