"""Each trainer format, checked with its consumer's own code where it installs (TRL here; OpenRLHF's
RewardDataset in tests/test_openrlhf_dataset.py, slow, as it installs OpenRLHF) and against the consumer's
documented reading rules where it does not (LLaMA-Factory pins its own stack).

The `consumer_*` helpers are shared with tests/test_publish.py, which runs them on rows downloaded from the
Hub stand-in.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path

import polars as pl
import pytest

from selfalign.prompts import load_template
from selfalign.stages.critique import CritiqueConfig
from selfalign.stages.model_calls import CRITIQUE
from selfalign.stages.export import ExportConfig, critique_prompt_from_stages, margin_setting, row_lengths
from selfalign.trainer_formats import (MARGIN_FORMATS, NEEDS, TRAINER_FORMATS, critique_reply, format_frame,
                                       llama_factory_dataset_info, percentiles, split_by_prompt)
from tests.support.fake_pipeline import fake_pipeline_yaml, load_hh_rlhf

ROOT = Path(__file__).resolve().parent.parent


def critique(text, score, index=0, model="critic", criteria=()):
    return {"text": text, "score": float(score), "sample_index": index, "model": model,
            "criterion_scores": [{"name": n, "score": float(s)} for n, s in criteria]}


def pairs() -> pl.DataFrame:
    """Canonical rows as the consistency stage leaves them: a system prompt, a multi-turn prompt, a rubric
    critique, a synthetic row and a null margin."""
    rows = [
        {"row_id": "a1", "source": "human",
         "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "How do I bake bread?"}],
         "chosen": "Mix flour, water, yeast and salt; knead; let it rise; bake at 230C.", "rejected": "Buy some.",
         "chosen_critiques": [critique("Clear steps.", 9), critique("Good.", 8, 1)],
         "rejected_critiques": [critique("Unhelpful.", 2)], "chosen_score": 8.5, "rejected_score": 2.0,
         "margin": 6.5},
        {"row_id": "b2", "source": "synthetic",
         "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Tell me a joke | with a pipe"}],
         "chosen": "Why did the chicken cross the road? To get to the other side.", "rejected": "No.",
         "chosen_critiques": [critique("Funny, harmless.", 7, 0, criteria=[("helpful", 7), ("harmless", 7)])],
         "rejected_critiques": [critique("Curt.", 3, 2, criteria=[("helpful", 2), ("harmless", 4)])],
         "chosen_score": 7.0, "rejected_score": 3.0, "margin": None},
        {"row_id": "c3", "source": "human", "prompt": [{"role": "user", "content": "2+2?"}],
         "chosen": "4", "rejected": "5", "chosen_critiques": [critique("Correct.", 10)],
         "rejected_critiques": [critique("Wrong.", 1), critique("Incorrect.", 1, 1)],
         "chosen_score": 10.0, "rejected_score": 1.0, "margin": 9.0},
    ]
    schema = {"row_id": pl.Utf8, "source": pl.Utf8,
              "prompt": pl.List(pl.Struct({"role": pl.Utf8, "content": pl.Utf8})), "chosen": pl.Utf8,
              "rejected": pl.Utf8, "chosen_critiques": pl.List(CRITIQUE), "rejected_critiques": pl.List(CRITIQUE),
              "chosen_score": pl.Float64, "rejected_score": pl.Float64, "margin": pl.Float64}
    return pl.DataFrame(rows, schema=schema)


# -- consumer checks (also used on rows downloaded from the Hub stand-in) --------------------------


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def local_tokenizer(texts: list[str]):
    """A word-level tokenizer trained on `texts`, with a chat template: no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(
        special_tokens=["<unk>", "<pad>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>"]))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
                                      eos_token="<eos>")
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def texts_of(rows: list[dict]) -> list[str]:
    out = []
    for row in rows:
        for value in row.values():
            items = value if isinstance(value, list) else [value]
            for item in items:
                if isinstance(item, dict):
                    out += [str(v) for v in item.values()]
                elif isinstance(item, str):
                    out.append(item)
    return out


