"""The decontaminate stage on real HH-RLHF data: prompts of one part of the file are the "benchmark", planted
(exact, re-cased, as spans, in later turns, in answers) into rows of the other part; exactly those rows go."""

import gzip
import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from benchmarks.naive_decontaminate import NaiveIndex, row_units
from selfalign.cli import main
from selfalign.config import load_pipeline
from selfalign.errors import ConfigErrors
from selfalign.runner import run_pipeline
from selfalign.stages.decontaminate import DecontaminateConfig, EvalSet, run as decontaminate
from selfalign.stages.load import LoadConfig, run as load
from selfalign.textmatch import hash_batch, normalise, normalise_slowly

PIPELINE = """\
schema_version: 1
name: decon
stages:
  - kind: load
    path: {data}
    format: hh-rlhf
    on_bad_row: drop
  - kind: decontaminate
    against:
      - {{path: {bench}, column: prompt, id_column: id, name: hh-part-a}}
    fields: {fields}
"""


def first_turn(transcript: str) -> str:
    return transcript.split("\n\nAssistant:")[0].removeprefix("\n\nHuman: ")


def simple_words(text: str) -> list[str]:
    """An independent reading of the normalisation for ASCII-ish text: lower-cased runs of letters/digits."""
    return re.findall(r"[^\W_]+", text.casefold())


def all_turns(transcript: str) -> list[str]:
    return re.split(r"\n\n(?:Human|Assistant): ", transcript)[1:]


def human_turns(transcript: str) -> list[str]:
    return [t.split("\n\nAssistant:")[0] for t in transcript.split("\n\nHuman: ")[1:]]


def replace_human_turn(row: dict, turn: int, text: str) -> dict:
    """The row with its `turn`-th Human turn replaced in both transcripts (they share every turn but the last)."""
    out = {}
    for key in ("chosen", "rejected"):
        parts = row[key].split("\n\nHuman: ")
        head, _, tail = parts[turn + 1].partition("\n\nAssistant:")
        parts[turn + 1] = text + "\n\nAssistant:" + tail
        out[key] = "\n\nHuman: ".join(parts)
    return out


HH_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-test-1500.jsonl.gz"


@pytest.fixture(scope="module")
def hh_rows():
    if not HH_DATA.exists():
        pytest.fail(f"{HH_DATA} is missing: the tests need ../shared/data beside the project (CI has it)")
    return [json.loads(line) for line in gzip.open(HH_DATA)]


