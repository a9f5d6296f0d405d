"""The embedded llama.cpp model really runs on this CPU, with the model params selfalign picks for it.

A wheel built on one CPU and tested on another proves little: on an Intel VM that advertises AMX but does not
execute it, llama.cpp's AMX path dies with SIGILL on the first completion (shared/RUNTIME-NOTES.md). So the
fast suite runs one real completion in a subprocess (a SIGILL would otherwise kill pytest itself), and the
unit tests below drive the choice (selfalign/backends/llamacpp_cpu.py) with a fake probe and a fake CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from selfalign.backends import llamacpp_cpu as cpu_mod
from selfalign.backends.bundled_model import bundled_model_path
from selfalign.backends.llamacpp_cpu import (CpuInfo, ModelParams, ProbeResult, choose_params, decide,
                                             read_cpu_info, read_verdict, run_probe_command, verdict_key,
                                             write_verdict)
from selfalign.errors import RunError

ROOT = Path(__file__).resolve().parent.parent

ONE_COMPLETION = r"""
import json
from selfalign.backends.base import Request, Sampling
from selfalign.backends.llamacpp import LlamaCppBackend

backend = LlamaCppBackend(n_ctx=512, n_threads=2)
request = Request(messages=({"role": "user", "content": "Name three colours of the rainbow, then say why "
                             "the sky is blue in one short sentence."},),
                  sampling=Sampling(temperature=0, max_tokens=8, seed=0))
[completion] = backend.generate([request])
print(json.dumps({"use_extra_bufts": backend.model_params.use_extra_bufts, "error": completion.error,
                  "text": completion.text, "completion_tokens": completion.completion_tokens}))
"""


def test_bundled_model_completes_on_this_cpu(tmp_path):
    """One real completion through the product's backend, with the params it chooses for this CPU."""
    cpu = read_cpu_info()
    # A fresh verdict cache: on an AMX-advertising CPU this runs the real probe, as a first run would.
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), OMP_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", ONE_COMPLETION], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    if done.returncode < 0:
        pytest.fail(f"the bundled model's completion was killed by {cpu_mod.signal_name(-done.returncode)} on "
                    f"{cpu.describe()}, with the llama.cpp params selfalign chose for this CPU. llama.cpp runs "
                    f"instructions this CPU does not execute; see {cpu_mod.TROUBLESHOOTING}.\nstderr:\n"
                    f"{done.stderr[-3000:]}")
    assert done.returncode == 0, f"exit code {done.returncode} on {cpu.describe()}:\n{done.stderr[-3000:]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["error"] is None and result["text"], result
    assert result["completion_tokens"] > 0, result
    cache_file = tmp_path / "cache" / "selfalign" / cpu_mod.CACHE_FILE_NAME
    if not cpu.amx_flags:
        # No AMX advertised: the defaults, and no probe ran (it would have written its verdict).
        assert result["use_extra_bufts"] is True
        assert not cache_file.exists()
    if not result["use_extra_bufts"]:
        assert "AMX path is off" in done.stderr  # the user is told why it is slower


def test_the_real_probe_child_returns_on_this_cpu():
    """The probe's child side works (a broken child would read as 'no verdict' and skip the safety net).

    On an AMX-advertising CPU that cannot execute AMX the default probe is expected to die by a signal, and
    then the safe one must return."""
    model = bundled_model_path()
    default = cpu_mod.probe_model(model, use_extra_bufts=True)
    safe = cpu_mod.probe_model(model, use_extra_bufts=False)
    assert safe.ok, f"use_extra_bufts=False: {safe.describe()} on {read_cpu_info().describe()}"
    assert default.ok or default.outcome == "signal", f"default params: {default.describe()}"
    if not read_cpu_info().amx_flags:
        assert default.ok, f"default params on a CPU without AMX: {default.describe()}"


def test_use_extra_bufts_reaches_the_loaded_model():
    """Llama() has no argument for it; `applied` sets it on the model params Llama builds, and only inside."""
    import llama_cpp.llama_cpp as low_level

    model = bundled_model_path()
    off = cpu_mod.new_llama(model, ModelParams(use_extra_bufts=False), vocab_only=True, verbose=False)
    on = cpu_mod.new_llama(model, ModelParams(), vocab_only=True, verbose=False)
    try:
        assert off.model_params.use_extra_bufts is False
        assert on.model_params.use_extra_bufts is True
        assert low_level.llama_model_default_params().use_extra_bufts is True  # restored after the block
    finally:
        off.close()
        on.close()


