"""Loading human preference data in its many shapes, and failing clearly on bad rows."""

import gzip
import json

import pytest

from selfalign.errors import DataError
from selfalign.input_formats import from_prompts, from_trl, parse_hh_transcript
from selfalign.stages.load import LoadConfig, run as load


class Ctx:
    def __init__(self, limit=None):
        self.limit = limit

    def resolve(self, value):
        from pathlib import Path
        return Path(value)


def load_rows(path, fmt, **options):
    config = LoadConfig(kind="load", path=str(path), format=fmt, **options)
    return load(None, config, Ctx())


def test_hh_transcript_parses_turns():
    turns = parse_hh_transcript("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: so.", "chosen")
    assert turns == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                     {"role": "user", "content": "how?"}, {"role": "assistant", "content": "so."}]


def test_real_hh_rlhf_file_loads_all_rows(hh_data):
    output = load_rows(hh_data, "hh-rlhf", on_bad_row="drop")
    df = output.kept
    assert df.height + output.dropped.height == 1500
    assert df.height > 1400
    assert df["row_id"].n_unique() == df.height
    first = json.loads(gzip.open(hh_data, "rt").readline())
    row = df.row(0, named=True)
    assert first["chosen"].endswith(row["chosen"])
    assert first["rejected"].endswith(row["rejected"])
    assert row["prompt"][0]["role"] == "user"
    multi_turn = df.filter(df["prompt"].list.len() > 1).height
    assert multi_turn / df.height > 0.5  # about 70% of HH-RLHF is multi-turn


def test_trl_standard_conversational_and_implicit_prompt():
    standard = from_trl({"prompt": "q", "chosen": "a", "rejected": "b"})
    conversational = from_trl({"prompt": [{"role": "user", "content": "q"}],
                               "chosen": [{"role": "assistant", "content": "a"}],
                               "rejected": [{"role": "assistant", "content": "b"}]})
    implicit = from_trl({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                         "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]})
    assert standard == conversational == implicit == {"prompt": [{"role": "user", "content": "q"}],
                                                      "chosen": "a", "rejected": "b"}
    assert from_prompts({"prompt": "write a poem"}) == {"prompt": [{"role": "user", "content": "write a poem"}]}


@pytest.mark.parametrize("content, fmt, expected", [
    ('{"prompt": "q", "chosen": "a"}\n', "trl", "row 1, column 'rejected': missing column"),
    ('{"prompt": "q", "chosen": null, "rejected": "b"}\n', "trl", "row 1, column 'chosen': is null"),
    ('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": 3, "chosen": "a", "rejected": "b"}\n', "trl",
     "row 2, column 'prompt': expected a non-empty list"),
    ('{"chosen": "\\n\\nHuman: hi", "rejected": "\\n\\nHuman: hi"}\n', "hh-rlhf",
     "row 1, column 'chosen': transcript has no final Assistant turn"),
    ('{"chosen": "hello", "rejected": "\\n\\nHuman: hi"}\n', "hh-rlhf", "row 1, column 'chosen': not an HH-RLHF"),
    ('{"prompt": "q", "chosen": 5, "rejected": "b"}\n', "trl", "row 1, column 'chosen': expected a non-empty list"),
    ('not json\n', "trl", "row 1: invalid JSON"),
    ('', "trl", "has no rows"),
    ('[1, 2]\n', "trl", "row 1: expected a JSON object per line"),
])
def test_bad_rows_fail_with_file_row_and_column(tmp_path, content, fmt, expected):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load_rows(path, fmt)
    assert str(info.value).startswith(str(path))
    assert expected in str(info.value)


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"row 2: not UTF-8"):
        load_rows(path, "trl")


def test_ten_megabyte_row_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a" * 10_000_000, "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match=r"row 1, column 'chosen': 10,000,000 characters, over max_chars"):
        load_rows(path, "trl")


def test_drop_mode_keeps_going_and_records_reasons(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": None, "rejected": "b"},
            {"prompt": "q", "chosen": "a", "rejected": "b"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = load_rows(path, "trl", on_bad_row="drop")
    assert output.kept.height == 1
    assert output.dropped["drop_reason"].to_list() == ["bad_input: chosen: is null", "duplicate_row"]


def test_parquet_csv_and_datasets_folder(tmp_path):
    import datasets
    import polars as pl

    frame = pl.DataFrame({"prompt": ["q1", "q2"], "chosen": ["a", "c"], "rejected": ["b", "d"]})
    frame.write_parquet(tmp_path / "d.parquet")
    frame.write_csv(tmp_path / "d.csv")
    datasets.Dataset(frame.to_arrow()).to_parquet(str(tmp_path / "hub" / "train.parquet"))
    for path in (tmp_path / "d.parquet", tmp_path / "d.csv"):
        assert load_rows(path, "trl").kept["chosen"].to_list() == ["a", "c"]
    # `hf:` goes through datasets.load_dataset: here a local dataset folder stands in for a Hub id.
    config = LoadConfig(kind="load", hf=str(tmp_path / "hub"), split="train", format="trl")
    assert load(None, config, Ctx()).kept["rejected"].to_list() == ["b", "d"]


def test_keep_columns_carries_a_category_along(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b", "category": "math"}\n')
    output = load_rows(path, "trl", keep_columns=["category"])
    assert output.kept["category"].to_list() == ["math"]
    with pytest.raises(DataError, match="row 1, column 'topic': missing, but named in keep_columns"):
        load_rows(path, "trl", keep_columns=["topic"])
