"""A full disk or a read-only output directory: a clear error, exit 2, and no finished call lost.

Real file systems, not mocks: each case runs `selfalign run` inside a private mount namespace
(`unshare`) on a small tmpfs, so ENOSPC and EROFS come from the kernel exactly as a user would meet them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.support.fake_pipeline import CRITIQUE_CONSISTENCY_EXPORT, fake_pipeline_yaml, load_hh_rlhf

ROWS = 600
CALLS = ROWS * 2 * 2  # rows x (chosen, rejected) x samples


def namespace_command() -> list[str]:
    """`unshare` flags that give this user a private mount namespace, or fail the test saying why not."""
    if shutil.which("unshare") is None:
        pytest.fail("these tests need util-linux's `unshare` (apt-get install util-linux)")
    for flags in (["-rm"], ["-m"]):  # -r: map us to root in a user namespace; plain -m works for real root
        if subprocess.run(["unshare", *flags, "true"], capture_output=True).returncode == 0:
            return ["unshare", *flags]
    pytest.fail("cannot create a mount namespace here (unshare -rm and unshare -m both refused); "
                "these tests need unprivileged user namespaces or root")


# Runs inside the namespace: `mount` and `run` (a selfalign run; its exit code and stderr are recorded).
DRIVER = """\
import json, subprocess, sys

RESULTS = {}

def mount(*options, target):
    subprocess.run(["mount", *options, target], check=True)

def run(name, pipeline, output):
    done = subprocess.run([sys.executable, "-m", "selfalign.cli", "run", str(pipeline), "--output", str(output),
                           "--limit", "%d", "--quiet"], capture_output=True, text=True)
    RESULTS[name] = {"rc": done.returncode, "stderr": done.stderr}
""" % ROWS


def in_mount_namespace(body: str) -> dict:
    """Run DRIVER + `body` (Python) in a private mount namespace; returns what `body` put in RESULTS."""
    script = DRIVER + body + "\nprint(json.dumps(RESULTS, default=str))\n"
    done = subprocess.run([*namespace_command(), sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_disk_full_midway_is_a_clear_error_and_the_rerun_pays_only_the_rest(hh_data, tmp_path):
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(fake_pipeline_yaml("disk", [load_hh_rlhf(hh_data), *CRITIQUE_CONSISTENCY_EXPORT]))
    mount = tmp_path / "mnt"
    mount.mkdir()
    run = mount / "run"
    # 900 KiB holds the load stage's parquet and part of the cache: the disk fills during the critique stage.
    steps = in_mount_namespace(f"""
import pathlib, sqlite3
mount("-t", "tmpfs", "-o", "size=900k", "tmpfs", target="{mount}")
run("full", "{pipeline}", "{run}")
RESULTS["cached"] = sqlite3.connect("{run}/cache.sqlite").execute("SELECT COUNT(*) FROM replies").fetchone()[0]
RESULTS["leftovers"] = [str(p) for p in pathlib.Path("{run}").rglob("*.tmp")]
mount("-o", "remount,size=100m", "tmpfs", target="{mount}")
run("resumed", "{pipeline}", "{run}")
RESULTS["manifest"] = json.loads(pathlib.Path("{run}/manifest.json").read_text())
""")
    full = steps["full"]
    assert full["rc"] == 2, full
    assert f"cannot write {run}" in full["stderr"] and "the disk is full" in full["stderr"], full["stderr"]
    assert "Traceback" not in full["stderr"]
    cached = steps["cached"]
    assert 0 < cached < CALLS, "the disk should fill midway through the critique stage"
    assert steps["leftovers"] == [], "a failed write left a temp file behind"
    assert steps["resumed"]["rc"] == 0, steps["resumed"]
    manifest = steps["manifest"]
    assert manifest["model_calls"]["sent"] == CALLS - cached  # finished calls are not paid for twice
    assert manifest["status"] == "complete"


def test_read_only_output_directory_is_a_clear_error_and_writes_nothing(hh_data, tmp_path):
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(fake_pipeline_yaml("disk", [load_hh_rlhf(hh_data), *CRITIQUE_CONSISTENCY_EXPORT]))
    mount = tmp_path / "mnt"
    mount.mkdir()
    steps = in_mount_namespace(f"""
import pathlib
mount("-t", "tmpfs", "-o", "size=10m", "tmpfs", target="{mount}")
pathlib.Path("{mount}/existing").mkdir()
mount("-o", "remount,ro", "tmpfs", target="{mount}")
run("new_dir", "{pipeline}", "{mount / 'new'}")
run("existing_dir", "{pipeline}", "{mount / 'existing'}")
RESULTS["listing"] = sorted(str(p) for p in pathlib.Path("{mount}").rglob("*"))
""")
    for name, where in (("new_dir", mount / "new"), ("existing_dir", mount / "existing")):
        step = steps[name]
        assert step["rc"] == 2, step
        assert f"cannot write the run directory {where}: the file system is read-only" in step["stderr"], step
        assert "Traceback" not in step["stderr"]
    assert steps["listing"] == [str(mount / "existing")]
