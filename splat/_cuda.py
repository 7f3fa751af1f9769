"""Loader of the C++/CUDA kernels (``torch.ops.splat_cuda``).

The kernels come from the ``splat._C`` extension that ``setup.py`` builds next to a CUDA build of
PyTorch. Without it they are compiled on first use with ``torch.utils.cpp_extension.load`` (needs
nvcc and ninja; cached by torch under ``$TORCH_EXTENSIONS_DIR``, rebuilt when a source changes) from
``splat/csrc`` of an installed package or ``csrc/`` of a source checkout. ``SPLAT_CUDA_JIT=0``
forbids that compilation. On a machine without CUDA nothing is loaded or built.
"""

import functools
import importlib
import os
from pathlib import Path

import torch


_PACKAGE = Path(__file__).resolve().parent
_JIT_NAME = "splat_cuda_kernels"
_ERROR_TAIL = 4000  # characters of a compiler's output kept in the reason


def source_dir() -> Path | None:
    """The directory of the C++/CUDA sources: ``splat/csrc`` when installed, else the checkout's ``csrc/``."""
    for candidate in (_PACKAGE / "csrc", _PACKAGE.parent / "csrc"):
        if (candidate / "registration.cpp").is_file():
            return candidate
    return None


def _jit_build() -> None:
    from torch.utils import cpp_extension

    src = source_dir()
    if src is None:
        raise RuntimeError("the C++/CUDA sources (splat/csrc or csrc/) are not there to compile")
    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("no CUDA toolkit found to compile them (install nvcc or set CUDA_HOME)")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("compiling them needs ninja (pip install ninja)")
    sources = sorted(str(p) for p in src.iterdir() if p.suffix in (".cu", ".cpp"))
    cpp_extension.load(
        name=_JIT_NAME,
        sources=sources,
        extra_include_paths=[str(src)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3"],
        is_python_module=False,
    )


def _import_or_build() -> str:
    """Loads the kernels; returns why they are unavailable, or "" once torch.ops.splat_cuda has them."""
    try:
        importlib.import_module("splat._C")
    except ImportError as prebuilt_error:
        if os.environ.get("SPLAT_CUDA_JIT", "1") == "0":
            return f"the extension splat._C is not built ({prebuilt_error}) and SPLAT_CUDA_JIT=0 forbids compiling it"
        try:
            _jit_build()
        except Exception as jit_error:  # a compiler failure is reported, not raised
            text = str(jit_error).strip()
            if len(text) > _ERROR_TAIL:
                text = "..." + text[-_ERROR_TAIL:]
            return f"the extension splat._C is not built ({prebuilt_error}) and compiling it failed: {text}"
    missing = [name for name in _fakes() if not hasattr(torch.ops.splat_cuda, name)]
    if missing:
        return f"the loaded extension lacks torch.ops.splat_cuda.{', '.join(missing)} (built from older sources?)"
    return ""


@functools.cache
def status() -> tuple[bool, str]:
    """``(available, why not)`` for the C++/CUDA backend; loads (or compiles) it the first time."""
    if torch.version.cuda is None:
        return False, f"PyTorch {torch.__version__} is built without CUDA"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible"
    why = _import_or_build()
    if why:
        return False, why
    _register_fakes()
    return True, ""


def ops():
    """``torch.ops.splat_cuda``, loaded; raises RuntimeError saying why when it is unavailable."""
    ok, why = status()
    if not ok:
        raise RuntimeError(f"the splat C++/CUDA kernels are unavailable: {why}")
    return torch.ops.splat_cuda


def _fakes() -> dict:
    """{splat_cuda op name: its fake}: the ops' own shape functions (torch.compile, opcheck)."""
    fakes = {}
    for name in ("attention_sum", "channel_stats", "radix_pool", "radix_softmax", "res2net_chain"):
        op = importlib.import_module(f"splat.ops.{name}")
        fakes[f"{name}_forward"], fakes[f"{name}_backward"] = op.fake_forward, op.fake_backward
    # split_attention has no forward kernel of its own, only its two backward passes.
    split_attention = importlib.import_module("splat.ops.split_attention")
    fakes["split_attention_backward_sums"] = split_attention.fake_backward_sums
    fakes["split_attention_backward_dy"] = split_attention.fake_backward_dy
    return fakes


def _register_fakes() -> None:
    for name, fake in _fakes().items():
        torch.library.register_fake(f"splat_cuda::{name}")(fake)
