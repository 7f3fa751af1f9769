"""Backend choice: which implementation of the ops runs for a given tensor.

- ``"torch"``: the pure-PyTorch implementation; runs anywhere and is the reference.
- ``"triton"``: the Triton kernels of ``splat.kernels``; CUDA tensors, or CPU tensors through
  Triton's interpreter when ``TRITON_INTERPRET=1`` was set before splat's kernels were imported.
- ``"cuda"``: the C++/CUDA kernels of ``csrc/`` (``torch.ops.splat_cuda``); CUDA tensors, or CPU
  tensors through a CPU emulator of CUDA when ``SPLAT_CUDA_EMULATE=1`` and there is no GPU.
- ``"auto"``: ``$SPLAT_BACKEND`` if set; else, on CUDA, the backend that ``bench_blocks.py``
  measured fastest for the op and its shape class on this device (``auto_backend.json``, written
  from its results by ``benchmarks/auto_table.py``), Triton where the table has no entry; on CPU, torch.
"""

import importlib
import importlib.util
import json
import os
from pathlib import Path

import torch

from splat import _layout

BACKENDS = ("auto", "triton", "torch", "cuda")


def check_name(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# assume_constant_result: torch.compile evaluates these once while tracing instead of tracing them.
@torch.compiler.assume_constant_result
def _triton_status() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'splat-kernels[triton]')"
    return True, ""


@torch.compiler.assume_constant_result
def _cuda_status() -> tuple[bool, str]:
    from splat import _cuda

    return _cuda.status()


@torch.compiler.assume_constant_result
def _cuda_emulated() -> bool:
    from splat import _cuda

    return _cuda.emulated()


def backends() -> dict[str, tuple[bool, str]]:
    """Each concrete backend mapped to ``(available, why not)`` on this machine."""
    triton_ok, triton_why = _triton_status()
    if triton_ok and not torch.cuda.is_available() and not _triton_interpreted():
        triton_ok, triton_why = False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)"
    return {"torch": (True, ""), "triton": (triton_ok, triton_why), "cuda": _cuda_status()}


AUTO_TABLE_PATH = Path(__file__).with_name("auto_backend.json")


def _load_auto_table(path: Path) -> dict:
    """{device name: {op: {shape class: backend}}}; empty until a GPU session commits one."""
    if not path.exists():
        return {}
    return {device: entry["choices"] for device, entry in json.loads(path.read_text()).items()}


_AUTO_TABLE = _load_auto_table(AUTO_TABLE_PATH)


def shape_class(t: torch.Tensor) -> str:
    """The auto table's key for the tensor an op is resolved on: dtype, and for 4-D tensors
    layout and map size (the ResNeSt-50 stages fall one per size class: 3136, 784, 196, 49)."""
    key = str(t.dtype).removeprefix("torch.")
    if t.dim() != 4:
        return key
    layout = "channels_last" if _layout.memory_format(t) == torch.channels_last else "nchw"
    hw = t.shape[2] * t.shape[3]
    size = next((f"hw<={limit}" for limit in (64, 256, 1024) if hw <= limit), "hw>1024")
    return f"{key}/{layout}/{size}"


@torch.compiler.assume_constant_result
def _device_name(index: int) -> str:
    return torch.cuda.get_device_properties(index).name


def auto_choice(op: str, device_name: str, key: str) -> str:
    """What "auto" runs for ``op`` on a CUDA device: the table's measured choice where it has one
    and that backend is available, else Triton (torch without Triton)."""
    if _AUTO_TABLE.get(device_name, {}).get(op, {}).get(key) == "cuda" and _cuda_status()[0]:
        return "cuda"
    return "triton" if _triton_status()[0] else "torch"


def _auto(op: str, t: torch.Tensor) -> str:
    if not t.is_cuda:
        return "torch"
    return auto_choice(op, _device_name(t.device.index), shape_class(t))


def resolve(backend: str, t: torch.Tensor, op: str) -> str:
    """The concrete backend that runs op ``op`` on tensor ``t``; raises if ``backend`` cannot run it."""
    check_name(backend)
    if backend == "auto":
        backend = os.environ.get("SPLAT_BACKEND", "auto") or "auto"
        check_name(backend)
    if backend == "auto":
        return _auto(op, t)
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
        if not t.is_cuda and not _cuda_emulated():
            raise RuntimeError(
                f"backend='cuda' got a tensor on {t.device}: it runs CUDA tensors, or CPU tensors when "
                "SPLAT_CUDA_EMULATE=1 emulates CUDA"
            )
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
