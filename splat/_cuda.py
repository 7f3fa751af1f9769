"""Loader of the C++/CUDA kernels (``torch.ops.splat_cuda``).

The kernels come from the ``splat._C`` extension that ``setup.py`` builds next to a CUDA build of
PyTorch. Without it they are compiled on first use with ``torch.utils.cpp_extension.load`` (needs
nvcc and ninja; cached by torch under ``$TORCH_EXTENSIONS_DIR``, rebuilt when a source changes) from
``splat/csrc`` of an installed package or ``csrc/`` of a source checkout. ``SPLAT_CUDA_JIT=0``
forbids that compilation. On a machine without CUDA nothing is loaded or built, unless
``SPLAT_CUDA_EMULATE=1``: then the sources are compiled for the host against a CPU emulator of
CUDA (``csrc/cuda_emulator.h``) and the ops run their kernels on CPU tensors, slowly, for tests.
``SPLAT_CUDA_EMULATE_CFLAGS`` adds host compiler and linker flags to that build
(``.ci/asan_cuda.sh`` builds it with AddressSanitizer).
"""

import functools
import importlib
import os
import re
from pathlib import Path

import torch


_PACKAGE = Path(__file__).resolve().parent
_JIT_NAME = "splat_cuda_kernels"
_EMULATED_NAME = "splat_cuda_emulated"
_ERROR_TAIL = 4000  # characters of a compiler's output kept in the reason


def source_dir() -> Path | None:
    """The directory of the C++/CUDA sources: ``splat/csrc`` when installed, else the checkout's ``csrc/``."""
    for candidate in (_PACKAGE / "csrc", _PACKAGE.parent / "csrc"):
        if (candidate / "registration.cpp").is_file():
            return candidate
    return None


def _sources() -> Path:
    src = source_dir()
    if src is None:
        raise RuntimeError("the C++/CUDA sources (splat/csrc or csrc/) are not there to compile")
    return src


def _jit_build() -> None:
    from torch.utils import cpp_extension

    src = _sources()
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


# How a host copy of the CUDA sources is made for the emulator. Each rule must apply somewhere in
# splat's sources, so that a change of them a rule no longer fits fails the build rather than the
# emulation.
_EMULATION_REWRITES = (
    # The emulator stubs what the kernels use of the c10/cuda headers (a blank line keeps the line numbers).
    (r"^#include <c10/cuda/[^>]+>$", ""),
    # kernel<<<grid, block, smem, stream>>>(args) -> splat_emu::launch(kernel, grid, block, smem, stream, args)
    (r"\b([A-Za-z_][\w:]*(?:<[^<>;]*>)?)<<<(.+?)>>>\(", r"splat_emu::launch(\1, \2, "),
    # Shared arrays come from the block's arena (fresh for each block, poisoned).
    (r"__shared__\s+(.+?)\s+(\w+)\[(.+?)\];", r"auto& \2 = splat_emu::shared<\1[\3]>(__FILE__, __COUNTER__);"),
    # The kernel checks its launch's block size against its bound.
    (r"__launch_bounds__\((\w+)\)([^{;]*)\{", r"\2{ splat_emu::launch_bounds(\1);"),
    # The emulated device's tensors are CPU tensors.
    (r"\.is_cuda\(\)", ".is_cpu()"),
    (r"\b(\w+)\.get_device\(\)", r"splat_emu::device_index(\1)"),
    (r"TORCH_LIBRARY_IMPL\((\w+), CUDA,", r"TORCH_LIBRARY_IMPL(\1, CPU,"),
)


def emulated() -> bool:
    """Whether ``torch.ops.splat_cuda`` is (to be) the CPU emulation: ``SPLAT_CUDA_EMULATE=1`` and no GPU."""
    return os.environ.get("SPLAT_CUDA_EMULATE", "0") == "1" and not torch.cuda.is_available()


