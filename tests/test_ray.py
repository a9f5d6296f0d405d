"""The Ray executor on a real two-node Ray cluster on 127.0.0.x: the same rows as the local executor, row for row,
a shared cache, a killed worker process and a killed driver that lose nothing but calls in flight.

The config tests at the top are fast; everything that starts Ray is marked slow (CI runs `pytest -m slow`).
"""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import pytest

from selfalign.cli import build_parser, executor_overrides
from selfalign.config import config_hash, load_pipeline
from selfalign.errors import ConfigErrors
from selfalign.runner import run_pipeline
from tests.support.fake_pipeline import fake_pipeline_yaml

ROOT = Path(__file__).resolve().parent.parent
CRITIQUE_PROMPT = ROOT / "prompts" / "critique.jinja"

# Ten lines; a test appends its `executor:` section from line 11 on.
FAST = fake_pipeline_yaml("t", [{"kind": "load", "path": "data.jsonl", "format": "trl"},
                                {"kind": "critique", "model": "critic"}])


def config_error(write_pipeline, executor: str, overrides=()) -> str:
    with pytest.raises(ConfigErrors) as exc:
        load_pipeline(write_pipeline(FAST + executor), list(overrides))
    return str(exc.value)


def test_executor_unknown_key_says_did_you_mean(write_pipeline):
    message = config_error(write_pipeline, "executor:\n  kind: ray\n  replica: 2\n")
    assert ":13: executor.replica: unknown key; did you mean 'replicas'?" in message


@pytest.mark.parametrize("executor, expected", [
    ("executor: {kind: dask}", "executor.kind: Input should be 'local' or 'ray'"),
    ("executor: {kind: ray, replicas: 0}", "executor.replicas: Input should be greater than or equal to 1"),
    ("executor: {kind: ray, batch_size: lots}", "executor.batch_size: Input should be a valid integer"),
    ("executor: {kind: ray, num_gpus: -1}", "executor.num_gpus: Input should be greater than or equal to 0"),
    ("executor: {address: '127.0.0.1:6379'}", "executor: Value error, address only applies to kind: ray"),
    ("executor: {replicas: 2, num_cpus: 2}", "executor: Value error, num_cpus, replicas only apply to kind: ray"),
])
def test_executor_bad_values_are_errors(write_pipeline, executor, expected):
    assert expected in config_error(write_pipeline, executor + "\n")


def test_executor_flags_and_defaults(write_pipeline):
    path = write_pipeline(FAST)
    local = load_pipeline(path)
    assert local.pipeline.executor.kind == "local"
    args = build_parser().parse_args(["run", str(path), "--executor", "ray", "--address", "127.0.0.2:6379"])
    on_ray = load_pipeline(path, executor_overrides(args))
    assert (on_ray.pipeline.executor.kind, on_ray.pipeline.executor.address) == ("ray", "127.0.0.2:6379")
    assert on_ray.pipeline.executor.replicas == 1
    # Where the calls run is not part of the config hash: the same pipeline makes the same data anywhere.
    assert config_hash(on_ray) == config_hash(local)
    args = build_parser().parse_args(["run", str(path), "--address", "127.0.0.2:6379"])
    with pytest.raises(ConfigErrors, match="address only applies to kind: ray"):
        load_pipeline(path, executor_overrides(args))


# ---------------------------------------------------------------- on a real cluster (slow)


@pytest.fixture(scope="module")
def ray_cluster():
    from tests.support.ray_cluster import RayCluster

    # The in-process driver (run_pipeline) and driver subprocesses read the cluster's token from the environment.
    saved = dict(os.environ)
    with RayCluster(head_cpus=1, worker_cpus=1) as cluster:
        os.environ.update(cluster.driver_env())
        try:
            yield cluster
        finally:
            os.environ.clear()
            os.environ.update(saved)