def consumer_trl(rows: list[dict], implicit: bool = False) -> None:
    """TRL's own dataset helpers accept the rows as conversational preference data."""
    from trl.data_utils import extract_prompt, is_conversational, maybe_apply_chat_template

    tokenizer = local_tokenizer(texts_of(rows))
    for row in rows:
        assert is_conversational(row)
        if implicit:
            assert "prompt" not in row
            explicit = extract_prompt(row)  # what TRL does with an implicit prompt
            assert explicit["prompt"] == row["chosen"][:-1] and len(explicit["chosen"]) == 1
            assert explicit["chosen"][0]["role"] == "assistant"
        else:
            assert row["prompt"][-1]["role"] == "user"
            assert [m["role"] for m in row["chosen"]] == ["assistant"] == [m["role"] for m in row["rejected"]]
        applied = maybe_apply_chat_template({k: row[k] for k in ("prompt", "chosen", "rejected") if k in row},
                                            tokenizer)
        assert isinstance(applied["chosen"], str) and isinstance(applied["rejected"], str)
        answer = (row["chosen"][-1]["content"])
        assert answer.split()[0] in applied["chosen"]
        if "margin" in row:
            assert isinstance(row["margin"], float)


def consumer_openrlhf(rows: list[dict]) -> None:
    """OpenRLHF's reading rules (openrlhf/datasets/reward_dataset.py `preprocess_data`, 0.11) with its usual
    recipe, `--data.apply_chat_template` and no prompt key: RewardDataset renders `chosen` and `rejected` with the
    chat template as they are (so each must hold the prompt too), and DPO renders `chosen[:-1]` with the
    generation prompt and cuts it off both. The real class runs in tests/test_openrlhf_dataset.py (slow)."""
    tokenizer = local_tokenizer(texts_of(rows))
    for row in rows:
        assert "prompt" not in row  # with a prompt column users pass --data.prompt_key and train answers alone
        assert row["chosen"][:-1] == row["rejected"][:-1] and row["chosen"][:-1][-1]["role"] == "user"
        prompt = tokenizer.apply_chat_template(row["chosen"][:-1], tokenize=False, add_generation_prompt=True)
        for key in ("chosen", "rejected"):
            assert row[key][-1]["role"] == "assistant"
            full = tokenizer.apply_chat_template(row[key], tokenize=False)
            assert full.startswith(prompt) and row["chosen"][-2]["content"] in full
            assert full[len(prompt):].strip().startswith(row[key][-1]["content"].strip())
        assert isinstance(row.get("margin", 0.0), (int, float))


# LLaMA-Factory's DatasetAttr: the keys an entry of dataset_info.json may hold (data/README.md, parser.py).
LF_ENTRY_KEYS = {"hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name", "file_name",
                 "file_sha1", "formatting", "ranking", "subset", "split", "folder", "num_samples", "columns", "tags"}
LF_COLUMNS = {"prompt", "query", "response", "history", "messages", "system", "tools", "images", "videos", "audios",
              "chosen", "rejected", "kto_tag"}
LF_TAGS = {"role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag"}


def consumer_llama_factory(rows: list[dict], dataset_info: dict) -> None:
    """dataset_info.json follows LLaMA-Factory's schema for a ShareGPT preference dataset, and each row passes
    its SharegptDatasetConverter rules: optional leading system turn, then human/gpt alternating from human,
    an odd number of turns (ranking), and chosen/rejected single messages from the assistant tag."""
    assert dataset_info
    for name, entry in dataset_info.items():
        assert set(entry) <= LF_ENTRY_KEYS, set(entry) - LF_ENTRY_KEYS
        assert entry["ranking"] is True and entry["formatting"] == "sharegpt"
        assert sum(k in entry for k in ("hf_hub_url", "file_name")) == 1
        assert set(entry["columns"]) <= LF_COLUMNS and set(entry["tags"]) <= LF_TAGS
    entry = next(iter(dataset_info.values()))
    columns, tags = entry["columns"], entry["tags"]
    role, content = tags["role_tag"], tags["content_tag"]
    for row in rows:
        turns = row[columns["messages"]]
        if turns and turns[0][role] == tags["system_tag"]:
            turns = turns[1:]
        assert len(turns) % 2 == 1
        for index, turn in enumerate(turns):
            assert turn[role] == (tags["user_tag"] if index % 2 == 0 else tags["assistant_tag"])
            assert isinstance(turn[content], str)
        for key in ("chosen", "rejected"):
            message = row[columns[key]]
            assert isinstance(message, dict) and message[role] == tags["assistant_tag"]
            assert isinstance(message[content], str) and message[content]


