"""Every Triton kernel compiles to a cubin for sm_90 (H100) and sm_80 (A100), GPU or not.

The rest of the suite runs the kernels through Triton's interpreter on CPU; this compiles them
for real (tests/triton_aot.py), so a kernel the compiler rejects, or one that needs more shared
memory than the device has, fails here rather than on the first GPU that runs it.
"""

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("triton_aot.py")
# Shared memory a block may use (opt-in maximum), per architecture.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
# The benchmark's stage shapes (their block sizes) compile for the H100 in bfloat16, the dtype of the targets.
BENCHMARK_DTYPES = {90: ("bfloat16",), 80: ()}


@pytest.fixture(scope="module")
def compiles():
    """One compile-only run per architecture, started together (they take minutes each)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # The splat of this checkout, as pytest imports it, not whichever one pip installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(SCRIPT.parents[1]), env.get("PYTHONPATH"))))
    procs = {
        arch: subprocess.Popen(
            [sys.executable, str(SCRIPT), str(arch), *BENCHMARK_DTYPES[arch]],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for arch in SHARED_LIMIT
    }
    return {arch: proc.communicate() + (proc.returncode,) for arch, proc in procs.items()}


def _kernels(module: str) -> set[str]:
    """The ``@triton.jit`` ``*_kernel`` functions of module ``splat.kernels.<module>``."""
    mod = importlib.import_module(f"splat.kernels.{module}")
    return {name for name, obj in vars(mod).items() if name.endswith("_kernel") and hasattr(obj, "fn")}


def _launched_kernels() -> set[str]:
    """Every ``@triton.jit`` ``*_kernel`` of splat.kernels."""
    import splat.kernels

    return set().union(*(_kernels(module.name) for module in pkgutil.iter_modules(splat.kernels.__path__)))


@pytest.mark.parametrize("arch", sorted(SHARED_LIMIT))
def test_every_kernel_compiles(compiles, arch):
    stdout, stderr, returncode = compiles[arch]
    assert returncode == 0, f"sm_{arch} compile failed:\n{stderr[-4000:]}"
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert set(summary) == _launched_kernels(), "kernels never launched by the blocks or ops"
    for name, info in summary.items():
        assert info["max_shared"] <= SHARED_LIMIT[arch], f"{name} needs {info['max_shared']} B of shared memory"
        # Only the compiled kernels show it (the interpreter keeps Python floats in float64).
        assert not info["float_args"], f"{name} takes {info['float_args']} as float32 scalars"
        # y * scale + shift must round twice, as in torch and the CUDA backend (_tiles.launch).
        assert not info["fp_fusion"], f"{name} was compiled with fused multiply-add"


def test_no_spills_at_benchmark_shapes(compiles):
    """The memory-bound kernels keep every value in registers at the shapes the benchmark times
    (bf16, sm_90): a spilled register costs a round trip to local memory per use. Res2Net's
    implicit-GEMM chain is left out: its tiles are for the GPU's timings to choose."""
    stdout, stderr, returncode = compiles[90]
    assert returncode == 0, f"sm_90 compile failed:\n{stderr[-4000:]}"
    summary = json.loads(stdout.strip().splitlines()[-1])
    chain = _kernels("res2net_chain")
    timed = {name: info["benchmark_stack"] for name, info in summary.items() if info["benchmark_stack"] is not None}
    assert set(timed) >= _launched_kernels() - chain, "kernels the benchmark's shapes never launch"
    spilled = {name: stack for name, stack in timed.items() if stack and name not in chain}
    assert not spilled, f"stack frames (bytes) at the benchmark's shapes: {spilled}"
