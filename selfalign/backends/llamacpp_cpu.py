"""Which llama.cpp model params this CPU can actually execute.

Why this exists: on an Intel Xeon in a Firecracker VM whose CPUID advertises AMX (`amx_tile amx_int8
amx_bf16` in /proc/cpuinfo), a llama-cpp-python built from source with native flags compiles in llama.cpp's
AMX matmul kernels and puts the weights in its AMX buffer type. The first completion then dies with SIGILL
(`tilezero` in `ggml_backend_amx_mul_mat`): the CPU advertises AMX but the VM does not execute it, and asking
for tile permission with arch_prctl does not help. Loading the model with `use_extra_bufts = False` skips
llama.cpp's extra buffer types (AMX, and CPU weight repacking for a few quant types) and the same completion
returns. No llama.cpp setting turns off AMX alone, so that flag is the narrowest switch there is.

The choice (`choose_params`, a plain function so tests can hand it a fake probe):

1. /proc/cpuinfo advertises no `amx*` flag, or the llama.cpp library says it was built without AMX kernels:
   default params, no probe, no cost.
2. A verdict cached for this CPU and this llama.cpp build: use it.
3. Otherwise probe in a subprocess (load the model with default params, one tiny completion). It returns:
   default params. It dies by a signal: probe again with `use_extra_bufts=False`; that returns: use it, and
   say so on stderr (slower). Both die by a signal: RunError saying what to do. A probe that hangs or fails
   otherwise gives no verdict: AMX off for this run, nothing cached.

The verdict is cached in $XDG_CACHE_HOME/selfalign/llamacpp-cpu.json (or ~/.cache/...), keyed by the CPU
(model name and flags) and the llama.cpp shared libraries (path, size, mtime), so the probe runs once per
machine and build, and a rebuilt llama-cpp-python is probed afresh.

`python -m selfalign.backends.llamacpp_cpu probe MODEL [--no-extra-bufts]` is the probe's child side.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..atomic import write_json
from ..errors import RunError
from .bundled_model import bundled_model_path

CACHE_FILE_NAME = "llamacpp-cpu.json"
CACHE_SCHEMA = 1
# Loading the 135M bundled model and evaluating one prompt takes about a second; a big user model on a
# busy machine takes longer. A probe that runs past this gives no verdict (AMX off for that run, not cached).
PROBE_TIMEOUT_S = 180.0
# AMX tile kernels run only for batches of more than one token (llama.cpp uses AVX512-VNNI for a single-
# token step), so the probe's prompt must be a real multi-token prompt, as the pipelines' prompts are.
PROBE_PROMPT = ("Rate the following answer from 1 to 10 and explain your score in one sentence. "
                "Question: why is the sky blue? Answer: sunlight is scattered by the molecules of the air, "
                "and blue light is scattered more than red light because its wavelength is shorter.")
TROUBLESHOOTING = "README.md, 'When things go wrong', 'Illegal instruction on some Intel CPUs'"


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]

    @property
    def amx_flags(self) -> list[str]:
        return sorted(flag for flag in self.flags if flag.startswith("amx"))

    def describe(self) -> str:
        amx = " ".join(self.amx_flags) or "no AMX flags"
        return f"{self.model} (/proc/cpuinfo advertises {amx})"


def read_cpu_info(path: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    """CPU model name and flags of the first processor; empty flags where there is no /proc (macOS)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return CpuInfo("unknown CPU", frozenset())
    model, flags = "unknown CPU", frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        name = name.strip()
        if name == "model name" and model == "unknown CPU":
            model = value.strip()
        elif name == "flags" and not flags:
            flags = frozenset(value.split())
    return CpuInfo(model, flags)


@dataclass(frozen=True)
class ModelParams:
    """The llama.cpp model params selfalign sets; everything else stays llama.cpp's default."""

    use_extra_bufts: bool = True
    # Why the params are not the default: printed once per process, so the user knows why it is slower.
    note: str | None = None


DEFAULT_PARAMS = ModelParams()


