"""publish: push the rows to the Hugging Face Hub at the end of a run, as `selfalign push` does.

```yaml
  - kind: publish
    formats: [trl, openrlhf, critic-rm]   # default: every format the rows support
    hub: {repo: my-org/my-prefs, private: true, language: [en],
          source_license: mit, source_attribution: "Anthropic HH-RLHF (Bai et al. 2022)"}
```

Each format becomes a `datasets` config; the configs, the dataset card, its histograms and the pipeline go up
in one commit (a failed push deletes a repo it created). `language:` is required to push (the card must say
it); the licenses are what the card declares. The token comes from `HF_TOKEN` or the `huggingface_hub` login,
never from the YAML. The split is the preceding export stage's (same prompt hash and test_size) unless
`test_size` is given here.
"""

from __future__ import annotations

from typing import Any, Literal

import polars as pl
from pydantic import Field

from ..config_base import Strict
from ..manifest import RunContents
from ..trainer_formats import NEEDS, FormatName, split_by_prompt
from .base import StageConfig, StageContext, StageOutput


class HubTarget(Strict):
    repo: str = Field(pattern=r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$",
                      description="dataset repo id, NAMESPACE/NAME")
    private: bool = Field(True, description="create the repo private (the default); false to make it public")
    license: str = Field("other", description="license in the card metadata, e.g. mit, apache-2.0, cc-by-4.0")
    # Optional in the schema so that the error can say how to add it: check.py refuses a publish stage without
    # `language` before any model call (and `selfalign push` refuses one without --language).
    license_name: str | None = Field(None, description="with license: other, an id for it, e.g. my-license-1.0")
    license_link: str | None = Field(None, description="with license: other, LICENSE (a file in the repo) or a URL")
    language: list[str] | None = Field(None, description="language(s) of the data, ISO 639 codes, e.g. [en]")
    source_license: str | None = Field(None, description="license of the input data, e.g. mit")
    source_attribution: str | None = Field(None, description="credit for the input data, e.g. its authors and paper")

    def card_options(self) -> dict[str, Any]:
        """The fields `publish.CardOptions` takes, as declared (unset ones left out)."""
        return self.model_dump(exclude={"repo", "private"}, exclude_none=True)


class PublishConfig(StageConfig):
    kind: Literal["publish"]
    formats: list[FormatName] | None = Field(None, min_length=1,
                                             description="default: every format the rows support")
    hub: HubTarget
    test_size: float | None = Field(None, ge=0, lt=1, description="default: the export stage's, else 0.1")

    def needs(self) -> set[str]:
        return set().union(*(NEEDS[f] for f in self.formats)) if self.formats else {"prompt", "chosen", "rejected"}


def _stage_index(config: PublishConfig, ctx: StageContext) -> int:
    for index, stage in enumerate(ctx.loaded.pipeline.stages):
        if stage is config:
            return index
    return len(ctx.loaded.pipeline.stages)  # called on its own, after the pipeline's stages


def run(df: pl.DataFrame, config: PublishConfig, ctx: StageContext) -> StageOutput:
    from ..publish import CardOptions, push_frames, run_splits

    index = _stage_index(config, ctx)
    manifest = ctx.manifest_so_far(index)  # the runner's manifest: the run's real start time and duration so far
    manifest["rows"].append({"stage": index, "kind": "publish", "in": df.height, "out": df.height, "dropped": 0,
                             "drop_reasons": {}, "seconds": 0.0, "agreement_with_human": None, "metrics": {},
                             "model_calls": {"requested": 0, "cached": 0, "sent": 0, "failed": 0},
                             "tokens": {"prompt": 0, "completion": 0}})
    manifest["rows_out"] = df.height
    try:
        text = ctx.loaded.path.read_text(encoding="utf-8")
    except OSError:
        text = None
    publish_run = RunContents(ctx.run_dir, manifest, df, pipeline_text=text, pipeline_file=str(ctx.loaded.path),
                              pipeline_matches_run=ctx.loaded.file_alone_matches(), loaded=ctx.loaded)
    if config.test_size is not None:
        splits = {k: v for k, v in split_by_prompt(df, config.test_size).items() if v.height or k == "train"}
    else:
        splits = run_splits(publish_run)
    result = push_frames(publish_run, config.hub.repo, private=config.hub.private, formats=config.formats,
                         options=CardOptions(**config.hub.card_options()), splits=splits, log=ctx.progress.log)
    return StageOutput(df, metrics={"published": {"repo": result["repo_id"], "private": result["private"],
                                                  "configs": result["configs"]}})
