"""`calibrate:` on the critique and judge stages: judge human-labelled pairs first, stop the run when the judge
disagrees with people, and never pay twice for the calibration's calls.

Planted judges (tests/support/planted_judge.py) are OpenAI-compatible servers on 127.0.0.1 that agree with the
human label on the rows a rule picks, so the numbers are known; the statistics are checked on hand-computed
examples; the fake backend covers validate, a named calibration dataset, the report and the card.
"""

from __future__ import annotations

import json
import re

import polars as pl
import pytest

from selfalign.calibration import (bootstrap_interval, cohen_kappa, positions, preference_length_bias,
                                   summarize)
from selfalign.cli import main
from selfalign.config import load_pipeline
from selfalign.errors import EXIT_CALIBRATION_FAILED, ConfigErrors
from selfalign.runner import run_pipeline
from tests.support.llama_server import llama_server  # noqa: F401  (pytest fixture)
from tests.support.planted_judge import PlantedJudge, planted_pairs, row_of

ROWS = 50
CALIBRATION_ROWS = 20


# -- the numbers, by hand -------------------------------------------------------------------------------------


def test_cohen_kappa_on_hand_computed_tables():
    # 50 items: both yes 20, first yes / second no 5, first no / second yes 10, both no 15.
    # Observed 35/50 = 0.7; chance 25/50 * 30/50 + 25/50 * 20/50 = 0.5; kappa (0.7 - 0.5) / 0.5 = 0.4.
    first = ["yes"] * 25 + ["no"] * 25
    second = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(first, second) == pytest.approx(0.4)
    assert cohen_kappa(["A", "B"], ["B", "A"]) == pytest.approx(-1.0)  # always the other one: worse than chance
    assert cohen_kappa(["A", "B", "A"], ["A", "B", "A"]) == pytest.approx(1.0)
    assert cohen_kappa(["A", "A"], ["A", "A"]) is None  # one label for everything: chance is already 1
    assert cohen_kappa([], []) is None


def pairs_frame(rows: list[dict]) -> pl.DataFrame:
    defaults = {"row_id": "r", "prompt": [{"role": "user", "content": "q"}], "chosen": "c", "rejected": "r",
                "chosen_score": None, "rejected_score": None, "winner_order_1": None, "winner_order_2": None,
                "error": None}
    from selfalign.calibration import PAIR_SCHEMA
    return pl.DataFrame([{**defaults, **row} for row in rows], schema=PAIR_SCHEMA)


def test_kappa_and_tie_rate_of_a_pointwise_critic():
    """chosen, chosen, tie, rejected. Each pair counts with chosen as A and as B: human A,B,A,B,A,B,A,B; critic
    A,B,A,B,tie,tie,B,A. Observed 4/8; chance 4/8 * 3/8 * 2 = 3/8; kappa (1/2 - 3/8) / (5/8) = 0.2."""
    frame = pairs_frame([{"prefers": p} for p in ("chosen", "chosen", "tie", "rejected")])
    human, critic = positions(frame, pairwise=False)
    assert human == ["A", "B"] * 4 and critic == ["A", "B", "A", "B", "tie", "tie", "B", "A"]
    summary = summarize(frame, pairwise=False, seed=0)
    assert summary["kappa"] == pytest.approx(0.2)
    assert (summary["agreement"], summary["tie_rate"], summary["flip_rate"]) == (0.5, 0.25, None)


