"""Shared test utilities: devices, backends, dtypes, tolerances, module comparisons."""

import copy
import statistics

import pytest
import torch
from hypothesis import HealthCheck, settings

import splat
from splat import _layout

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Backends that can run here: on CPU, "triton" runs through Triton's interpreter.
BACKENDS = [name for name, (ok, _) in splat.backends().items() if ok]

# The interpreter computes bf16/fp16 arithmetic wrongly, so low precision is tested on the GPU only.
DTYPES = [torch.float64, torch.float32] + ([torch.float16, torch.bfloat16] if DEVICE.type == "cuda" else [])

LAYOUTS = [torch.contiguous_format, torch.channels_last]

TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops accumulate and return statistics in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Relative floor under the 3x-reference bound: gradients through training-mode BN of the tiny
# MLP are ill-conditioned (the reference itself is off by ~1e-4 in float32 there).
FLOOR = {torch.float32: 1e-4, torch.float16: 4 * torch.finfo(torch.float16).eps,
         torch.bfloat16: 4 * torch.finfo(torch.bfloat16).eps}


# Property tests: a few examples each (the interpreter is slow), no per-example deadline, and the
# backend parametrised as a fixture-like argument.
PROPERTY = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def backend_params(backends=None):
    return [pytest.param(b, id=b) for b in (backends or BACKENDS)]


def rand(*shape, dtype=torch.float64, layout=torch.contiguous_format, requires_grad=False, scale=1.0):
    t = torch.randn(*shape, dtype=dtype, device=DEVICE) * scale
    if len(shape) == 4:
        t = t.contiguous(memory_format=layout)
    return t.requires_grad_(requires_grad)


def assert_close(actual, expected, dtype, reference_low=None, name=""):
    """``actual`` within tolerance of the float64 ``expected``.

    With ``reference_low`` (the reference computed in ``dtype``), the bound is 3x the error the
    reference itself makes in that dtype plus a small relative floor, as flash-attention bounds its kernels;
    without it (or in float64) the fixed per-dtype tolerance applies.
    """
    assert actual is not None, f"{name}: no value"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{name}: NaN (an element was not written?)"
    actual, expected = actual.double(), expected.double()
    if reference_low is None or dtype == torch.float64:
        tol = TOLERANCE.get(dtype, 1e-2)
        torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=name)
        return
    ref_err = (reference_low.double() - expected).abs().max().item()
    err = (actual - expected).abs().max().item()
    floor = FLOOR[dtype] * max(expected.abs().max().item(), 1.0)
    assert err <= 3 * ref_err + floor, f"{name}: error {err:.3g} > 3 x reference error {ref_err:.3g} + {floor:.3g}"


def relative_error(actual, expected) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def assert_grads_close_half(grads, expected, reference_low, dtype):
    """Half-precision gradients ({name: tensor}) against their float64 ``expected``: each tensor's
    relative error within 3x the reference's plus 4 sqrt(eps), except (C,) vectors, and the
    geometric mean over all tensors within 3x the reference's plus sqrt(eps).

    A ReLU whose input lies within rounding distance of zero takes the other branch and moves a
    whole element of the gradient; about eps of the elements do, so a gradient's relative error is
    of order sqrt(eps), and in one small run it is a handful of such events, a different handful
    for the reference. The per-channel sums of BN's weight and bias gradients cancel, and their
    relative error varies a hundredfold between seeds: they count in the mean only. These bounds
    catch a wrong or missing gradient path; rounding-level defects are the float32 and float64
    tests' and the half-precision outputs' to catch.
    """
    sqrt_eps = torch.finfo(dtype).eps ** 0.5
    errs = {}
    for name, g in grads.items():
        assert g is not None, f"grad of {name}: no value"
        assert not torch.isnan(g).any(), f"grad of {name}: NaN (an element was not written?)"
        err, ref_err = relative_error(g, expected[name]), relative_error(reference_low[name], expected[name])
        assert g.dim() == 1 or err <= 3 * ref_err + 4 * sqrt_eps, (
            f"grad of {name}: relative error {err:.3g} > 3 x reference {ref_err:.3g} + 4 sqrt(eps)")
        errs[name] = err, ref_err
    err, ref_err = (statistics.geometric_mean(max(e[i], 1e-30) for e in errs.values()) for i in (0, 1))
    worst = ", ".join(f"{n} {e:.3g} (reference {r:.3g})" for n, (e, r) in sorted(errs.items(), key=lambda i: -i[1][0])[:3])
    assert err <= 3 * ref_err + sqrt_eps, (
        f"gradients: geometric-mean relative error {err:.3g} > 3 x reference {ref_err:.3g} + sqrt(eps); worst: {worst}")


