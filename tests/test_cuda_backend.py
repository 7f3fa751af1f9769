"""The C++/CUDA backend (``torch.ops.splat_cuda``) against the torch backend, op by op.

Covers every op forward and backward (split_attention's two backward passes, and bn_add_relu's
with batch statistics, as raw ops against their references), all dtypes, NCHW and channels_last,
odd sizes, tensors whose data is not 16-byte aligned (storage offset of one element, so the scalar
paths run), a second GPU, gradcheck in float64, opcheck of the raw ops, empty batches and input
validation. On a machine without CUDA the
same kernels run on CPU tensors through the CUDA emulator (``SPLAT_CUDA_EMULATE=1``, set by
tests/conftest.py), which also stops any launch whose barriers or shuffles diverge.
"""

import pytest
import torch

import splat
from splat import _cuda, ops
from splat._layout import acc_dtype
from splat.ops.bn_add_relu import _torch_backward_dy as bn_add_relu_dy_reference
from splat.ops.bn_add_relu import _torch_backward_sums as bn_add_relu_sums_reference
from splat.ops.split_attention import _torch_backward_dy, _torch_backward_sums

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# Without a GPU the kernels run on CPU tensors through the CUDA emulator (tests/conftest.py).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def gpu_test(fn):
    return pytest.mark.gpu(needs_gpu(fn))


@pytest.fixture
def cuda_ops():
    ok, why = splat.backends()["cuda"]
    if not ok:
        pytest.skip(f"the cuda backend is unavailable: {why}")
    return torch.ops.splat_cuda


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}

# (B, radix, cardinality, C, H, W): aligned vectors, C = 3*5 with 7x7, HW = 1, R = 4 / K = 2,
# R = 1 / K = 4, R = 3, several NHWC channel tiles, rows long enough for 1024-lane groups, and
# rows so few and long (H*W = 66427, odd) that NCHW cuts each into 2-8 chunks (plan_rows) with a
# short last one.
CASES = [
    pytest.param((2, 2, 1, 16, 8, 8), id="aligned"),
    pytest.param((3, 2, 3, 15, 7, 7), id="c15-7x7"),
    pytest.param((3, 2, 3, 15, 1, 1), id="hw1"),
    pytest.param((2, 4, 2, 8, 5, 3), id="r4k2"),
    pytest.param((2, 1, 4, 12, 7, 7), id="r1k4"),
    pytest.param((2, 3, 1, 24, 4, 4), id="r3"),
    pytest.param((1, 2, 1, 136, 3, 3), id="c-tiles"),
    pytest.param((2, 2, 1, 4, 100, 100), id="long-rows"),
    pytest.param((1, 2, 1, 2, 181, 367), id="split-rows"),
]


def make(shape, dtype, layout="nchw", offset=0, device=DEVICE, scale=1.0, shift=0.0):
    """A dense tensor in `layout` whose data starts `offset` elements into its storage."""
    if len(shape) == 4:
        B, C, H, W = shape
        strides = (C * H * W, H * W, W, 1) if layout == "nchw" else (H * W * C, 1, W * C, C)
    else:
        strides = torch.empty(shape, device="meta").stride()
    numel = 1
    for s in shape:
        numel *= s
    base = torch.randn(numel + offset, dtype=torch.float64, device=device) * scale + shift
    return base.to(dtype).as_strided(shape, strides, offset)


def bn_vectors(channels, dtype, device=DEVICE):
    acc = acc_dtype(dtype)
    sign = torch.where(torch.rand(channels, device=device) < 0.2, -1.0, 1.0)
    scale = ((torch.rand(channels, device=device) + 0.5) * sign).to(acc)
    return scale, (torch.randn(channels, device=device) * 0.5).to(acc)


TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def assert_matches(actual, expected, name, min_tol=0.0):
    """Same dtype, shape and layout; values within the output dtype's rounding, relative to its scale
    (or within min_tol, for outputs computed in a narrower dtype than their own)."""
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.device == expected.device, f"{name}: device {actual.device} != {expected.device}"
    if actual.dim() == 4:
        assert actual.is_contiguous() == expected.is_contiguous(), f"{name}: layout {actual.stride()}"
    tol = max(TOLERANCE[actual.dtype], min_tol)
    scale = max(1.0, expected.double().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale, equal_nan=True, msg=name)