def test_flip_rate_and_kappa_of_a_pairwise_judge():
    """Winners (order 1 shows chosen as A, order 2 as B): (A,B) picks chosen twice, (B,A) rejected twice, (A,A)
    and (B,B) flip with the order. Judgments agree 4 of 8, the judge says A half the time: kappa 0."""
    frame = pairs_frame([{"prefers": p, "winner_order_1": a, "winner_order_2": b} for p, a, b in
                         [("chosen", "A", "B"), ("rejected", "B", "A"), ("inconsistent", "A", "A"),
                          ("inconsistent", "B", "B")]])
    summary = summarize(frame, pairwise=True, seed=0)
    assert (summary["agreement"], summary["flip_rate"], summary["tie_rate"]) == (0.25, 0.5, None)
    assert summary["kappa"] == pytest.approx(0.0)
    # A judge that always names A flips on every pair and agrees on half the judgments: kappa 0 again, not 0.5.
    biased = pairs_frame([{"prefers": "inconsistent", "winner_order_1": "A", "winner_order_2": "A"}] * 4)
    assert summarize(biased, pairwise=True, seed=0)["flip_rate"] == 1.0
    assert summarize(biased, pairwise=True, seed=0)["kappa"] == pytest.approx(0.0)
    # Three right in both orders and one flipped: 7 of 8 judgments right, A 4 times of 8: kappa (7/8 - 1/2) / (1/2).
    good = pairs_frame([{"prefers": "chosen", "winner_order_1": "A", "winner_order_2": "B"}] * 3
                       + [{"prefers": "inconsistent", "winner_order_1": "A", "winner_order_2": "A"}])
    assert summarize(good, pairwise=True, seed=0)["kappa"] == pytest.approx(0.75)


def test_length_bias_compares_the_stage_with_the_people_on_the_same_pairs():
    frame = pairs_frame([
        {"chosen": "aaaa", "rejected": "bb", "prefers": "chosen"},     # human longer, stage longer
        {"chosen": "a", "rejected": "bbb", "prefers": "rejected"},     # human shorter, stage longer
        {"chosen": "aaa", "rejected": "b", "prefers": "rejected"},     # human longer, stage shorter
        {"chosen": "a", "rejected": "bb", "prefers": "rejected"},      # human shorter, stage longer
        {"chosen": "aaaaaa", "rejected": "b", "prefers": "tie"},       # undecided: not counted
        {"chosen": "aaaaaa", "rejected": "b", "prefers": "failed"},
    ])
    assert preference_length_bias(frame) == {"pairs": 4, "stage_prefers_longer": 0.75, "human_prefers_longer": 0.5}
    assert summarize(frame, pairwise=False, seed=0)["failed"] == 1


def test_bootstrap_interval():
    assert bootstrap_interval([True] * 30, seed=0) == (1.0, 1.0)
    assert bootstrap_interval([False] * 30, seed=0) == (0.0, 0.0)
    assert bootstrap_interval([], seed=0) is None
    low, high = bootstrap_interval([True, False] * 50, seed=0)
    # The normal approximation for 50 of 100 is 0.5 +- 0.098.
    assert 0.38 < low < 0.45 and 0.55 < high < 0.62
    assert bootstrap_interval([True, False] * 50, seed=0) == (low, high)  # seeded: the same every time
    low_small, high_small = bootstrap_interval([True, False] * 5, seed=0)
    assert high_small - low_small > high - low  # fewer pairs, a wider interval


# -- planted judges on 127.0.0.1 ------------------------------------------------------------------------------


def pipeline(tmp_path, url: str, min_agreement: float, stage: str = "critique", samples: int = 1) -> str:
    data = planted_pairs(tmp_path / "pairs.jsonl", ROWS)
    judge_stage = (f"  - {{kind: critique, model: judge, samples: {samples}," if stage == "critique"
                   else "  - {kind: judge, model: judge,")
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"""\
schema_version: 1
name: calibrated
models:
  judge: {{backend: openai, base_url: '{url}', model: m, max_concurrency: 4, max_retries: 0}}
stages:
  - {{kind: load, path: {data}, format: trl}}
{judge_stage}
     calibrate: {{rows: {CALIBRATION_ROWS}, min_agreement: {min_agreement}}}}}
""")
    return str(path)


def planted_share(run_dir, rule) -> float:
    """The planted rule applied to the pairs the run calibrated on (from calibration/NN-kind.parquet)."""
    [file] = (run_dir / "calibration").glob("*.parquet")
    pairs = pl.read_parquet(file)
    assert pairs.height == CALIBRATION_ROWS and pairs["row_id"].n_unique() == CALIBRATION_ROWS
    rows = [row_of(prompt[-1]["content"]) for prompt in pairs["prompt"]]
    return sum(rule(i) for i in rows) / len(rows)