def randomize_bn(module):
    """Non-trivial BN parameters and running statistics, so eval mode tests something."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
            if isinstance(m, torch.nn.BatchNorm2d) and m.track_running_stats:
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return module


def run_module(module, x):
    """Forward and backward of ``module`` on a fresh leaf copy of x: (out, dx, {param name: grad})."""
    x = x.detach().requires_grad_()
    out = module(x)
    # By logical shape: randn_like would fill a channels_last output in memory order.
    grad_out = torch.randn(out.shape, generator=torch.Generator(out.device).manual_seed(1), device=out.device)
    out.backward(grad_out.to(out.dtype))
    return out, x.grad, {n.removeprefix("_orig_mod."): p.grad for n, p in module.named_parameters()}


def compare_modules(ref, fused, x, dtype, ref_low=None, steps=1):
    """``fused`` against the float64 copy of ``ref``: output (dtype and layout too), input and
    parameter gradients, and every buffer after ``steps`` training or eval passes.

    ``ref_low``: the reference in ``dtype``, whose own error bounds the fused module's: tensor by
    tensor, except half-precision gradients, bounded as a whole (``assert_grads_close_half``).
    """
    ref64 = copy.deepcopy(ref).double() if dtype != torch.float64 else ref
    for step in range(steps):
        xs = x if step == 0 else rand(*x.shape, dtype=dtype, layout=_layout.memory_format(x))
        for module in (fused, ref64, ref_low):
            if module is not None:
                module.zero_grad(set_to_none=True)
        out, dx, grads = run_module(fused, xs)
        exp_out, exp_dx, exp_grads = run_module(ref64, xs.double())
        low = run_module(ref_low, xs) if ref_low is not None else (None, None, {})
    assert out.dtype == (low[0].dtype if low[0] is not None else dtype)
    # The input's layout. A Bottle2neck of width 1 has one-channel intermediates, NCHW and NHWC at
    # once, after which the reference may go on in NCHW: its layout is accepted too.
    layouts = {_layout.memory_format(x), _layout.memory_format(exp_out)}
    assert any(out.is_contiguous(memory_format=f) for f in layouts), f"output layout {out.stride()} not in {layouts}"
    assert_close(out, exp_out, dtype, low[0], "output")
    assert grads.keys() == exp_grads.keys()
    grads, exp_grads, low_grads = {"input": dx, **grads}, {"input": exp_dx, **exp_grads}, {"input": low[1], **low[2]}
    if dtype in (torch.float16, torch.bfloat16) and ref_low is not None:
        assert_grads_close_half(grads, exp_grads, low_grads, dtype)
    else:
        for name, g in grads.items():
            assert_close(g, exp_grads[name], dtype, low_grads.get(name), f"grad of {name}")
    buffers = dict(ref64.named_buffers())
    assert dict(fused.named_buffers()).keys() == buffers.keys()
    for name, b in fused.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert int(b) == int(buffers[name]), name
        else:
            assert_close(b.to(buffers[name].dtype), buffers[name], dtype, buffers[name], f"buffer {name}")


def compare_random_block(block, from_module, shape, layout, train):
    """A property test's case: ``block`` (a reference module) with random BN state, in float64 and
    ``train`` mode, against ``from_module(copy of it)`` on a random input of ``shape`` in ``layout``."""
    ref = randomize_bn(block).to(DEVICE, torch.float64).train(train)
    compare_modules(ref, from_module(copy.deepcopy(ref)), rand(*shape, layout=layout), torch.float64)


def pretend_synchronising(monkeypatch):
    """Make the fused blocks treat every training SyncBatchNorm as synchronising across processes,
    so they run it as a module. Without a process group the module is a BatchNorm2d, so the
    result must not change: what a CPU can check of the path real multi-process training takes."""
    def synchronises(norm):
        return type(norm) is torch.nn.SyncBatchNorm and norm.training

    for module in ("batchnorm", "splat_conv", "sk_conv", "res2net"):
        monkeypatch.setattr(f"splat.modules.{module}.synchronises", synchronises)


def as_subclass(module, name):
    """``module`` with its class replaced by an empty subclass named ``name``: what a user's
    StdConv2d (a Conv2d subclass computing something else) looks like to from_module, or another
    project's copy of a block to convert, which recognises blocks by class name."""
    module.__class__ = type(name, (type(module),), {})
    return module


def count_calls(module, cls):
    """{name: number of forward calls}, kept up to date, of every ``cls`` module inside ``module``."""
    calls = {}
    for name, m in module.named_modules():
        if type(m) is cls:
            calls[name] = 0
            m.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    return calls


CUDA_GRAPH_WARMUP = 3


def cuda_graph_step(module, x):
    """``module(x).sum().backward()`` captured in a CUDA graph, after CUDA_GRAPH_WARMUP eager steps on
    a side stream (Triton compiles, the allocator fills). x (a CUDA leaf) is the graph's input; returns
    replay(x_new), which copies x_new into x, replays and returns the output; the gradients land in
    x.grad and the parameters' .grad."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(CUDA_GRAPH_WARMUP):
            module(x).sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    module.zero_grad(set_to_none=True)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = module(x)
        out.sum().backward()

    def replay(x_new):
        with torch.no_grad():
            x.copy_(x_new)
        graph.replay()
        torch.cuda.synchronize()
        return out

    return replay


def check_rejects_bad_input(module, in_channels):
    """The input checks every fused block makes (``module`` in training mode, on DEVICE, float32)."""
    x = rand(2, in_channels, 5, 5, dtype=torch.float32)
    with pytest.raises(ValueError, match="input must be 4-D"):
        module(x[0])
    with pytest.raises(ValueError, match=f"input has {in_channels // 2} channels, expected in_channels={in_channels}"):
        module(x[:, : in_channels // 2])
    with pytest.raises(TypeError, match="input must be a floating-point"):
        module(x.long())
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        module(x.cpu().numpy())
    with pytest.raises(TypeError, match="input dtype torch.float64 does not match"):
        module(x.double())
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        module(x[:1, :, :1, :1])