def write_pairs(path: Path, rows: int) -> Path:
    with open(path, "w") as handle:
        for i in range(rows):
            handle.write(json.dumps({"prompt": f"Question {i}: what is {i} times {i % 7 + 2}?",
                                     "chosen": f"{i} times {i % 7 + 2} is {i * (i % 7 + 2)}.",
                                     "rejected": f"It is {i + 1}, roughly."}) + "\n")
    return path


# A short prompt keeps the embedded model's 20-row runs (one thread each) to seconds per call.
SHORT_PROMPT = """\
{% block system %}You review answers.{% endblock %}
{% block user %}Question: {{ prompt[-1].content }}
Answer: {{ response }}
Critique the answer in one sentence and score it from {{ score_min }} to {{ score_max }}.
Reply in JSON: {"critique": "...", "score": <score>}{% endblock %}
"""


def write_critique_pipeline(tmp_path: Path, data: Path, model: dict, samples: int = 1,
                            sampling: dict | None = None, prompt: Path = CRITIQUE_PROMPT) -> Path:
    # max_failed_fraction 1: these tests compare a local and a Ray run, failed calls included (32-token replies
    # break the schema often); the failure budget itself is tested in test_endpoint_failures.py.
    doc = {"schema_version": 1, "name": "ray-test", "max_failed_fraction": 1, "models": {"critic": model}, "stages": [
        {"kind": "load", "path": str(data), "format": "trl"},
        {"kind": "critique", "model": "critic", "prompt": str(prompt), "samples": samples,
         "targets": ["chosen"], **({"sampling": sampling} if sampling else {})}]}
    path = tmp_path / "pipeline.yaml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


def on_ray(cluster, replicas: int = 2, batch_size: int = 1000) -> list[str]:
    return ["executor.kind=ray", f"executor.address={cluster.address}", f"executor.replicas={replicas}",
            f"executor.batch_size={batch_size}"]


def assert_same_rows(run_a: Path, run_b: Path) -> None:
    for folder in ("stages", "dropped"):
        names = sorted(p.name for p in (run_a / folder).glob("*.parquet"))
        assert names == sorted(p.name for p in (run_b / folder).glob("*.parquet"))
        for name in names:
            a, b = pl.read_parquet(run_a / folder / name), pl.read_parquet(run_b / folder / name)
            assert a.columns == b.columns, name
            assert a.equals(b), f"{folder}/{name} differs"


def cached_replies(run_dir: Path) -> int:
    try:
        with sqlite3.connect(f"file:{run_dir / 'cache.sqlite'}?mode=ro", uri=True) as db:
            return db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.mark.slow
def test_fake_backend_100k_rows_equal_local_and_share_the_cache(ray_cluster, tmp_path):
    pipeline = write_critique_pipeline(tmp_path, write_pairs(tmp_path / "pairs.jsonl", 100_000), {"backend": "fake"})
    local = run_pipeline(load_pipeline(pipeline), output=tmp_path / "local", quiet=True)
    ray_run = run_pipeline(load_pipeline(pipeline, on_ray(ray_cluster)), output=tmp_path / "ray", quiet=True)
    assert ray_run["rows"][0]["in"] == 100_000
    assert ray_run["model_calls"] == local["model_calls"] == {"requested": 100_000, "cached": 0, "sent": 100_000,
                                                              "failed": 0}
    assert ray_run["tokens"] == local["tokens"]
    assert_same_rows(tmp_path / "local", tmp_path / "ray")

    # Same cache keys: a Ray run over the local run's cache sends nothing and makes the same rows.
    (tmp_path / "shared").mkdir()
    shutil.copy(tmp_path / "local" / "cache.sqlite", tmp_path / "shared" / "cache.sqlite")
    again = run_pipeline(load_pipeline(pipeline, on_ray(ray_cluster)), output=tmp_path / "shared", quiet=True)
    assert again["model_calls"]["sent"] == 0 and again["model_calls"]["cached"] == 100_000
    assert_same_rows(tmp_path / "local", tmp_path / "shared")


