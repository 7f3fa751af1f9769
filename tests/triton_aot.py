"""Compile every Triton kernel of splat for a real GPU target, on a machine without a GPU.

CI runs the kernels through Triton's interpreter, which accepts programs the compiler rejects
(Python control flow on tensor values, dtype mixes in ``tl.dot``, 16-bit dots the interpreter
replaces by float32 ones) and says nothing about shared memory. This script compiles, down to a
cubin, every kernel variant the launchers ask for while the blocks and ops run forward and
backward, including the ResNeSt-50 and Res2Net-50 stage shapes the benchmark times:

- a driver stub reports the target (no CUDA driver is needed to compile);
- every launch becomes a compile (``JITFunction.run`` with ``warmup=True``): nothing runs, so the
  tensors the launchers allocate stay uninitialised, and that is fine;
- the launchers are reached through the public modules and ops with ``backend="triton"`` on CPU
  tensors, so the specialisations (dtypes, unit strides, block sizes) are the ones a GPU gets.

Usage: ``python tests/triton_aot.py ARCH [DTYPE ...]`` without TRITON_INTERPRET: ARCH 80 or 90,
the DTYPEs (``bfloat16``, ``float32``, ...) for which the benchmark shapes compile as well. Prints
one JSON object: per kernel, the variants compiled, the most shared memory one of them needs, its
floating-point scalar arguments, whether a variant was compiled with fused multiply-add, and
the local-memory stack frames (spilled registers) of its variants: the largest per pointer
dtypes, and the largest among the variants the benchmark's shapes launch.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import torch
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from splat import backend as _backend

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Scalar argument types of a compiled kernel that a Python float becomes: Triton passes every one
# as float32, so a reciprocal count or an eps given that way costs float64 data its precision.
FLOAT_SCALARS = ("fp16", "bf16", "fp32", "fp64")
float_args: dict[str, set[str]] = {}
# Kernels with a variant compiled with fused multiply-add (every launch should pass _tiles.launch).
fp_fusion: set[str] = set()
# Per kernel: {pointer dtypes of a variant: bytes of its local-memory stack frame}, where not 0.
stack_frames: dict[str, dict[str, int]] = {}
# Per kernel: the largest stack frame of a variant launched at the benchmark's shapes.
benchmark_stack: dict[str, int] = {}
_stack_of: dict[int, int] = {}  # per compiled variant (id), so cuobjdump reads each cubin once
_benchmarking = False
LAYOUTS = (torch.contiguous_format, torch.channels_last)


def _stack_frame(name: str, cubin: bytes) -> int:
    """Bytes of local memory a thread of kernel ``name`` uses for its stack frame: spilled
    registers (splat's kernels call no functions), as ``cuobjdump -res-usage`` reads the cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    match = re.search(rf"Function {name}:\s*REG:\d+ STACK:(\d+)", usage)
    assert match, f"{name}: no resource usage in\n{usage}"
    return int(match.group(1))


class _CompileOnlyDriver:
    """The few driver calls ``JITFunction.run`` makes before it compiles."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _install(arch: int) -> dict:
    """Route every launch to a compile for ``arch``; returns {kernel name: {variant: shared bytes}}
    (and fills ``float_args``)."""
    driver.set_active(_CompileOnlyDriver(arch))
    compiled: dict[str, dict[int, int]] = {}
    compile_and_launch = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = compile_and_launch(self, *args, grid=grid, warmup=True, **kwargs)
        assert kernel.asm["cubin"], f"{self.fn.__name__}: empty cubin"
        compiled.setdefault(self.fn.__name__, {})[id(kernel)] = kernel.metadata.shared
        float_args.setdefault(self.fn.__name__, set()).update(
            name for name, ty in kernel.src.signature.items() if ty in FLOAT_SCALARS
        )
        if kernel.metadata.enable_fp_fusion:
            fp_fusion.add(self.fn.__name__)
        if id(kernel) not in _stack_of:
            _stack_of[id(kernel)] = _stack_frame(self.fn.__name__, kernel.asm["cubin"])
        stack = _stack_of[id(kernel)]
        if _benchmarking:
            benchmark_stack[self.fn.__name__] = max(benchmark_stack.get(self.fn.__name__, 0), stack)
        if stack:
            dtypes = ",".join(sorted({ty[1:] for ty in kernel.src.signature.values() if ty.startswith("*")}))
            frames = stack_frames.setdefault(self.fn.__name__, {})
            frames[dtypes] = max(frames.get(dtypes, 0), stack)
        return kernel

    JITFunction.run = compile_only
    # The launchers run on CPU tensors here, which resolve() admits only for the interpreter.
    _backend._triton_interpreted = lambda: True
    return compiled


def _empty(shape, dtype, layout=torch.contiguous_format, requires_grad=False):
    return torch.empty(shape, dtype=dtype).contiguous(memory_format=layout).requires_grad_(requires_grad)


def _tail_ops(B, radix, C, H, W, dtype, layout, groups=1):
    """The split-attention ops forward and backward on one shape."""
    from splat import ops

    y = _empty((B, radix * C, H, W), dtype, layout, requires_grad=True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mean, var = ops.channel_stats(y, "triton")
    scale, shift = torch.rsqrt(var.abs() + 1), -mean
    gap = ops.radix_pool(y, scale, shift, radix, "triton", groups=groups)
    logits = _empty((B, radix * C), dtype, requires_grad=True)
    attn = ops.radix_softmax(logits, radix, groups, "triton")
    out = ops.attention_sum(y, scale, shift, attn, radix, "triton", groups=groups)
    (out.to(acc).sum() + gap.to(acc).sum()).backward()
    if dtype.itemsize == 2:  # autocast: float32 weights, so a float32 out and dout
        wide = ops.attention_sum(y, scale.detach(), shift.detach(), attn.detach().float(), radix, "triton", groups=groups)
        wide.sum().backward()


def _split_attention(B, radix, C, H, W, dtype, layout, groups=1, stats_grads=(True, True)):
    """The whole-tail op forward and backward, training statistics (mean and var differentiated
    where ``stats_grads`` says), on one shape."""
    from splat import ops

    y = _empty((B, radix * C, H, W), dtype, layout, requires_grad=True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    inter = max(C // 2, 32)
    ones = torch.ones(radix * C, dtype=acc, requires_grad=True)
    bn1 = (torch.ones(inter, dtype=acc), torch.zeros(inter, dtype=acc), True, 1e-5)
    out, mean0, var0, *_ = ops.split_attention(
        y, bn0=(ones, torch.zeros_like(ones), True, 1e-5), fc1_weight=_empty((inter, C), acc), fc1_bias=None,
        bn1=bn1, relu=True, fc2_weight=_empty((radix * C, inter), acc), fc2_bias=None, radix=radix,
        groups=groups, backend="triton",
    )
    (out.to(acc).sum() + stats_grads[0] * mean0.sum() + stats_grads[1] * var0.sum()).backward()


def _blocks(dtype, layout):
    """Each fused block, train and eval, forward and backward, on small inputs."""
    import splat

    bn = torch.nn.BatchNorm2d
    blocks = [
        (splat.FusedSplAtConv2d(16, 16, 3, padding=1, radix=2, groups=2, norm_layer=bn, backend="triton"), 16),
        (splat.FusedSplAtConv2d(16, 16, 3, padding=1, radix=1, backend="triton"), 16),
        (splat.FusedSKConv(32, 8, M=2, G=4, r=2, backend="triton"), 32),
        (splat.FusedBottle2neck(64, 16, baseWidth=26, scale=4, backend="triton"), 64),
        (splat.FusedBottle2neck(64, 16, stride=2, stype="stage", downsample=torch.nn.Conv2d(64, 64, 1, 2),
                                backend="triton"), 64),
    ]
    for block, channels in blocks:
        block = block.to(dtype)
        for training in (True, False):
            x = _empty((2, channels, 9, 9), dtype, layout, requires_grad=True)
            block.train(training)(x).sum().backward()
        with torch.no_grad():  # inference: nothing saved for a backward
            block(x)


def _res2net_chain(B, width, H, stage, dtype, layout):
    """The Res2Net 3x3 chain op forward and backward, training statistics, on one shape."""
    from splat import ops

    x = _empty((B, 4 * width, H, H), dtype, layout, requires_grad=True)
    weight = _empty((3 * width, width, 3, 3), dtype, requires_grad=True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gamma, beta = torch.ones(3 * width, dtype=acc), torch.zeros(3 * width, dtype=acc)
    out, _, _ = ops.res2net_chain(
        x, weight, gamma, beta, gamma, beta, 1e-5, 4, stage, 2 if stage else 1, backend="triton"
    )
    out.sum().backward()


def _bn_add_relu(B, C, H, W, dtype, layout, residual=True):
    """bn_add_relu forward and backward with training statistics, on one shape."""
    from splat import ops

    y = _empty((B, C, H, W), dtype, layout, requires_grad=True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    res = _empty((B, C, H, W), dtype, layout, requires_grad=True) if residual else None
    out, _, _ = ops.bn_add_relu(y, res, bn=(torch.ones(C, dtype=acc), torch.zeros(C, dtype=acc), True, 1e-5),
                                backend="triton")
    out.sum().backward()


def _benchmark_shapes(dtype, layout):
    """The stage shapes bench_blocks.py times (batch 64 at 224), so their block sizes compile too."""
    for C, H in ((64, 56), (128, 28), (256, 14), (512, 7)):
        _tail_ops(64, 2, C, H, H, dtype, layout)
        _split_attention(64, 2, C, H, H, dtype, layout)
    for width, H in ((26, 56), (52, 28), (104, 14), (208, 7)):
        for stage in (False, True):
            _res2net_chain(64, width, H, stage, dtype, layout)
        _bn_add_relu(64, 4 * width, H, H, dtype, layout, residual=False)
    for C, H in ((256, 56), (512, 28), (1024, 14), (2048, 7)):
        _bn_add_relu(64, C, H, H, dtype, layout)


def _gpu_grids(dtype, layout):
    """The variants only a GPU's grids reach: H*W split across programs (a GPU wants hundreds of
    programs, the CPU stand-in 8) and several tiles per program (maps of millions of pixels)."""
    from splat.kernels import _tiles

    programs_wanted, max_grid = _tiles.programs_wanted, _tiles._MAX_GRID_YZ
    _tiles.programs_wanted, _tiles._MAX_GRID_YZ = (lambda device: 528), 1
    try:
        _tail_ops(2, 2, 12, 40, 40, dtype, layout)
        _split_attention(2, 2, 12, 40, 40, dtype, layout, stats_grads=(True, False))
        _split_attention(2, 2, 12, 40, 40, dtype, layout, stats_grads=(False, True))
        _bn_add_relu(2, 12, 40, 40, dtype, layout)
    finally:
        _tiles.programs_wanted, _tiles._MAX_GRID_YZ = programs_wanted, max_grid


def main(arch: int, benchmark_dtypes: tuple) -> int:
    global _benchmarking
    compiled = _install(arch)
    for dtype in DTYPES:
        for layout in LAYOUTS:
            for radix, groups in ((1, 1), (2, 1), (4, 2)):
                _tail_ops(3, radix, 12, 5, 7, dtype, layout, groups)
                _split_attention(3, radix, 12, 5, 7, dtype, layout, groups)
            _gpu_grids(dtype, layout)
            _blocks(dtype, layout)
            if dtype in benchmark_dtypes:
                _benchmarking = True
                _benchmark_shapes(dtype, layout)
                _benchmarking = False
    summary = {
        name: {"variants": len(k), "max_shared": max(k.values()), "float_args": sorted(float_args[name]),
               "fp_fusion": name in fp_fusion, "stack_frames": stack_frames.get(name, {}),
               "benchmark_stack": benchmark_stack.get(name)}
        for name, k in sorted(compiled.items())
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("run without TRITON_INTERPRET: this script compiles the kernels, it does not interpret them")
    sys.exit(main(int(sys.argv[1]), tuple(getattr(torch, name) for name in sys.argv[2:])))
