"""Backend choice: which implementation of the ops runs for a given tensor.

- ``"torch"``: the pure-PyTorch implementation; runs anywhere and is the reference.
- ``"triton"``: the Triton kernels of ``splat.kernels``; CUDA tensors, or CPU tensors through
  Triton's interpreter when ``TRITON_INTERPRET=1`` was set before splat's kernels were imported.
- ``"cuda"``: the C++/CUDA kernels of ``csrc/`` (``torch.ops.splat_cuda``); CUDA tensors only.
- ``"auto"``: ``$SPLAT_BACKEND`` if set, else the fastest available backend for the device.
"""

import functools
import importlib
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch", "cuda")


def check_name(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_status() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'splat-kernels[triton]')"
    return True, ""


def _cuda_status() -> tuple[bool, str]:
    from splat import _cuda

    return _cuda.status()


def backends() -> dict[str, tuple[bool, str]]:
    """Each concrete backend mapped to ``(available, why not)`` on this machine."""
    triton_ok, triton_why = _triton_status()
    if triton_ok and not torch.cuda.is_available() and not _triton_interpreted():
        triton_ok, triton_why = False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)"
    return {"torch": (True, ""), "triton": (triton_ok, triton_why), "cuda": _cuda_status()}


def resolve(backend: str, t: torch.Tensor) -> str:
    """The concrete backend that runs for tensor ``t``; raises if ``backend`` cannot run it."""
    check_name(backend)
    if backend == "auto":
        backend = os.environ.get("SPLAT_BACKEND", "auto") or "auto"
        check_name(backend)
    if backend == "auto":
        if t.is_cuda and _triton_status()[0]:
            return "triton"
        return "torch"
    if backend == "triton":
        ok, why = _triton_status()
        if not ok:
            raise RuntimeError(f"backend='triton' is unavailable: {why}")
        if not t.is_cuda and not _triton_interpreted():
            raise RuntimeError(
                f"backend='triton' got a tensor on {t.device}: Triton runs CUDA tensors, or CPU "
                "tensors when TRITON_INTERPRET=1 is set before splat is imported"
            )
    if backend == "cuda":
        if not t.is_cuda:
            raise RuntimeError(f"backend='cuda' needs CUDA tensors, got a tensor on {t.device}")
        ok, why = _cuda_status()
        if not ok:
            raise RuntimeError(f"backend='cuda' is unavailable: {why}")
    return backend


def call(backend: str, name: str, reference, *args):
    """Run kernel ``name`` of ``backend``: ``reference`` for torch, else the backend's launcher."""
    if backend == "torch":
        return reference(*args)
    if backend == "triton":
        return getattr(importlib.import_module("splat.kernels"), name)(*args)
    if backend == "cuda":
        from splat import _cuda

        return getattr(_cuda.ops(), name)(*args)
    raise ValueError(f"no kernels for backend {backend!r}")
