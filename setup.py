"""Build of splat-kernels; the metadata is in pyproject.toml.

The C++/CUDA extension ``splat._C`` (csrc/) is built only when this runs next to a CUDA build of
PyTorch with a CUDA toolkit, i.e. without build isolation::

    pip install --no-build-isolation .      # TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0"

A plain ``pip install .`` builds in an isolated environment without torch (torch is deliberately
not a build requirement) and so makes a pure-Python wheel; the extension is then compiled on first
use by ``splat._cuda`` where nvcc and ninja exist. Either way csrc/ is shipped as ``splat/csrc``
for that. ``SPLAT_BUILD_CUDA=0`` skips the extension.
"""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
SOURCE_SUFFIXES = (".cu", ".cuh", ".cpp", ".h")


class build_py_with_sources(build_py):
    """Also copies csrc/ into the package as splat/csrc, for compiling the extension at run time."""

    def run(self):
        super().run()
        if self.editable_mode:  # an editable install finds csrc/ in the checkout
            return
        target = Path(self.build_lib) / "splat" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for src in sorted(CSRC.iterdir()):
            if src.suffix in SOURCE_SUFFIXES:
                shutil.copyfile(src, target / src.name)


def cuda_extension():
    """(ext_modules, cmdclass) for splat._C, or nothing when torch or the CUDA toolkit is missing."""
    if os.environ.get("SPLAT_BUILD_CUDA", "1") == "0":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.iterdir() if p.suffix in (".cu", ".cpp"))
    ext = cpp_extension.CUDAExtension(
        "splat._C",
        sources,
        include_dirs=[str(CSRC)],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = cuda_extension()
setup(ext_modules=ext_modules, cmdclass={"build_py": build_py_with_sources, **cmdclass})