def agrees_40(i: int) -> bool:
    return i % 5 < 2


def agrees_80(i: int) -> bool:
    return i % 5 < 4


def test_a_judge_agreeing_40_percent_stops_the_run_after_calibration(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with PlantedJudge(agrees=agrees_40) as server:
        path = pipeline(tmp_path, server.url, min_agreement=0.6)
        status = main(["run", path, "--output", str(run_dir), "--quiet"])
        err = capsys.readouterr().err
        calibration_calls = CALIBRATION_ROWS * 2  # chosen and rejected, one sample each
        assert status == EXIT_CALIBRATION_FAILED == 6, err
        assert server.chat_requests == calibration_calls, "calls beyond the calibration were sent"
        manifest = json.loads((run_dir / "manifest.json").read_text())
        summary = manifest["calibration"]
        expected = planted_share(run_dir, agrees_40)
        assert abs(expected - 0.4) <= 0.15  # the sample of 20 is near the planted 40%
        assert summary["agreement"] == pytest.approx(expected)
        low, high = summary["agreement_ci95"]
        assert low <= expected <= high and high - low > 0.1
        assert summary["passed"] is False and summary["pairs"] == CALIBRATION_ROWS and summary["failed"] == 0
        assert summary["model_calls"]["sent"] == calibration_calls
        # Kappa of a critic that is right in a share p of pairs, with no ties: 2p - 1 (see calibration.py).
        assert summary["kappa"] == pytest.approx(2 * expected - 1, abs=1e-4)
        assert manifest["status"] == "calibration_failed"
        assert [a["status"] for a in manifest["attempts"]] == ["calibration_failed"]
        last = err.strip().splitlines()[-1]
        print("\n" + last)  # the output the report pastes
        assert re.search(rf"agreement {expected:.2f} \(95% CI [0-9.]+-[0-9.]+\) is below min_agreement 0.6;", last), last
        assert f"calibration on {CALIBRATION_ROWS} human-labelled pairs" in last
        assert f"kappa {2 * expected - 1:.2f}, tie rate 0.00, prefers the longer answer" in last
        assert f"the calls for its other {ROWS - CALIBRATION_ROWS} rows" in last
        assert str(run_dir / "calibration" / "01-critique.parquet") in last and "Fix:" in last
        assert not (run_dir / "stages" / "01-critique.parquet").exists()

        # Accepting this judge after all: the run goes on and pays only for the rows it had not sent.
        status = main(["run", path, "--output", str(run_dir), "--quiet",
                       "--set", "stages.1.calibrate.min_agreement=0.3"])
        assert status == 0, capsys.readouterr().err
        assert server.chat_requests == ROWS * 2 and max(server.bodies.values()) == 1, "a call was paid twice"
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert manifest["rows"][1]["metrics"]["calibration"]["passed"] is True
        assert manifest["calls_sent_all_attempts"] == ROWS * 2


def test_a_judge_agreeing_80_percent_goes_on_and_pays_for_no_call_twice(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with PlantedJudge(agrees=agrees_80) as server:
        path = pipeline(tmp_path, server.url, min_agreement=0.6, samples=2)
        status = main(["run", path, "--output", str(run_dir)])
        err = capsys.readouterr().err
        assert status == 0, err
        total = ROWS * 2 * 2
        assert server.chat_requests == total and max(server.bodies.values()) == 1, "a call was paid twice"
        manifest = json.loads((run_dir / "manifest.json").read_text())
        critique = manifest["rows"][1]
        summary = critique["metrics"]["calibration"]
        calibration_calls = CALIBRATION_ROWS * 2 * 2
        assert summary["model_calls"] == {"requested": calibration_calls, "cached": 0, "sent": calibration_calls,
                                          "failed": 0}
        # The stage asked for every call again and found the calibration's in the cache.
        assert critique["model_calls"] == {"requested": total + calibration_calls, "cached": calibration_calls,
                                           "sent": total, "failed": 0}
        expected = planted_share(run_dir, agrees_80)
        assert abs(expected - 0.8) <= 0.15
        assert summary["agreement"] == pytest.approx(expected) and summary["passed"] is True
        assert summary["tie_rate"] == 0 and summary["flip_rate"] is None
        # The people's length preference on these pairs, counted from the texts.
        pairs = pl.read_parquet(run_dir / "calibration" / "01-critique.parquet")
        human_longer = pairs.select((pl.col("chosen").str.len_chars() > pl.col("rejected").str.len_chars()).mean())
        assert summary["length_bias"]["human_prefers_longer"] == pytest.approx(human_longer.item(), abs=1e-4)
        log = [line for line in err.splitlines() if "calibration on" in line]
        print("\n" + "\n".join(log))  # the output the report pastes
        assert log and f"agreement {expected:.2f}" in log[0]
        # The stage's own rows equal the planted scores, calibration rows included.
        out = pl.read_parquet(run_dir / "stages" / "01-critique.parquet")
        assert out.height == ROWS

        # A re-run is free, calibration included.
        before = server.chat_requests
        assert main(["run", path, "--output", str(run_dir), "--quiet"]) == 0
        assert server.chat_requests == before


def test_a_position_biased_pairwise_judge_shows_its_flip_rate(tmp_path, capsys):
    """A judge right on every row but naming A whatever is shown on every fourth row: those pairs flip with the
    order; the run stops when min_agreement asks for more than the consistent share."""
    def biased(i: int) -> bool:
        return i % 4 == 0

    run_dir = tmp_path / "run"
    with PlantedJudge(agrees=lambda i: True, position_biased=biased) as server:
        path = pipeline(tmp_path, server.url, min_agreement=0.9, stage="judge")
        status = main(["run", path, "--output", str(run_dir), "--quiet"])
        err = capsys.readouterr().err
        flipped = planted_share(run_dir, biased)
        assert flipped > 0.1  # the sample holds biased rows
        assert server.chat_requests == CALIBRATION_ROWS * 2  # both orders of each calibration pair
        summary = json.loads((run_dir / "manifest.json").read_text())["calibration"]
        assert summary["flip_rate"] == pytest.approx(flipped) and summary["tie_rate"] is None
        assert summary["agreement"] == pytest.approx(1 - flipped)
        # Judgments right: all of the consistent pairs' and one of each flipped pair's; A named on flipped pairs twice.
        right = 1 - flipped / 2
        says_a = (1 - flipped) / 2 + flipped
        chance = 0.5 * says_a + 0.5 * (1 - says_a)
        assert summary["kappa"] == pytest.approx((right - chance) / (1 - chance), abs=1e-4)
        assert status == 6, err
        print("\n" + err.strip().splitlines()[-1])
        assert "flips with the order of the answers" in err and "position bias" in err, err


# -- validate, a named dataset, the report and the card (fake backend) ---------------------------------------

FAKE = """\
schema_version: 1
name: fake-calibrated
models:
  critic: {{backend: fake}}
stages:
{stages}
"""


def write(tmp_path, stages: str) -> str:
    planted_pairs(tmp_path / "pairs.jsonl", 12)
    path = tmp_path / "pipeline.yaml"
    path.write_text(FAKE.format(stages=stages.format(data=tmp_path / "pairs.jsonl")))
    return str(path)


def validate_errors(path: str) -> str:
    try:
        from selfalign.check import check_pipeline
        errors = check_pipeline(load_pipeline(path))
    except ConfigErrors as exc:
        return str(exc)
    return "\n".join(e.format() for e in errors)


@pytest.mark.parametrize("stages, expected", [
    ("  - {{kind: load, path: {data}, format: trl}}\n  - kind: critique\n    model: critic\n"
     "    calibrate: {{rows: 13}}",
     r"pipeline.yaml:\d+: stage 1 \(critique\): calibrate.rows: asks for 13 pairs, but the input .* has only 12 rows"),
    ("  - {{kind: load, path: {data}, format: trl}}\n  - kind: critique\n    model: critic\n"
     "    calibrate: {{rows: 5, min_agreement: 1.2}}",
     r"stage 1 \(critique\): calibrate.min_agreement: Input should be less than or equal to 1"),
    ("  - {{kind: load, path: {data}, format: trl}}\n  - kind: critique\n    model: critic\n"
     "    calibrate: {{rows: 5, min_agremeent: 0.5}}",
     r"calibrate.min_agremeent: unknown key; did you mean 'min_agreement'\?"),
    ("  - {{kind: load, path: {data}, format: prompts}}\n  - {{kind: generate, model: critic, samples: 2}}\n"
     "  - kind: critique\n    model: critic\n    targets: [responses]\n    calibrate: {{rows: 5}}",
     r"stage 2 \(critique\): calibrate.rows: calibrating on input rows needs human-labelled pairs, but the stage's "
     r"input has no chosen, rejected column .*calibrate: \{path: FILE"),
    ("  - {{kind: load, path: {data}, format: prompts}}\n  - {{kind: generate, model: critic, samples: 2}}\n"
     "  - {{kind: critique, model: critic, targets: [responses]}}\n  - {{kind: pair}}\n"
     "  - kind: judge\n    model: critic\n    calibrate: {{rows: 5}}",
     r"stage 4 \(judge\): calibrate.rows: the input's chosen/rejected come from stage 3 \(pair\), labelled by a "
     r"model, not a person"),
    ("  - {{kind: load, path: {data}, format: trl}}\n  - kind: critique\n    model: critic\n    targets: [chosen]\n"
     "    calibrate: {{rows: 5}}",
     r"calibration scores both answers of each pair, but the stage's targets are \['chosen'\]"),
    ("  - {{kind: load, path: {data}, format: trl}}\n  - kind: judge\n    model: critic\n"
     "    calibrate: {{path: missing.jsonl, format: hh-rlhf}}",
     r"stage 1 \(judge\): calibrate.path: file 'missing.jsonl' not found"),
    ("  - {{kind: load, path: {data}, format: trl}}\n  - kind: judge\n    model: critic\n"
     "    calibrate: {{path: {data}, format: trl, rows: 20}}",
     r"calibrate.rows: asks for 20 pairs, but .*pairs.jsonl has only 12 readable pairs"),
    ("  - {{kind: load, path: {data}, format: trl}}\n  - kind: judge\n    model: critic\n"
     "    calibrate: {{path: {data}}}",
     r"calibrate: Value error, `format:` is needed with `path:`/`hf:`"),
    ("  - {{kind: load, path: {data}, format: trl}}\n  - kind: judge\n    model: critic\n"
     "    calibrate: {{min_agreement: 0.5}}",
     r"say how many input rows to calibrate on"),
])
def test_validate_checks_the_calibrate_option(tmp_path, stages, expected):
    path = write(tmp_path, stages)
    assert re.search(expected, validate_errors(path)), validate_errors(path)
    assert main(["validate", path]) == 2


def test_a_bad_row_in_a_named_dataset_fails_validate_or_is_left_out_and_counted(tmp_path):
    good = planted_pairs(tmp_path / "labelled.jsonl", 6)
    good.write_text(good.read_text() + json.dumps({"prompt": "Question 99?", "chosen": None, "rejected": "x"}) + "\n")
    stages = ("  - {{kind: load, path: {data}, format: trl}}\n  - kind: judge\n    model: critic\n"
              f"    calibrate: {{{{path: {good}, format: trl{{bad}}}}}}")
    path = write(tmp_path, stages.replace("{bad}", ""))
    assert re.search(r"calibrate.path: .*labelled.jsonl, row 7, column 'chosen': is null.*on_bad_row: drop",
                     validate_errors(path)), validate_errors(path)
    path = write(tmp_path, stages.replace("{bad}", ", on_bad_row: drop"))
    assert validate_errors(path) == ""
    summary = run_pipeline(load_pipeline(path), output=tmp_path / "run", quiet=True)["rows"][1]["metrics"]["calibration"]
    assert (summary["pairs"], summary["unreadable_rows"]) == (6, 1)


def test_validate_accepts_good_calibrate_options(tmp_path):
    path = write(tmp_path, "  - {{kind: load, path: {data}, format: trl}}\n"
                           "  - {{kind: critique, model: critic, samples: 1, calibrate: {{rows: 12}}}}\n"
                           "  - {{kind: judge, model: critic, calibrate: {{path: {data}, format: trl, rows: 3}}}}")
    assert validate_errors(path) == ""


def test_rows_beyond_the_limit_fail_before_any_call(tmp_path, capsys):
    path = write(tmp_path, "  - {{kind: load, path: {data}, format: trl}}\n"
                           "  - {{kind: critique, model: critic, samples: 1, calibrate: {{rows: 8}}}}")
    assert main(["run", path, "--output", str(tmp_path / "run"), "--limit", "5", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "calibrate.rows: asks for 8 pairs, but there are only 5 human-labelled rows in the stage's input " \
           "(with --limit 5)" in err, err
    assert not (tmp_path / "run").exists()


def test_calibration_agreement_is_the_consistency_stages_agreement(tmp_path):
    """Calibrating on every input row measures what the consistency stage then finds (the same rule)."""
    path = write(tmp_path, "  - {{kind: load, path: {data}, format: trl}}\n"
                           "  - {{kind: critique, model: critic, samples: 3, calibrate: {{rows: 12}}}}\n"
                           "  - {{kind: consistency}}")
    manifest = run_pipeline(load_pipeline(path), output=tmp_path / "run", quiet=True)
    calibration = manifest["rows"][1]["metrics"]["calibration"]
    assert calibration["pairs"] == 12
    assert calibration["agreement"] == manifest["rows"][2]["metrics"]["agreement_with_human_before"]
    assert manifest["rows"][1]["model_calls"]["sent"] == 12 * 2 * 3  # each call once


def test_a_named_dataset_calibrates_a_stage_whose_input_has_no_labels(tmp_path):
    """Prompts only -> generate -> critique of the responses: the critic is calibrated on a labelled file with
    the stage's own prompt and model (those calls are extra, and cached)."""
    path = write(tmp_path, "  - {{kind: load, path: {data}, format: prompts}}\n"
                           "  - {{kind: generate, model: critic, samples: 2}}\n"
                           "  - kind: critique\n    model: critic\n    samples: 1\n    targets: [responses]\n"
                           "    calibrate: {{path: {data}, format: trl, rows: 6}}")
    manifest = run_pipeline(load_pipeline(path), output=tmp_path / "run", quiet=True)
    calibration = manifest["rows"][2]["metrics"]["calibration"]
    assert (calibration["source"], calibration["pairs"]) == ("file pairs.jsonl", 6)
    assert calibration["model_calls"]["sent"] == 6 * 2
    assert manifest["rows"][2]["model_calls"]["sent"] == 6 * 2 + 12 * 2  # calibration, then 2 responses x 12 rows
    again = run_pipeline(load_pipeline(path), output=tmp_path / "run", quiet=True)
    assert again["model_calls"]["sent"] == 0


def test_the_report_and_the_card_show_the_calibration(tmp_path):
    from selfalign.finished_run import load_run
    from selfalign.publish import CardOptions, write_card
    from selfalign.report import write_report

    path = write(tmp_path, "  - {{kind: load, path: {data}, format: trl}}\n"
                           "  - {{kind: judge, model: critic, calibrate: {{rows: 10}}}}\n"
                           "  - {{kind: export, formats: [trl], test_size: 0}}")
    manifest = run_pipeline(load_pipeline(path), output=tmp_path / "run", quiet=True)
    summary = manifest["rows"][1]["metrics"]["calibration"]
    html = write_report(tmp_path / "run").read_text()
    section = html[html.index('<section id="calibration">'):]
    section = section[:section.index("</section>")]
    assert "Judge calibration against human labels" in section and "Kappa" in section
    assert f"<td class=num>{summary['pairs']}</td>" in section
    assert f"{summary['agreement']:.2f}" in section and f"{summary['flip_rate']:.2f}" in section
    card = write_card(load_run(tmp_path / "run"), tmp_path / "card", options=CardOptions(language=["en"])).read_text()
    section = card[card.index("## Judge calibration"):].split("\n## ")[0]
    [row] = [line for line in section.splitlines() if line.startswith("| 1 | judge |")]
    assert f"| {summary['agreement']:.2f} |" in row and "| passed |" in row


# -- the real bundled model ------------------------------------------------------------------------------------

REAL = """\
schema_version: 1
name: calibrate-real
models:
  critic: {{backend: openai, base_url: '{url}', model: smollm2, max_concurrency: 2, structured_output: json_object}}
stages:
  - {{kind: load, path: {data}, format: hh-rlhf, on_bad_row: drop}}
  - kind: critique
    model: critic
    samples: 1
    max_critique_chars: 200
    sampling: {{temperature: 0, max_tokens: 120, seed: 0}}
    calibrate: {{rows: 2, min_agreement: 0}}
  - kind: judge
    model: critic
    sampling: {{temperature: 0, max_tokens: 160, seed: 0}}
    on_disagreement: swap
    calibrate: {{path: {data}, format: hh-rlhf, on_bad_row: drop, rows: 1}}
"""


@pytest.mark.slow
def test_calibrate_end_to_end_with_the_bundled_model_on_real_hh_pairs(llama_server, hh_data, tmp_path):  # noqa: F811
    """SmolLM2-135M behind llama.cpp's server judges real HH-RLHF pairs: the critic on 2 of the 3 input rows (its
    calls reused by the stage), the pairwise judge on a pair drawn from the whole file read as a named dataset (its
    unreadable rows left out and counted). The tiny model judges badly: this proves the plumbing and honest
    numbers, not an agreement."""
    path = tmp_path / "pipeline.yaml"
    path.write_text(REAL.format(url=llama_server, data=hh_data))
    first = run_pipeline(load_pipeline(path), output=tmp_path / "run", limit=3, quiet=True)
    critique, judge = first["rows"][1], first["rows"][2]
    for stage, pairs, pairwise in ((critique, 2, False), (judge, 1, True)):
        summary = stage["metrics"]["calibration"]
        print(f"\n{stage['kind']}: {json.dumps(summary)}")
        assert summary["pairs"] + summary["failed"] == pairs
        if summary["pairs"]:
            low, high = summary["agreement_ci95"]
            assert 0 <= low <= summary["agreement"] <= high <= 1
            assert (summary["flip_rate"] is not None) == pairwise and (summary["tie_rate"] is not None) != pairwise
        assert summary["passed"] is True  # min_agreement 0 (critique) or none (judge)
        verdicts = pl.read_parquet(tmp_path / "run" / summary["file"])
        assert verdicts.height == pairs and set(verdicts["prefers"]) <= {"chosen", "rejected", "tie", "inconsistent",
                                                                          "failed"}
    # The critic's calibration calls were the stage's own: every critique call was sent once.
    calibration_calls = critique["metrics"]["calibration"]["model_calls"]
    assert critique["model_calls"]["sent"] == critique["metrics"]["calls"] + calibration_calls["failed"]
    assert critique["model_calls"]["cached"] == calibration_calls["sent"] - calibration_calls["failed"]
    assert judge["metrics"]["calibration"]["source"] == f"file {hh_data.name}"
    assert judge["metrics"]["calibration"]["unreadable_rows"] > 0  # the file has rows whose transcripts differ early
    if first["model_calls"]["failed"] == 0:  # a failed call is asked again on a re-run, by design
        again = run_pipeline(load_pipeline(path), output=tmp_path / "run", limit=3, quiet=True)
        assert again["model_calls"]["sent"] == 0
        assert again["rows"][1]["metrics"]["calibration"] == critique["metrics"]["calibration"]
