"""Where a path written in a pipeline file points: the current directory, beside the pipeline, or the checkout."""

from __future__ import annotations

from pathlib import Path

# The selfalign checkout (or installed tree): the bundled prompts/ live here.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def resolve_path(value: str, pipeline_path: Path) -> Path:
    """Relative paths are looked up in the current directory, then beside the pipeline file, then in the
    selfalign checkout (for the bundled prompts/)."""
    path = Path(value)
    if path.is_absolute():
        return path
    candidates = [Path.cwd() / path, pipeline_path.parent / path, PROJECT_ROOT / path]
    return next((c for c in candidates if c.exists()), candidates[0])