# -- the formats -----------------------------------------------------------------------------------


def rows_of(name: str, frame: pl.DataFrame | None = None, **kwargs) -> list[dict]:
    return format_frame(name, pairs() if frame is None else frame, **kwargs).to_dicts()


def test_every_format_is_exportable_and_declares_its_columns():
    assert set(TRAINER_FORMATS) == set(NEEDS) == set(typing.get_args(typing.get_args(
        ExportConfig.model_fields["formats"].annotation)[0]))
    for name in TRAINER_FORMATS:
        frame = format_frame(name, pairs())
        assert frame.height >= 3
        for column in NEEDS[name]:  # a needed column missing fails loudly, not silently
            with pytest.raises(pl.exceptions.ColumnNotFoundError):
                format_frame(name, pairs().drop(column))
    assert ExportConfig(kind="export", formats=["cloud", "trl"]).needs() == NEEDS["cloud"]


def test_trl_explicit_prompt_rows():
    rows = rows_of("trl")
    assert rows[0]["prompt"] == pairs()["prompt"][0].to_list()
    assert rows[0]["chosen"] == [{"role": "assistant", "content": pairs()["chosen"][0]}]
    assert rows[0]["chosen_critiques"] == ["Clear steps.", "Good."]
    assert rows[1]["source"] == "synthetic"


def test_margin_is_opt_in_for_the_formats_whose_trainers_apply_it():
    """TRL's RewardTrainer subtracts `margin` whenever the column exists: by default there is none."""
    assert set(MARGIN_FORMATS) == {"trl", "trl-implicit", "openrlhf"}
    for name in MARGIN_FORMATS:
        assert "margin" not in rows_of(name)[0]
        raw = [r["margin"] for r in rows_of(name, margin="raw")]
        assert raw == [6.5, 0.0, 9.0]  # null margin -> 0.0 so trainers can batch it
        scaled = [r["margin"] for r in rows_of(name, margin="scaled", score_range=(1, 10))]
        assert scaled == pytest.approx([6.5 / 9, 0.0, 1.0])
        with pytest.raises(ValueError, match="score range"):
            rows_of(name, margin="scaled")
    for name in ("llama-factory", "critic-rm", "cloud"):  # data for people, no trainer reads it: kept raw
        assert [r["margin"] for r in rows_of(name)] == [6.5, 0.0, 9.0]


def test_margin_setting_comes_from_the_export_stage_and_its_score_scale():
    critique = CritiqueConfig(kind="critique", model="critic", score_range=(1, 5))
    assert margin_setting(None) == ("none", None)
    assert margin_setting([critique, ExportConfig(kind="export")]) == ("none", None)
    assert margin_setting([critique, ExportConfig(kind="export", margin="raw")]) == ("raw", None)
    assert margin_setting([critique, ExportConfig(kind="export", margin="scaled")]) == ("scaled", (1, 5))
    with pytest.raises(ValueError, match="no critique or feedback stage"):
        margin_setting([ExportConfig(kind="export", margin="scaled")])
    other = CritiqueConfig(kind="critique", model="critic", score_range=(1, 10))
    with pytest.raises(ValueError, match="one score scale"):
        margin_setting([critique, other, ExportConfig(kind="export", margin="scaled")])
    with pytest.raises(Exception, match="margin"):
        ExportConfig(kind="export", margin="half")


def test_trl_implicit_rows_are_whole_conversations():
    for row, original in zip(rows_of("trl-implicit"), pairs().to_dicts()):
        assert "prompt" not in row
        assert row["chosen"][:-1] == original["prompt"] == row["rejected"][:-1]
        assert row["chosen"][-1] == {"role": "assistant", "content": original["chosen"]}
        assert row["rejected"][-1] == {"role": "assistant", "content": original["rejected"]}


