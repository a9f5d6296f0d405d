"""Run OpenRLHF's own `train_rm.py` / `train_dpo.py` up to the dataset their defaults build, and report what it
holds: the token ids OpenRLHF's `RewardDataset` would train on, decoded.

OpenRLHF installs with `pip install --no-deps` on a CPU machine, but its model and trainer code need deepspeed
and flash-attn. So the script's `train()` runs as written (argparse defaults, `hierarchize`, `get_tokenizer`,
`blending_datasets`, `RewardDataset`) with only the model, the trainer and the distributed strategy replaced by
stand-ins; the strategy stops the script at `setup_dataloader`, the first thing that needs the real one, and
hands over the dataset.

Run in its own process (OpenRLHF is not installed in the venv; its folder comes first on sys.path):

    python openrlhf_datasets.py SPEC.json OUT.json

SPEC: {"openrlhf": folder with the installed package, "runs": [{"script": "train_rm" | "train_dpo",
"argv": [...flags]}]}. OUT: one entry per run: {"rows": [{"chosen", "rejected", "extra"}]} (`extra` is the
margin for train_rm and the prompt's token count for train_dpo) or {"error": "Type: message"}.
"""

from __future__ import annotations

import json
import runpy
import sys
import traceback
import types
from pathlib import Path


class Captured(Exception):
    def __init__(self, dataset):
        super().__init__("dataset captured")
        self.dataset = dataset


class Strategy:
    """DeepspeedStrategy's stand-in: holds the parsed args, prints, and stops at the dataloader."""

    def __init__(self, args):
        self.args = args

    def print(self, *values):
        print(*values, file=sys.stderr)

    def setup_dataloader(self, dataset, *args, **kwargs):
        raise Captured(dataset)

    def __getattr__(self, name):  # setup_distributed, get_ds_train_config, ...: nothing to do on one CPU
        if name.startswith("__"):  # pickle (datasets hashes the map function) asks for these
            raise AttributeError(name)
        return lambda *args, **kwargs: {}


class Model:
    model = None
    config = types.SimpleNamespace()

    def __init__(self, *args, **kwargs):
        pass

    def gradient_checkpointing_enable(self, **kwargs):
        pass


def stub_model_and_trainer_modules() -> None:
    """openrlhf.models and openrlhf.trainer import flash-attn/deepspeed; the dataset code needs neither."""
    models = types.ModuleType("openrlhf.models")
    models.get_llm_for_sequence_regression = lambda *args, **kwargs: Model()
    models.Actor = Model
    trainer = types.ModuleType("openrlhf.trainer")
    trainer.__path__ = []
    rm_trainer = types.ModuleType("openrlhf.trainer.rm_trainer")
    rm_trainer.RewardModelTrainer = Model
    dpo_trainer = types.ModuleType("openrlhf.trainer.dpo_trainer")
    dpo_trainer.DPOTrainer = Model
    sys.modules.update({"openrlhf.models": models, "openrlhf.trainer": trainer,
                        "openrlhf.trainer.rm_trainer": rm_trainer, "openrlhf.trainer.dpo_trainer": dpo_trainer})


def build(script: Path, argv: list[str]):
    """The dataset `script`'s train() builds from `argv`."""
    import openrlhf.utils

    openrlhf.utils.get_strategy = Strategy
    sys.argv = [str(script), *argv]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except Captured as captured:
        return captured.dataset
    raise RuntimeError("the script finished without building a dataloader")


def run(script: Path, argv: list[str]) -> dict:
    try:
        dataset = build(script, argv)
        tokenizer = dataset.tokenizer
        rows = []
        for index in range(len(dataset)):  # __getitem__ is where OpenRLHF joins prompt and answer
            chosen_ids, _, rejected_ids, _, extra = dataset[index]
            rows.append({"chosen": tokenizer.decode(chosen_ids[0].tolist()),
                         "rejected": tokenizer.decode(rejected_ids[0].tolist()), "extra": extra})
    except Exception as exc:  # noqa: BLE001 - what OpenRLHF raised is the result
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"rows": rows}


def main() -> None:
    spec_path, out_path = Path(sys.argv[1]), Path(sys.argv[2])  # before the runs replace sys.argv
    spec = json.loads(spec_path.read_text())
    sys.path.insert(0, spec["openrlhf"])
    stub_model_and_trainer_modules()
    cli = Path(spec["openrlhf"]) / "openrlhf" / "cli"
    results = [run(cli / f"{entry['script']}.py", entry["argv"]) for entry in spec["runs"]]
    out_path.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
