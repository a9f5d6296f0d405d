"""kill -9 a real run midway, resume it, and get exactly what an undisturbed run gets."""

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

import polars as pl
import pytest

from tests.support.fake_pipeline import CRITIQUE_CONSISTENCY_EXPORT, fake_pipeline_yaml, load_hh_rlhf


def start(pipeline, run_dir):
    return subprocess.Popen([sys.executable, "-m", "selfalign.cli", "run", str(pipeline), "--output", str(run_dir),
                             "--limit", "250", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def cached_replies(run_dir) -> int:
    try:
        with sqlite3.connect(run_dir / "cache.sqlite") as db:
            return db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_kill_9_then_resume_equals_undisturbed_run(write_pipeline, hh_data, tmp_path, seed):
    """Five kills at random moments: after a random share (5-90%) of the calls are cached, plus a random pause."""
    pipeline = write_pipeline(fake_pipeline_yaml("resume", [load_hh_rlhf(hh_data), *CRITIQUE_CONSISTENCY_EXPORT],
                                                 latency_s=0.004))
    reference = subprocess.run([sys.executable, "-m", "selfalign.cli", "run", str(pipeline), "--output",
                                str(tmp_path / "reference"), "--limit", "250", "--quiet"], capture_output=True)
    assert reference.returncode == 0, reference.stderr.decode()
    total_calls = json.loads((tmp_path / "reference" / "manifest.json").read_text())["model_calls"]["sent"]

    run_dir = tmp_path / "killed"
    process = start(pipeline, run_dir)
    deadline = time.monotonic() + 60
    moment = random.Random(seed)
    kill_after = int(total_calls * moment.uniform(0.05, 0.9))
    while cached_replies(run_dir) < kill_after and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    time.sleep(moment.uniform(0, 0.2))
    assert process.poll() is None, "the run finished before it could be killed; raise the fake latency"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    persisted = cached_replies(run_dir)
    assert 0 < persisted < total_calls
    assert not (run_dir / "manifest.json").exists()

    resumed = subprocess.run([sys.executable, "-m", "selfalign.cli", "run", str(pipeline), "--output",
                              str(run_dir), "--limit", "250", "--quiet"], capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    # Nothing persisted before the kill is paid for again.
    assert manifest["model_calls"]["sent"] == total_calls - persisted
    expected = pl.read_parquet(tmp_path / "reference" / "stages" / "03-export.parquet").sort("row_id")
    got = pl.read_parquet(run_dir / "stages" / "03-export.parquet").sort("row_id")
    assert got.equals(expected)
    assert not list(run_dir.rglob("*.tmp"))  # no half-written file survived as if complete


SERIES_PIPELINE = """\
schema_version: 1
name: resume-series
models:
  critic: {{backend: openai, base_url: '{url}', model: m, max_concurrency: {concurrency}}}
stages:
  - kind: load
    path: {data}
    format: hh-rlhf
    on_bad_row: drop
  - kind: critique
    model: critic
    samples: 2
"""


def test_kill_9_series_resends_only_calls_in_flight(write_pipeline, hh_data, tmp_path):
    """Five kill -9s of one run against a real HTTP server that counts what it answered: a call is asked twice
    only if it was in flight at a kill (at most max_concurrency per kill), and the attempts table accounts for
    every attempt, killed ones included."""
    from tests.support.fake_openai_server import FakeOpenAIServer

    concurrency, kills = 8, 5
    run_dir = tmp_path / "run"
    with FakeOpenAIServer(model="m", delay_s=0.01) as server:
        pipeline = write_pipeline(SERIES_PIPELINE.format(url=server.url, concurrency=concurrency, data=hh_data))
        total_calls = 250 * 2 * 2
        for kill in range(kills):
            process = start(pipeline, run_dir)
            kill_after = total_calls * (kill + 1) // (kills + 2)
            deadline = time.monotonic() + 60
            while cached_replies(run_dir) < kill_after and time.monotonic() < deadline and process.poll() is None:
                time.sleep(0.01)
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        resumed = subprocess.run([sys.executable, "-m", "selfalign.cli", "run", str(pipeline), "--output",
                                  str(run_dir), "--limit", "250", "--quiet"], capture_output=True)
        assert resumed.returncode == 0, resumed.stderr.decode()
        asked_twice = sum(count - 1 for count in server.bodies.values())
        answered = server.requests
    assert cached_replies(run_dir) == total_calls == len(server.bodies)
    assert asked_twice <= kills * concurrency, f"{asked_twice} calls were paid twice over {kills} kills"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [a["status"] for a in manifest["attempts"]] == ["killed"] * kills + ["complete"]
    assert all(a["ended"] is None for a in manifest["attempts"][:kills])
    # Calls sent over the run's life: every reply that arrived is counted; the server also saw those in flight.
    sent = manifest["calls_sent_all_attempts"]
    assert sent == total_calls
    assert answered - kills * concurrency <= sent <= answered