@pytest.mark.slow
def test_embedded_model_20_rows_equal_local(ray_cluster, tmp_path):
    # Greedy decoding with one thread on both sides: llama.cpp's output is then the same in every process.
    model = {"backend": "llamacpp", "n_threads": 1}
    (tmp_path / "short.jinja").write_text(SHORT_PROMPT)
    pipeline = write_critique_pipeline(tmp_path, write_pairs(tmp_path / "pairs.jsonl", 20), model,
                                       sampling={"temperature": 0, "max_tokens": 32, "seed": 0},
                                       prompt=tmp_path / "short.jinja")
    local = run_pipeline(load_pipeline(pipeline), output=tmp_path / "local", quiet=True)
    ray_run = run_pipeline(load_pipeline(pipeline, on_ray(ray_cluster, batch_size=5)), output=tmp_path / "ray",
                           quiet=True)
    assert ray_run["model_calls"] == local["model_calls"]
    assert ray_run["model_calls"]["sent"] >= 20 and ray_run["rows"][1]["in"] == 20
    assert ray_run["tokens"] == local["tokens"] and local["tokens"]["completion"] > 0
    assert_same_rows(tmp_path / "local", tmp_path / "ray")
    texts = pl.read_parquet(tmp_path / "ray" / "stages" / "01-critique.parquet")["chosen_critiques"]
    assert texts.list.len().sum() > 0  # real critiques came back from the model on the cluster


def replica_processes(cluster) -> list:
    return [p for p in cluster.worker_processes() if "ModelReplica" in " ".join(p.info["cmdline"])]


@pytest.mark.slow
def test_killed_worker_process_and_the_run_still_completes(ray_cluster, tmp_path):
    pipeline = write_critique_pipeline(tmp_path, write_pairs(tmp_path / "pairs.jsonl", 2000),
                                       {"backend": "fake", "latency_s": 0.005})
    run_dir = tmp_path / "ray"
    killed: dict = {}

    def kill_one_replica_midway() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            replicas = replica_processes(ray_cluster)
            done = cached_replies(run_dir)
            if replicas and 200 <= done < 1500:
                victim = replicas[0]
                killed.update(pid=victim.pid, cached_before=done)
                victim.send_signal(signal.SIGKILL)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_replica_midway)
    killer.start()
    manifest = run_pipeline(load_pipeline(pipeline, on_ray(ray_cluster, batch_size=50)), output=run_dir, quiet=True)
    killer.join()
    assert killed, "no replica was killed: the run ended before the killer found one"
    assert 200 <= killed["cached_before"] < 2000  # killed mid-run
    assert manifest["model_calls"] == {"requested": 2000, "cached": 0, "sent": 2000, "failed": 0}
    local = run_pipeline(load_pipeline(pipeline), output=tmp_path / "local", quiet=True)
    assert manifest["tokens"] == local["tokens"]
    assert_same_rows(tmp_path / "local", run_dir)


@pytest.mark.slow
def test_killed_driver_resumes_losing_only_calls_in_flight(ray_cluster, tmp_path):
    pipeline = write_critique_pipeline(tmp_path, write_pairs(tmp_path / "pairs.jsonl", 2000),
                                       {"backend": "fake", "latency_s": 0.005})
    run_dir = tmp_path / "ray"
    command = [sys.executable, "-m", "selfalign.cli", "run", str(pipeline), "--output", str(run_dir), "--quiet",
               "--executor", "ray", "--address", ray_cluster.address, "--set", "executor.replicas=2",
               "--set", "executor.batch_size=50"]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while cached_replies(run_dir) < 500 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert driver.poll() is None, driver.communicate()[1].decode()[-2000:]
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    cached = cached_replies(run_dir)
    assert 500 <= cached < 2000

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    calls = json.loads((run_dir / "manifest.json").read_text())["model_calls"]
    assert calls == {"requested": 2000, "cached": cached, "sent": 2000 - cached, "failed": 0}
    run_pipeline(load_pipeline(pipeline), output=tmp_path / "local", quiet=True)
    assert_same_rows(tmp_path / "local", run_dir)
