"""Faults between the `openai` backend and a real server: nothing lost, nothing duplicated, nothing silent.

Each case runs selfalign's real pipeline (load -> critique, through `run_pipeline`) against a real HTTP
fault-injecting proxy (tests/support/fault_proxy.py) in front of a real server: the deterministic fake
OpenAI server for volume, and llama.cpp's server with SmolLM2 for one smaller mixed case. For each fault
alone and all of them mixed:

- the run completes;
- rows out + rows dropped == rows in, by row_id (nothing lost, nothing duplicated);
- a row is dropped only after a call exhausted its attempts (all transport tries, or all re-asks), and
  then with status, error, attempts and raw_output; every other row ends ok;
- a re-run through the same proxy with the faults switched off sends exactly the calls that never got a
  reply (the proxy's log says which) and no others.

The table (fault x rows in / ok / dropped / lost / extra calls) is printed at the end of the module.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path

import polars as pl
import pytest

from selfalign.config import load_pipeline
from selfalign.runner import run_pipeline
from tests.support.fake_openai_server import FakeOpenAIServer
from tests.support.fault_proxy import FAULTS, FaultProxy, mixed_faults
from tests.support.llama_server import llama_server  # noqa: F401  (pytest fixture)

TARGETS = 2   # chosen, rejected
SAMPLES = 2
MAX_RETRIES = 4
MAX_ATTEMPTS = 3  # the critique stage's re-asks of an invalid reply (its default)
BACKOFF_MAX_S = 0.05  # caps the jittered backoff (0.5 s * 2^n) so hundreds of retries take seconds;
                      # a server's Retry-After is still honoured as sent
DELIVERED = {"ok", "schema_violation"}  # proxy outcomes in which the client received a complete 200

TABLE: list[dict] = []
# Errors of calls whose last try received a body (a 200 that was not a completion, or an HTTP error page).
RAW_BODY_FAULT = re.compile(r"BadReply|InternalServerError|RateLimitError|APIStatusError")


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def upstream():
    with FakeOpenAIServer(model="m") as server:  # the name the pipelines ask for, as the preflight checks
        yield server


@pytest.fixture(scope="module", autouse=True)
def fault_table(request):
    yield
    if not TABLE:
        return
    text = "\nFault table (test_faults.py):\n" + "\n".join(format_table(TABLE)) + "\n"
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():  # visible without -s
            print(text, flush=True)
    else:
        print(text, flush=True)


# ---------------------------------------------------------------------------------------------- helpers

def write_pairs(path: Path, rows: int) -> Path:
    with path.open("w") as handle:
        for i in range(rows):
            handle.write(json.dumps({
                "prompt": f"Question {i}: what is {i} plus {i + 1}?",
                "chosen": f"{i} plus {i + 1} is {2 * i + 1}.",
                "rejected": f"It is {2 * i + 3}, I think.",
            }) + "\n")
    return path


def write_pipeline(tmp_path: Path, base_url: str, rows: int, timeout_s: float = 2, max_tokens: int = 96,
                   max_concurrency: int = 8, model: str = "m") -> Path:
    data = write_pairs(tmp_path / "pairs.jsonl", rows)
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"""\
schema_version: 1
name: faults
max_failed_fraction: 1  # faults are injected at rates far over the default budget: this suite checks accounting
models:
  critic:
    backend: openai
    base_url: {base_url}
    model: {model}
    max_concurrency: {max_concurrency}
    timeout_s: {timeout_s}
    max_retries: {MAX_RETRIES}
    backoff_max_s: {BACKOFF_MAX_S}
    structured_output: json_object
stages:
  - kind: load
    path: {data}
    format: trl
  - kind: critique
    model: critic
    samples: {SAMPLES}
    max_attempts: {MAX_ATTEMPTS}
    score_range: [1, 10]
    sampling: {{temperature: 0.7, max_tokens: {max_tokens}, seed: 0}}