def emulator_sources(texts: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """CUDA sources ({file name: text}) -> (the host copies the emulator compiles, ``*.cu`` as
    ``*.cpp``; the patterns of the rewrites that matched nothing)."""
    texts, unmatched = dict(texts), []
    for pattern, replacement in _EMULATION_REWRITES:
        total = 0
        for name, text in texts.items():
            texts[name], n = re.subn(pattern, replacement, text, flags=re.MULTILINE)
            total += n
        if total == 0:
            unmatched.append(pattern)
    copies = {name.removesuffix(".cu") + ".cpp" if name.endswith(".cu") else name: text for name, text in texts.items()}
    return copies, unmatched


def build_emulated(name: str, texts: dict[str, str]) -> None:
    """Compiles CUDA sources ({file name: text}) for the CPU emulator and loads them as library ``name``."""
    from torch.utils import cpp_extension

    src = _sources()
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("compiling them needs ninja (pip install ninja)")
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    out = Path(root) / f"{name}_sources"
    out.mkdir(parents=True, exist_ok=True)
    sources = []
    for file, text in emulator_sources(texts)[0].items():
        target = out / file
        if not target.exists() or target.read_text() != text:  # untouched files are not rebuilt
            # Whole or not at all: another process (pytest-xdist) may be compiling the same file.
            part = target.with_name(f"{file}.{os.getpid()}")
            part.write_text(text)
            part.replace(target)
        if target.suffix == ".cpp":
            sources.append(str(target))
    flags = os.environ.get("SPLAT_CUDA_EMULATE_CFLAGS", "").split()
    cpp_extension.load(
        name=name,
        sources=sources,
        extra_include_paths=[str(out)],
        extra_cflags=["-O2", "-march=native", "-ffp-contract=fast", "-Wno-unknown-pragmas"]
        + ["-include", str(src / "cuda_emulator.h"), *flags],
        extra_ldflags=flags,
        is_python_module=False,
    )


def _import_emulated() -> str:
    try:
        texts = {p.name: p.read_text() for p in sorted(_sources().iterdir()) if p.suffix in (".cu", ".cuh", ".cpp")}
        unmatched = emulator_sources(texts)[1]
        if unmatched:
            raise RuntimeError(f"the emulator's rewrites {unmatched} match no source (update splat/_cuda.py)")
        build_emulated(_EMULATED_NAME, texts)
    except Exception as error:  # a compiler failure is reported, not raised
        return f"SPLAT_CUDA_EMULATE=1, but compiling the kernels for the CPU emulator failed: {_tail(error)}"
    return _missing_ops()


def _tail(error: Exception) -> str:
    text = str(error).strip()
    return "..." + text[-_ERROR_TAIL:] if len(text) > _ERROR_TAIL else text


def _missing_ops() -> str:
    missing = [name for name in _fakes() if not hasattr(torch.ops.splat_cuda, name)]
    if missing:
        return f"the loaded extension lacks torch.ops.splat_cuda.{', '.join(missing)} (built from older sources?)"
    return ""


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
            return f"the extension splat._C is not built ({prebuilt_error}) and compiling it failed: {_tail(jit_error)}"
    return _missing_ops()


@functools.cache
def status() -> tuple[bool, str]:
    """``(available, why not)`` for the C++/CUDA backend; loads (or compiles) it the first time."""
    if emulated():
        why = _import_emulated()
    elif torch.version.cuda is None:
        return False, f"PyTorch {torch.__version__} is built without CUDA (SPLAT_CUDA_EMULATE=1 emulates it)"
    elif not torch.cuda.is_available():
        return False, "no CUDA device is visible (SPLAT_CUDA_EMULATE=1 emulates one)"
    else:
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
    # bn_add_relu has a forward kernel and, like split_attention, two backward passes (no fake_backward).
    bn_add_relu = importlib.import_module("splat.ops.bn_add_relu")
    fakes["bn_add_relu_forward"] = bn_add_relu.fake_forward
    fakes["bn_add_relu_backward_sums"] = bn_add_relu.fake_backward_sums
    fakes["bn_add_relu_backward_dy"] = bn_add_relu.fake_backward_dy
    return fakes


def _register_fakes() -> None:
    for name, fake in _fakes().items():
        torch.library.register_fake(f"splat_cuda::{name}")(fake)
