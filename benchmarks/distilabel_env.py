"""distilabel 1.5.3 in its own virtual environment, for the overhead benchmark.

:func:`ensure_distilabel_venv` creates (or reuses) ``benchmarks/.venvs/distilabel``
(git-ignored): ``pip install distilabel==1.5.3``, then ``pip install requests
openai`` (distilabel's pipeline module imports ``requests`` without declaring
it). :func:`run_distilabel` runs ``benchmarks/distilabel_task.py`` in it against
a server and returns its JSON result, or ``{"unavailable": "unavailable: <why>"}``
when distilabel cannot be installed or run — never a made-up number.

``python -m benchmarks.distilabel_env [--requests 8000] [--concurrency 64]``
starts the instant server and prints the result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

DISTILABEL_VERSION = "1.5.3"
HERE = Path(__file__).resolve().parent
VENV_DIR = HERE / ".venvs" / "distilabel"
TASK_SCRIPT = HERE / "distilabel_task.py"

_CHECK = (
    "import importlib.metadata as m, distilabel, requests, openai; "
    "print(m.version('distilabel'))"
)


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _tail(text: str, n: int = 400) -> str:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip() and not ln.startswith("WARNING: Location")]
    return (" | ".join(lines[-3:]))[-n:] or "(no output)"


def _run(cmd: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONWARNINGS="ignore")
    return subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=timeout, env=env)


def _is_ready(py: Path) -> bool:
    if not py.exists():
        return False
    try:
        r = _run([py, "-c", _CHECK], timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and r.stdout.strip() == DISTILABEL_VERSION


def ensure_distilabel_venv(venv: Path = VENV_DIR, timeout: float = 1200.0) -> tuple[Path | None, str]:
    """Return ``(python, "ok")`` for a ready venv, else ``(None, "unavailable: <why>")``."""
    py = _venv_python(venv)
    if _is_ready(py):
        return py, "ok"
    steps = []
    if not py.exists():
        steps.append(("create the venv", [sys.executable, "-m", "venv", venv]))
    steps += [
        (f"pip install distilabel=={DISTILABEL_VERSION}",
         [py, "-m", "pip", "install", "-q", f"distilabel=={DISTILABEL_VERSION}"]),
        ("pip install requests openai", [py, "-m", "pip", "install", "-q", "requests", "openai"]),
    ]
    for what, cmd in steps:
        try:
            r = _run(cmd, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"unavailable: {what} timed out after {timeout:.0f} s"
        except OSError as exc:
            return None, f"unavailable: {what} failed: {exc}"
        if r.returncode != 0:
            return None, f"unavailable: {what} failed (exit {r.returncode}): {_tail(r.stderr or r.stdout)}"
    if not _is_ready(py):
        r = _run([py, "-c", _CHECK], timeout=120)
        return None, f"unavailable: distilabel {DISTILABEL_VERSION} does not import after install: {_tail(r.stderr or r.stdout)}"
    return py, "ok"


def run_distilabel(base_url: str, requests: Sequence[dict[str, Any]], concurrency: int = 64,
                   mode: str = "expand", samples: int = 4, timeout: float = 1800.0) -> dict[str, Any]:
    """Run the equivalent task in distilabel against ``base_url`` (ending in ``/v1``).

    Returns the task's JSON (``requests``, ``seconds``, ``req_per_s``, and
    ``window_req_per_s`` when the server has ``/stats``) plus ``cpu_seconds`` /
    ``cpu_ms_per_req`` (CPU of all distilabel's processes, start-up included), or
    ``{"unavailable": "unavailable: <why>"}``.
    """
    py, why = ensure_distilabel_venv()
    if py is None:
        return {"unavailable": why}
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for req in requests:
            f.write(json.dumps(req) + "\n")
        path = f.name
    try:
        cmd = [py, TASK_SCRIPT, "--base-url", base_url, "--requests-file", path,
               "--concurrency", str(concurrency), "--mode", mode, "--samples", str(samples)]
        import resource

        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            r = _run(cmd, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"unavailable": f"unavailable: the distilabel run timed out after {timeout:.0f} s"}
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        if r.returncode != 0 or not lines:
            return {"unavailable": f"unavailable: the distilabel run failed (exit {r.returncode}): "
                                   f"{_tail(r.stderr or r.stdout)}"}
        result = json.loads(lines[-1])
        # all of distilabel's processes (start-up and imports included)
        result["cpu_seconds"] = round(cpu, 3)
        result["cpu_ms_per_req"] = round(1000 * cpu / max(result.get("requests", 0), 1), 3)
        if result.get("valid_generations", 0) < result.get("generations", 0):
            result["warning"] = "some generations were not valid critiques"
        return result
    finally:
        os.unlink(path)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from benchmarks.baselines import make_requests
    from benchmarks.instant_server import start_instant_server, stop_instant_server

    p = argparse.ArgumentParser(description="distilabel 1.5.3 against the instant server")
    p.add_argument("--requests", type=int, default=8000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--mode", choices=["expand", "n"], default="expand")
    args = p.parse_args(argv)
    reqs = make_requests(rows=(args.requests + 3) // 4, samples=4)[: args.requests]
    url, proc = start_instant_server()
    try:
        print(json.dumps(run_distilabel(url, reqs, args.concurrency, mode=args.mode)))
    finally:
        stop_instant_server(proc)


if __name__ == "__main__":
    main()
