"""Near-duplicate removal (the dedupe stage and mix's near_duplicates:) on real HH-RLHF prompts with planted
near-duplicates: small edits are clustered with their original, the declared order decides who stays."""

import gzip
import itertools
import json
import random
from pathlib import Path

import polars as pl
import pytest

from selfalign.cli import main
from selfalign.config import load_pipeline
from selfalign.errors import DataError
from selfalign.runner import run_pipeline
from selfalign.stages.dedupe import DedupeConfig, KeepOrder, bands_for, near_duplicates, row_texts, shingles
from selfalign.stages.load import LoadConfig, run as load
from selfalign.textmatch import words

HH_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-test-1500.jsonl.gz"


class Ctx:
    limit = None

    def resolve(self, value):
        return Path(value)


@pytest.fixture(scope="module")
def human(tmp_path_factory):
    if not HH_DATA.exists():
        pytest.fail(f"{HH_DATA} is missing: the tests need ../shared/data beside the project (CI has it)")
    return load(None, LoadConfig(kind="load", path=str(HH_DATA), format="hh-rlhf", on_bad_row="drop"), Ctx()).kept


def edited(prompt: list[dict], rng: random.Random) -> list[dict]:
    """A small edit of a conversation: its longest message re-cased, re-punctuated, with one word changed."""
    longest = max(range(len(prompt)), key=lambda i: len(prompt[i]["content"]))
    text = prompt[longest]["content"].upper().replace(",", " ,").replace(".", "!")
    tokens = text.split()
    tokens[rng.randrange(len(tokens))] = "really"
    return [dict(m, content=" ".join(tokens)) if i == longest else m for i, m in enumerate(prompt)]


def expected_clusters(df: pl.DataFrame, threshold: float, n: int) -> dict[str, str]:
    """The brute-force answer: every pair's exact Jaccard, clusters by union, kept = first by (source, row)."""
    sets = [set(shingles(words(t), n)) if words(t) else None for t in row_texts(df, ["prompt"])]
    parent = list(range(df.height))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in itertools.combinations(range(df.height), 2):
        if sets[i] and sets[j] and len(sets[i] & sets[j]) / len(sets[i] | sets[j]) >= threshold:
            parent[max(root(i), root(j))] = min(root(i), root(j))
    rank = {"human": 0, "synthetic": 1}
    members: dict[int, list[int]] = {}
    for i in range(df.height):
        members.setdefault(root(i), []).append(i)
    ids, sources = df["row_id"].to_list(), df["source"].to_list()
    out = {}
    for group in members.values():
        keeper = min(group, key=lambda i: (rank[sources[i]], i))
        out.update({ids[i]: ids[keeper] for i in group if i != keeper})
    return out


def test_planted_near_duplicates_are_clustered_with_their_original(human):
    rng = random.Random(0)
    base = human.head(600)
    originals = base.sample(40, seed=1)
    copies = originals.with_columns(
        prompt=pl.Series([edited(p, rng) for p in originals["prompt"].to_list()], dtype=base.schema["prompt"]),
        row_id=pl.Series([f"copy-{r}" for r in originals["row_id"]]), source=pl.lit("synthetic"))
    # Copies first: the order of rows alone would keep them; human before synthetic keeps the originals.
    frame = pl.concat([copies, base])
    config = DedupeConfig(kind="dedupe")
    kept, dropped, metrics = near_duplicates(frame, config)
    truth = expected_clusters(frame, config.threshold, config.ngram)
    got = dict(zip(dropped["row_id"], dropped["cluster_id"]))
    assert got == truth
    planted = {f"copy-{r}": r for r in originals["row_id"]}
    assert {k: got[k] for k in planted if k in got} == {k: v for k, v in planted.items() if k in truth}
    assert len(set(planted) & set(got)) >= 30  # re-casing plus one changed word in a short prompt can fall below
    assert set(dropped["drop_reason"]) == {"near_duplicate"}
    assert dropped["similarity"].min() >= 0 and kept.height + dropped.height == frame.height
    assert metrics["near_duplicates_dropped"] == dropped.height and metrics["library"] == "rensa"
    assert metrics["dropped_by_source"]["synthetic"] == len(set(planted) & set(got))

    # Another declared order keeps the synthetic copies instead.
    flipped = DedupeConfig(kind="dedupe", keep=KeepOrder(order=["synthetic", "human"]))
    _, dropped_flipped, _ = near_duplicates(frame, flipped)
    assert {r for r in originals["row_id"] if f"copy-{r}" in got} <= set(dropped_flipped["row_id"])


