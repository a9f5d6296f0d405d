"""The `finetune` reward model of an evaluation: TRL's RewardTrainer on a small local model.

For each arm and seed, a fresh copy of `finetune.model` (AutoModelForSequenceClassification, one label) trains
for exactly `steps` optimizer steps on the arm's drawn pairs (cycled when there are fewer pairs than
steps x batch_size), in TRL's conversational format with the tokenizer's chat template, as `selfalign export
--format trl` rows train. It then scores each held-out conversation (prompt + answer, the same chat template,
cut to its last `max_length` tokens); the pair is right when the human-chosen answer scores higher.

Runs on a GPU when there is one (`device: auto`), else on the CPU (a tiny model in the slow test).
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import polars as pl
from pydantic import Field

from .errors import RunError
from .config_base import Strict


class FinetuneSettings(Strict):
    """TRL's RewardTrainer on a small model for a fixed number of steps, a fresh copy per arm and seed."""

    model: str = Field(description="a local model folder (weights, config, tokenizer with a chat template), "
                                   "loaded as AutoModelForSequenceClassification with one label")
    steps: int = Field(100, ge=1, le=1_000_000, description="optimizer steps per arm and seed")
    batch_size: int = Field(8, ge=1, le=4096, description="pairs per step")
    learning_rate: float = Field(1e-5, gt=0, le=1, description="AdamW learning rate")
    max_length: int = Field(512, ge=16, description="tokens per conversation; longer ones keep their end")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: a GPU when there is one")


@contextlib.contextmanager
def quiet_libraries():
    """No progress bars from datasets (tokenizing) and transformers (loading weights) for the duration: the
    evaluation logs its own progress, and --quiet means quiet. Both switches are global, so they are put back."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging

    datasets_was_off = are_progress_bars_disabled()
    transformers_was_on = logging.is_progress_bar_enabled()
    disable_progress_bars()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if not datasets_was_off:
            enable_progress_bars()
        if transformers_was_on:
            logging.enable_progress_bar()


class FinetuneModel:
    def __init__(self, settings, resolve: Callable[[str], Path], run_dir: Path, log: Callable[[str], None]):
        try:
            import torch  # noqa: F401
            import trl  # noqa: F401
            from transformers import AutoTokenizer
        except ImportError:
            raise RunError("reward_model: finetune needs torch, transformers and trl: "
                           "pip install 'selfalign[finetune]'") from None
        self.settings, self.log = settings, log
        self.path = resolve(settings.model)
        if not (self.path / "config.json").is_file():
            raise RunError(f"finetune.model {settings.model!r} is not a local model folder (no config.json in "
                           f"{self.path}); give a folder saved with save_pretrained")
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        if not self.tokenizer.chat_template:
            raise RunError(f"the tokenizer in {self.path} has no chat template; TRL renders conversational pairs "
                           "with one: use the folder of a chat (instruct) model")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.run_dir = run_dir

    def _device(self) -> str:
        import torch

        if self.settings.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.settings.device

    def _rows(self, frame: pl.DataFrame) -> list[dict[str, Any]]:
        needed = self.settings.steps * self.settings.batch_size
        rows = [{"prompt": list(p), "chosen": [{"role": "assistant", "content": c}],
                 "rejected": [{"role": "assistant", "content": r}]}
                for p, c, r in frame.select("prompt", "chosen", "rejected").iter_rows()]
        # Cycled, not padded or cut: every arm gets the same number of steps whatever its budget.
        return (rows * (needed // len(rows) + 1))[:needed]

    def _ids(self, prompt: list[dict[str, str]], answer: str) -> list[int]:
        ids = self.tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": answer}],
                                                 tokenize=True, return_dict=True)["input_ids"]
        return ids[-self.settings.max_length:]

    def scores(self, train: pl.DataFrame, held_out: pl.DataFrame, seed: int) -> np.ndarray:
        import datasets
        import torch
        from transformers import AutoModelForSequenceClassification
        from transformers.trainer_callback import PrinterCallback
        from trl import RewardConfig, RewardTrainer

        device = self._device()
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(str(self.path), num_labels=1,
                                                                   local_files_only=True)
        model.config.pad_token_id = self.tokenizer.pad_token_id
        with tempfile.TemporaryDirectory(prefix=".finetune-", dir=self.run_dir) as output_dir:
            args = RewardConfig(output_dir=output_dir, max_steps=self.settings.steps,
                                per_device_train_batch_size=self.settings.batch_size,
                                learning_rate=self.settings.learning_rate, seed=seed, data_seed=seed,
                                max_length=self.settings.max_length, use_cpu=device == "cpu", report_to=[],
                                save_strategy="no", logging_steps=max(1, self.settings.steps // 4),
                                disable_tqdm=True)
            with quiet_libraries():
                trainer = RewardTrainer(model=model, args=args,
                                        train_dataset=datasets.Dataset.from_list(self._rows(train)),
                                        processing_class=self.tokenizer)
                trainer.remove_callback(PrinterCallback)  # it prints every log dict on stdout
                trainer.train()
        model = trainer.model.eval()
        out = []
        with torch.no_grad():
            for prompt, chosen, rejected in held_out.select("prompt", "chosen", "rejected").iter_rows():
                rewards = [model(input_ids=torch.tensor([self._ids(prompt, answer)], device=model.device)).logits[0, 0]
                           for answer in (chosen, rejected)]
                out.append(float(rewards[0] - rewards[1]))
        return np.asarray(out)