def test_openrlhf_rows_are_whole_conversations():
    pytest.importorskip("transformers")
    rows = rows_of("openrlhf")
    assert set(rows[0]) == {"chosen", "rejected", "source", "row_id"}
    for row, original in zip(rows, pairs().to_dicts()):
        assert row["chosen"] == original["prompt"] + [{"role": "assistant", "content": original["chosen"]}]
        assert row["rejected"] == original["prompt"] + [{"role": "assistant", "content": original["rejected"]}]
    consumer_openrlhf(rows)
    consumer_openrlhf(rows_of("openrlhf", margin="raw"))


def test_llama_factory_rows_and_dataset_info():
    rows = rows_of("llama-factory")
    assert rows[0]["conversations"] == [{"from": "system", "value": "Be kind."},
                                        {"from": "human", "value": "How do I bake bread?"}]
    assert rows[1]["chosen"] == {"from": "gpt", "value": pairs()["chosen"][1]}
    local = llama_factory_dataset_info(splits={"train": "train.parquet", "test": "test.parquet"})
    hub = llama_factory_dataset_info(hub_repo="me/prefs")
    assert set(local) == set(hub) == {"selfalign_train", "selfalign_test"}
    assert hub["selfalign_test"]["hf_hub_url"] == "me/prefs" and hub["selfalign_test"]["subset"] == "llama-factory"
    assert hub["selfalign_test"]["split"] == "test" and local["selfalign_train"]["file_name"] == "train.parquet"
    consumer_llama_factory(rows, local)
    consumer_llama_factory(rows, hub)


def test_critic_rm_and_cloud_carry_the_surviving_critiques():
    critic = rows_of("critic-rm")[2]
    assert critic["rejected_critiques"] == ["Wrong.", "Incorrect."]
    assert critic["rejected_critique_scores"] == [1.0, 1.0] and critic["chosen"] == "4"
    cloud = rows_of("cloud")[0]
    assert cloud["chosen_feedback"] == ["Clear steps.", "Good."] and cloud["rejected_feedback"] == ["Unhelpful."]
    assert cloud["chosen_score"] == 8.5 and cloud["margin"] == 6.5


def test_critique_sft_one_example_per_critique_with_the_exact_critique_prompt():
    plain = CritiqueConfig(kind="critique", model="critic")
    rubric = CritiqueConfig(kind="critique", model="critic", rubric=[
        {"name": "helpful", "description": "helps"}, {"name": "harmless", "description": "no harm"}])
    template = load_template(ROOT / "prompts" / "critique.jinja")
    render = critique_prompt_from_stages([plain], lambda value: template)
    rows = rows_of("critique-sft", critique_prompt=render)
    frame = pairs()
    assert len(rows) == sum(len(c) for c in frame["chosen_critiques"].to_list() + frame["rejected_critiques"].to_list())
    first = rows[0]
    assert first["messages"][:-1] == template.render_messages(prompt=frame["prompt"][0].to_list(),
                                                              response=frame["chosen"][0], score_min=1, score_max=10,
                                                              rubric=None)
    assert first["messages"][-1]["role"] == "assistant" and first["target"] == "chosen"
    plain.reply_model().model_validate_json(first["messages"][-1]["content"])  # what the critic was asked for
    rubric_reply = [r for r in rows if r["row_id"] == "b2"][0]["messages"][-1]["content"]
    assert json.loads(rubric_reply) == {"critique": "Funny, harmless.", "scores": {"helpful": 7, "harmless": 7}}
    rubric.reply_model().model_validate_json(rubric_reply)
    default = rows_of("critique-sft")  # no template: the built-in prompt
    assert [m["role"] for m in default[0]["messages"]] == ["user", "assistant"]
    assert critique_reply(critique("x", 7.5)) == '{"critique": "x", "score": 7.5}'


