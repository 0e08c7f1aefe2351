"""The same bytes on every x86-64 CPU: stage processes pin the numeric libraries to their AVX2
code paths (and MKL to its thread-count-independent mode) before torch loads, whatever the
CPU and whatever the caller set."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, tiny_overrides, tree_bytes

from ptqflow.pipeline.common import NATIVE_NUMERICS, PINNED_NUMERICS, stage_environment

# What an older or capped CPU gives the libraries: no SIMD in PyTorch's own kernels, SSE4.2 in
# MKL and oneDNN, one thread.
CAPPED = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


SCRIPTS = (
    "calib_data.py",
    "gradient.py",
    "sensitivity.py",
    "scale_search.py",
    "clip_search.py",
)


def test_the_pins_override_the_caller_unless_native_numerics_are_asked_for():
    env = stage_environment({"ATEN_CPU_CAPABILITY": "avx512", "PATH": "/bin"})
    assert env["ATEN_CPU_CAPABILITY"] == "avx2" and env["MKL_CBWR"] == "AVX2,STRICT"
    assert env["PATH"] == "/bin"
    native = stage_environment({"ATEN_CPU_CAPABILITY": "avx512", NATIVE_NUMERICS: "1"})
    assert native["ATEN_CPU_CAPABILITY"] == "avx512" and "MKL_CBWR" not in native
    assert set(PINNED_NUMERICS) <= set(stage_environment({}))


@pytest.mark.slow
def test_the_searches_write_the_same_bytes_under_capped_instruction_sets_and_one_thread(
    tiny_model_dir, texts, tmp_path
):
    """calib-data, gradient, sensitivity and the two searches as DVC runs them (fresh
    processes), once with the machine's defaults and once capped to SSE4.2 / no SIMD on one
    thread: identical artifacts."""
    trees = {}
    for name, extra in (("native", {}), ("capped", CAPPED)):
        work = tmp_path / name
        work.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in CAPPED and k != NATIVE_NUMERICS}
        env |= {"HF_HUB_OFFLINE": "1", **extra}
        for script in SCRIPTS:
            cmd = [sys.executable, str(ROOT / "stages" / script)]
            cmd += [*tiny_overrides(tiny_model_dir, texts, work), "tracking=none"]
            proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr[-3000:]
        trees[name] = tree_bytes(work / "artifacts")
    assert trees["native"].keys() == trees["capped"].keys()
    differ = [k for k in trees["native"] if trees["native"][k] != trees["capped"][k]]
    assert not differ, f"bytes differ under capped instruction sets: {differ}"