@dataclass(frozen=True)
class ProbeResult:
    outcome: str  # "ok" | "signal" (killed by a signal) | "timeout" | "error" (exited non-zero)
    detail: str = ""  # the signal name (SIGILL), or the exit code and the end of stderr
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    def describe(self) -> str:
        return {"ok": "returned", "signal": f"killed by {self.detail}",
                "timeout": self.detail, "error": f"failed: {self.detail}"}[self.outcome]


Probe = Callable[[bool], ProbeResult]  # probe(use_extra_bufts) -> how one load and completion went


def safe_params(cpu: CpuInfo, how_default_died: str) -> ModelParams:
    """AMX off. `how_default_died` is e.g. "killed by SIGILL", said on stderr so the user knows why it is slower."""
    return ModelParams(use_extra_bufts=False, note=(
        f"selfalign: this CPU ({cpu.model}) advertises AMX ({' '.join(cpu.amx_flags)}) but cannot execute it "
        f"(a llama.cpp test completion was {how_default_died}), so llama.cpp's AMX path is off "
        f"(use_extra_bufts=False; slower)"))


def unchecked_params(cpu: CpuInfo, default: ProbeResult) -> ModelParams:
    return ModelParams(use_extra_bufts=False, note=(
        f"selfalign: this CPU ({cpu.model}) advertises AMX ({' '.join(cpu.amx_flags)}) and the check whether it "
        f"executes it did not finish (the test completion {default.describe()}), so llama.cpp's AMX path is off "
        f"for this run (use_extra_bufts=False; slower)"))


def decide(cpu: CpuInfo, library_has_amx: bool | None, probe: Probe) -> tuple[ModelParams, dict | None]:
    """(params, verdict to cache or None). `library_has_amx` None means unknown: probe to be safe.

    Only a signal is a verdict on the CPU. A probe that hung or failed for another reason (a busy machine,
    an unreadable model) says nothing about it: AMX off is the careful choice for this run (it costs speed,
    a SIGILL costs the run), nothing is cached, and the real load reports any real error itself."""
    if not cpu.amx_flags or library_has_amx is False:
        return DEFAULT_PARAMS, None  # the AMX path cannot be taken: nothing to probe
    default = probe(True)
    if default.ok:
        return DEFAULT_PARAMS, {"use_extra_bufts": True, "default_probe": "returned",
                                "probe_seconds": round(default.seconds, 2)}
    if default.outcome != "signal":
        return unchecked_params(cpu, default), None
    safe = probe(False)
    if safe.outcome == "signal":
        raise RunError(
            f"llama.cpp cannot run on this CPU, {cpu.describe()}: a test completion was {default.describe()} "
            f"with default params and {safe.describe()} with its AMX path off (use_extra_bufts=False). This "
            f"llama-cpp-python build uses instructions this CPU (or its VM) does not execute. Rebuild it for a "
            f"generic CPU: CMAKE_ARGS='-DGGML_NATIVE=OFF' pip install --force-reinstall --no-cache-dir "
            f"llama-cpp-python==0.3.36 (the next run probes the new build), or use the openai or vllm backend "
            f"in the pipeline's models section. See {TROUBLESHOOTING}.")
    params = safe_params(cpu, default.describe())
    if not safe.ok:
        return params, None  # the safe probe hung or failed: use it anyway, but decide again next time
    return params, {"use_extra_bufts": False, "default_probe": default.describe(),
                    "probe_seconds": round(default.seconds + safe.seconds, 2)}


# --------------------------------------------------------------------------------------------------
# The verdict cache
# --------------------------------------------------------------------------------------------------

def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "selfalign" / CACHE_FILE_NAME


def llama_library_dir() -> Path | None:
    """Where llama-cpp-python loads its shared libraries from (its own lib/, or LLAMA_CPP_LIB_PATH)."""
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("llama_cpp")  # found without importing: importing loads the library
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "lib"