def test_split_by_prompt_keeps_each_prompt_in_one_split():
    frame = pl.concat([pairs()] * 3).with_row_index("n").with_columns(row_id=pl.col("n").cast(pl.Utf8)).drop("n")
    splits = split_by_prompt(frame, 0.5)
    train = {json.dumps(p) for p in splits["train"]["prompt"].to_list()}
    test = {json.dumps(p) for p in splits["test"]["prompt"].to_list()}
    assert not train & test and splits["train"].height + splits["test"].height == frame.height


def test_trl_helpers_accept_the_rows():
    pytest.importorskip("trl")
    consumer_trl(rows_of("trl"))
    consumer_trl(rows_of("trl-implicit"), implicit=True)
    from trl.data_utils import is_conversational

    assert all(is_conversational(row) for row in rows_of("critique-sft"))


# -- TRL's RewardTrainer: the margin it applies, the rows its max_length drops ------------------------


def reward_trainer(rows: list[dict], tokenizer, output_dir: Path, **config):
    """A RewardTrainer on the rows, unchanged (TRL tokenizes, filters and collates them itself), with a randomly
    initialised 2-layer Llama whose score head is zero: every reward is 0, so the loss is TRL's loss term alone."""
    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_config(tokenizer, num_labels=1))
    torch.nn.init.zeros_(model.score.weight)
    args = RewardConfig(output_dir=str(output_dir), per_device_train_batch_size=len(rows), report_to=[],
                        use_cpu=True, save_strategy="no", disable_tqdm=True, dataset_num_proc=None,
                        **{"max_length": 1024, **config})
    return RewardTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tokenizer)


def first_loss(trainer) -> tuple[float, dict]:
    """TRL's loss on the first batch its own dataloader and collator make."""
    import torch

    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, dict(batch)).item(), batch


def test_reward_trainer_applies_margin_only_when_the_export_asks(tmp_path):
    """TRL's own path (dataset preparation, DataCollatorForPreference, compute_loss): with no `margin` column
    the loss at equal rewards is log 2; with the raw 1-10 score difference it starts near 5."""
    pytest.importorskip("trl")
    import math

    def softplus(x):
        return math.log1p(math.exp(x))

    tokenizer = local_tokenizer(texts_of(rows_of("trl")))
    losses = {}
    for mode in ("none", "raw", "scaled"):
        for name in ("trl", "trl-implicit"):
            rows = rows_of(name, margin=mode, score_range=(1, 10))
            loss, batch = first_loss(reward_trainer(rows, tokenizer, tmp_path / f"{name}-{mode}"))
            assert ("margin" in batch) == (mode != "none")
            losses[name, mode] = loss
    assert losses["trl", "none"] == pytest.approx(math.log(2), abs=1e-5)  # -logsigmoid(0)
    assert losses["trl", "raw"] == pytest.approx((softplus(6.5) + softplus(0) + softplus(9)) / 3, abs=1e-4)  # 5.40
    assert losses["trl", "scaled"] == pytest.approx((softplus(6.5 / 9) + softplus(0) + softplus(1)) / 3, abs=1e-4)
    for mode in ("none", "raw", "scaled"):
        assert losses["trl-implicit", mode] == pytest.approx(losses["trl", mode], abs=1e-5)


def test_token_lengths_are_what_reward_trainer_tokenizes_and_drops(tmp_path):
    """The export's token lengths equal TRL's own `chosen_ids`/`rejected_ids` lengths, so `max_length` set from
    them drops exactly the rows they say (TRL drops them without a word)."""
    pytest.importorskip("trl")
    frame = pl.concat([pairs()] * 4).with_row_index("n").with_columns(
        chosen=pl.col("chosen") + pl.lit(" more") .repeat_by(pl.col("n")).list.join(""),
        row_id=pl.col("n").cast(pl.Utf8)).drop("n")
    tokenizer = local_tokenizer(texts_of(rows_of("trl", frame)) + ["more"])
    for name in ("trl", "trl-implicit"):
        rows = rows_of(name, frame)
        ours = row_lengths(name, format_frame(name, frame), tokenizer)
        trainer = reward_trainer(rows, tokenizer, tmp_path / name, max_length=None)
        theirs = [max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in trainer.train_dataset]
        assert ours == theirs and len(set(ours)) > 4
        p50 = percentiles(ours)["p50"]
        kept = reward_trainer(rows, tokenizer, tmp_path / f"{name}-cut", max_length=p50).train_dataset
        assert len(kept) == sum(n <= p50 for n in ours) < len(rows)
    chars = row_lengths("trl", format_frame("trl", frame))
    assert chars[0] == len("Be kind.") + len("How do I bake bread?") + len(pairs()["chosen"][0])


