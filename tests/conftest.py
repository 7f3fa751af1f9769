import atexit
import os
import shutil
import tempfile

import torch

# Triton reads TRITON_INTERPRET when its kernels are decorated: set it before splat's kernels are
# imported, so that on a machine without a GPU backend="triton" runs the real kernels on CPU.
# Likewise backend="cuda" runs the C++/CUDA kernels on CPU tensors, compiled against splat's CUDA
# emulator (splat/_cuda.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("SPLAT_CUDA_EMULATE", "1")

# torch.compile's on-disk cache does not key on a custom op's registered backward
# (pytorch/pytorch#144344): one written before a change to splat's ops would replay the old
# backward. Every test run compiles into a fresh cache of its own.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="splat-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402

import splat  # noqa: E402
from splat import _layout  # noqa: E402


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every kernel output starts as NaN, so an element a kernel fails to write cannot pass."""
    monkeypatch.setattr(_layout, "POISON", True)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    return f"splat backends: {splat.backends()}"
