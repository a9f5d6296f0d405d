"""A full disk or a read-only output directory: a clear error, exit 2, and no finished call lost.

Real file systems, not mocks: each case runs `selfalign run` inside a private mount namespace
(`unshare`) on a small tmpfs, so ENOSPC and EROFS come from the kernel exactly as a user would meet them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PIPELINE = """\
schema_version: 1
name: disk
models:
  critic: {{backend: fake}}
stages:
  - kind: load
    path: {data}
    format: hh-rlhf
    on_bad_row: drop
  - kind: critique
    model: critic
    samples: 2
  - kind: consistency
  - kind: export
"""
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


def run_script(script: str) -> list[dict]:
    """Run a shell script in a private mount namespace; each `step NAME CMD...` line reports rc and stderr."""
    prelude = f"""
set -u
step() {{ name=$1; shift; err=$("$@" 2>&1 >/dev/null); rc=$?
  printf '%s\\n' "$(printf '%s' "$err" | {sys.executable} -c 'import json,sys; print(json.dumps({{"step": sys.argv[1], "rc": int(sys.argv[2]), "stderr": sys.stdin.read()}}))' "$name" "$rc")"; }}
"""
    done = subprocess.run([*namespace_command(), "sh", "-c", prelude + script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def selfalign(pipeline: Path, output: str, *extra: str) -> str:
    return f"{sys.executable} -m selfalign.cli run {pipeline} --output {output} --limit {ROWS} --quiet {' '.join(extra)}"


def test_disk_full_midway_is_a_clear_error_and_the_rerun_pays_only_the_rest(hh_data, tmp_path):
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(PIPELINE.format(data=hh_data))
    mount = tmp_path / "mnt"
    mount.mkdir()
    run = mount / "run"
    # 900 KiB holds the load stage's parquet and part of the cache: the disk fills during the critique stage.
    steps = run_script(f"""
mount -t tmpfs -o size=900k tmpfs {mount}
step full {selfalign(pipeline, run)}
step cached {sys.executable} -c "import sqlite3; print(sqlite3.connect('{run}/cache.sqlite').execute('select count(*) from replies').fetchone()[0], file=__import__('sys').stderr)"
step leftovers sh -c "ls -A {run}/stages {run}/dropped 2>/dev/null | grep -c '\\.tmp$' >&2"
mount -o remount,size=100m {mount}
step resumed {selfalign(pipeline, run)}
step manifest sh -c "cat {run}/manifest.json >&2"
""")
    by_step = {s["step"]: s for s in steps}
    full = by_step["full"]
    assert full["rc"] == 2, full
    assert f"cannot write {run}" in full["stderr"] and "the disk is full" in full["stderr"], full["stderr"]
    assert "Traceback" not in full["stderr"]
    cached = int(by_step["cached"]["stderr"].strip())
    assert 0 < cached < CALLS, "the disk should fill midway through the critique stage"
    assert by_step["leftovers"]["stderr"].strip() == "0", "a failed write left a temp file behind"
    assert by_step["resumed"]["rc"] == 0, by_step["resumed"]
    manifest = json.loads(by_step["manifest"]["stderr"])
    assert manifest["model_calls"]["sent"] == CALLS - cached  # finished calls are not paid for twice
    assert manifest["status"] == "complete"


def test_read_only_output_directory_is_a_clear_error_and_writes_nothing(hh_data, tmp_path):
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(PIPELINE.format(data=hh_data))
    mount = tmp_path / "mnt"
    mount.mkdir()
    steps = run_script(f"""
mount -t tmpfs -o size=10m tmpfs {mount}
mkdir {mount}/existing
mount -o remount,ro {mount}
step new_dir {selfalign(pipeline, mount / 'new')}
step existing_dir {selfalign(pipeline, mount / 'existing')}
step listing sh -c "find {mount} >&2"
""")
    by_step = {s["step"]: s for s in steps}
    for name, where in (("new_dir", mount / "new"), ("existing_dir", mount / "existing")):
        step = by_step[name]
        assert step["rc"] == 2, step
        assert f"cannot write the run directory {where}: the file system is read-only" in step["stderr"], step
        assert "Traceback" not in step["stderr"]
    assert sorted(by_step["listing"]["stderr"].split()) == sorted([str(mount), str(mount / "existing")])