""")
    return path


def run(pipeline: Path, run_dir: Path) -> dict:
    return run_pipeline(load_pipeline(pipeline), output=run_dir, quiet=True)


def row_ids(path: Path) -> list[str]:
    return pl.read_parquet(path)["row_id"].to_list() if path.exists() else []


def outcome(run_dir: Path) -> tuple[list[str], list[str], list[str], pl.DataFrame]:
    """(ids in, ids ok, ids dropped, dropped frame) of the critique stage."""
    ids_in = row_ids(run_dir / "stages" / "00-load.parquet")
    ids_ok = row_ids(run_dir / "stages" / "01-critique.parquet")
    dropped = pl.read_parquet(run_dir / "dropped" / "01-critique.parquet")
    return ids_in, ids_ok, dropped["row_id"].to_list() if dropped.height else [], dropped


def undelivered(log: list[tuple]) -> set[str]:
    """Request bodies (fingerprints) that were sent but never got a complete 200 back."""
    delivered = {body for _, fault, body, _ in log if fault in DELIVERED}
    return {body for _, _, body, _ in log} - delivered


def check_accounting(run_dir: Path, manifest: dict, rows: int) -> dict:
    """The invariants of one run; returns its counts."""
    assert manifest["status"] == "complete"
    ids_in, ids_ok, ids_dropped, dropped = outcome(run_dir)
    assert len(ids_in) == rows
    assert len(set(ids_ok)) == len(ids_ok), "a row appears twice in the output"
    assert len(set(ids_dropped)) == len(ids_dropped), "a row is dropped twice"
    assert not set(ids_ok) & set(ids_dropped), "a row is both kept and dropped"
    assert set(ids_ok) | set(ids_dropped) == set(ids_in), "rows were lost"
    funnel = manifest["rows"][1]
    assert (funnel["in"], funnel["out"], funnel["dropped"]) == (rows, len(ids_ok), len(ids_dropped))
    # Kept rows are complete: every target has all its samples, each with a valid score.
    kept = pl.read_parquet(run_dir / "stages" / "01-critique.parquet")
    for target in ("chosen", "rejected"):
        for critiques in kept[f"{target}_critiques"].to_list():
            assert sorted(c["sample_index"] for c in critiques) == list(range(SAMPLES))
            assert all(1 <= c["score"] <= 10 and c["text"] for c in critiques)
    # Dropped rows say why, and only after the attempts ran out.
    if dropped.height:
        for column in ("drop_reason", "status", "error", "attempts", "raw_output"):
            assert column in dropped.columns, f"dropped rows lack {column}"
        for row in dropped.iter_rows(named=True):
            assert row["drop_reason"] == "model_call_failed"
            assert row["status"] == "failed"
            assert row["error"] and row["attempts"] >= 1
            exhausted_tries = f"after {MAX_RETRIES + 1} tries" in row["error"]
            exhausted_reasks = "invalid reply" in row["error"] and row["attempts"] >= MAX_ATTEMPTS
            assert exhausted_tries or exhausted_reasks, f"dropped before its attempts ran out: {row['error']}"
            if exhausted_tries:  # attempts counts every HTTP try, not one per call
                assert row["attempts"] >= MAX_RETRIES + 1, row
            if "invalid reply" in row["error"] or RAW_BODY_FAULT.search(row["error"]):
                # Something arrived (an invalid completion, a garbage or error body): the user sees it.
                assert row["raw_output"], f"the body that arrived is not kept as raw_output: {row['error']}"
    return {"rows_in": len(ids_in), "ok": len(ids_ok), "dropped": len(ids_dropped),
            "lost": len(set(ids_in) - set(ids_ok) - set(ids_dropped)),
            "duplicated": (len(ids_ok) - len(set(ids_ok))) + (len(ids_dropped) - len(set(ids_dropped)))}


def cache_rows(run_dir: Path) -> int:
    with sqlite3.connect(run_dir / "cache.sqlite") as db:
        return db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]


def rows_asked(proxy: FaultProxy, run_dir: Path) -> set[str]:
    """row_ids whose critique requests went through the proxy since its counters were reset."""
    by_question = {}
    for row in pl.read_parquet(run_dir / "stages" / "00-load.parquet").iter_rows(named=True):
        by_question[re.match(r"Question (\d+):", row["prompt"][0]["content"]).group(1)] = row["row_id"]
    asked = set()
    for body in proxy.bodies.values():
        messages = json.loads(body)["messages"]
        found = next((m for m in (re.search(r"Question (\d+):", x["content"]) for x in messages) if m), None)
        assert found, f"a request names no row: {messages!r:.300}"
        asked.add(by_question[found.group(1)])
    return asked


def fault_case(tmp_path: Path, proxy: FaultProxy, faults: dict[str, float], rows: int, label: str,
               timeout_s: float = 2, max_tokens: int = 96, max_concurrency: int = 8,
               deterministic_upstream: bool = True, model: str = "m") -> dict:
    """Run with faults, check, re-run through the same proxy with faults off, check again; add a table row."""
    baseline = rows * TARGETS * SAMPLES
    pipeline = write_pipeline(tmp_path, proxy.url, rows, timeout_s=timeout_s, max_tokens=max_tokens,
                              max_concurrency=max_concurrency, model=model)
    run_dir = tmp_path / "run"
    proxy.set_faults(faults)
    proxy.reset_counts()
    started = time.perf_counter()
    first = run(pipeline, run_dir)
    seconds = time.perf_counter() - started
    counts = check_accounting(run_dir, first, rows)
    outcome_before = outcome(run_dir)
    log1 = list(proxy.log)
    calls1 = first["model_calls"]
    assert calls1["requested"] >= baseline
    # Every call that got a complete 200 was cached; every other one was not (and will be asked again).
    # Exception: the replies of a request whose re-asks all came back invalid are forgotten on purpose, so
    # that a re-run asks it afresh; only schema violations cause those.
    missing = undelivered(log1)
    invalid_chains = faults.get("schema_violation", 0) > 0
    if invalid_chains:
        assert calls1["sent"] - cache_rows(run_dir) >= len(missing)
    else:
        assert calls1["sent"] - cache_rows(run_dir) == len(missing)
    http_requests = proxy.requests

    # Re-run through the same proxy (the same base_url, so the same cache keys), faults off.
    proxy.set_faults({})
    proxy.reset_counts()
    second = run(pipeline, run_dir)
    again = check_accounting(run_dir, second, rows)
    sent2 = second["model_calls"]["sent"]
    assert proxy.requests == sent2
    if invalid_chains:
        assert sent2 >= len(missing)
        assert {body for _, _, body, _ in proxy.log} >= missing
    else:
        assert sent2 == len(missing), f"re-run sent {sent2} calls, {len(missing)} had no reply"
        assert {body for _, _, body, _ in proxy.log} == missing, "the re-run asked for calls that were answered"
    if not counts["dropped"]:
        assert sent2 == 0
    # A re-run sends calls only for rows not yet ok: every request it sent belongs to a row dropped before.
    _, _, dropped_before, _ = outcome_before
    assert rows_asked(proxy, run_dir) <= set(dropped_before), "the re-run asked again for rows that were ok"
    if deterministic_upstream:
        # Each failed call is asked once more (its reply is now valid, so no re-asks): exactly the failed ones.
        assert sent2 == calls1["failed"], f"re-run sent {sent2} calls, {calls1['failed']} had failed"

    row = {"fault": label, **counts, "baseline_calls": baseline, "http_requests": http_requests,
           "extra_calls": http_requests - baseline, "failed_calls": calls1["failed"],
           "rerun_sent": sent2, "ok_after_rerun": again["ok"], "seconds": round(seconds, 1)}
    TABLE.append(row)
    print(json.dumps(row))
    return {"first": first, "second": second, "counts": counts, "again": again, "log": log1}


def format_table(rows: list[dict]) -> list[str]:
    columns = [("fault", "fault"), ("rows_in", "rows in"), ("ok", "ok"), ("dropped", "dropped"), ("lost", "lost"),
               ("duplicated", "dup"), ("baseline_calls", "calls needed"), ("http_requests", "HTTP requests"),
               ("extra_calls", "extra calls"), ("failed_calls", "failed calls"), ("rerun_sent", "re-run sent"),
               ("ok_after_rerun", "ok after re-run"), ("seconds", "s")]
    out = ["| " + " | ".join(title for _, title in columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
    out += ["| " + " | ".join(str(row[key]) for key, _ in columns) + " |" for row in rows]
    return out


# ---------------------------------------------------------------------------------------------- cases

# Each fault alone at a rate high enough that some calls exhaust all 5 tries (0.5^5 of them): both paths,
# transient -> ok and exhausted -> dropped, are exercised in every case.
FAST = [f for f in FAULTS if f not in ("hang", "429_retry_after")]


@pytest.mark.parametrize("fault", FAST)
def test_each_fault_alone(fault, upstream, tmp_path):
    rows = 200
    with FaultProxy(upstream.url, seed=1) as proxy:
        result = fault_case(tmp_path, proxy, {fault: 0.5}, rows, f"{fault} @ 50%")
    log = result["log"]
    injected = sum(1 for _, f, _, _ in log if f == fault)
    assert injected > 0.4 * len(log)
    if fault == "schema_violation":
        # The re-ask path: a violation is answered with the error quoted, as a new request.
        assert result["first"]["model_calls"]["requested"] > rows * TARGETS * SAMPLES
    # Transport faults are retried and the re-run fetches what is missing: every row ends ok.
    # (An invalid reply is a delivered reply: it is cached and replayed on a re-run, see the note below.)
    if fault != "schema_violation":
        assert result["again"]["ok"] == rows


def test_schema_violation_rows_recover_on_rerun(upstream, tmp_path):
    """A row dropped because every re-ask came back invalid should be asked again on a re-run.

    calls.py forgets the replies of a request that ended invalid, so the re-run asks it again.
    """
    rows = 60
    with FaultProxy(upstream.url, seed=3) as proxy:
        result = fault_case(tmp_path, proxy, {"schema_violation": 0.7}, rows,
                            "schema_violation @ 70%")
    assert result["counts"]["dropped"] > 0
    assert result["again"]["ok"] == rows  # the re-run, faults off, asked the invalid ones afresh


def test_all_faults_mixed(upstream, tmp_path):
    rows = 200
    faults = mixed_faults(0.2)
    with FaultProxy(upstream.url, seed=0, retry_after_s=1, hang_s=4) as proxy:
        result = fault_case(tmp_path, proxy, faults, rows, "all 11 mixed @ 20%")
    seen = {f for _, f, _, _ in result["log"]}
    assert set(FAULTS) <= seen, f"not every fault was injected: {set(FAULTS) - seen}"
    assert result["again"]["ok"] >= rows - result["counts"]["dropped"]


@pytest.mark.slow
def test_429_with_retry_after_is_honoured(upstream, tmp_path):
    """429 + Retry-After: 1 -> the same request comes back no sooner than 1 s later."""
    rows = 60
    with FaultProxy(upstream.url, seed=2, retry_after_s=1) as proxy:
        result = fault_case(tmp_path, proxy, {"429_retry_after": 0.3}, rows, "429_retry_after @ 30%")
    assert result["again"]["ok"] == rows
    times: dict[str, list[tuple[float, str]]] = {}
    for _, fault, body, at in result["log"]:
        times.setdefault(body, []).append((at, fault))
    gaps = [later[0] - earlier[0] for seq in times.values() for earlier, later in zip(seq, seq[1:])
            if earlier[1] == "429_retry_after"]
    assert gaps, "no request was retried after a 429"
    assert min(gaps) >= 0.9, f"a retry came {min(gaps):.2f} s after Retry-After: 1"


@pytest.mark.slow
def test_hung_responses_time_out_and_retry(upstream, tmp_path):
    rows = 50
    with FaultProxy(upstream.url, seed=4, hang_s=3) as proxy:
        result = fault_case(tmp_path, proxy, {"hang": 0.3}, rows, "hang @ 30% (timeout 1 s)",
                            timeout_s=1)
    assert result["again"]["ok"] == rows


@pytest.mark.slow
def test_mixed_faults_with_real_backoff(upstream, tmp_path):
    """The backend's own backoff (no patching), all faults mixed at 20%."""
    rows = 100
    with FaultProxy(upstream.url, seed=5, retry_after_s=1, hang_s=4) as proxy:
        result = fault_case(tmp_path, proxy, mixed_faults(0.2), rows, "mixed @ 20%, real backoff")
    assert result["again"]["ok"] >= rows - result["counts"]["dropped"]


@pytest.mark.slow
def test_mixed_faults_against_llama_cpp(llama_server, tmp_path):  # noqa: F811
    """The same invariants with a real model behind the proxy (llama.cpp, grammar-constrained JSON)."""
    rows = 4
    # Every fault but `hang`: llama.cpp serves one request at a time, so the client timeout must cover the
    # queue (here up to 2 requests) and a hang would cost that long. Hangs are covered above.
    faults = mixed_faults(0.2, tuple(f for f in FAULTS if f != "hang"))
    with FaultProxy(llama_server, seed=6, retry_after_s=1) as proxy:
        result = fault_case(tmp_path, proxy, faults, rows, "llama.cpp, mixed @ 20% (no hang)",
                            timeout_s=60, max_tokens=64, max_concurrency=2, deterministic_upstream=False,
                            model="smollm2")  # the name the server lists: the preflight then sends no chat probe
    assert result["counts"]["lost"] == 0