@pytest.fixture(scope="module")
def parts(hh_rows):
    """(benchmark prompts: first turns of rows 0-749 whose words are not those of any turn of rows 750-1499 (the
    data really repeats some prompts: test_fast_path_agrees... covers those), rows 750-1499)."""
    part_b = hh_rows[750:]
    seen = {" ".join(simple_words(t)) for row in part_b for key in ("chosen", "rejected") for t in all_turns(row[key])}
    bench = []
    for i, row in enumerate(hh_rows[:750]):
        prompt = first_turn(row["chosen"])
        if " ".join(simple_words(prompt)) not in seen:
            bench.append({"id": f"hh-{i}", "prompt": prompt})
    return bench, part_b


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_planted_benchmark_prompts_are_dropped_and_nothing_else(parts, tmp_path):
    bench, part_b = parts
    long = [b for b in bench if len(simple_words(b["prompt"])) >= 20]
    short = [b for b in bench if 4 <= len(simple_words(b["prompt"])) < 13]
    multi = [i for i, r in enumerate(part_b) if i >= 100 and len(human_turns(r["chosen"])) >= 3 and _parses(r)]
    rows = [dict(r) for r in part_b]
    expected = {}  # row index in part B -> (reason, benchmark id, field)

    planted = set()

    def plant(index, turn, text, reason, bench_row, field):
        assert index not in planted
        planted.add(index)
        rows[index] = replace_human_turn(rows[index], turn, text)
        if reason:
            expected[index] = (reason, bench_row["id"], field)

    exact, recased, span, later, tail_exact = long[0], long[1], long[2], long[3], short[0]
    single, several = [i for i in range(5, 40) if len(human_turns(part_b[i]["chosen"])) == 1 and _parses(part_b[i])], \
        [i for i in range(5, 40) if len(human_turns(part_b[i]["chosen"])) >= 2 and _parses(part_b[i])]
    # The first turn of a one-turn prompt is the whole prompt; in a longer one it is message 0.
    plant(single[0], 0, exact["prompt"], "benchmark_exact_match", exact, "prompt")
    shouted = "  ".join(recased["prompt"].upper().split()).replace(",", " ,").replace("?", "?!")
    plant(several[0], 0, shouted, "benchmark_exact_match", recased, "prompt[0]")
    plant(2, 0, f"My friend asked me this, word for word: {span['prompt']} What should I tell them?",
          "benchmark_ngram_overlap", span, "prompt")
    plant(multi[0], 2, f"Also, {later['prompt']} Thanks.", "benchmark_ngram_overlap", later, "prompt")
    plant(multi[1], 1, tail_exact["prompt"].lower(), "benchmark_exact_match", tail_exact, "prompt[2]")
    # Must stay: a short benchmark prompt inside a longer one (short texts match exactly only), and a long one
    # with every sixth word changed (no 13 words in a row survive).
    plant(single[1], 0, f"Someone told me '{short[1]['prompt']}' and I laughed a lot about it yesterday", None, None, None)
    changed = simple_words(long[4]["prompt"])
    plant(single[2], 0, " ".join("banana" if i % 6 == 5 else w for i, w in enumerate(changed)), None, None, None)
    # An answer quoting a benchmark prompt: dropped only when the answers are compared too.
    quoted = long[5]
    chosen_index = single[3]
    rows[chosen_index] = {key: rows[chosen_index][key] for key in ("chosen", "rejected")}
    rows[chosen_index]["chosen"] += f" As they say: {quoted['prompt']}"

    data = write_jsonl(tmp_path / "part_b.jsonl", rows)
    bench_file = write_jsonl(tmp_path / "bench.jsonl", bench)
    loaded = load(None, LoadConfig(kind="load", path=str(data), format="hh-rlhf", on_bad_row="drop"), Ctx()).kept
    source_rows = [r for r in rows if _parses(r)]
    assert loaded.height == len(source_rows)

    def dropped_by(fields):
        pipeline = tmp_path / f"p-{len(fields)}.yaml"
        pipeline.write_text(PIPELINE.format(data=data, bench=bench_file, fields=json.dumps(fields)))
        manifest = run_pipeline(load_pipeline(pipeline), output=tmp_path / f"run-{len(fields)}", quiet=True)
        return manifest, pl.read_parquet(tmp_path / f"run-{len(fields)}" / "dropped" / "01-decontaminate.parquet")

    manifest, dropped = dropped_by(["prompt"])
    index_of = {row_id: i for i, row_id in enumerate(loaded["row_id"])}
    source_index = [i for i, r in enumerate(rows) if _parses(r)]  # part B row of each loaded row
    got = {source_index[index_of[r["row_id"]]]: (r["drop_reason"], r["benchmark_id"], r["benchmark_field"])
           for r in dropped.iter_rows(named=True)}
    assert got == expected
    assert set(dropped["benchmark"]) == {"hh-part-a"}
    assert dropped.filter(pl.col("drop_reason") == "benchmark_exact_match")["overlap"].to_list() == [1.0] * 3
    assert dropped.filter(pl.col("drop_reason") == "benchmark_ngram_overlap")["overlap"].to_list() == [1.0, 1.0]
    stage = manifest["rows"][1]
    assert stage["in"] == loaded.height and stage["out"] == loaded.height - 5
    assert stage["metrics"]["benchmarks"] == {"hh-part-a": {"prompts": len(bench), "exact": 3, "ngram": 2}}
    assert stage["drop_reasons"] == {"benchmark_exact_match": 3, "benchmark_ngram_overlap": 2}

    _, with_answers = dropped_by(["prompt", "chosen"])
    quoted_row = with_answers.filter(pl.col("benchmark_field") == "chosen")
    assert quoted_row["benchmark_id"].to_list() == [quoted["id"]]
    assert quoted_row["drop_reason"].to_list() == ["benchmark_ngram_overlap"]
    assert with_answers.height == 6


class Ctx:
    limit = None

    def resolve(self, value):
        from pathlib import Path
        return Path(value)


def _parses(row):
    from selfalign.input_formats import RowError, from_hh_rlhf
    try:
        from_hh_rlhf(row)
        return True
    except RowError:
        return False


