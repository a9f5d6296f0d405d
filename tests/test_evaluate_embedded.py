"""`selfalign evaluate` with real models on real HH-RLHF pairs (slow).

The embedded llama.cpp model's embeddings feed the probe on a few hundred HH-RLHF pairs: it must run end to
end, resume for free (no text embedded twice, the model not even loaded), and give honest intervals (holding
the estimate, as wide as the held-out count allows); not any particular accuracy. `finetune` trains a tiny
random reward model with TRL's RewardTrainer on the CPU, the same arms and held-out pairs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from selfalign import evaluate, evaluate_arms, evaluate_run
from selfalign.cli import main
from selfalign.config import load_pipeline
from selfalign.runner import run_pipeline

ROOT = Path(__file__).resolve().parent.parent
HH_DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-test-1500.jsonl.gz"
ROWS = 200


@pytest.fixture(scope="module")
def hh_run(tmp_path_factory) -> Path:
    """Critic-RM on the first 200 HH-RLHF pairs with a fake critic (random scores), as a finished run."""
    if not HH_DATA.exists():
        pytest.fail(f"{HH_DATA} is missing: the tests need ../shared/data beside the project (CI has it)")
    run_dir = tmp_path_factory.mktemp("hh") / "run"
    overrides = ["models.critic.backend=fake", f"stages.0.path={HH_DATA}", "stages.0.on_bad_row=drop",
                 "stages.2.min_margin=0"]
    run_pipeline(load_pipeline(ROOT / "pipelines" / "critic_rm.yaml", overrides), output=run_dir, limit=ROWS,
                 quiet=True)
    return run_dir


class Counting:
    """An embedding source that counts the texts it is asked to embed and whether its model was loaded."""

    def __init__(self, inner):
        self.inner, self.identity, self.texts, self.loaded = inner, inner.identity, 0, False

    def embed(self, texts):
        self.texts += len(texts)
        self.loaded = True
        return self.inner.embed(texts)

    def close(self):
        self.inner.close()


def binomial_width(p: float, n: int) -> float:
    return 2 * 1.96 * math.sqrt(max(p * (1 - p), 1e-9) / n)


@pytest.mark.slow
def test_probe_on_the_embedded_model_runs_resumes_for_free_and_is_honest(hh_run, monkeypatch, capsys):
    sources, real = [], evaluate.embedder_for

    def counting_source(config, resolve):
        sources.append(Counting(real(config, resolve)))
        return sources[-1]

    monkeypatch.setattr(evaluate, "embedder_for", counting_source)
    args = ["evaluate", str(hh_run), "--seeds", "3", "--set", "holdout=0.25", "--set", "embedding.n_threads=2"]
    assert main(args) == 0
    first_out = capsys.readouterr().out
    result = json.loads((hh_run / "evaluate.json").read_text())
    assert sources[0].texts == result["features"]["computed"] > 0
    assert result["features"]["source"]["model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert result["features"]["dims"] == 576

    held = result["held_out"]["pairs"]
    assert held >= 30
    by_name = {arm["name"]: arm for arm in result["arms"]}
    assert all(by_name[name]["available"] for name in evaluate_arms.ARMS)
    assert len({arm["budget"] for arm in by_name.values()}) == 1
    for arm in by_name.values():
        low, high = arm["ci"]
        assert low <= arm["accuracy"] <= high, arm
        width = high - low
        assert 0.3 * binomial_width(arm["accuracy"], held) <= width <= 1.25 * binomial_width(arm["accuracy"], held), \
            (arm, held)
        assert len(arm["seed_accuracies"]) == 3
    for difference in result["differences"]:
        low, high = difference["ci"]
        assert low <= difference["difference"] <= high and high - low > 0

    # resume: every feature from the cache, the model never loaded, the same numbers
    assert main(args) == 0
    again = json.loads((hh_run / "evaluate.json").read_text())
    assert sources[1].texts == 0 and not sources[1].loaded
    assert again["features"]["computed"] == 0 and again["features"]["cached"] == result["features"]["texts"]
    assert again["arms"] == result["arms"]
    assert capsys.readouterr().out == first_out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama reward model (one label) with SmolLM2's tokenizer, saved locally."""
    pytest.importorskip("trl")
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig

    from tests.support.smollm2_hf import find_smollm2_gguf

    gguf = find_smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("models") / "tiny-reward-model"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_finetune_trains_a_tiny_reward_model_on_cpu(hh_run, tiny_model, capfd):
    finetune = {"model": str(tiny_model), "steps": 4, "batch_size": 4, "max_length": 256, "learning_rate": 1e-3}
    settings = ["reward_model=finetune", f"finetune={json.dumps(finetune)}", "seeds=2", "holdout=0.25"]
    result = evaluate_run.evaluate_run_dir(hh_run, overrides=settings)
    assert result["reward_model"]["kind"] == "finetune" and result["reward_model"]["steps"] == 4
    assert result["features"] is None
    by_name = {arm["name"]: arm for arm in result["arms"]}
    assert all(by_name[name]["available"] for name in evaluate_arms.ARMS)
    assert len({arm["budget"] for arm in by_name.values()}) == 1
    for arm in by_name.values():
        assert arm["ci"][0] <= arm["accuracy"] <= arm["ci"][1]
        assert len(arm["seed_accuracies"]) == 2
    assert not list(hh_run.glob(".finetune-*"))  # the trainer's scratch folders are gone
    out, err = capfd.readouterr()
    assert "train_runtime" not in out and "Tokenizing" not in err  # no library chatter


@pytest.mark.slow
def test_probe_on_a_local_transformers_model(hh_run, tiny_model, tmp_path):
    """embedding.source transformers: the tiny model's mean-pooled hidden states (its base model), cached."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(hh_run, run_dir)
    (run_dir / "features.sqlite").unlink(missing_ok=True)
    settings = [f"embedding={json.dumps({'source': 'transformers', 'path': str(tiny_model), 'batch_size': 8})}",
                "seeds=2", "holdout=0.25"]
    result = evaluate_run.evaluate_run_dir(run_dir, overrides=settings)
    assert result["features"]["dims"] == 32 and result["features"]["computed"] == result["features"]["texts"] > 0
    assert result["features"]["source"]["model"] == "tiny-reward-model"
    again = evaluate_run.evaluate_run_dir(run_dir, overrides=settings)
    assert again["features"]["computed"] == 0 and again["arms"] == result["arms"]
