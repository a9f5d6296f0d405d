"""`selfalign render`: the exact chat messages a stage would send for one row, without calling a model."""

from __future__ import annotations

import json
from pathlib import Path

from .cache import Cache
from .check import check_pipeline
from .config import load_pipeline
from .errors import ConfigErrors, RunError
from .progress import Progress
from .rundir import CACHE
from .runner import RunContext, run_dir_for, run_stages
from .stages import STAGES, model_stage_kinds


def render(file: str, stage: int, row: int, overrides: list[str] = (), output: str | None = None) -> str:
    loaded = load_pipeline(file, overrides)
    errors = check_pipeline(loaded)
    if errors:
        raise ConfigErrors(errors)
    stages = loaded.pipeline.stages
    if not 0 <= stage < len(stages):
        raise RunError(f"--stage {stage}: the pipeline has stages 0..{len(stages) - 1}")
    kind = stages[stage].kind
    if STAGES[kind].build_requests is None:
        model_stages = [f"{i} ({s.kind})" for i, s in enumerate(stages) if s.kind in model_stage_kinds()]
        raise RunError(f"stage {stage} ({kind}) sends no model calls; model stages: {', '.join(model_stages)}")
    run_dir = run_dir_for(loaded, output)
    cache_path = run_dir / CACHE
    cache = Cache(cache_path) if cache_path.exists() else None
    # Earlier model stages are served from the run's cache only: render never pays for a call.
    ctx = RunContext(loaded, run_dir, cache, Progress(quiet=True), limit=row + 1 if stage == 1 else None, offline=True)
    try:
        df, _ = run_stages(ctx, stop_before=stage, write=False)
        if row >= df.height:
            raise RunError(f"--row {row}: stage {stage} gets only {df.height} row(s) as input")
        requests = STAGES[kind].build_requests(df[row:row + 1], stages[stage], ctx)
    finally:
        ctx.close()
        if cache is not None:
            cache.close()
    blocks, seen = [], {}
    for request in requests:
        key = json.dumps(request.messages)
        seen.setdefault(key, []).append(request)
    for number, group in enumerate(seen.values(), start=1):
        first = group[0]
        header = (f"=== request {number} of {len(seen)} (stage {stage} {kind}, row {row}; samples "
                  f"{', '.join(str(r.sample_index) for r in group)}; {json.dumps(first.sampling.as_dict())}) ===")
        parts = [header]
        for message in first.messages:
            parts.append(f"--- {message['role']} ---\n{message['content']}")
        if first.json_schema:
            parts.append(f"--- reply schema ---\n{json.dumps(first.json_schema)}")
        blocks.append("\n".join(parts))
    return "\n\n".join(blocks)