PLACEMENT = r"""
import ctypes, sys
import llama_cpp
from selfalign.backends.llamacpp_cpu import ModelParams, new_llama

if sys.argv[1] == "quantize":  # requantize the bundled model to Q4_0, a type llama.cpp repacks on AVX2
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    sys.exit(llama_cpp.llama_model_quantize(sys.argv[2].encode(), sys.argv[3].encode(), ctypes.byref(params)))
# Load only (no completion: loading never runs a matmul, so this is safe on an AMX VM too); the
# verbose log names each buffer type the weights went to.
new_llama(sys.argv[2], ModelParams(use_extra_bufts=sys.argv[1] == "default"), n_ctx=256, verbose=True).close()
"""


def test_use_extra_bufts_false_keeps_the_weights_out_of_llama_cpps_extra_buffers(tmp_path):
    """At llama.cpp's own level: by default a Q4_0 model's weights go to an extra buffer type (CPU_REPACK,
    or AMX on a build with AMX kernels); with use_extra_bufts=False every weight stays in the plain CPU
    buffer. AMX is one of those extra buffer types, so this is the switch that keeps its kernels out."""
    cpu = read_cpu_info()
    if "avx2" not in cpu.flags and not cpu.amx_flags:
        pytest.skip(f"{cpu.model} has neither AVX2 nor AMX: llama.cpp puts no Q4_0 weight in an extra buffer")
    q4_0 = tmp_path / "q4_0.gguf"

    def child(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", PLACEMENT, *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)

    quantized = child("quantize", str(bundled_model_path()), str(q4_0))
    assert quantized.returncode == 0, quantized.stderr[-2000:]
    default, off = child("default", str(q4_0)), child("off", str(q4_0))
    assert default.returncode == 0 and off.returncode == 0, (default.stderr[-2000:], off.stderr[-2000:])
    extra = ("CPU_REPACK model buffer size", "AMX model buffer size")
    assert any(name in default.stderr for name in extra), default.stderr[-3000:]
    assert "CPU_Mapped model buffer size" in off.stderr, off.stderr[-3000:]
    assert not any(name in off.stderr for name in extra), off.stderr[-3000:]


def test_check_applied_fails_loudly_when_the_param_did_not_take():
    class Loaded:
        class model_params:  # noqa: N801  (shaped like llama_cpp.Llama.model_params)
            use_extra_bufts = True

    with pytest.raises(RunError, match="use_extra_bufts=True, not False"):
        cpu_mod.check_applied(Loaded(), ModelParams(use_extra_bufts=False))


# --------------------------------------------------------------------------------------------------
# The decision, with a fake CPU and a fake probe
# --------------------------------------------------------------------------------------------------

INTEL_AMX = CpuInfo("Intel(R) Xeon(R) Platinum 8488C",
                    frozenset("fpu sse avx2 avx512f avx512_vnni amx_bf16 amx_tile amx_int8".split()))
AMD = CpuInfo("AMD EPYC", frozenset("fpu sse avx2 avx512f avx512_vnni".split()))

OK = ProbeResult("ok", seconds=1.0)
SIGILL = ProbeResult("signal", "SIGILL", seconds=0.8)


class FakeProbe:
    """Answers probe(use_extra_bufts) from a table and records each call."""

    def __init__(self, default: ProbeResult | None = None, safe: ProbeResult | None = None):
        self.answers = {True: default, False: safe}
        self.calls: list[bool] = []

    def __call__(self, use_extra_bufts: bool) -> ProbeResult:
        self.calls.append(use_extra_bufts)
        answer = self.answers[use_extra_bufts]
        if answer is None:
            raise AssertionError(f"probe(use_extra_bufts={use_extra_bufts}) was not expected")
        return answer


def choose(cpu, probe, tmp_path, library_has_amx=True, lines=None):
    key = {"cpu_model": cpu.model, "cpu_flags": " ".join(sorted(cpu.flags)), "libraries": [["libllama.so", 1, 2]]}
    log = (lines if lines is not None else []).append
    return choose_params(cpu, library_has_amx, key, tmp_path / "verdicts.json", probe, log=log)


def test_no_amx_flags_means_default_params_and_no_probe(tmp_path):
    probe = FakeProbe()
    assert choose(AMD, probe, tmp_path) == ModelParams()
    assert probe.calls == []
    assert not (tmp_path / "verdicts.json").exists()


def test_a_library_built_without_amx_is_not_probed(tmp_path):
    probe = FakeProbe()
    assert choose(INTEL_AMX, probe, tmp_path, library_has_amx=False) == ModelParams()
    assert probe.calls == []


def test_default_dies_with_sigill_and_safe_works_turns_amx_off_and_says_so(tmp_path):
    probe, lines = FakeProbe(default=SIGILL, safe=OK), []
    params = choose(INTEL_AMX, probe, tmp_path, lines=lines)
    assert params.use_extra_bufts is False
    assert probe.calls == [True, False]
    assert len(lines) == 1
    assert "advertises AMX (amx_bf16 amx_int8 amx_tile) but cannot execute it" in lines[0]
    assert "killed by SIGILL" in lines[0] and "AMX path is off" in lines[0]
    # Cached: the next run on this machine and build does not probe, and still says why it is slower.
    again, lines = FakeProbe(), []
    assert choose(INTEL_AMX, again, tmp_path, lines=lines).use_extra_bufts is False
    assert again.calls == [] and "killed by SIGILL" in lines[0]


def test_unknown_library_build_is_probed(tmp_path):
    probe = FakeProbe(default=SIGILL, safe=OK)
    assert choose(INTEL_AMX, probe, tmp_path, library_has_amx=None).use_extra_bufts is False
    assert probe.calls == [True, False]


def test_default_works_keeps_defaults_and_is_cached(tmp_path):
    probe, lines = FakeProbe(default=OK), []
    assert choose(INTEL_AMX, probe, tmp_path, lines=lines) == ModelParams()
    assert probe.calls == [True] and lines == []
    again = FakeProbe()
    assert choose(INTEL_AMX, again, tmp_path) == ModelParams()
    assert again.calls == []


def test_both_dying_is_a_readable_error_and_nothing_is_cached(tmp_path):
    probe = FakeProbe(default=SIGILL, safe=ProbeResult("signal", "SIGILL"))
    with pytest.raises(RunError) as caught:
        choose(INTEL_AMX, probe, tmp_path)
    message = str(caught.value)
    for part in ("killed by SIGILL", "Intel(R) Xeon(R) Platinum 8488C", "amx_bf16 amx_int8 amx_tile",
                 "use_extra_bufts=False", "GGML_NATIVE=OFF", "openai or vllm backend",
                 "Illegal instruction on some Intel CPUs"):
        assert part in message, part
    assert not (tmp_path / "verdicts.json").exists()


def test_a_probe_that_fails_without_a_signal_is_no_verdict(tmp_path):
    """E.g. an unreadable model: says nothing about the CPU. AMX off for this run (a SIGILL would cost the
    run, AMX off only speed), nothing cached, and the real load reports the real error."""
    probe, lines = FakeProbe(default=ProbeResult("error", "exit code 1: ValueError: Failed to load model")), []
    assert choose(INTEL_AMX, probe, tmp_path, lines=lines).use_extra_bufts is False
    assert probe.calls == [True]
    assert "did not finish" in lines[0] and "Failed to load model" in lines[0] and "AMX path is off" in lines[0]
    assert not (tmp_path / "verdicts.json").exists()


def test_a_timeout_uses_safe_params_but_is_not_cached(tmp_path):
    """A hang may be a busy machine, not the CPU: AMX off this time, probe again next time."""
    probe = FakeProbe(default=ProbeResult("timeout", "did not finish in 180s"))
    assert choose(INTEL_AMX, probe, tmp_path).use_extra_bufts is False
    assert probe.calls == [True]
    assert not (tmp_path / "verdicts.json").exists()


def test_sigill_then_a_hung_safe_probe_uses_safe_params_uncached(tmp_path):
    probe = FakeProbe(default=SIGILL, safe=ProbeResult("timeout", "did not finish in 180s"))
    assert choose(INTEL_AMX, probe, tmp_path).use_extra_bufts is False
    assert not (tmp_path / "verdicts.json").exists()


def test_decide_alone_returns_the_verdict_to_cache():
    params, verdict = decide(INTEL_AMX, True, FakeProbe(default=SIGILL, safe=OK))
    assert params.use_extra_bufts is False
    assert verdict["use_extra_bufts"] is False and verdict["default_probe"] == "killed by SIGILL"
    assert decide(AMD, True, FakeProbe()) == (ModelParams(), None)


# --------------------------------------------------------------------------------------------------
# The verdict cache
# --------------------------------------------------------------------------------------------------

def test_verdict_key_changes_with_the_build_and_the_cpu(tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "libllama.so").write_bytes(b"x" * 10)
    (lib / "libggml-cpu.so").write_bytes(b"y" * 10)
    (lib / "README.txt").write_text("not a library")
    key = verdict_key(INTEL_AMX, lib)
    assert [Path(entry[0]).name for entry in key["libraries"]] == ["libggml-cpu.so", "libllama.so"]
    cache = tmp_path / "verdicts.json"
    write_verdict(cache, key, {"use_extra_bufts": False, "default_probe": "killed by SIGILL"})
    assert read_verdict(cache, key)["use_extra_bufts"] is False

    (lib / "libggml-cpu.so").write_bytes(b"y" * 11)  # a rebuilt llama.cpp: probe it afresh
    rebuilt = verdict_key(INTEL_AMX, lib)
    assert rebuilt != key and read_verdict(cache, rebuilt) is None
    os.utime(lib / "libggml-cpu.so", ns=(1, 1))
    assert verdict_key(INTEL_AMX, lib) != rebuilt
    assert read_verdict(cache, verdict_key(AMD, lib)) is None  # another CPU

    # Verdicts for other builds and CPUs stay (a shared home directory, several venvs).
    write_verdict(cache, rebuilt, {"use_extra_bufts": True, "default_probe": "returned"})
    assert read_verdict(cache, key)["use_extra_bufts"] is False
    assert read_verdict(cache, rebuilt)["use_extra_bufts"] is True


def test_a_damaged_cache_file_only_costs_a_probe(tmp_path):
    (tmp_path / "verdicts.json").write_text('{"verdicts": {"abc": ')  # a truncated file
    probe = FakeProbe(default=SIGILL, safe=OK)
    assert choose(INTEL_AMX, probe, tmp_path).use_extra_bufts is False
    assert probe.calls == [True, False]
    data = json.loads((tmp_path / "verdicts.json").read_text())  # rewritten whole
    assert [entry["use_extra_bufts"] for entry in data["verdicts"].values()] == [False]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_an_unwritable_cache_dir_does_not_fail_the_run(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache dir should be")
    key = verdict_key(INTEL_AMX, None)
    write_verdict(blocker / "selfalign" / "verdicts.json", key, {"use_extra_bufts": False})  # no raise


def test_cache_path_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cpu_mod.cache_path() == tmp_path / "selfalign" / cpu_mod.CACHE_FILE_NAME
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cpu_mod.cache_path() == Path.home() / ".cache" / "selfalign" / cpu_mod.CACHE_FILE_NAME


# --------------------------------------------------------------------------------------------------
# Reading the CPU and running the probe child
# --------------------------------------------------------------------------------------------------

def test_read_cpu_info_finds_model_and_amx_flags(tmp_path):
    text = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8488C\n"
            "flags\t\t: fpu avx2 avx512f amx_bf16 avx512_fp16 amx_tile amx_int8\n\n"
            "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8488C\nflags\t\t: fpu\n")
    (tmp_path / "cpuinfo").write_text(text)
    cpu = read_cpu_info(tmp_path / "cpuinfo")
    assert cpu.model == "Intel(R) Xeon(R) Platinum 8488C"
    assert cpu.amx_flags == ["amx_bf16", "amx_int8", "amx_tile"]
    assert "advertises amx_bf16 amx_int8 amx_tile" in cpu.describe()
    assert read_cpu_info(tmp_path / "missing").amx_flags == []  # no /proc (macOS): nothing to probe


def test_run_probe_command_names_the_signal():
    died = run_probe_command([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"])
    assert (died.outcome, died.detail) == ("signal", "SIGILL")
    assert died.describe() == "killed by SIGILL"
    failed = run_probe_command([sys.executable, "-c", "import sys; sys.exit('model not found')"])
    assert failed.outcome == "error" and "exit code 1" in failed.detail and "model not found" in failed.detail
    slow = run_probe_command([sys.executable, "-c", "import time; time.sleep(30)"], timeout_s=0.5)
    assert slow.outcome == "timeout" and "did not finish" in slow.detail
    assert run_probe_command([sys.executable, "-c", "pass"]).ok
