#!/usr/bin/env python3
"""Time the fused blocks against their plain-PyTorch references, stage by stage.

For each block family (ResNeSt split attention "splat"; Res2Net "res2net"; SKNet "sk") and each
stage of the published models it times, at batch 64:

- ``eager``    the reference module of ``tests/reference`` (plain PyTorch, what users run);
- ``compile``  ``torch.compile(reference)`` (default mode, static shapes), warmed up first;
- ``<family>-<backend>``  the fused module built by ``Fused*.from_module(reference, backend)``
  (same weights), for every available backend (torch, triton, cuda);
- ``conv``     the block's convolutions alone, so that "block - conv" (the *tail*: BN, ReLU,
  pooling, attention, ...) is visible;
- ``conv-fused``, ``conv-cat``  where the fused module convolves otherwise, its convolution alone
  and an alternative (SK: its M branch convs as one conv, each branch's kernel zero-padded to the
  largest footprint; and the reference's M convs with their outputs copied into one buffer);

in float32 and bfloat16 (``torch.autocast("cuda", torch.bfloat16)`` over float32 parameters,
as mixed-precision training runs), NCHW and channels_last (input and module), forward and
forward+backward. Every mode runs the module in train mode with gradients enabled (BN uses
batch statistics; "fwd" is the forward half of a training step, "fwd+bwd" adds
``out.backward(grad)`` for a random ``grad``; gradients are reset to None between repeats).
Before timing, every implementation's output and input gradient are compared with eager's on
the same input; an implementation that disagrees is dropped and reported, never timed.

It also times each split-attention op (forward and ``torch.ops.splat.<op>_backward``) of the
Triton and CUDA backends (``--op-backends``) on the ResNeSt stage shapes and reports achieved
bandwidth -- the fewest bytes the op must move (each input read once, each output written
once) over its time -- against the device's copy bandwidth, measured with a large
device-to-device ``copy_`` (bytes read + written). The same is reported for the tail of each
block (block time minus conv time; forward: y read and the output written once; backward: dout
and y read and dy written once).

Timing on CUDA: ``triton.testing.do_bench`` (median; it flushes the L2 cache before every
repeat). Ops are captured in a CUDA graph over several input copies that together exceed the
L2 cache, so the numbers are the kernels' and not Python's launch overhead.

Order of work, so that a short budget (``--time-budget``, ``--compile-budget``) loses the least:
the blocks go in groups, the primary models (resnest50d, res2net50_26w_4s's repeated blocks,
skresnext50_32x4d) first, then by dtype and layout in the order asked for (bfloat16, the targets'
dtype, first on a GPU); in each group stage by stage across the families, every block with eager /
fused / conv, then ``torch.compile`` of the same references (one compile per config, dtype and
layout serves both modes); the ops last, with 45 s kept for them.
Whatever did not fit is listed under "skipped" with the reason.

Outputs (see ``--out``): ``blocks-<device>.json``, ``blocks-<device>.md`` and, if matplotlib is
importable, ``blocks-<device>.png``. JSON schema::

    {"device", "torch", "triton", "cuda", "date", "gpu_timed", "settings": {...},
     "copy_gbs": float,
     "records": [{"block", "config", "dtype", "layout", "mode", "impl", "ms", ["compile_s"], ["host_ms"]}],
     "tail":    [{"block", "config", "dtype", "layout", "mode", "impl", "tail_ms",
                  "min_bytes", "gbs", "pct_copy"}],
     "ops":     [{"op", "pass", "config", "dtype", "layout", "shape_class", "backend", "us",
                  "min_bytes", "gbs", "pct_copy", "graph"}],
     "skipped": [{"what", "reason"}]}

On a machine without CUDA it runs a short version (one small stage per family, eager and the
torch backend) and says that GPU kernels were not timed; it writes files only when ``--out`` is
given, named ``blocks-cpu.*``, so a CPU run never overwrites GPU results.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import itertools
import json
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import splat  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
MODES = ("fwd", "fwd+bwd")
CPU_NOTE = "no CUDA device: GPU kernels were not timed; CPU numbers are not representative"


# --------------------------------------------------------------------------------------------
# Block families: a table of configs and a builder each.
# --------------------------------------------------------------------------------------------


@dataclass
class Config:
    name: str  # "resnest50d.s1"
    in_channels: int
    hw: int
    kwargs: dict
    primary: bool = True  # timed and compiled first when the budget is short (see Bench.plan)
    quick: bool = False  # the one config a --quick run times
    radix: int = 0  # for the tail's minimum bytes: y is (B, radix*channels, H, W)
    channels: int = 0


@dataclass
class Family:
    name: str
    fused_attr: str  # attribute of the splat package
    configs: list
    build_ref: Callable  # Config -> reference nn.Module (float32, CPU)
    conv_parts: Callable  # (ref, x) -> [(module, input)] : the block's convolutions alone
    ops: bool = False  # time the split-attention ops on these shapes
    # (ref, fused module) -> {impl: x -> conv output}: convolutions alone other than the reference's
    conv_variants: Callable | None = None


# Records of convolutions alone: baselines, not implementations of the block.
CONVS = ("conv", "conv-fused", "conv-cat")


def _splat_configs():
    cfgs = []
    # timm resnest50d: radix 2, cardinality 1, base width 64; SplitAttn(width, width, 3, stride 1)
    # (avd puts the stride-2 AvgPool after it), at the resolution of the stage's repeated blocks.
    for i, (width, hw) in enumerate([(64, 56), (128, 28), (256, 14), (512, 7)]):
        kw = dict(kernel_size=3, stride=1, padding=1, groups=1, radix=2)
        cfgs.append(Config(f"resnest50d.s{i + 1}", width, hw, kw, True, i == 2, 2, width))
    # resnest50d_4s2x40d: radix 4, cardinality 2, base width 40 -> widths 80, 160, 320, 640.
    for i, (width, hw) in enumerate([(80, 56), (160, 28), (320, 14), (640, 7)]):
        kw = dict(kernel_size=3, stride=1, padding=1, groups=2, radix=4)
        cfgs.append(Config(f"resnest50d_4s2x40d.s{i + 1}", width, hw, kw, False, False, 4, width))
    return cfgs


def _build_splat(cfg):
    from tests.reference.splat import SplitAttn

    return SplitAttn(cfg.in_channels, cfg.in_channels, bias=False, norm_layer=nn.BatchNorm2d, **cfg.kwargs)


def _res2net_configs():
    # res2net50_26w_4s: the repeated 'normal' blocks (no downsample, inplanes = 4 * planes) and the
    # 'stage' block that opens each stage (downsample; stride 2 from stage 2 on).
    cfgs = []
    for i, (planes, hw) in enumerate([(64, 56), (128, 28), (256, 14), (512, 7)]):
        cfgs.append(Config(f"res2net50_26w_4s.s{i + 1}", 4 * planes, hw, dict(planes=planes), True, i == 2))
    for i, (inplanes, planes, stride, hw) in enumerate([(64, 64, 1, 56), (256, 128, 2, 56), (512, 256, 2, 28),
                                                         (1024, 512, 2, 14)]):
        kw = dict(planes=planes, stride=stride, stype="stage")
        cfgs.append(Config(f"res2net50_26w_4s.s{i + 1}-stage", inplanes, hw, kw, False))
    return cfgs


def _build_res2net(cfg):
    from tests.reference.res2net import Bottle2neck

    planes, stride = cfg.kwargs["planes"], cfg.kwargs.get("stride", 1)
    downsample = None
    if cfg.kwargs.get("stype") == "stage":
        downsample = nn.Sequential(nn.Conv2d(cfg.in_channels, planes * 4, 1, stride, bias=False),
                                   nn.BatchNorm2d(planes * 4))
    return Bottle2neck(cfg.in_channels, planes, stride, downsample, baseWidth=26, scale=4,
                       stype=cfg.kwargs.get("stype", "normal"))


def _like(x, channels, stride=1):
    """A random leaf shaped like x (spatially divided by stride) with another channel count, in x's memory format."""
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
    size = [(n - 1) // stride + 1 for n in x.shape[2:]]
    t = torch.randn(x.shape[0], channels, *size, device=x.device, dtype=x.dtype)
    return t.contiguous(memory_format=fmt).requires_grad_()


def _res2net_convs(ref, x):
    # conv1 on x, each 3x3 branch conv on a width-channel input, conv3 on the concatenation at the
    # output resolution, and the downsample's conv on x.
    stride = ref.convs[0].stride[0]
    parts = [(ref.conv1, x)] + [(conv, _like(x, ref.width)) for conv in ref.convs]
    parts.append((ref.conv3, _like(x, ref.width * ref.scale, stride)))
    if ref.downsample is not None:
        parts.append((ref.downsample[0], x))
    return parts


def _sk_configs():
    # skresnext50_32x4d: SelectiveKernel(width, width, groups=32), two 3x3 paths (dilation 1, 2),
    # no input split, attention width make_divisible(width / 16, 32).
    cfgs = []
    for i, (width, hw, attn) in enumerate([(128, 56, 32), (256, 28, 32), (512, 14, 32), (1024, 7, 64)]):
        kw = dict(groups=32, num_paths=2, attn_channels=attn, split_input=False)
        cfgs.append(Config(f"skresnext50_32x4d.s{i + 1}", width, hw, kw, True, i == 2, 2, width))
    return cfgs


def _build_sk(cfg):
    from tests.reference.sk import SelectiveKernel

    return SelectiveKernel(cfg.in_channels, cfg.in_channels, **cfg.kwargs)


def _sk_convs(ref, x):
    if ref.split_input:
        xs = [t.detach().clone().requires_grad_() for t in torch.split(x, ref.in_channels // ref.num_paths, 1)]
        return [(p.conv, xi) for p, xi in zip(ref.paths, xs)]
    return [(p.conv, x) for p in ref.paths]


def _sk_conv_variants(ref, fused):
    """What the zero-padded taps of FusedSKConv's one conv cost against M convs and a copy."""
    def separate_then_cat(x):
        xs = torch.split(x, ref.in_channels // ref.num_paths, 1) if ref.split_input else [x] * ref.num_paths
        return torch.cat([p.conv(xi) for p, xi in zip(ref.paths, xs)], 1)

    return {"conv-fused": lambda x: fused._branch_conv(x)[0], "conv-cat": separate_then_cat}


FAMILIES = {
    "splat": Family("splat", "FusedSplAtConv2d", _splat_configs(), _build_splat, lambda ref, x: [(ref.conv, x)], True),
    "res2net": Family("res2net", "FusedBottle2neck", _res2net_configs(), _build_res2net, _res2net_convs),
    "sk": Family("sk", "FusedSKConv", _sk_configs(), _build_sk, _sk_convs, conv_variants=_sk_conv_variants),
}


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


class Timer:
    def __init__(self, device, warmup_ms, rep_ms):
        self.device, self.warmup, self.rep = device, warmup_ms, rep_ms
        self.cuda = device.type == "cuda"
        self.do_bench = None
        if self.cuda:
            try:
                from triton.testing import do_bench

                self.do_bench = do_bench
            except ImportError:
                pass

    def __call__(self, fn, grad_to_none=None, warmup=None, rep=None) -> float:
        """Median milliseconds of fn()."""
        warmup = self.warmup if warmup is None else warmup
        rep = self.rep if rep is None else rep
        if self.do_bench is not None:
            return float(self.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"))
        if self.cuda:
            return self._events(fn, grad_to_none, warmup, rep)
        return self._host(fn, grad_to_none, warmup, rep)

    def host(self, fn, grad_to_none=None, reps=10) -> float | None:
        """Median milliseconds the host takes to issue fn() onto an idle, synchronised device (CUDA
        only). Where it exceeds the device time, back-to-back steps are bound by the host's launches."""
        if not self.cuda:
            return None
        times = []
        for _ in range(reps):
            self._reset(grad_to_none)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        return statistics.median(times)

    @staticmethod
    def _reset(grad_to_none):
        for t in grad_to_none or ():
            t.grad = None

    def _events(self, fn, grad_to_none, warmup, rep):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        est = max((time.perf_counter() - t0) * 1e3, 1e-3)
        for _ in range(max(1, int(warmup / est))):
            fn()
        times = []
        for _ in range(max(3, int(rep / est))):
            self._reset(grad_to_none)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        return statistics.median(times)

    def _host(self, fn, grad_to_none, warmup, rep):
        fn()
        t0 = time.perf_counter()
        fn()
        est = max((time.perf_counter() - t0) * 1e3, 1e-3)
        for _ in range(min(2, max(1, int(warmup / est)))):
            fn()
        times = []
        for _ in range(min(20, max(3, int(rep / est)))):
            self._reset(grad_to_none)
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


class Budget:
    """Wall-clock budget: later work is skipped, with a printed reason, once it runs out."""

    def __init__(self, seconds):
        self.start = time.monotonic()
        self.seconds = seconds

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - (time.monotonic() - self.start)


def autocast(device, dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    device: torch.device
    timer: Timer
    budget: Budget
    records: list = field(default_factory=list)
    tail: list = field(default_factory=list)
    ops: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    copy_gbs: float | None = None
    compile_seconds: float = 0.0  # spent compiling so far
    compile_last_s: float = 20.0  # the last compile's time: the estimate for the next one
    out_dtypes: dict = field(default_factory=dict)  # (config, dtype name) -> (output dtype, element size)

    def skip(self, what, reason):
        self.skipped.append({"what": what, "reason": reason})
        print(f"  skip {what}: {reason}", flush=True)

    # ---- copy bandwidth ----
    def measure_copy(self):
        n = (1 << 28) if self.device.type == "cuda" else (1 << 24)  # 1 GiB / 64 MiB of float32
        src = torch.randn(n, device=self.device)
        dst = torch.empty_like(src)
        ms = self.timer(lambda: dst.copy_(src))
        self.copy_gbs = 2 * src.nbytes / ms / 1e6
        print(f"copy bandwidth: {self.copy_gbs:.0f} GB/s (device-to-device copy_ of {src.nbytes >> 20} MiB, read + write)")
        del src, dst

    def pct(self, gbs):
        return 100.0 * gbs / self.copy_gbs if self.copy_gbs else None

    # ---- one implementation's step ----
    def step(self, module, x, grad, mode, dtype):
        if mode == "fwd":
            def fn():
                with autocast(self.device, dtype):
                    module(x)
        else:
            def fn():
                with autocast(self.device, dtype):
                    out = module(x)
                out.backward(grad)
        return fn

    def conv_step(self, parts, grads, mode, dtype):
        def fn():
            with autocast(self.device, dtype):
                outs = [m(inp) for m, inp in parts]
            if mode == "fwd+bwd":
                torch.autograd.backward(outs, grads)
        return fn

    def run_once(self, module, x, g_logical, dtype):
        """(out, dx, grad) of one forward+backward; grad in out's dtype and strides."""
        x.grad = None
        for p in module.parameters():
            p.grad = None
        with autocast(self.device, dtype):
            out = module(x)
        grad = torch.empty_like(out).copy_(g_logical)
        out.backward(grad)
        dx = x.grad
        x.grad = None
        return out.detach(), dx, grad

    def exact_once(self, ref, x, g_logical):
        """(out, dx) of one forward+backward of a float64 copy of ``ref``: the arbiter where an
        implementation and eager disagree."""
        ref64 = copy.deepcopy(ref).double()
        x64 = x.detach().double().requires_grad_()
        out = ref64(x64)
        out.backward(g_logical.double())
        return out.detach(), x64.grad

    def check(self, out, dx, ref_out, ref_dx, dtype, exact) -> str | None:
        """None if the implementation agrees with eager, else the reason. Where they disagree,
        ``exact()`` (float64 out, dx) decides: a ReLU whose input rounds to the other side of zero
        moves a whole gradient element, in eager as in the kernels. The implementation then passes
        if its error from float64 is within the tolerance or within twice eager's."""
        tol = 1e-3 if dtype == torch.float32 else 5e-2
        if out.shape != ref_out.shape:
            return f"output shape {tuple(out.shape)} != {tuple(ref_out.shape)}"
        if not torch.isfinite(out).all() or dx is None or not torch.isfinite(dx).all():
            return "non-finite output or input gradient"
        if dtype == torch.float32:
            if not torch.allclose(out.float(), ref_out.float(), rtol=tol, atol=tol):
                bad = f"output differs from eager: max abs err {(out.float() - ref_out.float()).abs().max().item():.3g}"
            elif rel_err(dx, ref_dx) > tol:
                bad = f"input gradient differs from eager: relative error {rel_err(dx, ref_dx):.3g}"
            else:
                return None
        elif rel_err(out, ref_out) > tol or rel_err(dx, ref_dx) > tol:
            bad = f"{dtype} output/grad relative error {rel_err(out, ref_out):.3g}/{rel_err(dx, ref_dx):.3g} > {tol:g}"
        else:
            return None
        out64, dx64 = exact()
        errs = [(rel_err(a, want), rel_err(b, want)) for a, b, want in ((out, ref_out, out64), (dx, ref_dx, dx64))]
        if all(err <= max(tol, 2 * eager_err) for err, eager_err in errs):
            return None
        (out_err, eager_out_err), (dx_err, eager_dx_err) = errs
        return (f"{bad}; relative error from float64 {out_err:.3g}/{dx_err:.3g} (output/grad), "
                f"eager's {eager_out_err:.3g}/{eager_dx_err:.3g}")

    def record(self, fam, cfg, dname, lname, mode, impl, ms, **extra):
        rec = {"block": fam.name, "config": cfg.name, "dtype": dname, "layout": lname, "mode": mode,
               "impl": impl, "ms": round(ms, 5), **extra}
        self.records.append(rec)
        return rec

    def time_impl(self, fam, cfg, dname, lname, impl, module, x, grad, dtype, **extra):
        params = [p for p in module.parameters() if p.requires_grad]
        for mode in self.args.modes:
            fn = self.step(module, x, grad, mode, dtype)
            ms = self.timer(fn, grad_to_none=[x] + params)
            host = self.timer.host(fn, grad_to_none=[x] + params)
            if host is not None:
                extra["host_ms"] = round(host, 5)
            self.record(fam, cfg, dname, lname, mode, impl, ms, **extra)

    # ---- a family ----
    def fused_backends(self):
        avail = splat.backends()
        names = []
        for b in self.args.backends:
            ok, why = avail.get(b, (False, "unknown backend"))
            if not ok:
                self.skip(f"backend {b}", why)
            elif b == "triton" and self.device.type != "cuda":
                self.skip("backend triton", "no CUDA device (the interpreter is too slow to time)")
            else:
                names.append(b)
        return names

    def plan(self, families) -> list[list]:
        """The (family, config, dtype name, layout name) jobs, in groups timed one after another:
        each group's blocks, then torch.compile of the same references. Groups go by the primary
        models first, then by dtype and layout in the order asked for (bfloat16 first on a GPU: the
        targets are stated in it); within a group stage by stage across the families, so that a
        budget cut short leaves every family timed and compiled on the same stages."""
        keyed = []
        for f, fam in enumerate(families):
            if getattr(splat, fam.fused_attr, None) is None:
                self.skip(f"block {fam.name}", f"splat.{fam.fused_attr} does not exist yet")
                continue
            configs = [c for c in fam.configs if self.want_config(c)]
            for (stage, cfg), (d, dname), (l, lname) in itertools.product(
                    enumerate(configs), enumerate(self.args.dtypes), enumerate(self.args.layouts)):
                keyed.append(((not cfg.primary, d, l), (stage, f), (fam, cfg, dname, lname)))
        keyed.sort(key=lambda k: k[:2])
        return [[job for _, _, job in group] for _, group in itertools.groupby(keyed, key=lambda k: k[0])]

    def want_config(self, cfg):
        if self.args.configs:
            return any(s in cfg.name for s in self.args.configs)
        return cfg.quick if self.args.quick else True

    def each_job(self, jobs, label, min_left_s, body):
        """body(fam, cfg, dname, lname) for each job while ``min_left_s`` of the budget remain; a
        job that raises is listed under "skipped" and does not stop the others."""
        for fam, cfg, dname, lname in jobs:
            what = f"{label}{fam.name} {cfg.name} {dname} {lname}"
            if self.budget.left() < min_left_s:
                self.skip(what, "time budget spent")
                continue
            t0 = time.monotonic()
            try:
                body(fam, cfg, dname, lname)
            except Exception as e:
                self.skip(what, f"{type(e).__name__}: {str(e)[:300]}")
            print(f"  {what}: {time.monotonic() - t0:.1f} s", flush=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def run_blocks(self, jobs, backends, reserve_s=0.0):
        self.each_job(jobs, "", 10 + reserve_s, lambda *job: self.run_job(*job, backends))

    def setup(self, fam, cfg, dname, lname):
        """(reference, x, output gradient's values, dtype) of a job: the reference in train mode and
        x in the job's layout, seeded, so that every run of the job sees the same."""
        dtype, layout = DTYPES[dname], LAYOUTS[lname]
        torch.manual_seed(0)
        ref = fam.build_ref(cfg).to(self.device).train().to(memory_format=layout)
        x = torch.randn(self.args.batch, cfg.in_channels, cfg.hw, cfg.hw, device=self.device)
        x = x.contiguous(memory_format=layout).requires_grad_()
        with autocast(self.device, dtype):
            shape = ref(x).shape
        return ref, x, torch.randn(shape, device=self.device), dtype

    def implementations(self, fam, cfg, ref, lname, backends) -> dict:
        """{impl: module}: eager (``ref``) and the fused module of each backend, same weights."""
        cls = getattr(splat, fam.fused_attr)
        impls = {"eager": ref}
        for b in backends:
            try:
                impls[f"{fam.name}-{b}"] = cls.from_module(ref, backend=b).to(memory_format=LAYOUTS[lname])
            except Exception as e:
                self.skip(f"{fam.name}-{b} {cfg.name}", f"from_module failed: {type(e).__name__}: {e}")
        return impls

    def run_job(self, fam, cfg, dname, lname, backends):
        ref, x, g_logical, dtype = self.setup(fam, cfg, dname, lname)
        impls = self.implementations(fam, cfg, ref, lname, backends)
        # Reference output and gradient; every other implementation must agree before it is timed.
        ref_out, ref_dx, _ = self.run_once(ref, x, g_logical, dtype)
        exact = functools.cache(functools.partial(self.exact_once, ref, x, g_logical))
        self.out_dtypes[(cfg.name, dname)] = (ref_out.dtype, ref_out.element_size())
        for impl, module in impls.items():
            what = f"{impl} {cfg.name} {dname} {lname}"
            try:
                out, dx, grad = self.run_once(module, x, g_logical, dtype)
                bad = None if impl == "eager" else self.check(out, dx, ref_out, ref_dx, dtype, exact)
            except Exception as e:
                bad = f"{type(e).__name__}: {e}"
            if bad:
                self.skip(what, f"NOT TIMED: {bad}")
                continue
            self.time_impl(fam, cfg, dname, lname, impl, module, x, grad, dtype)
        # The convolutions alone.
        parts = fam.conv_parts(ref, x)
        with autocast(self.device, dtype):
            outs = [m(inp) for m, inp in parts]
        grads = [torch.randn_like(o) for o in outs]
        del outs
        leaves = [p for m, _ in parts for p in m.parameters()] + [inp for _, inp in parts if inp.requires_grad]
        for mode in self.args.modes:
            ms = self.timer(self.conv_step(parts, grads, mode, dtype), grad_to_none=leaves)
            self.record(fam, cfg, dname, lname, mode, "conv", ms)
        fused = next((m for impl, m in impls.items() if impl != "eager"), None)
        variants = fam.conv_variants(ref, fused) if fam.conv_variants and fused is not None else {}
        for impl, conv in variants.items():
            with autocast(self.device, dtype):
                conv_grads = [torch.randn_like(conv(x))]
            conv_leaves = list(ref.parameters()) + list(fused.parameters()) + [x]
            for mode in self.args.modes:
                ms = self.timer(self.conv_step([(conv, x)], conv_grads, mode, dtype), grad_to_none=conv_leaves)
                self.record(fam, cfg, dname, lname, mode, impl, ms)

    # ---- torch.compile of the reference ----
    def compile_unavailable(self) -> str | None:
        """Why torch.compile is not timed, or None."""
        if self.args.no_compile:
            return "--no-compile"
        if self.device.type != "cuda":
            return "no CUDA device: torch.compile was not timed (CPU inductor builds C++, slow)"
        return None

    def run_compile(self, jobs, reserve_s=0.0):
        if self.compile_unavailable():
            return
        dyn = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
            if hasattr(dyn, name):
                setattr(dyn, name, max(getattr(dyn, name), 1024))
        for fam, cfg, dname, lname in jobs:
            what = f"compile {cfg.name} {dname} {lname}"
            est = max(self.compile_last_s, 5.0)
            if self.compile_seconds + est > self.args.compile_budget:
                self.skip(what, f"compile budget ({self.args.compile_budget:.0f} s) spent")
                continue
            if self.budget.left() < est + 20 + reserve_s:
                self.skip(what, "time budget spent")
                continue
            try:
                self.compile_one(fam, cfg, dname, lname)
            except Exception as e:
                self.skip(what, f"{type(e).__name__}: {str(e)[:300]}")
            torch.cuda.empty_cache()

    def compile_ref(self, ref, x, g_logical, dtype):
        """(compiled, out, dx, grad, seconds): torch.compile(ref) and its first forward+backward,
        which compiles both."""
        torch._dynamo.reset()
        compiled = torch.compile(ref, dynamic=False)
        t0 = time.monotonic()
        out, dx, grad = self.run_once(compiled, x, g_logical, dtype)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return compiled, out, dx, grad, time.monotonic() - t0

    def compile_one(self, fam, cfg, dname, lname):
        ref, x, g_logical, dtype = self.setup(fam, cfg, dname, lname)
        ref_out, ref_dx, _ = self.run_once(ref, x, g_logical, dtype)
        compiled, out, dx, grad, compile_s = self.compile_ref(ref, x, g_logical, dtype)
        self.compile_seconds += compile_s
        self.compile_last_s = compile_s
        what = f"compile {cfg.name} {dname} {lname}"
        bad = self.check(out, dx, ref_out, ref_dx, dtype, functools.partial(self.exact_once, ref, x, g_logical))
        if bad:
            self.skip(what, f"NOT TIMED: {bad}")
            return
        self.time_impl(fam, cfg, dname, lname, "compile", compiled, x, grad, dtype, compile_s=round(compile_s, 1))
        print(f"  {what}: compiled in {compile_s:.1f} s", flush=True)

    # ---- compiling ahead ----
    def prewarm(self, jobs, backends, op_backends):
        """Run, untimed, what timing ``jobs`` compiles: a forward+backward of each implementation
        (the Triton kernels of the fused ones), torch.compile of the reference, and each op case
        once, so that Triton's and Inductor's on-disk caches hold them and a timed run spends its
        budget timing. gpu_check.sh runs one such process per family beside the tests."""
        def warm(fam, cfg, dname, lname):
            ref, x, g_logical, dtype = self.setup(fam, cfg, dname, lname)
            for module in self.implementations(fam, cfg, ref, lname, backends).values():
                self.run_once(module, x, g_logical, dtype)
            if not self.compile_unavailable():
                self.compile_ref(ref, x, g_logical, dtype)
            if fam.ops and not self.args.no_ops:
                for b in op_backends:
                    for _, _, _, fn, inputs, *_ in self.op_cases(cfg, dname, lname, b):
                        fn(*inputs)

        self.each_job(jobs, "prewarm ", 5, warm)

    # ---- per-op bandwidth ----
    def run_ops(self, fam: Family, backends):
        if not fam.ops or self.args.no_ops:
            return
        for cfg in [c for c in fam.configs if self.want_config(c)]:
            for dname, lname in itertools.product(self.args.dtypes, self.args.layouts):
                if self.budget.left() < 30:
                    self.skip(f"ops {cfg.name} {dname} {lname}", "time budget spent")
                    continue
                for b in backends:
                    try:
                        self.ops_one(cfg, dname, lname, b)
                    except Exception as e:
                        self.skip(f"ops {cfg.name} {dname} {lname} {b}", f"{type(e).__name__}: {str(e)[:300]}")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def op_cases(self, cfg, dname, lname, backend):
        """[(op, pass, fn, inputs)]: tensors as the block sees them (conv output y in the compute
        dtype; under autocast the attention weights and the output are float32)."""
        ops = torch.ops.splat
        dtype, layout = DTYPES[dname], LAYOUTS[lname]
        B, R, C, H = self.args.batch, cfg.radix, cfg.channels, cfg.hw
        K = cfg.kwargs.get("groups", 1)
        dev = self.device
        y = torch.randn(B, R * C, H, H, device=dev, dtype=dtype).contiguous(memory_format=layout)
        scale = torch.rand(R * C, device=dev) + 0.5
        shift = torch.randn(R * C, device=dev) * 0.5
        logits = torch.randn(B, R * C, device=dev)  # fc2 output, float32 under autocast
        attn = ops.radix_softmax(logits, R, K, backend)
        mean, var = ops.channel_stats(y, backend)
        gap = ops.radix_pool(y, scale, shift, R, 1, backend)
        out = ops.attention_sum(y, scale, shift, attn, R, 1, backend)
        dgap = torch.randn_like(gap)
        dattn = torch.randn_like(attn)
        dout = torch.randn_like(out)
        dmean, dvar = torch.randn_like(mean), torch.randn_like(var)
        # The tensor each op's "auto" resolves on, hence its row of the auto table.
        yk, lk = splat.backend.shape_class(y), splat.backend.shape_class(logits)
        inter = max(C * R // 4, 32)
        mlp = [torch.randn(inter, C // K, device=dev) * 0.1, torch.rand(inter, device=dev) + 0.5,
               torch.randn(inter, device=dev) * 0.5, torch.randn(R * C, inter // K, device=dev) * 0.1]
        tail_inputs = (y, scale, shift, *mlp, dout)
        rstd = (var + 1e-5).rsqrt()
        # Training: three reads of y forward (statistics, pool, sum) and two backward, see NOTES.md.
        tail_bytes = 6 * y.nbytes + 3 * dout.nbytes

        # A bottleneck's bn3 + shortcut + ReLU on a tensor of y's shape: four passes forward
        # (statistics, then y and the residual read and out written), eight backward, see
        # splat/ops/bn_add_relu.py.
        residual, dy_out = torch.randn_like(y), torch.randn_like(y)
        bn_out, _, _ = splat.ops.bn_add_relu(y, residual, bn=(scale, shift, True, 1e-5), backend=backend)

        def bn_add_relu(y, residual, scale, shift, dout):
            leaves = [t.detach().requires_grad_() for t in (y, residual, scale, shift)]
            out, _, _ = splat.ops.bn_add_relu(leaves[0], leaves[1], bn=(*leaves[2:], True, 1e-5), backend=backend)
            return torch.autograd.grad(out, leaves, dout)

        def tail(y, scale, shift, w1, g1, b1, w2, dout):
            leaves = [t.detach().requires_grad_() for t in (y, scale, shift, w1, g1, b1, w2)]
            out, *_ = splat.ops.split_attention(
                leaves[0], bn0=(leaves[1], leaves[2], True, 1e-5), fc1_weight=leaves[3], fc1_bias=None,
                bn1=(leaves[4], leaves[5], True, 1e-5), relu=True, fc2_weight=leaves[6], fc2_bias=None,
                radix=R, cardinality=K, out_dtype=dout.dtype, backend=backend,
            )
            return torch.autograd.grad(out, leaves, dout)

        return [
            ("split_attention", "fwd+bwd", yk, tail, tail_inputs, tail_bytes),
            ("split_attention", "bwd-sums", yk, ops.split_attention_backward_sums,
             (dout, y, scale, shift, attn, R, 1, backend)),
            ("split_attention", "bwd-dy", yk, ops.split_attention_backward_dy,
             (dout, y, scale, shift, attn, dgap.float(), scale, shift, attn, attn, mean, rstd, None, None, R, 1,
              backend)),
            ("channel_stats", "fwd", yk, ops.channel_stats, (y, backend)),
            ("channel_stats", "bwd", yk, ops.channel_stats_backward, (dmean, dvar, y, mean, backend)),
            ("radix_pool", "fwd", yk, ops.radix_pool, (y, scale, shift, R, 1, backend)),
            ("radix_pool", "bwd", yk, ops.radix_pool_backward, (dgap, y, scale, shift, R, 1, backend)),
            ("radix_softmax", "fwd", lk, ops.radix_softmax, (logits, R, K, backend)),
            ("radix_softmax", "bwd", lk, ops.radix_softmax_backward, (dattn, attn, R, K, backend)),
            ("attention_sum", "fwd", yk, ops.attention_sum, (y, scale, shift, attn, R, 1, backend)),
            ("attention_sum", "bwd", yk, ops.attention_sum_backward, (dout, y, scale, shift, attn, R, 1, backend)),
            ("bn_add_relu", "fwd+bwd", yk, bn_add_relu, (y, residual, scale, shift, dy_out), 12 * y.nbytes),
            ("bn_add_relu", "fwd", yk, ops.bn_add_relu, (y, residual, scale, shift, True, 1e-5, backend),
             4 * y.nbytes),
            ("bn_add_relu", "bwd-sums", yk, ops.bn_add_relu_backward_sums, (dy_out, bn_out, y, backend)),
            ("bn_add_relu", "bwd-dy", yk, ops.bn_add_relu_backward_dy,
             (dy_out, bn_out, y, scale, scale, shift, True, backend)),
        ]

    def ops_one(self, cfg, dname, lname, backend):
        for op, direction, key, fn, inputs, *least in self.op_cases(cfg, dname, lname, backend):
            outs = fn(*inputs)
            outs = outs if isinstance(outs, (tuple, list)) else (outs,)
            tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
            # Each input read and each output written once, unless the case says more is needed.
            min_bytes = least[0] if least else sum(t.nbytes for t in tensors) + sum(t.nbytes for t in outs)
            ms, graph = self.time_op(fn, inputs, min_bytes)
            gbs = min_bytes / ms / 1e6
            self.ops.append({"op": op, "pass": direction, "config": cfg.name, "dtype": dname, "layout": lname,
                             "shape_class": key, "backend": backend, "us": round(ms * 1e3, 2),
                             "min_bytes": min_bytes, "gbs": round(gbs, 1), "pct_copy": _round(self.pct(gbs)),
                             "graph": graph})

    def time_op(self, fn, inputs, min_bytes):
        """Median ms of one call. On CUDA: a graph of calls over enough input copies to exceed L2."""
        if self.device.type != "cuda":
            return self.timer(lambda: fn(*inputs)), False
        l2 = getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 50 << 20)
        copies = max(1, min(32, math.ceil(4 * l2 / max(min_bytes, 1))))
        sets = [inputs] + [tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in inputs)
                           for _ in range(copies - 1)]
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for s in sets:
                    fn(*s)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for s in sets:
                    fn(*s)
            ms = self.timer(graph.replay, warmup=self.args.op_warmup, rep=self.args.op_rep) / copies
            return ms, True
        except Exception as e:  # graph capture refused: time plain calls
            print(f"    (graph capture failed: {type(e).__name__}: {str(e)[:120]}; timing plain calls)")
            torch.cuda.synchronize()
            return self.timer(lambda: fn(*inputs), warmup=self.args.op_warmup, rep=self.args.op_rep), False

    # ---- tail: block minus its convolutions ----
    def compute_tail(self):
        convs = {(r["block"], r["config"], r["dtype"], r["layout"], r["mode"]): r["ms"]
                 for r in self.records if r["impl"] == "conv"}
        cfgs = {c.name: c for f in FAMILIES.values() for c in f.configs}
        B = self.args.batch
        for r in self.records:
            key = (r["block"], r["config"], r["dtype"], r["layout"], r["mode"])
            if r["impl"] in CONVS or key not in convs:
                continue
            cfg = cfgs[r["config"]]
            tail_ms = r["ms"] - convs[key]
            entry = {k: r[k] for k in ("block", "config", "dtype", "layout", "mode", "impl")}
            entry["tail_ms"] = round(tail_ms, 5)
            if cfg.radix:
                # Fewest bytes after the conv in training (benchmarks/NOTES.md): the forward reads y
                # (B, R*C, H, W) three times (BN statistics, then the pool, then the sum, each needing
                # the one before) and writes the output; the backward reads dout and y twice (the
                # attention gradient comes before dy) and writes dy.
                y_el = 4 if r["dtype"] == "float32" else 2
                out_el = self.out_dtypes.get((cfg.name, r["dtype"]), (None, 4))[1]
                y_b = B * cfg.radix * cfg.channels * cfg.hw * cfg.hw * y_el
                out_b = B * cfg.channels * cfg.hw * cfg.hw * out_el
                nbytes = 3 * y_b + out_b + ((2 * out_b + 3 * y_b) if r["mode"] == "fwd+bwd" else 0)
                entry["min_bytes"] = nbytes
                if tail_ms > 0:
                    gbs = nbytes / tail_ms / 1e6
                    entry["gbs"] = round(gbs, 1)
                    entry["pct_copy"] = _round(self.pct(gbs))
            self.tail.append(entry)


def _round(v, n=1):
    return None if v is None else round(v, n)


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def impl_order(records):
    names = []
    for r in records:
        if r["impl"] not in names:
            names.append(r["impl"])
    first = [n for n in (*CONVS, "eager", "compile") if n in names]
    return first + sorted(n for n in names if n not in first)


def speedup_rows(records):
    """{(block, config, dtype, layout, mode): {impl: ms}}."""
    rows = {}
    for r in records:
        rows.setdefault((r["block"], r["config"], r["dtype"], r["layout"], r["mode"]), {})[r["impl"]] = r["ms"]
    return rows


def geomeans(records):
    """{(block, dtype, layout, mode): {impl: geometric-mean speedup over eager across configs}}."""
    acc = {}
    for (block, _, dtype, layout, mode), by_impl in speedup_rows(records).items():
        if "eager" not in by_impl:
            continue
        for impl, ms in by_impl.items():
            if impl not in ("eager", *CONVS):
                acc.setdefault((block, dtype, layout, mode), {}).setdefault(impl, []).append(by_impl["eager"] / ms)
    return {k: {i: (math.exp(sum(map(math.log, v)) / len(v)), len(v)) for i, v in d.items()} for k, d in acc.items()}


def fmt_table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def md_table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def block_table(records):
    impls = [i for i in impl_order(records)]
    header = ["config", "dtype", "layout", "mode"] + [f"{i} ms" for i in impls]
    rows = []
    for (block, config, dtype, layout, mode), by_impl in speedup_rows(records).items():
        eager = by_impl.get("eager")
        cells = [config, dtype, layout, mode]
        for i in impls:
            ms = by_impl.get(i)
            if ms is None:
                cells.append("-")
            elif eager and i not in ("eager", *CONVS):
                cells.append(f"{ms:.3f} ({eager / ms:.2f}x)")
            else:
                cells.append(f"{ms:.3f}")
        rows.append(cells)
    return header, rows


def host_table(records):
    """Host milliseconds to issue one step next to the device's: "host/device" above 1 means
    that eager steps run back to back wait on the host's launches."""
    impls = [i for i in impl_order(records) if i not in CONVS]
    rows_d = {}
    for r in records:
        if "host_ms" in r and r["impl"] in impls:
            key = (r["config"], r["dtype"], r["layout"], r["mode"])
            rows_d.setdefault(key, {})[r["impl"]] = f"{r['host_ms']:.3f} ({r['host_ms'] / r['ms']:.2f})"
    header = ["config", "dtype", "layout", "mode"] + [f"{i} host ms (host/device)" for i in impls]
    return header, [list(k) + [d.get(i, "-") for i in impls] for k, d in rows_d.items()]


def geomean_table(records):
    gm = geomeans(records)
    impls = [i for i in impl_order(records) if i not in ("eager", *CONVS)]
    header = ["block", "dtype", "layout", "mode"] + impls
    rows = []
    for (block, dtype, layout, mode), d in gm.items():
        rows.append([block, dtype, layout, mode] + [f"{d[i][0]:.2f}x (n={d[i][1]})" if i in d else "-" for i in impls])
    return header, rows


def tail_table(tail):
    impls = []
    for t in tail:
        if t["impl"] not in impls:
            impls.append(t["impl"])
    rows_d = {}
    for t in tail:
        key = (t["config"], t["dtype"], t["layout"], t["mode"])
        pct = t.get("pct_copy")
        rows_d.setdefault(key, {})[t["impl"]] = f"{t['tail_ms']:.3f}" + (f" ({pct:.0f}%)" if pct is not None else "")
    header = ["config", "dtype", "layout", "mode"] + [f"{i} tail ms (%copy)" for i in impls]
    rows = [list(k) + [d.get(i, "-") for i in impls] for k, d in rows_d.items()]
    return header, rows


def ops_tables(ops):
    """One table per (dtype, layout): rows op/pass/backend, columns configs, cells 'us (pct%)'."""
    tables = []
    groups = {}
    for o in ops:
        groups.setdefault((o["dtype"], o["layout"]), []).append(o)
    for (dtype, layout), items in groups.items():
        configs = []
        for o in items:
            if o["config"] not in configs:
                configs.append(o["config"])
        rows_d = {}
        for o in items:
            pct = o["pct_copy"]
            rows_d.setdefault((o["op"], o["pass"], o["backend"]), {})[o["config"]] = (
                f"{o['us']:.1f}" + (f" ({pct:.0f}%)" if pct is not None else ""))
        header = ["op", "pass", "backend"] + configs
        rows = [list(k) + [d.get(c, "-") for c in configs] for k, d in rows_d.items()]
        tables.append((f"{dtype} {layout}: us per call (% of copy bandwidth)", header, rows))
    return tables


def plot(records, path, title):
    """Bars of speedup over eager: one panel per (dtype, layout) and mode, configs along x, one
    bar per implementation kind (compile, fused-<backend> whatever the family)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter
    except ImportError:
        print("matplotlib is not importable: no plot written")
        return None
    rows = speedup_rows(records)
    kind = lambda impl: impl if impl in ("compile", "eager", *CONVS) else "fused-" + impl.split("-", 1)[-1]  # noqa: E731
    kinds = []
    for i in impl_order(records):
        if i not in ("eager", *CONVS) and kind(i) not in kinds:
            kinds.append(kind(i))
    combos, configs = [], []
    for (_, config, dtype, layout, _) in rows:
        if (dtype, layout) not in combos:
            combos.append((dtype, layout))
        if config not in configs:
            configs.append(config)
    modes = [m for m in MODES if any(k[4] == m for k in rows)]
    if not kinds or not combos or not modes:
        print("nothing to plot")
        return None
    panel_w = max(5.0, 0.45 * len(configs) * max(1, len(kinds)) / 2)
    fig, axes = plt.subplots(len(combos), len(modes), figsize=(panel_w * len(modes), 3.6 * len(combos)),
                             squeeze=False, sharey=True)
    width = 0.8 / len(kinds)
    for ci, (dtype, layout) in enumerate(combos):
        for mi, mode in enumerate(modes):
            ax = axes[ci][mi]
            for ki, k in enumerate(kinds):
                xs, ys = [], []
                for xi, config in enumerate(configs):
                    for (_, cfg, d, lay, m), by in rows.items():
                        if (cfg, d, lay, m) != (config, dtype, layout, mode) or "eager" not in by:
                            continue
                        for impl, ms in by.items():
                            if impl not in ("eager", *CONVS) and kind(impl) == k:
                                xs.append(xi + (ki - (len(kinds) - 1) / 2) * width)
                                ys.append(by["eager"] / ms)
                ax.bar(xs, ys, width, label=k)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.tick_params(axis="y", which="both", labelsize=7)
            ax.set_xticks(range(len(configs)))
            ax.set_xticklabels(configs, rotation=45, ha="right", fontsize=7)
            ax.set_title(f"{mode}, {dtype}, {layout}", fontsize=9)
            ax.grid(axis="y", which="both", alpha=0.3)
            if mi == 0:
                ax.set_ylabel("speedup over eager")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def print_report(bench, cuda):
    """The tables of write_markdown, as text on stdout."""
    for title, h, r in ops_tables(bench.ops):
        print(f"\nOps, {title}; copy = {bench.copy_gbs:.0f} GB/s")
        print(fmt_table(h, r))
    h, r = host_table(bench.records)
    if r:
        print("\nHost time to issue one step (ms; host/device > 1: launch-bound when run back to back)")
        print(fmt_table(h, r))
    if bench.tail:
        h, r = tail_table(bench.tail)
        print("\nTail = block - its convolutions (ms; % of copy bandwidth at the tail's minimum bytes: forward "
              "reads y and writes out once, backward reads dout and y and writes dy once)")
        print(fmt_table(h, r))
    h, r = block_table(bench.records)
    print("\nBlocks: median ms (speedup over eager)")
    print(fmt_table(h, r))
    if bench.skipped:
        print("\nSkipped:")
        for s in bench.skipped:
            print(f"  {s['what']}: {s['reason']}")
    h, r = geomean_table(bench.records)
    print("\nGeometric-mean speedup over eager, across stages")
    print(fmt_table(h, r) if r else "  (nothing timed)")
    if not cuda:
        print(f"\nNOTE: {CPU_NOTE}")


def write_markdown(path, meta, bench):
    lines = [f"# Block benchmark: {meta['device']}", "",
             f"- device: {meta['device']}", f"- torch: {meta['torch']}", f"- triton: {meta['triton']}",
             f"- date: {meta['date']}", f"- batch {bench.args.batch}; median ms; train mode; bf16 = autocast over "
             "float32 parameters; speedup = eager / impl", ""]
    if not meta["gpu_timed"]:
        lines += [f"**{CPU_NOTE}**", ""]
    if bench.copy_gbs:
        lines += [f"Copy bandwidth: {bench.copy_gbs:.0f} GB/s (read + write).", ""]
    h, r = geomean_table(bench.records)
    lines += ["## Geometric-mean speedup over eager", "", md_table(h, r), ""]
    h, r = block_table(bench.records)
    lines += ["## Per stage (ms, speedup over eager)", "", md_table(h, r), ""]
    h, r = host_table(bench.records)
    if r:
        lines += ["## Host time to issue one step (ms; host/device > 1: launch-bound when run back to back)",
                  "", md_table(h, r), ""]
    if bench.tail:
        h, r = tail_table(bench.tail)
        lines += ["## Tail: block minus its convolutions (ms, % of copy bandwidth at the tail's minimum bytes)",
                  "", md_table(h, r), ""]
    if bench.skipped:
        lines += ["## Skipped", ""] + [f"- {s['what']}: {s['reason']}" for s in bench.skipped] + [""]
    Path(path).write_text("\n".join(lines))


# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one small stage per family, few repeats (default on CPU)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/ on a GPU; on CPU "
                   "nothing is written unless --out is given)")
    p.add_argument("--blocks", default="splat,res2net,sk", help="families: splat,res2net,sk")
    p.add_argument("--configs", default=None, help="comma-separated substrings of config names to keep")
    p.add_argument("--dtypes", default=None, help="bfloat16,float32, in the order timed (CPU: float32)")
    p.add_argument("--layouts", default="nchw,channels_last", help="nchw,channels_last")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="fwd,fwd+bwd")
    p.add_argument("--backends", default="torch,triton,cuda", help="fused backends to time")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 64; --quick: 16; CPU: 2)")
    p.add_argument("--warmup", type=float, default=None, help="do_bench warm-up, ms (default 10)")
    p.add_argument("--rep", type=float, default=None, help="do_bench repetition, ms (default 40)")
    p.add_argument("--op-backends", default="triton,cuda",
                   help="backends whose ops are timed one by one (default triton,cuda; CPU: torch)")
    p.add_argument("--op-warmup", type=float, default=3.0, help="warm-up for the op timings, ms")
    p.add_argument("--op-rep", type=float, default=15.0, help="repetition for the op timings, ms")
    p.add_argument("--no-compile", action="store_true", help="do not time torch.compile")
    p.add_argument("--no-ops", action="store_true", help="do not time the individual ops")
    p.add_argument("--compile-budget", type=float, default=150.0,
                   help="seconds of torch.compile compilation at most; later compiles are skipped (default 150)")
    p.add_argument("--time-budget", type=float, default=330.0,
                   help="wall seconds for the whole run; later work is skipped with a reason (default 330)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default on a CPU-only machine: 1, steadier on a shared machine)")
    p.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    p.add_argument("--prewarm", action="store_true",
                   help="time nothing, write nothing: run once, in the order a timed run would, what it "
                   "compiles (Triton kernels, torch.compile), filling their on-disk caches")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.quick = args.quick or not cuda
    if args.dtypes is None:
        args.dtypes = "bfloat16,float32" if cuda else "float32"
    args.blocks = _split(args.blocks, FAMILIES, "--blocks")
    args.dtypes = _split(args.dtypes, DTYPES, "--dtypes")
    args.layouts = _split(args.layouts, LAYOUTS, "--layouts")
    args.modes = _split(args.modes, MODES, "--modes")
    args.backends = _split(args.backends, ("torch", "triton", "cuda"), "--backends")
    args.configs = args.configs.split(",") if args.configs else None
    if not cuda and args.op_backends == "triton,cuda":
        args.op_backends = "torch"
    args.op_backends = _split(args.op_backends, ("torch", "triton", "cuda"), "--op-backends")
    if args.batch is None:
        args.batch = 64 if cuda and not args.quick else (16 if cuda else 2)
    if args.warmup is None:
        args.warmup = 10.0 if cuda else 5.0
    if args.rep is None:
        args.rep = (40.0 if not args.quick else 25.0) if cuda else 30.0
    return args


def _split(text, allowed, flag):
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad:
        raise SystemExit(f"{flag}: unknown {bad}; choose from {list(allowed)}")
    return items


def main(argv=None):
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    meta = {
        "device": device_name, "torch": torch.__version__, "triton": triton_version,
        "cuda": torch.version.cuda, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu_timed": cuda,
    }
    print(f"device: {device_name} | torch {torch.__version__} | triton {triton_version} | "
          f"CUDA {torch.version.cuda} | splat backends: {splat.backends()}")
    print(f"batch {args.batch}, dtypes {args.dtypes}, layouts {args.layouts}, modes {args.modes}, "
          f"do_bench warmup/rep {args.warmup}/{args.rep} ms, time budget {args.time_budget} s, "
          f"{torch.get_num_threads()} CPU threads")
    if not cuda:
        print(f"NOTE: {CPU_NOTE}")

    bench = Bench(args, device, Timer(device, args.warmup, args.rep), Budget(args.time_budget))
    backends = bench.fused_backends()
    op_backends = [b for b in backends if b in args.op_backends]
    families = [FAMILIES[b] for b in args.blocks]
    if args.prewarm:
        try:
            for jobs in bench.plan(families):
                bench.prewarm(jobs, backends, op_backends)
        except KeyboardInterrupt:  # gpu_check.sh's timeout: what compiled is cached
            bench.skip("the rest", "interrupted (SIGINT)")
        print(f"prewarm: done, {len(bench.skipped)} skipped")
        return 0
    bench.measure_copy()
    print("fused backends timed:", backends)

    op_families = [f for f in families if f.ops and not args.no_ops and getattr(splat, f.fused_attr, None) is not None]
    reserve_s = 45.0 if op_families else 0.0  # for the ops, timed last
    why_not = bench.compile_unavailable()
    if why_not:
        bench.skip("compile", why_not)
    try:
        for jobs in bench.plan(families):
            _, cfg, dname, lname = jobs[0]
            print(f"== blocks: {'primary' if cfg.primary else 'other'} models, {dname}, {lname}", flush=True)
            bench.run_blocks(jobs, backends, reserve_s)
            bench.run_compile(jobs, reserve_s)
        for fam in op_families:
            print(f"== {fam.name}: ops on {op_backends}", flush=True)
            bench.run_ops(fam, op_backends)
    except KeyboardInterrupt:  # e.g. `timeout -s INT`: keep what was measured and write it
        bench.skip("the rest", "interrupted (SIGINT)")
    bench.compute_tail()

    print_report(bench, cuda)

    # ---- write ----
    out_dir = args.out
    if out_dir is None and cuda:
        out_dir = str(REPO / "benchmarks" / "results")
    if out_dir is None:
        print("no --out given on CPU: no files written")
        return 0
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"blocks-{slug(device_name) if cuda else 'cpu'}"
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    doc = {**meta, "settings": settings, "copy_gbs": _round(bench.copy_gbs),
           "records": bench.records, "tail": bench.tail, "ops": bench.ops, "skipped": bench.skipped}
    base.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    write_markdown(base.with_suffix(".md"), meta, bench)
    png = plot(bench.records, base.with_suffix(".png"), f"{device_name}, torch {torch.__version__}, batch {args.batch}")
    print(f"wrote {base}.json, {base}.md" + (f", {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