def run_export(write_pipeline, tmp_path, data, export: dict | None = None, name: str = "run") -> tuple[dict, Path]:
    """Critique 80 HH-RLHF rows and export them in three formats, with the export stage's further `export`
    options; returns the export's metrics and the run directory."""
    from selfalign.config import load_pipeline
    from selfalign.runner import run_pipeline

    path = write_pipeline(fake_pipeline_yaml("export-lengths", [
        load_hh_rlhf(data),
        {"kind": "critique", "model": "critic", "samples": 2},
        {"kind": "consistency"},
        {"kind": "export", "formats": ["trl", "openrlhf", "critique-sft"], **(export or {})},
    ]), f"{name}.yaml")
    run_pipeline(load_pipeline(path), output=tmp_path / name, limit=80, quiet=True)
    manifest = json.loads((tmp_path / name / "manifest.json").read_text())
    return manifest["rows"][-1]["metrics"], tmp_path / name


def exported(run_dir: Path, name: str) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(f) for f in sorted((run_dir / "export" / name).glob("*.parquet"))])


def test_export_metrics_give_margin_and_length_percentiles_in_the_manifest(write_pipeline, tmp_path, hh_data):
    import datasets

    metrics, run_dir = run_export(write_pipeline, tmp_path, hh_data)
    assert metrics["margin"] == "none"
    assert "margin" not in exported(run_dir, "trl").columns and "margin" not in exported(run_dir, "openrlhf").columns
    assert "margin" not in datasets.load_from_disk(str(run_dir / "dataset"))["train"].column_names
    for name in ("trl", "openrlhf", "critique-sft"):
        lengths, frame = metrics["lengths"][name], exported(run_dir, name)
        assert lengths == {"unit": "characters", "rows": frame.height, **percentiles(row_lengths(name, frame))}
        assert 0 < lengths["p50"] <= lengths["p90"] <= lengths["p99"] <= lengths["max"]
    assert metrics["lengths"]["trl"] == metrics["lengths"]["openrlhf"]  # the same conversations
    characters = metrics["lengths"]["trl"]

    tokenizer = local_tokenizer(texts_of(exported(run_dir, "trl").to_dicts()))
    tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    metrics, run_dir = run_export(write_pipeline, tmp_path, hh_data, name="tokens",
                                  export={"margin": "scaled", "tokenizer": tmp_path / "tokenizer"})
    assert metrics["margin"] == "scaled"
    trl = exported(run_dir, "trl")
    assert trl["margin"].to_list() == pytest.approx(((trl["chosen_score"] - trl["rejected_score"]) / 9).to_list())
    assert 0 < trl["margin"].min() and trl["margin"].max() <= 1
    lengths = metrics["lengths"]["trl"]
    assert lengths == {"unit": "tokens", "tokenizer": "tokenizer", "rows": trl.height,  # no local path
                       **percentiles(row_lengths("trl", trl, tokenizer))}
    assert lengths["max"] < characters["max"]  # words, not characters

    from selfalign.publish import export_run, write_card
    from selfalign.finished_run import load_run
    from selfalign.report import write_report

    # `selfalign export` (and a push, through the same build_formats) writes the margin the run's export wrote.
    export_run(load_run(run_dir), "trl", tmp_path / "exported")
    again = pl.concat([pl.read_parquet(f) for f in sorted((tmp_path / "exported").glob("*.parquet"))])
    assert sorted(again["margin"].to_list()) == pytest.approx(sorted(trl["margin"].to_list()))

    row = f"| trl | tokens (tokenizer) | {trl.height} | {lengths['p50']} | {lengths['p90']} | {lengths['p99']} | " \
          f"{lengths['max']} |"
    card = write_card(load_run(run_dir), tmp_path / "card", formats=["trl", "openrlhf"]).read_text()
    assert "## Sequence lengths" in card and row in card and "drops every pair" in card
    assert "puts a `margin` column into its loss whenever the column exists" in card
    html = write_report(run_dir).read_text()
    assert '<section id="lengths">' in html
    assert f"<td>trl</td><td>tokens (tokenizer)</td><td class=num>{trl.height}</td>" in html