def compare(fn, inputs, grad_offset, name, min_tol=0.0):
    """fn(backend, *inputs) on "cuda" vs "torch": outputs, and gradients w.r.t. every floating input."""
    results = {}
    for backend in ("cuda", "torch"):
        torch.manual_seed(1)  # the same output gradients for both
        leaves = [t.detach().requires_grad_() for t in inputs]
        outs = fn(backend, *leaves)
        outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
        grads_out = [
            make(o.shape, o.dtype, "nhwc" if not o.is_contiguous() else "nchw", grad_offset, device=o.device)
            for o in outs
        ]
        grads = torch.autograd.grad(outs, leaves, grads_out)
        results[backend] = (outs, grads)
    for i, (a, e) in enumerate(zip(results["cuda"][0], results["torch"][0])):
        assert_matches(a, e, f"{name} output {i}", min_tol)
    for i, (a, e) in enumerate(zip(results["cuda"][1], results["torch"][1])):
        assert_matches(a, e, f"{name} grad of input {i}", min_tol)


def compare_split_attention_backward(y, scale, shift, radix, groups, layout, offset, name, dout_dtype=None):
    """split_attention's raw backward passes against their torch references, for a random dout
    (y's dtype unless given), and random attn and pass-2 inputs in the accumulation dtype."""
    sc = torch.ops.splat_cuda
    B, RC, H, W = y.shape
    acc = acc_dtype(y.dtype)
    dout = make((B, RC // radix, H, W), dout_dtype or y.dtype, layout, offset, device=y.device)
    attn = torch.rand(B, RC, device=y.device, dtype=acc)
    args = (dout, y, scale, shift, attn, radix, groups)
    for i, (a, e) in enumerate(zip(sc.split_attention_backward_sums(*args), _torch_backward_sums(*args))):
        assert_matches(a, e, f"split_attention_backward_sums output {i} {name}")
    rows = lambda n: make((B, n), acc, offset=offset, device=y.device)  # noqa: E731
    vector = lambda: make((RC,), acc, offset=offset, device=y.device)  # noqa: E731
    pass1 = (rows(RC // radix), vector(), vector(), rows(RC), rows(RC))  # dgap, dscale, dshift, sum_my, sum_m
    empty = y.new_empty(0, dtype=acc)
    for stats, (mean, rstd, dmean, dvar) in {
        "batch statistics": (vector(), vector().abs() + 0.5, vector(), vector()),
        "batch statistics, no dmean": (vector(), vector().abs() + 0.5, None, vector()),
        "no statistics": (empty, empty, None, None),
    }.items():
        args = (dout, y, scale, shift, attn, *pass1, mean, rstd, dmean, dvar, radix, groups)
        for i, (a, e) in enumerate(zip(sc.split_attention_backward_dy(*args), _torch_backward_dy(*args))):
            assert_matches(a, e, f"split_attention_backward_dy output {i}, {stats}, {name}")


def compare_bn_add_relu(y, scale, shift, layout, offset, grad_offset, name):
    """bn_add_relu without batch statistics (scale and shift are then its weight and bias: both
    backends apply the same ReLU mask, which batch statistics rounded differently could flip), with
    and without a residual; its raw backward passes against their references, with and without batch
    statistics' gamma and delta and the residual's gradient. The residual and dout start
    ``grad_offset`` elements into their storage, out 0 and then 1: the callers' offsets (both 0, and
    each 0 with the other 1) make each array the only misaligned one of a call somewhere."""
    sc = torch.ops.splat_cuda
    residual = make(y.shape, y.dtype, layout, grad_offset, device=y.device)
    plain = lambda be, x, *bn: ops.bn_add_relu(x, bn=(*bn, False, 1e-5), backend=be)[0]  # noqa: E731
    compare(plain, [y, scale, shift], grad_offset, "bn_add_relu " + name)
    added = lambda be, x, r, *bn: ops.bn_add_relu(x, r, bn=(*bn, False, 1e-5), backend=be)[0]  # noqa: E731
    compare(added, [y, residual, scale, shift], grad_offset, "bn_add_relu with residual " + name)
    dout = make(y.shape, y.dtype, layout, grad_offset, device=y.device)
    vector = lambda: make((y.shape[1],), scale.dtype, offset=offset, device=y.device)  # noqa: E731
    for out_offset in (0, 1):
        out = make(y.shape, y.dtype, layout, out_offset, device=y.device)
        out.copy_(sc.bn_add_relu_forward(y, residual, scale, shift))
        what = f"out_offset={out_offset} {name}"
        for i, (a, e) in enumerate(zip(sc.bn_add_relu_backward_sums(dout, out, y),
                                       bn_add_relu_sums_reference(dout, out, y))):
            assert_matches(a, e, f"bn_add_relu_backward_sums output {i}, {what}")
        for gamma, delta in ((vector(), vector()), (scale[:0], scale[:0])):
            for residual_grad in (True, False):
                args = (dout, out, y, scale, gamma, delta, residual_grad)
                pass2 = f"bn_add_relu_backward_dy, gamma {tuple(gamma.shape)}, residual_grad={residual_grad}"
                for i, (a, e) in enumerate(zip(sc.bn_add_relu_backward_dy(*args), bn_add_relu_dy_reference(*args))):
                    assert_matches(a, e, f"{pass2} output {i}, {what}")


def test_unavailable_without_cuda_or_emulation(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.delenv("SPLAT_CUDA_EMULATE", raising=False)
    ok, why = _cuda.status.__wrapped__()  # not the cached status of the emulated session
    assert ok is False and "SPLAT_CUDA_EMULATE=1" in why
    y = torch.randn(2, 8, 3, 3)
    scale, shift = torch.rand(8), torch.rand(8)
    with pytest.raises(RuntimeError, match="backend='cuda' got a tensor on cpu"):
        ops.radix_pool(y, scale, shift, 2, backend="cuda")
    with pytest.raises(RuntimeError, match="backend='cuda' got a tensor on cpu"):
        ops.channel_stats(y, backend="cuda")


@gpu_test
def test_available_with_cuda():
    ok, why = splat.backends()["cuda"]
    assert ok, f"the cuda backend failed to load on a CUDA machine: {why}"


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "offset1"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_ops_match_torch_backend(cuda_ops, case, dtype, layout, offset):
    check_ops(case, dtype, layout, offset, offset)


def check_ops(case, dtype, layout, offset, grad_offset):
    """Every op on y and inputs starting ``offset`` elements into their storage, output gradients
    ``grad_offset`` elements into theirs."""
    B, R, K, C, H, W = case
    what = f"{case} {dtype} {layout} offset={offset} grad_offset={grad_offset}"
    y = make((B, R * C, H, W), dtype, layout, offset)
    scale, shift = bn_vectors(R * C, dtype)
    logits = make((B, R * C), dtype, offset=offset, scale=3.0)
    attn = ops.radix_softmax(logits, R, K, backend="torch").detach()

    pool = lambda be, *a: ops.radix_pool(*a, R, backend=be)  # noqa: E731
    compare(pool, [y, scale, shift], grad_offset, "radix_pool " + what)
    compare(lambda be, x: ops.radix_softmax(x, R, K, backend=be), [logits], grad_offset, "radix_softmax " + what)
    summed = lambda be, *a: ops.attention_sum(*a, R, backend=be)  # noqa: E731
    compare(summed, [y, scale, shift, attn], grad_offset, "attention_sum " + what)
    # A mean far from zero: E[y^2] - E[y]^2 would lose the variance.
    ys = make((B, R * C, H, W), dtype, layout, offset, shift=30.0)
    compare(lambda be, x: ops.channel_stats(x, backend=be), [ys], grad_offset, "channel_stats " + what)
    compare_split_attention_backward(y, scale, shift, R, 1, layout, grad_offset, what)
    compare_bn_add_relu(y, scale, shift, layout, offset, grad_offset, what)


# (B, radix, groups, C, H, W) with y's channels ordered (group, radix, channel of the group): C/K a
# multiple of every vector width, C/K = 6 (vectors only for float64), odd C/K = 3 and 17 (scalar
# NHWC paths everywhere), R = 1 and 3, HW = 1, several NHWC channel tiles, long NCHW rows, NCHW rows
# cut into chunks.
GROUP_CASES = [
    pytest.param((2, 2, 2, 16, 5, 5), id="r2k2-cg8"),
    pytest.param((2, 3, 4, 32, 3, 3), id="r3k4-cg8"),
    pytest.param((2, 2, 4, 24, 4, 4), id="r2k4-cg6"),
    pytest.param((2, 2, 2, 6, 7, 7), id="r2k2-cg3"),
    pytest.param((2, 1, 4, 16, 3, 3), id="r1k4-cg4"),
    pytest.param((3, 2, 2, 34, 1, 1), id="hw1-cg17"),
    pytest.param((1, 2, 2, 256, 3, 3), id="c-tiles"),
    pytest.param((1, 2, 4, 16, 60, 60), id="long-rows"),
    pytest.param((1, 2, 2, 4, 181, 367), id="split-rows"),
]


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "offset1"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GROUP_CASES)
def test_groups_match_torch_backend(cuda_ops, case, dtype, layout, offset):
    check_groups(case, dtype, layout, offset, offset)


def check_groups(case, dtype, layout, offset, grad_offset):
    B, R, K, C, H, W = case
    what = f"{case} {dtype} {layout} offset={offset} grad_offset={grad_offset}"
    y = make((B, R * C, H, W), dtype, layout, offset)
    scale, shift = bn_vectors(R * C, dtype)
    attn = torch.rand(B, R * C, device=DEVICE, dtype=dtype)
    pool = lambda be, *a: ops.radix_pool(*a, R, backend=be, groups=K)  # noqa: E731
    compare(pool, [y, scale, shift], grad_offset, "radix_pool " + what)
    summed = lambda be, *a: ops.attention_sum(*a, R, backend=be, groups=K)  # noqa: E731
    compare(summed, [y, scale, shift, attn], grad_offset, "attention_sum " + what)
    compare_split_attention_backward(y, scale, shift, R, K, layout, grad_offset, what)


@pytest.mark.parametrize("offsets", [(0, 1), (1, 0)], ids=["y-aligned", "dout-aligned"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inputs_aligned_differently(cuda_ops, dtype, layout, offsets):
    """y 16-byte aligned and the output gradients one element past a boundary, or the other way
    round, at sizes where each alone would take the vector paths: no kernel may read both as
    vectors (a GPU faults on the misaligned access, as the ASan build of the emulator does)."""
    offset, grad_offset = offsets
    check_ops((2, 2, 1, 16, 8, 8), dtype, layout, offset, grad_offset)
    check_groups((2, 2, 2, 16, 5, 5), dtype, layout, offset, grad_offset)


@pytest.mark.skipif(not _cuda.emulated(), reason="the order of a block's threads is the CUDA emulator's")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reverse_thread_order(cuda_ops, monkeypatch, layout):
    """The emulator runs a block's threads between barriers in reverse order: a race on shared
    memory that the usual order hides (a write after another thread's read) would show here."""
    monkeypatch.setenv("SPLAT_CUDA_EMULATE_ORDER", "reverse")
    for case in CASES:
        check_ops(case.values[0], torch.float32, layout, 0, 0)
    for case in GROUP_CASES:
        check_groups(case.values[0], torch.float32, layout, 0, 0)


# y's shapes for the mixed-dtype tests: a small map, and NCHW rows cut into chunks (plan_rows).
MIXED_SHAPES = [pytest.param((2, 32, 9, 9), id="9x9"), pytest.param((1, 8, 181, 367), id="split-rows")]


@pytest.mark.parametrize("shape", MIXED_SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_attention_sum_float32_weights(cuda_ops, dtype, layout, shape):
    """Under autocast attn is float32 while y is lower precision: out and dout are float32. A float64
    attn gives float64 results that, as in the reference, are computed in y's accumulation dtype."""
    y = make(shape, dtype, layout)
    scale, shift = bn_vectors(shape[1], dtype)
    for attn_dtype in (torch.float32, torch.float64):
        attn = torch.rand(shape[:2], device=DEVICE, dtype=attn_dtype)
        for groups in (1, 4):
            fn = lambda be, *a: ops.attention_sum(*a, 2, backend=be, groups=groups)  # noqa: E731
            what = f"attn {attn_dtype} groups={groups}"
            compare(fn, [y, scale, shift, attn], 0, what, min_tol=TOLERANCE[torch.float32])


@pytest.mark.parametrize("shape", MIXED_SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_split_attention_backward_wide_dout(cuda_ops, dtype, layout, shape):
    """dout in the accumulation dtype (out_dtype float32 for lower-precision y) is read as it is; a
    float64 dout for y below float64 is read in the accumulation dtype, as the references convert it."""
    for offset in (0, 1):
        y = make(shape, dtype, layout, offset)
        scale, shift = bn_vectors(shape[1], dtype)
        for dout_dtype in (torch.float32, torch.float64):
            for groups in (1, 4):
                what = f"dout {dout_dtype} groups={groups} offset={offset}"
                compare_split_attention_backward(y, scale, shift, 2, groups, layout, offset, what, dout_dtype)


@gpu_test
def test_second_device(cuda_ops):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    with torch.cuda.device(0):
        for layout in LAYOUTS:
            y = make((2, 32, 7, 7), torch.float32, layout, device="cuda:1")
            scale, shift = bn_vectors(32, torch.float32, device="cuda:1")
            attn = torch.rand(2, 32, device="cuda:1")
            logits = torch.randn(2, 32, device="cuda:1")
            compare(lambda be, *a: ops.radix_pool(*a, 2, backend=be), [y, scale, shift], 0, "radix_pool cuda:1")
            compare(lambda be, *a: ops.attention_sum(*a, 2, backend=be), [y, scale, shift, attn], 0, "sum cuda:1")
            compare(lambda be, x: ops.radix_softmax(x, 2, 2, backend=be), [logits], 0, "softmax cuda:1")
            compare(lambda be, x: ops.channel_stats(x, backend=be), [y], 0, "channel_stats cuda:1")
            compare_split_attention_backward(y, scale, shift, 2, 2, layout, 0, "cuda:1")
            compare_bn_add_relu(y, scale, shift, layout, 0, 0, "cuda:1")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck(cuda_ops, layout):
    B, R, K, C, H, W = 2, 2, 2, 4, 3, 5
    y = make((B, R * C, H, W), torch.float64, layout).requires_grad_()
    scale, shift = (t.requires_grad_() for t in bn_vectors(R * C, torch.float64))
    attn = torch.rand(B, R * C, device=DEVICE, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(B, R * C, device=DEVICE, dtype=torch.float64, requires_grad=True)
    gradcheck = torch.autograd.gradcheck
    for groups in (1, 2):
        assert gradcheck(lambda *a: ops.radix_pool(*a, R, backend="cuda", groups=groups), (y, scale, shift))
        assert gradcheck(lambda *a: ops.attention_sum(*a, R, backend="cuda", groups=groups), (y, scale, shift, attn))
    assert gradcheck(lambda x: ops.radix_softmax(x, R, K, backend="cuda"), (logits,))
    assert gradcheck(lambda x: ops.radix_softmax(x, 1, K, backend="cuda"), (logits,))
    assert gradcheck(lambda x: ops.channel_stats(x, backend="cuda"), (y,))
    residual = make(y.shape, torch.float64, layout).requires_grad_()
    for batch_stats in (False, True):
        bn = lambda x, r, *wb: ops.bn_add_relu(x, r, bn=(*wb, batch_stats, 1e-5), backend="cuda")  # noqa: E731
        assert gradcheck(bn, (y, residual, scale, shift))


def op_samples(layout, dtype, attn_dtype=None):
    """(op, args) for every torch.ops.splat_cuda op."""
    B, R, K, C, H, W = 2, 2, 2, 8, 5, 3
    acc = acc_dtype(dtype)
    sc = torch.ops.splat_cuda
    y = make((B, R * C, H, W), dtype, layout)
    scale, shift = bn_vectors(R * C, dtype)
    logits = make((B, R * C), dtype)
    attn = torch.rand(B, R * C, device=DEVICE, dtype=attn_dtype or dtype)
    out_dtype = torch.promote_types(dtype, attn.dtype)
    mean = torch.randn(R * C, device=DEVICE, dtype=acc)
    rows = [torch.randn(B, n, device=DEVICE, dtype=acc) for n in (R * C, C, R * C, R * C)]  # attn, dgap, sums
    vectors = [torch.randn(R * C, device=DEVICE, dtype=acc) for _ in range(6)]  # dscale, dshift, stats, dstats
    empty = vectors[0][:0]
    return [
        (sc.radix_pool_forward, (y, scale, shift, R, 1)),
        (sc.radix_pool_forward, (y, scale, shift, R, K)),
        (sc.radix_pool_backward, (make((B, C), dtype), y, scale, shift, R, 1)),
        (sc.radix_pool_backward, (make((B, C), dtype), y, scale, shift, R, K)),
        (sc.radix_softmax_forward, (logits, R, K)),
        (sc.radix_softmax_forward, (logits, 1, K)),
        (sc.radix_softmax_backward, (make((B, R * C), dtype), attn.to(dtype), R, K)),
        (sc.attention_sum_forward, (y, scale, shift, attn, R, 1)),
        (sc.attention_sum_forward, (y, scale, shift, attn, R, K)),
        (sc.attention_sum_backward, (make((B, C, H, W), out_dtype, layout), y, scale, shift, attn, R, 1)),
        (sc.attention_sum_backward, (make((B, C, H, W), out_dtype, layout), y, scale, shift, attn, R, K)),
        (sc.channel_stats_forward, (y,)),
        (sc.channel_stats_backward, (torch.randn_like(mean), torch.randn_like(mean), y, mean)),
        (sc.split_attention_backward_sums, (make((B, C, H, W), dtype, layout), y, scale, shift, attn.to(acc), R, 1)),
        (sc.split_attention_backward_sums, (make((B, C, H, W), dtype, layout), y, scale, shift, attn.to(acc), R, K)),
        (sc.split_attention_backward_dy, (make((B, C, H, W), dtype, layout), y, scale, shift, *rows[:2], *vectors[:2],
                                          *rows[2:], *vectors[2:], R, 1)),
        (sc.split_attention_backward_dy, (make((B, C, H, W), dtype, layout), y, scale, shift, *rows[:2], *vectors[:2],
                                          *rows[2:], empty, empty, None, None, R, K)),
        (sc.bn_add_relu_forward, (y, None, scale, shift)),
        (sc.bn_add_relu_forward, (y, make(y.shape, dtype, layout), scale, shift)),
        (sc.bn_add_relu_backward_sums, (make(y.shape, dtype, layout), make(y.shape, dtype, layout), y)),
        (sc.bn_add_relu_backward_dy, (make(y.shape, dtype, layout), make(y.shape, dtype, layout), y, scale,
                                      *vectors[:2], True)),
        (sc.bn_add_relu_backward_dy, (make(y.shape, dtype, layout), make(y.shape, dtype, layout), y, scale,
                                      empty, empty, False)),
    ]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(cuda_ops, dtype, layout):
    """Schema, fake kernels (shapes, dtypes, strides) and compile tracing of the raw ops."""
    samples = op_samples(layout, dtype)
    if dtype == torch.bfloat16:
        samples += [s for s in op_samples(layout, dtype, torch.float32) if "attention_sum" in str(s[0])]
    for op, args in samples:
        torch.library.opcheck(op, args)


def test_deterministic(cuda_ops):
    """Fixed-order partials: repeated runs agree bitwise, in both layouts."""
    for layout in LAYOUTS:
        y = make((4, 64, 28, 28), torch.float32, layout)
        scale, shift = bn_vectors(64, torch.float32)
        dout = make((4, 32, 28, 28), torch.float32, layout)
        attn = torch.rand(4, 64, device=DEVICE)
        sc = torch.ops.splat_cuda
        for op, args in [
            (sc.attention_sum_backward, (dout, y, scale, shift, attn, 2, 1)),
            (sc.attention_sum_backward, (dout, y, scale, shift, attn, 2, 4)),
            (sc.split_attention_backward_sums, (dout, y, scale, shift, attn, 2, 1)),
            (sc.split_attention_backward_sums, (dout, y, scale, shift, attn, 2, 4)),
            (sc.radix_pool_backward, (make((4, 32), torch.float32), y, scale, shift, 2, 1)),
            (sc.radix_pool_backward, (make((4, 32), torch.float32), y, scale, shift, 2, 4)),
            (sc.channel_stats_forward, (y,)),
            (sc.bn_add_relu_backward_sums, (make(y.shape, torch.float32, layout), y, y)),
        ]:
            first, second = op(*args), op(*args)
            assert all(torch.equal(a, b) for a, b in zip(first, second)), (op, layout)


def test_invalid_inputs(cuda_ops):
    sc = torch.ops.splat_cuda
    y = torch.randn(2, 16, 3, 3, device=DEVICE)
    scale, shift = bn_vectors(16, torch.float32)
    with pytest.raises(RuntimeError, match="radix=3 must divide"):
        sc.radix_pool_forward(y, scale, shift, 3, 1)
    with pytest.raises(RuntimeError, match="scale must be"):
        sc.radix_pool_forward(y, scale.double(), shift, 2, 1)
    with pytest.raises(RuntimeError, match="groups=3 must divide the channels per radix"):
        sc.radix_pool_forward(y, scale, shift, 2, 3)
    with pytest.raises(RuntimeError, match="groups must be positive"):
        sc.radix_pool_backward(torch.randn(2, 8, device=DEVICE), y, scale, shift, 2, 0)
    with pytest.raises(RuntimeError, match="groups=16 must divide"):
        sc.attention_sum_forward(y, scale, shift, torch.rand(2, 16, device=DEVICE), 2, 16)
    with pytest.raises(RuntimeError, match="groups must be positive"):
        sc.attention_sum_backward(
            torch.randn(2, 8, 3, 3, device=DEVICE), y, scale, shift, torch.rand(2, 16, device=DEVICE), 2, -1
        )
    with pytest.raises(RuntimeError, match="4-D"):
        sc.channel_stats_forward(y[0])
    with pytest.raises(RuntimeError, match="cardinality=3 must divide"):
        sc.radix_softmax_forward(torch.randn(2, 16, device=DEVICE), 2, 3)
    with pytest.raises(RuntimeError, match="attn must have shape"):
        sc.attention_sum_forward(y, scale, shift, torch.rand(2, 8, device=DEVICE), 2, 1)
    if DEVICE == "cuda":
        with pytest.raises(RuntimeError, match="is on cpu"):
            sc.attention_sum_forward(y, scale.cpu(), shift, torch.rand(2, 16, device=DEVICE), 2, 1)
    dout, rows = torch.randn(2, 8, 3, 3, device=DEVICE), torch.rand(2, 16, device=DEVICE)
    with pytest.raises(RuntimeError, match="dout must have shape"):
        sc.split_attention_backward_sums(dout[:, :4], y, scale, shift, rows, 2, 1)
    with pytest.raises(RuntimeError, match="groups=3 must divide"):
        sc.split_attention_backward_sums(dout, y, scale, shift, rows, 2, 3)
    dgap = rows[:, :8]

    def pass2(attn=rows, dgap=dgap, sum_m=rows, rstd=scale, dvar=None):
        return sc.split_attention_backward_dy(dout, y, scale, shift, attn, dgap, scale, shift, rows, sum_m, shift,
                                              rstd, None, dvar, 2, 1)

    with pytest.raises(RuntimeError, match="attn must have shape"):
        pass2(attn=rows[:, :8])
    with pytest.raises(RuntimeError, match="dgap must have shape"):
        pass2(dgap=rows)
    with pytest.raises(RuntimeError, match="sum_m must be"):
        pass2(sum_m=rows.double())
    with pytest.raises(RuntimeError, match="rstd must have shape"):
        pass2(rstd=scale[:8])
    with pytest.raises(RuntimeError, match="dvar must have shape"):
        pass2(dvar=scale[:8])
    with pytest.raises(RuntimeError, match="residual must have shape"):
        sc.bn_add_relu_forward(y, y[:, :8], scale, shift)
    with pytest.raises(RuntimeError, match="residual must have y's dtype"):
        sc.bn_add_relu_forward(y, y.double(), scale, shift)
    with pytest.raises(RuntimeError, match="shift must be"):
        sc.bn_add_relu_forward(y, None, scale, shift.double())
    with pytest.raises(RuntimeError, match="out must have shape"):
        sc.bn_add_relu_backward_sums(y, y[:1], y)
    with pytest.raises(RuntimeError, match="dout must have shape"):
        sc.bn_add_relu_backward_dy(y[:, :8], y, y, scale, scale, shift, True)
    with pytest.raises(RuntimeError, match="delta must have shape"):
        sc.bn_add_relu_backward_dy(y, y, y, scale, scale, shift[:8], True)
    with pytest.raises(RuntimeError, match="delta must be empty"):
        sc.bn_add_relu_backward_dy(y, y, y, scale, scale[:0], shift, False)