def verdict_key(cpu: CpuInfo, library_dir: Path | None) -> dict:
    """What the verdict depends on: the CPU, and the exact llama.cpp build (a rebuild changes size/mtime)."""
    libraries = []
    if library_dir is not None and library_dir.is_dir():
        for path in sorted(library_dir.iterdir()):
            if path.is_file() and (".so" in path.name or path.suffix in (".dylib", ".dll")):
                stat = path.stat()
                libraries.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return {"cpu_model": cpu.model, "cpu_flags": " ".join(sorted(cpu.flags)), "libraries": libraries}


def _key_id(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def read_verdict(path: Path, key: dict) -> dict | None:
    """The cached verdict for this key; None when absent, unreadable or from another CPU or build."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entry = data["verdicts"][_key_id(key)]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a missing or damaged cache only costs a probe
    if not isinstance(entry, dict) or entry.get("key") != key or not isinstance(entry.get("use_extra_bufts"), bool):
        return None
    return entry


def write_verdict(path: Path, key: dict, verdict: dict) -> None:
    """Add this key's verdict (other machines' and builds' verdicts stay: a shared home, several venvs)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        verdicts = data["verdicts"] if isinstance(data.get("verdicts"), dict) else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        verdicts = {}
    verdicts[_key_id(key)] = {"key": key, **verdict, "probed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        write_json({"schema": CACHE_SCHEMA, "verdicts": verdicts}, path)
    except OSError:
        pass  # an unwritable cache dir means probing again next time, not a failed run


def choose_params(cpu: CpuInfo, library_has_amx: bool | None, key: dict, cache_file: Path, probe: Probe,
                  log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> ModelParams:
    """The params for this CPU: from the cache, else from `decide` (its verdict cached)."""
    if not cpu.amx_flags or library_has_amx is False:
        return DEFAULT_PARAMS
    cached = read_verdict(cache_file, key)
    if cached is not None:
        params = (DEFAULT_PARAMS if cached["use_extra_bufts"]
                  else safe_params(cpu, str(cached.get("default_probe", "killed by a signal"))))
    else:
        params, verdict = decide(cpu, library_has_amx, probe)
        if verdict is not None:
            write_verdict(cache_file, key, verdict)
    if params.note:
        log(params.note)
    return params


# --------------------------------------------------------------------------------------------------
# The real inputs: the library's build flags and the subprocess probe
# --------------------------------------------------------------------------------------------------

def library_has_amx() -> bool | None:
    """Whether llama.cpp's CPU backend was compiled with AMX kernels; None when it cannot tell.

    llama_print_system_info() lists the CPU backend's compile-time features ("AMX_INT8 = 1" only when the
    kernels are built in). Reading it executes no AMX instruction."""
    try:
        import llama_cpp
        info = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    except Exception:  # noqa: BLE001  (no llama_cpp, or an old one: probing decides instead)
        return None
    if "CPU :" not in info:
        return None  # backends not registered yet (a dynamic-backend build): unknown, so probe
    return "AMX_INT8 = 1" in info


def run_probe_command(argv: list[str], timeout_s: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """Run one probe child; say whether it returned, was killed by a signal, ran out of time or failed."""
    started = time.monotonic()
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return ProbeResult("timeout", f"did not finish in {timeout_s:.0f}s", time.monotonic() - started)
    seconds = time.monotonic() - started
    if done.returncode == 0:
        return ProbeResult("ok", "", seconds)
    if done.returncode < 0:
        return ProbeResult("signal", signal_name(-done.returncode), seconds)
    tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
    return ProbeResult("error", f"exit code {done.returncode}: {' / '.join(tail) or '(no output)'}", seconds)


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def probe_model(model_path: Path, use_extra_bufts: bool, timeout_s: float = PROBE_TIMEOUT_S) -> ProbeResult:
    argv = [sys.executable, "-m", "selfalign.backends.llamacpp_cpu", "probe", str(model_path)]
    if not use_extra_bufts:
        argv.append("--no-extra-bufts")
    return run_probe_command(argv, timeout_s)


@functools.lru_cache(maxsize=None)
def params_for_this_cpu(model_path: Path) -> ModelParams:
    """The params every llama.cpp model in selfalign loads with (once per process: the CPU does not change).

    The probe loads the bundled model when it is installed (its Q4_1 weights take llama.cpp's AMX path),
    else `model_path`."""
    cpu = read_cpu_info()
    if not cpu.amx_flags:
        return DEFAULT_PARAMS  # the common case costs one read of /proc/cpuinfo
    try:
        probe_with = bundled_model_path()
    except RunError:
        probe_with = model_path
    return choose_params(cpu, library_has_amx(), verdict_key(cpu, llama_library_dir()), cache_path(),
                         probe=lambda use_extra_bufts: probe_model(probe_with, use_extra_bufts))


# --------------------------------------------------------------------------------------------------
# Applying the params
# --------------------------------------------------------------------------------------------------

_params_lock = threading.Lock()


@contextlib.contextmanager
def applied(params: ModelParams) -> Iterator[None]:
    """Every `llama_cpp.Llama(...)` constructed inside this block loads with `params`.

    llama-cpp-python 0.3.36's Llama() has no argument for use_extra_bufts (unknown keyword arguments are
    silently ignored), and builds its llama_model_params from llama_model_default_params() inside __init__,
    then loads the model. So for the duration of the block that function returns the defaults with our
    fields set. The lock keeps two threads from interleaving the swap; the server launcher uses this too,
    since its Llama is constructed inside llama_cpp.server."""
    if params.use_extra_bufts:
        yield  # the defaults: nothing to change
        return
    import llama_cpp.llama_cpp as low_level
    if "use_extra_bufts" not in dict(low_level.llama_model_params._fields_):
        raise RunError("this llama-cpp-python has no use_extra_bufts model param, which this CPU needs (see "
                       f"{TROUBLESHOOTING}); install the tested version: pip install llama-cpp-python==0.3.36")
    with _params_lock:
        original = low_level.llama_model_default_params

        def defaults_with_our_params():
            model_params = original()
            model_params.use_extra_bufts = params.use_extra_bufts
            return model_params

        low_level.llama_model_default_params = defaults_with_our_params
        try:
            yield
        finally:
            low_level.llama_model_default_params = original


def check_applied(llm, params: ModelParams) -> None:
    """Fail loudly (not with SIGILL later) if a llama-cpp-python release stops reading those defaults."""
    actual = bool(llm.model_params.use_extra_bufts)
    if actual != params.use_extra_bufts:
        raise RunError(f"llama.cpp loaded the model with use_extra_bufts={actual}, not {params.use_extra_bufts} "
                       "as this CPU needs; install the tested version: pip install llama-cpp-python==0.3.36")


def new_llama(model_path: Path | str, params: ModelParams, **kwargs):
    """`llama_cpp.Llama(model_path, **kwargs)` loaded with `params`."""
    from llama_cpp import Llama
    with applied(params):
        llm = Llama(model_path=str(model_path), **kwargs)
    check_applied(llm, params)
    return llm


def _probe_main(model_path: str, use_extra_bufts: bool) -> None:
    """The probe child: load, evaluate a multi-token prompt, sample one token. Dies by a signal if it must."""
    import resource
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # an expected SIGILL must not leave a core file behind
    llm = new_llama(model_path, ModelParams(use_extra_bufts=use_extra_bufts), n_ctx=512,
                    n_threads=os.cpu_count() or 1, verbose=False)
    llm.create_chat_completion(messages=[{"role": "user", "content": PROBE_PROMPT}], max_tokens=1, temperature=0)
    llm.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="selfalign's llama.cpp CPU probe (one load, one token)")
    sub = parser.add_subparsers(dest="command", required=True)
    probe = sub.add_parser("probe")
    probe.add_argument("model")
    probe.add_argument("--no-extra-bufts", action="store_true")
    args = parser.parse_args(argv)
    _probe_main(args.model, use_extra_bufts=not args.no_extra_bufts)


if __name__ == "__main__":
    main()