def test_threshold_is_the_share_of_the_shorter_texts_ngrams(parts, tmp_path):
    """Half of a long benchmark prompt inside a longer row: shared / min(row's, prompt's) distinct 13-grams."""
    bench, part_b = parts
    prompt = next(b for b in bench if len(simple_words(b["prompt"])) >= 40)
    words = simple_words(prompt["prompt"])
    half = " ".join(words[:len(words) // 2])
    filler = " ".join(f"filler{i}" for i in range(len(words)))
    text = f"{filler} {half} {filler}"
    expected = (len(words) // 2 - 13 + 1) / min(len(words) - 13 + 1, len(simple_words(text)) - 13 + 1)
    frame = pl.DataFrame({"row_id": ["r"], "prompt": [[{"role": "user", "content": text}]]})
    bench_file = write_jsonl(tmp_path / "bench.jsonl", [prompt])
    for threshold, dropped in ((round(expected, 4) + 0.0001, 0), (round(expected, 4) - 0.0001, 1)):
        config = DecontaminateConfig(kind="decontaminate", threshold=threshold, against=[
            EvalSet(path=str(bench_file), column="prompt", id_column="id")])
        output = decontaminate(frame, config, Ctx())
        assert output.dropped.height == dropped
        if dropped:
            assert output.dropped["overlap"].item() == pytest.approx(expected, abs=1e-4)


def test_fast_path_agrees_with_the_naive_implementation_on_real_data(hh_rows, tmp_path):
    """The whole file against every first turn of its first half, including the rows that really repeat a
    benchmark prompt: the hashed stage and the word-by-word reference drop the same rows for the same match."""
    bench = [{"id": str(i), "prompt": first_turn(r["chosen"])} for i, r in enumerate(hh_rows[:750])]
    # Plant spans so the n-gram path is exercised too.
    rows = [dict(r) for r in hh_rows]
    for k, b in enumerate([b for b in bench if len(b["prompt"].split()) >= 25][:20]):
        rows[900 + k] = replace_human_turn(rows[900 + k], 0, f"Quick one. {b['prompt']} ok?")
    data = write_jsonl(tmp_path / "all.jsonl", rows)
    frame = load(None, LoadConfig(kind="load", path=str(data), format="hh-rlhf", on_bad_row="drop"), Ctx()).kept
    bench_file = write_jsonl(tmp_path / "bench.jsonl", bench)
    for fields, n, threshold in ((["prompt"], 13, 0.5), (["prompt", "chosen", "rejected"], 8, 0.2)):
        config = DecontaminateConfig(kind="decontaminate", fields=fields, n=n, threshold=threshold, against=[
            EvalSet(path=str(bench_file), column="prompt", id_column="id")])
        output = decontaminate(frame, config, Ctx())
        naive = NaiveIndex([[b["prompt"]] for b in bench], n, threshold)
        expected = {}
        for row in frame.iter_rows(named=True):
            match = naive.match(row_units(row, fields))
            if match:
                expected[row["row_id"]] = (match[0], bench[match[1]]["id"], match[2], match[3])
        got = {r["row_id"]: (r["drop_reason"], r["benchmark_id"], r["benchmark_field"], r["overlap"])
               for r in output.dropped.iter_rows(named=True)}
        assert got == expected
        assert sum(1 for m in got.values() if m[0] == "benchmark_ngram_overlap") >= 20
        assert output.kept.height + output.dropped.height == frame.height


def test_normalise_fast_path_equals_its_definition(hh_rows):
    texts = [t for r in hh_rows for t in (r["chosen"], r["rejected"])]
    texts += ["Straße ＡＢＣ ﬁne", "Ǆemal  e\u0301clair", "naïve—café…“quoted” ‘x’", "a\u00a0b\tc\nd", "ΣΊΣΥΦΟΣ"]
    assert sum(not t.isascii() for t in texts) > 100
    for text in texts:
        assert normalise(text).split() == normalise_slowly(text).split(), text


def test_hashes_are_the_same_for_the_same_words_wherever_they_stand():
    segments = [normalise(t) for t in ["One two, THREE four", "x", "one two three four", "two three"]]
    hashed = hash_batch(segments, np.array([0, 1, 1, 2]), 3, 2)
    by_unit = {u: hashed.ngram_hashes[hashed.ngram_units == u].tolist() for u in range(3)}
    assert by_unit[0] == by_unit[1][1:]  # "x one" is unit 1's own first bigram
    assert by_unit[2][0] == by_unit[0][1]  # "two three"
    assert hashed.segment_hashes[0] == hashed.segment_hashes[2] and hashed.unit_words.tolist() == [4, 5, 2]


def test_datasets_id_is_read_with_load_dataset(tmp_path, parts):
    """`hf:` goes through datasets.load_dataset (offline here: a local dataset folder stands in for a Hub id)."""
    import datasets

    bench, part_b = parts
    folder = tmp_path / "reward-bench"
    # The Hub's layout of allenai/reward-bench: data/<split>-00000-of-00001.parquet
    datasets.Dataset.from_list([{"id": 7, "prompt": bench[0]["prompt"]}, {"id": 8, "prompt": "unrelated"}]) \
        .to_parquet(str(folder / "data" / "filtered-00000-of-00001.parquet"))
    frame = pl.DataFrame({"row_id": ["a", "b"], "prompt": [[{"role": "user", "content": bench[0]["prompt"]}],
                                                         [{"role": "user", "content": "something else"}]]})
    config = DecontaminateConfig(kind="decontaminate", against=[
        EvalSet(hf=str(folder), split="filtered", column="prompt", id_column="id")])
    output = decontaminate(frame, config, Ctx())
    assert output.dropped["row_id"].to_list() == ["a"]
    assert output.dropped.select("benchmark", "benchmark_id").row(0) == (str(folder), "7")
    config.against[0].split = "missing"
    with pytest.raises(Exception, match="cannot load with datasets.load_dataset"):
        decontaminate(frame, config, Ctx())


def test_chat_format_benchmark_and_responses_field():
    """A benchmark whose prompts are message lists (one of its turns matches exactly), against `responses`."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mt.jsonl"
        write_jsonl(path, [{"turns": [{"role": "user", "content": "Compose a haiku about autumn."},
                                      {"role": "user", "content": "Now make it rhyme."}]}])
        frame = pl.DataFrame({"row_id": ["a", "b"], "prompt": [[{"role": "user", "content": "q"}]] * 2,
                              "responses": [["fine", "NOW, make it rhyme!"], ["compose a haiku", "no"]]})
        config = DecontaminateConfig(kind="decontaminate", fields=["responses"], against=[
            EvalSet(path=str(path), column="turns", name="mt")])
        output = decontaminate(frame, config, Ctx())
    assert output.dropped.select("row_id", "benchmark_id", "benchmark_field").rows() == [("a", "1", "responses[1]")]


def test_validate_names_file_line_and_fix(write_pipeline, tmp_path, capsys):
    bench = write_jsonl(tmp_path / "bench.jsonl", [{"question": "q"}])
    good = write_pipeline(PIPELINE.format(data="data.jsonl", bench=bench, fields='["prompt"]'))
    with pytest.raises(ConfigErrors) as info:
        run_pipeline(load_pipeline(good), output=tmp_path / "run", quiet=True)
    assert "pipeline.yaml:10: stage 1 (decontaminate): against.0.path: " in str(info.value)
    assert "row 1, column 'prompt': missing; the row has ['question']" in str(info.value)
    assert not (tmp_path / "run").exists()

    missing = write_pipeline(PIPELINE.format(data="data.jsonl", bench="nope.jsonl", fields='["prompt"]'), "m.yaml")
    assert main(["validate", str(missing)]) == 2
    assert "against.0.path: nope.jsonl: file not found" in capsys.readouterr().err

    no_column = write_pipeline(PIPELINE.format(data="d.jsonl", bench=bench, fields='["response"]'), "c.yaml")
    assert main(["validate", str(no_column)]) == 2
    assert "needs column(s) response, which no earlier stage makes" in capsys.readouterr().err

    typo = write_pipeline(PIPELINE.format(data="d.jsonl", bench=bench, fields='["prompt"]') + "    treshold: 0.3\n",
                          "t.yaml")
    assert main(["validate", str(typo)]) == 2
    assert "treshold: unknown key; did you mean 'threshold'?" in capsys.readouterr().err

    both = write_pipeline(PIPELINE.format(data="d.jsonl", bench=bench, fields='["prompt"]').replace(
        "name: hh-part-a}", "name: x}\n      - {path: other.jsonl, name: x}"), "b.yaml")
    assert main(["validate", str(both)]) == 2
    assert "two evaluation sets are named 'x'; give each a distinct `name:`" in capsys.readouterr().err


def test_readme_examples_are_valid_stages():
    """The YAML examples of the README's decontaminate/dedupe section parse as those stages' configs."""
    import yaml

    from selfalign.stages import STAGES

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Keeping evaluation prompts out, and near-duplicates")[1].split("\n## ")[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    kinds = []
    for block in blocks:
        for stage in yaml.safe_load(block):
            STAGES[stage["kind"]].config.model_validate(stage)
            kinds.append(stage["kind"])
    assert kinds == ["decontaminate", "dedupe", "mix"]