def test_export_errors_name_the_field_and_the_fix(write_pipeline, tmp_path, hh_data):
    from selfalign.errors import ConfigError

    with pytest.raises(ConfigError, match=r"stage 3 \(export\): tokenizer: cannot load tokenizer .*leave tokenizer"):
        run_export(write_pipeline, tmp_path, hh_data, name="a", export={"tokenizer": "no/such-tokenizer-here"})
    from selfalign.config import load_pipeline
    from selfalign.runner import run_pipeline

    path = write_pipeline(fake_pipeline_yaml("export-lengths", [
        load_hh_rlhf(hh_data),
        {"kind": "export", "formats": ["trl"], "margin": "scaled"},
    ]), "b.yaml")
    with pytest.raises(ConfigError, match="margin: .*no critique or feedback stage"):
        run_pipeline(load_pipeline(path), output=tmp_path / "b", limit=5, quiet=True)


# -- a few real training steps (slow: imports torch + transformers + trl, builds tiny models) ------


def tiny_config(tokenizer, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **extra)


def reward_trainer_steps(rows: list[dict], output_dir: Path, steps: int = 2) -> list[dict]:
    """`RewardTrainer` on the rows, unchanged, with a randomly initialised 2-layer Llama and a local tokenizer."""
    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    torch.manual_seed(0)
    tokenizer = local_tokenizer(texts_of(rows))
    model = AutoModelForSequenceClassification.from_config(tiny_config(tokenizer, num_labels=1))
    args = RewardConfig(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=2, report_to=[],
                        use_cpu=True, logging_steps=1, save_strategy="no", max_length=1024,
                        disable_tqdm=True)
    trainer = RewardTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                            processing_class=tokenizer)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == steps and all(entry["loss"] == entry["loss"] for entry in logs)  # not NaN
    return logs


@pytest.mark.slow
def test_reward_trainer_runs_on_trl_rows(tmp_path):
    pytest.importorskip("trl")
    rows = rows_of("trl", pl.concat([pairs()] * 2))
    reward_trainer_steps(rows, tmp_path / "explicit")
    reward_trainer_steps(rows_of("trl-implicit", pl.concat([pairs()] * 2)), tmp_path / "implicit")


@pytest.mark.slow
def test_dpo_and_sft_trainers_run_on_trl_and_critique_sft_rows(tmp_path):
    pytest.importorskip("trl")
    import datasets
    import torch
    from transformers import LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    torch.manual_seed(0)
    rows = rows_of("trl", pl.concat([pairs()] * 2))
    sft_rows = rows_of("critique-sft")
    tokenizer = local_tokenizer(texts_of(rows) + texts_of(sft_rows))
    config = tiny_config(tokenizer)
    common = dict(max_steps=2, per_device_train_batch_size=2, report_to=[], use_cpu=True, logging_steps=1,
                  save_strategy="no", disable_tqdm=True)
    dpo = DPOTrainer(model=LlamaForCausalLM(config), ref_model=LlamaForCausalLM(config),
                     args=DPOConfig(output_dir=str(tmp_path / "dpo"), max_length=1024, **common),
                     train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)
    assert dpo.train().global_step == 2
    sft = SFTTrainer(model=LlamaForCausalLM(config),
                     args=SFTConfig(output_dir=str(tmp_path / "sft"), max_length=2048, **common),
                     train_dataset=datasets.Dataset.from_list(sft_rows), processing_class=tokenizer)
    assert sft.train().global_step == 2