def test_order_within_a_source_is_row_order_and_values_must_be_listed(human):
    rows = human.head(3)
    twins = pl.concat([rows, rows.with_columns(row_id=pl.col("row_id") + "-again")])
    kept, dropped, _ = near_duplicates(twins, DedupeConfig(kind="dedupe"))
    assert kept["row_id"].to_list() == rows["row_id"].to_list()
    assert dropped["cluster_id"].to_list() == rows["row_id"].to_list()
    assert dropped["similarity"].to_list() == [1.0, 1.0, 1.0]
    with pytest.raises(DataError, match=r"column 'source': holds 'human', which keep.order \(\['synthetic'\]\)"):
        near_duplicates(twins, DedupeConfig(kind="dedupe", keep=KeepOrder(order=["synthetic"])))


def test_bands_find_a_pair_at_the_threshold():
    for threshold in (0.5, 0.7, 0.9):
        bands = bands_for(threshold, 128)
        assert 1 - (1 - threshold ** (128 // bands)) ** bands >= 0.99


def test_dedupe_stage_and_mix_option_from_yaml(human, tmp_path, write_pipeline, capsys):
    rng = random.Random(2)
    rows = human.head(200).to_dicts()
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"],
                                                              "rejected": r["rejected"]}) + "\n" for r in rows))
    near = [{"prompt": edited(r["prompt"], rng), "chosen": r["chosen"] + " (v2)", "rejected": r["rejected"]}
            for r in rows[:10]]
    (tmp_path / "synthetic.jsonl").write_text("".join(json.dumps(r) + "\n" for r in near))
    pipeline = write_pipeline(f"""\
schema_version: 1
name: near
stages:
  - kind: load
    path: {tmp_path / 'pairs.jsonl'}
    format: trl
  - kind: mix
    add: [{{path: {tmp_path / 'synthetic.jsonl'}, source: synthetic}}]
    near_duplicates: {{threshold: 0.6}}
  - kind: dedupe
    threshold: 0.6
""")
    manifest = run_pipeline(load_pipeline(pipeline), output=tmp_path / "run", quiet=True)
    mix = manifest["rows"][1]
    dropped = pl.read_parquet(tmp_path / "run" / "dropped" / "01-mix.parquet")
    near_dropped = dropped.filter(pl.col("drop_reason") == "near_duplicate")
    assert near_dropped.height == mix["metrics"]["near_duplicates"]["near_duplicates_dropped"] >= 9
    assert set(near_dropped["source"]) == {"synthetic"}
    assert set(near_dropped["cluster_id"]) <= set(pl.read_parquet(tmp_path / "run" / "stages" / "01-mix.parquet")
                                                  ["row_id"])
    assert manifest["rows"][2]["dropped"] == 0  # mix left no near-duplicate at the same threshold

    bad = write_pipeline(pipeline.read_text().replace("    threshold: 0.6\n", "    fields: [response]\n"
                                                      "    keep: {column: origin}\n"), "bad.yaml")
    assert main(["validate", str(bad)]) == 2
    assert "needs column(s) origin, response, which no earlier stage makes" in capsys.readouterr().err
    typo = write_pipeline(pipeline.read_text().replace("    threshold: 0.6\n", "    treshold: 0.6\n"), "typo.yaml")
    assert main(["validate", str(typo)]) == 2
    assert "did you mean 'threshold'?" in capsys.readouterr().err
