"""evaluate: at the end of a pipeline, measure whether the run's data makes a better reward model.

```yaml
  - kind: evaluate                 # after export; only export or publish may follow
    eval: {path: data/heldout.jsonl, format: hh-rlhf}   # default: the run's own split of the human prompts
    reward_model: probe            # probe (CPU, default) | finetune (TRL RewardTrainer, finetune: {model: DIR})
    embedding: {source: llamacpp}  # or {source: openai, base_url: ..., model: ...} | {source: transformers, path: DIR}
    seeds: 5
```

The same library function as `selfalign evaluate RUN_DIR` (evaluate.py), on the frames the earlier stages
wrote into the run directory: RUN_DIR/evaluate.json, features cached in RUN_DIR/features.sqlite (a re-run
embeds nothing), and the summary in this stage's metrics (manifest.json, the report and the dataset card).
The rows pass through unchanged.
"""

from __future__ import annotations

from typing import Literal

import polars as pl

from ..evaluate import RESULT_FILE, EvaluateSettings, RunView, evaluate_stages, run_state, summary
from ..rundir import DROPPED, stage_path
from .base import StageConfig, StageContext, StageOutput

# Stages that may follow an evaluate: they do not change the rows it measured.
AFTER_EVALUATE = {"export", "publish"}


class EvaluateConfig(EvaluateSettings, StageConfig):
    kind: Literal["evaluate"]

    def needs(self) -> set[str]:
        return {"prompt", "chosen", "rejected"}

    def settings(self) -> EvaluateSettings:
        return EvaluateSettings.model_validate(self.model_dump(exclude={"kind"}))


def check_evaluate(stages: list, index: int, resolve, error) -> None:
    """What `selfalign validate` can know before a run: the stages after it, the files it names, the packages."""
    import importlib.util

    config = stages[index]
    later = [f"{i} ({stage.kind})" for i, stage in enumerate(stages) if i > index and stage.kind not in AFTER_EVALUATE]
    if later:
        error(f"evaluate comes before stage{'s' if len(later) > 1 else ''} {', '.join(later)}, which change the rows "
              "it would measure; move it to the end (only export or publish may follow it)", "kind")
    if any(stage.kind == "evaluate" for stage in stages[:index]):
        error("a second evaluate stage: keep one (it writes RUN_DIR/evaluate.json)", "kind")
    if config.eval is None and stages[0].kind == "load" and getattr(stages[0], "format", None) in ("prompts",
                                                                                                  "feedback"):
        error("the input has no human pairs to hold out; give `eval:` (held-out human pairs, e.g. "
              "eval: {path: heldout.jsonl, format: hh-rlhf})", "eval")
    if config.eval is not None and config.eval.path is not None and not resolve(config.eval.path).is_file():
        error(f"file {config.eval.path!r} not found (looked in the current directory and beside the pipeline); "
              "fix eval.path", "eval.path")
    if config.reward_model == "probe":
        if importlib.util.find_spec("sklearn") is None:
            error("reward_model: probe needs scikit-learn: pip install 'selfalign[evaluate]'", "reward_model")
        embedding = config.embedding
        if embedding.source == "transformers" and not (resolve(embedding.path) / "config.json").is_file():
            error(f"{embedding.path!r} is not a local model folder (no config.json); models are never downloaded "
                  "here: give a folder saved with save_pretrained", "embedding.path")
        if embedding.source == "llamacpp" and embedding.model_path and not resolve(embedding.model_path).is_file():
            error(f"model file {embedding.model_path!r} not found; fix embedding.model_path", "embedding.model_path")
    else:
        for package in ("trl", "torch", "transformers"):
            if importlib.util.find_spec(package) is None:
                error(f"reward_model: finetune needs {package}: pip install 'selfalign[finetune]'", "reward_model")
        if not (resolve(config.finetune.model) / "config.json").is_file():
            error(f"{config.finetune.model!r} is not a local model folder (no config.json); give a folder saved with "
                  "save_pretrained", "finetune.model")


def _earlier_stages(ctx: StageContext, index: int):
    """The frames stages 0..index-1 wrote into the run directory: (index, kind, kept, dropped or None)."""
    stages = []
    for number, stage in enumerate(ctx.loaded.pipeline.stages[:index]):
        dropped = stage_path(ctx.run_dir, number, stage.kind, DROPPED)
        stages.append((number, stage.kind, pl.read_parquet(stage_path(ctx.run_dir, number, stage.kind)),
                       pl.read_parquet(dropped) if dropped.exists() else None))
    return stages


def run(df: pl.DataFrame, config: EvaluateConfig, ctx: StageContext) -> StageOutput:
    from ..atomic import write_json

    stages = ctx.loaded.pipeline.stages
    index = next(i for i, stage in enumerate(stages) if stage is config)
    config_sha256 = ctx.manifest_so_far(index)["config_sha256"]
    view = RunView(ctx.loaded.pipeline.name, ctx.run_dir, _earlier_stages(ctx, index), stages, ctx.resolve,
                   run_state(config_sha256, df.height))
    place = {**ctx.loaded.place("stages", index), "stage": index, "kind": "evaluate"}
    result = evaluate_stages(view, config.settings(), log=ctx.progress.log, place=place)
    write_json(result, ctx.run_dir / RESULT_FILE)
    return StageOutput(df, metrics={"evaluation": summary(result)})
