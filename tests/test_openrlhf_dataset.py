"""The `openrlhf` export read by OpenRLHF's own code: `RewardDataset` as `train_rm.py` and `train_dpo.py` build it
from their argparse defaults and the flags the usage text prints (tests/support/openrlhf_datasets.py).

Slow: it installs OpenRLHF with `pip install --no-deps` into a cache folder (the network is needed once; a
failed install fails the test with pip's words) and imports torch, transformers and datasets in a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from selfalign.stages.export import write_format
from selfalign.trainer_formats import USAGE, format_frame, split_by_prompt
from tests.test_trainer_formats import pairs

OPENRLHF = "0.11.2"
PYLATEXENC = "2.10"  # `import openrlhf.utils` imports it (math_utils); --no-deps leaves it out
HARNESS = Path(__file__).parent / "support" / "openrlhf_datasets.py"


def openrlhf_folder() -> Path:
    """OpenRLHF installed with --no-deps into a cached folder (built beside it, then renamed into place)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "selfalign-tests" / f"openrlhf-{OPENRLHF}"
    if (cache / ".installed").is_file():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".openrlhf.", dir=cache.parent))
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-input", "--disable-pip-version-check",
               "--target", str(tmp), f"openrlhf=={OPENRLHF}", f"pylatexenc=={PYLATEXENC}"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        result = subprocess.CompletedProcess(command, 1, "", "pip did not finish within 900 s")
    if result.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        said = "\n".join((result.stdout + result.stderr).strip().splitlines()[-8:])
        pytest.fail(f"could not install OpenRLHF {OPENRLHF} with `{' '.join(command[2:])}`: this test needs PyPI "
                    f"once (then it is cached in {cache}). pip said:\n{said}", pytrace=False)
    (tmp / ".installed").write_text(f"openrlhf=={OPENRLHF} pylatexenc=={PYLATEXENC}\n")
    try:
        os.rename(tmp, cache)
    except OSError:  # another run installed it first
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def chat_tokenizer(directory: Path):
    """SmolLM2's real tokenizer and ChatML template, from the GGUF the dev extra bundles (no download)."""
    from transformers import AutoTokenizer

    from tests.support.smollm2_hf import find_smollm2_gguf

    gguf = find_smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def usage_flags(export_dir: Path) -> list[str]:
    """The flags the usage text (dataset card, README) tells OpenRLHF users to pass, for this export folder."""
    match = re.search(r"`(--data\.dataset REPO@openrlhf[^`]*)`", USAGE["openrlhf"])
    assert match, USAGE["openrlhf"]
    return match.group(1).replace("REPO", str(export_dir)).split()


def export(directory: Path, **options) -> Path:
    """`<directory>/openrlhf/train.parquet` as the export stage writes it; returns the export folder."""
    write_format(split_by_prompt(format_frame("openrlhf", pairs(), **options), 0), "openrlhf",
                 directory / "openrlhf")
    return directory


def run_openrlhf(folder: Path, runs: list[dict], tmp_path: Path) -> list[dict]:
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps({"openrlhf": str(folder), "runs": runs}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(HARNESS), str(spec), str(out)], capture_output=True, text=True,
                            timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_openrlhf_reward_dataset_trains_on_whole_conversations(tmp_path):
    folder = openrlhf_folder()
    tokenizer = chat_tokenizer(tmp_path / "tokenizer")
    plain = usage_flags(export(tmp_path / "plain"))
    margin = usage_flags(export(tmp_path / "margin", margin="raw"))
    assert "--data.prompt_key" not in plain and "--model.margin_loss_enable" in USAGE["openrlhf"]
    model = ["--model.model_name_or_path", str(tmp_path / "tokenizer")]
    rm, rm_margin, dpo = run_openrlhf(folder, [
        {"script": "train_rm", "argv": model + plain},
        {"script": "train_rm", "argv": model + margin + ["--model.margin_loss_enable"]},
        {"script": "train_dpo", "argv": model + ["--ref.model_name_or_path", str(tmp_path / "tokenizer")] + plain},
    ], tmp_path)
    originals = pairs().to_dicts()
    for result in (rm, rm_margin, dpo):
        assert "rows" in result, result
        assert len(result["rows"]) == len(originals)
        for row, original in zip(result["rows"], originals):
            for key in ("chosen", "rejected"):
                text = row[key]
                # The whole conversation, in order: every prompt message, then this answer, then EOS.
                position = 0
                for content in [m["content"] for m in original["prompt"]] + [original[key]]:
                    found = text.find(content, position)
                    assert found >= 0, (content, text)
                    position = found + len(content)
                assert text.endswith(tokenizer.eos_token)
    assert [row["extra"] for row in rm["rows"]] == [0, 0, 0]  # no margin column by default
    assert [row["extra"] for row in rm_margin["rows"]] == [6.5, 0.0, 9.0]
    for row, original in zip(dpo["rows"], originals):  # DPO splits the prompt off exactly where it ends
        prompt = tokenizer.apply_chat_template(original["prompt"], tokenize=False, add_generation_prompt=True)
        assert row["extra"] == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
