"""Each split-attention op against an independent PyTorch expression, on every backend that runs here.

Gradients of the expected values come from autograd through the expression, never from the
ops' own backward formulas.
"""

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from splat import ops
from tests.helpers import (
    BACKENDS, DEVICE, DTYPES, LAYOUTS, PROPERTY, acc_dtype, assert_close, backend_params, rand,
)

# (B, radix, cardinality, C, H, W): odd channels, 1x1 maps, radix 1, H*W beyond one tile
# (tails in both layouts), more channels than one NHWC tile.
CASES = [
    pytest.param((2, 2, 1, 6, 5, 3), id="odd"),
    pytest.param((3, 4, 2, 8, 1, 1), id="1x1"),
    pytest.param((2, 1, 1, 5, 7, 7), id="radix1"),
    pytest.param((1, 3, 3, 9, 33, 40), id="hw-tail"),
    pytest.param((2, 2, 2, 136, 3, 3), id="c-tail"),
]


def expected_pool(y, scale, shift, radix):
    B, RC, H, W = y.shape
    act = torch.relu(y * scale[:, None, None] + shift[:, None, None])
    return act.reshape(B, radix, RC // radix, H * W).sum(1).mean(-1).to(y.dtype)


def expected_attention_sum(y, scale, shift, attn, radix):
    B, RC, H, W = y.shape
    act = torch.relu(y * scale[:, None, None] + shift[:, None, None]).reshape(B, radix, RC // radix, H, W)
    out = (act * attn.reshape(B, radix, RC // radix, 1, 1)).sum(1)
    return out.to(torch.promote_types(y.dtype, attn.dtype))


def expected_softmax(logits, radix, cardinality):
    B = logits.shape[0]
    if radix == 1:
        return torch.sigmoid(logits)
    return logits.view(B, cardinality, radix, -1).transpose(1, 2).softmax(1).reshape(B, -1)


def expected_stats(y):
    y = y.to(acc_dtype(y.dtype))
    return y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)


def bn_vectors(channels, dtype):
    acc = acc_dtype(dtype)
    return rand(channels, dtype=acc).abs() + 0.5, rand(channels, dtype=acc) * 0.5


def check_op(fn, expected_fn, inputs, dtype, name):
    """fn(*inputs) vs expected_fn(*float64 copies), values and gradients w.r.t. every input."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    exact = [t.detach().double().requires_grad_() for t in inputs]
    low = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    outs, exp_outs, low_outs = (
        (o,) if isinstance(o, torch.Tensor) else o for o in (out, expected_fn(*exact), expected_fn(*low))
    )
    grads_out = [torch.randn_like(o) for o in exp_outs]
    for i, (o, e, lo) in enumerate(zip(outs, exp_outs, low_outs)):
        assert o.dtype == lo.dtype, f"{name} output {i}: dtype {o.dtype}, reference gives {lo.dtype}"
        assert_close(o, e, dtype, lo, f"{name} output {i}")
    grads = torch.autograd.grad(outs, inputs, [g.to(o.dtype) for g, o in zip(grads_out, outs)])
    exp_grads = torch.autograd.grad(exp_outs, exact, grads_out)
    low_grads = torch.autograd.grad(low_outs, low, [g.to(o.dtype) for g, o in zip(grads_out, low_outs)])
    for i, (g, e, lo) in enumerate(zip(grads, exp_grads, low_grads)):
        assert g.dtype == inputs[i].dtype
        assert_close(g, e, dtype, lo, f"{name} grad of input {i}")
    return outs


def check_radix_pool(backend, dtype, layout, case):
    B, R, K, C, H, W = case
    y = rand(B, R * C, H, W, dtype=dtype, layout=layout)
    scale, shift = bn_vectors(R * C, dtype)
    fn = lambda y, s, t: ops.radix_pool(y, s, t, R, backend)  # noqa: E731
    check_op(fn, lambda y, s, t: expected_pool(y, s, t, R), [y, scale, shift], dtype, "radix_pool")


def check_attention_sum(backend, dtype, layout, case):
    B, R, K, C, H, W = case
    y = rand(B, R * C, H, W, dtype=dtype, layout=layout)
    scale, shift = bn_vectors(R * C, dtype)
    attn = rand(B, R * C, dtype=dtype).sigmoid()
    fn = lambda *a: ops.attention_sum(*a, R, backend)  # noqa: E731
    (out,) = check_op(
        fn, lambda *a: expected_attention_sum(*a, R), [y, scale, shift, attn], dtype, "attention_sum"
    )
    assert out.is_contiguous(memory_format=layout), "the output must keep the input's memory format"


def check_radix_softmax(backend, dtype, case):
    B, R, K, C, _, _ = case
    logits = rand(B, R * C, dtype=dtype, scale=3.0)
    fn = lambda x: ops.radix_softmax(x, R, K, backend)  # noqa: E731
    check_op(fn, lambda x: expected_softmax(x, R, K), [logits], dtype, "radix_softmax")


def check_channel_stats(backend, dtype, layout, case):
    B, R, K, C, H, W = case
    # A mean far from zero: a naive E[y^2] - E[y]^2 would lose every digit of the variance.
    y = (rand(B, R * C, H, W, dtype=dtype, layout=layout) * 0.1 + 30).to(dtype)
    mean, var = check_op(lambda y: ops.channel_stats(y, backend), expected_stats, [y], dtype, "channel_stats")
    expected_dtype = acc_dtype(dtype)
    assert mean.dtype == var.dtype == expected_dtype


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "check", [check_radix_pool, check_attention_sum, check_channel_stats], ids=lambda f: f.__name__[6:]
)
@pytest.mark.parametrize("backend", backend_params())
def test_map_op(backend, check, dtype, layout, case):
    B, _, _, _, H, W = case
    if check is check_channel_stats and B * H * W == 1:
        pytest.skip("a single value per channel has no variance to test")
    check(backend, dtype, layout, case)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", backend_params())
def test_radix_softmax(backend, dtype, case):
    check_radix_softmax(backend, dtype, case)


@st.composite
def op_cases(draw):
    """(B, radix, cardinality, C, H, W) with C a multiple of the cardinality, and a layout."""
    radix, cardinality = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    C = cardinality * draw(st.integers(1, 5))
    case = (draw(st.integers(1, 3)), radix, cardinality, C, draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    return case, draw(st.sampled_from(LAYOUTS))


@pytest.mark.parametrize("backend", backend_params())
@PROPERTY
@given(case=op_cases())
def test_property_random_shapes(backend, case):
    """Every op above on random small shapes, in float64."""
    case, layout = case
    dtype = torch.float64
    check_radix_pool(backend, dtype, layout, case)
    check_attention_sum(backend, dtype, layout, case)
    check_radix_softmax(backend, dtype, case)
    B, _, _, _, H, W = case
    if B * H * W > 1:
        check_channel_stats(backend, dtype, layout, case)


# (B, radix, cardinality, groups, C, inter, H, W, bn0 batch stats, bn1 batch stats, relu, biases):
# ResNeSt in training, eval-mode BNs on 1x1 maps, the sigmoid gate with one channel per group, SK's
# (k, r, j) channel order with H*W tails and no activation (the original SKConv), more channels
# than one tile without biases, softmax with one channel per group, more batch rows than one tile
# of the backward's reduction over the batch.
SPLIT_CASES = [
    pytest.param((3, 2, 1, 1, 6, 4, 5, 3, True, True, True, True), id="resnest"),
    pytest.param((2, 2, 2, 1, 8, 4, 1, 1, False, False, True, True), id="card2-eval"),
    pytest.param((2, 1, 2, 1, 2, 4, 7, 7, True, True, True, True), id="radix1-cg1"),
    pytest.param((2, 3, 1, 2, 6, 4, 33, 40, True, False, False, True), id="sk-hw-tail"),
    pytest.param((2, 2, 1, 4, 136, 8, 3, 3, False, True, True, False), id="c-tail-nobias"),
    pytest.param((2, 2, 2, 1, 2, 4, 2, 1, False, False, True, False), id="radix2-cg1"),
    pytest.param((18, 2, 1, 1, 4, 8, 2, 3, True, True, True, True), id="batch-tiles"),
]


def expected_split_attention(case, y, w0, b0, w1, b1, g1, be1, w2, b2):
    """The tail from its definition, in the accumulation dtype: (out, mean0, var0, mean1, var1)."""
    B, R, G, K, C, inter, H, W, stats0, stats1, relu, _ = case
    acc = acc_dtype(y.dtype)
    ya = y.to(acc)
    empty = ya.new_zeros(0)
    mean0, var0, mean1, var1 = empty, empty, empty, empty
    if stats0:
        mean0, var0 = ya.mean((0, 2, 3)), ya.var((0, 2, 3), unbiased=False)
        pre = (ya - mean0[:, None, None]) / torch.sqrt(var0[:, None, None] + 1e-5)
    else:
        pre = ya
    act = torch.relu(pre * w0[:, None, None] + b0[:, None, None]).reshape(B, K, R, C // K, H, W)
    gap = act.sum(2).mean((3, 4)).reshape(B, C).to(y.dtype).to(acc)
    z = torch.nn.functional.conv2d(gap[:, :, None, None], w1[:, :, None, None], b1, groups=G).flatten(1)
    if stats1:
        mean1, var1 = z.mean(0), z.var(0, unbiased=False)
        z = (z - mean1) / torch.sqrt(var1 + 1e-3)
    z = z * g1 + be1
    if relu:
        z = torch.relu(z)
    logits = torch.nn.functional.conv2d(z[:, :, None, None], w2[:, :, None, None], b2, groups=G).flatten(1)
    attn = expected_softmax(logits, R, G).reshape(B, R, K, C // K).transpose(1, 2)  # (b, k, r, j)
    out = (act * attn[..., None, None]).sum(2).reshape(B, C, H, W)
    return out.to(torch.promote_types(y.dtype, w2.dtype)), mean0, var0, mean1, var1


def split_attention_inputs(case, dtype, layout=torch.contiguous_format):
    """y, then the (R*C,) BN0 vectors, fc1, BN1 vectors and fc2 of a ``SPLIT_CASES`` case."""
    B, R, G, K, C, inter, H, W, _, _, _, bias = case
    acc = acc_dtype(dtype)
    w0, b0 = bn_vectors(R * C, dtype)
    g1, be1 = bn_vectors(inter, dtype)
    return {
        "y": rand(B, R * C, H, W, dtype=dtype, layout=layout), "w0": w0, "b0": b0,
        "w1": rand(inter, C // G, dtype=acc), "b1": rand(inter, dtype=acc) if bias else None,
        "g1": g1, "be1": be1,
        "w2": rand(R * C, inter // G, dtype=acc), "b2": rand(R * C, dtype=acc) if bias else None,
    }


def split_attention_fn(case, names, backend):
    """ops.split_attention as a function of the inputs ``names`` (the others are None)."""
    B, R, G, K, C, inter, H, W, stats0, stats1, relu, _ = case

    def fn(*tensors):
        t = dict.fromkeys(("y", "w0", "b0", "w1", "b1", "g1", "be1", "w2", "b2")) | dict(zip(names, tensors))
        return ops.split_attention(
            t["y"], bn0=(t["w0"], t["b0"], stats0, 1e-5), fc1_weight=t["w1"], fc1_bias=t["b1"],
            bn1=(t["g1"], t["be1"], stats1, 1e-3), relu=relu, fc2_weight=t["w2"], fc2_bias=t["b2"], radix=R,
            cardinality=G, groups=K, backend=backend,
        )

    return fn


def check_split_attention(backend, dtype, layout, case):
    """Values and gradients of every input, through out and the returned batch statistics."""
    inputs = {k: v for k, v in split_attention_inputs(case, dtype, layout).items() if v is not None}
    names = list(inputs)

    stats0, stats1 = case[8:10]

    def nonempty(outs):  # the statistics are empty without batch_stats
        out, mean0, var0, mean1, var1 = outs
        return (out,) + ((mean0, var0) if stats0 else ()) + ((mean1, var1) if stats1 else ())

    def expected(*tensors):
        t = dict.fromkeys(("b1", "b2")) | dict(zip(names, tensors))
        return nonempty(expected_split_attention(case, **t))

    fn = split_attention_fn(case, names, backend)
    out, *_ = check_op(lambda *t: nonempty(fn(*t)), expected, list(inputs.values()), dtype, "split_attention")
    assert out.is_contiguous(memory_format=layout), "the output must keep the input's memory format"


@pytest.mark.parametrize("case", SPLIT_CASES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", backend_params())
def test_split_attention(backend, dtype, layout, case):
    check_split_attention(backend, dtype, layout, case)


@st.composite
def split_attention_cases(draw):
    """A ``SPLIT_CASES`` tuple: any radix, cardinality G and channel order K (C a multiple of both,
    the MLP width of G), batch statistics where there is more than one value to take them over."""
    radix, G, K = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.sampled_from([1, 2]))
    C, inter = G * K * draw(st.integers(1, 3)), G * draw(st.integers(1, 4))
    B, H, W = draw(st.integers(1, 3)), draw(st.integers(1, 7)), draw(st.integers(1, 7))
    stats0 = B * H * W > 1 and draw(st.booleans())
    stats1 = B > 1 and draw(st.booleans())
    case = (B, radix, G, K, C, inter, H, W, stats0, stats1, draw(st.booleans()), draw(st.booleans()))
    return case, draw(st.sampled_from(LAYOUTS))


@pytest.mark.parametrize("backend", backend_params())
@PROPERTY
@given(case=split_attention_cases())
def test_split_attention_property(backend, case):
    """split_attention on random valid configurations, in float64."""
    case, layout = case
    check_split_attention(backend, torch.float64, layout, case)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not available here")
@pytest.mark.parametrize("wanted", [1, 1 << 20], ids=["unsplit", "split-most"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_triton_reductions_split_hw(monkeypatch, layout, wanted):
    """Triton's reductions over H*W, whether each (b, channel block) row is one program or H*W is
    split as far as ``hw_splits`` goes (two tiles a program; the device decides how far), on maps
    of several tiles and a tail in both layouts."""
    from splat.kernels import _tiles

    monkeypatch.setattr(_tiles, "programs_wanted", lambda device: wanted)
    case = (2, 2, 1, 6, 57, 55)  # NCHW: 4 tiles of 1024 pixels, the last one partial
    check_radix_pool("triton", torch.float64, layout, case)
    check_attention_sum("triton", torch.float64, layout, case)
    check_channel_stats("triton", torch.float64, layout, case)
    check_split_attention("triton", torch.float64, layout, (2, 3, 1, 2, 6, 4, 57, 55, True, False, False, True))


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not available here")
@pytest.mark.parametrize("programs", [1, 64, 132, 528, 4096])
def test_hw_splits_plan(monkeypatch, programs):
    """``hw_splits`` on an H100 (528 programs wanted), from a 1x1 map to one of more than 2**31
    pixels: whole tiles a chunk, chunks that cover H*W with none empty, two tiles or more a program
    and no more programs than wanted where it splits. The values stay right without these, so the
    value tests cannot see them."""
    from splat.kernels import _tiles

    monkeypatch.setattr(_tiles, "programs_wanted", lambda device: 528)
    for (h, w), block_hw in itertools.product([(1, 1), (7, 7), (57, 55), (1024, 2048), (46341, 46341)], [64, 1024]):
        splits, chunk = _tiles.hw_splits(torch.empty(1, 1, h, w, device="meta"), programs, block_hw)
        what = f"{h}x{w} block_hw={block_hw}"
        assert chunk % block_hw == 0, what
        assert (splits - 1) * chunk < h * w <= splits * chunk, what
        if splits > 1:
            assert chunk >= 2 * block_hw and programs * splits <= 528, what


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not available here")
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_triton_elementwise_tiles_per_program(monkeypatch, layout):
    """The elementwise passes (attention_sum forward, channel_stats backward, split_attention's dy)
    with several tiles of a map per program, as on a GPU for maps of more tiles than a grid axis
    holds (``hw_tiles``): a grid axis of two programs, the last tile of the second past the map."""
    from splat.kernels import _tiles

    monkeypatch.setattr(_tiles, "_MAX_GRID_YZ", 2)
    assert _tiles.hw_tiles(torch.empty(1, 1, 57, 55), 64) == (2, 25)
    case = (2, 2, 1, 6, 57, 55)
    check_attention_sum("triton", torch.float64, layout, case)
    check_channel_stats("triton", torch.float64, layout, case)
    check_split_attention("triton", torch.float64, layout, (2, 3, 1, 2, 6, 4, 57, 55, True, False, False, True))


@pytest.mark.parametrize("backend", backend_params())
def test_attention_sum_promotes_mixed_dtypes(backend):
    """Float32 weights on a lower-precision conv output give a float32 result, as the reference's multiply does."""
    low = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
    high = torch.float64 if DEVICE.type == "cpu" else torch.float32
    y = rand(2, 8, 3, 3, dtype=low)
    scale, shift = bn_vectors(8, low)
    attn = rand(2, 8, dtype=high).sigmoid()
    out = ops.attention_sum(y, scale, shift, attn, 2, backend)
    expected = expected_attention_sum(y.double(), scale.double(), shift.double(), attn.double(), 2)
    assert out.dtype == high
    torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("radix", [1, 2, 4])
@pytest.mark.parametrize("backend", backend_params())
def test_radix_softmax_extreme_logits(backend, radix):
    logits = rand(2, radix * 8).sign() * 1e4
    attn = ops.radix_softmax(logits, radix, 2, backend)
    assert torch.isfinite(attn).all()
    torch.testing.assert_close(attn, expected_softmax(logits, radix, 2))


@pytest.mark.parametrize("backend", backend_params())
def test_gradcheck(backend):
    B, R, K, C, H, W = 2, 2, 2, 4, 3, 2
    y = rand(B, R * C, H, W, requires_grad=True)
    scale, shift = (t.requires_grad_() for t in bn_vectors(R * C, torch.float64))
    attn = rand(B, R * C).sigmoid().requires_grad_()
    logits = rand(B, R * C, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.radix_pool(*a, R, backend), (y, scale, shift))
    assert torch.autograd.gradcheck(lambda *a: ops.attention_sum(*a, R, backend), (y, scale, shift, attn))
    assert torch.autograd.gradcheck(lambda x: ops.radix_softmax(x, R, K, backend), (logits,))
    assert torch.autograd.gradcheck(lambda x: ops.radix_softmax(x, 1, K, backend), (logits,))
    assert torch.autograd.gradcheck(lambda x: ops.channel_stats(x, backend), (y,))


@pytest.mark.parametrize("case", [SPLIT_CASES[0], SPLIT_CASES[2], SPLIT_CASES[3]])
@pytest.mark.parametrize("backend", backend_params())
def test_split_attention_gradcheck(backend, case):
    """float64 gradcheck of out with respect to every input, on small sizes. The interpreter makes
    the Triton kernels slow, so there it checks along random directions (fast_mode)."""
    _, R, G, K, _, _, _, _, *flags = case
    small, fast = (2, R, G, K, 2 * K * G, 2 * G, 2, 3, *flags), backend == "triton"
    inputs = {k: v for k, v in split_attention_inputs(small, torch.float64).items() if v is not None}
    fn = split_attention_fn(small, list(inputs), backend)
    tensors = [t.requires_grad_() for t in inputs.values()]
    assert torch.autograd.gradcheck(lambda *t: fn(*t)[0], tensors, fast_mode=fast)


def opcheck_cases(backend):
    B, R, K, C, H, W = 2, 2, 2, 4, 3, 3
    y = rand(B, R * C, H, W, requires_grad=True)
    y_nhwc = rand(B, R * C, H, W, layout=torch.channels_last, requires_grad=True)
    scale, shift = (t.requires_grad_() for t in bn_vectors(R * C, torch.float64))
    attn = rand(B, R * C).sigmoid().requires_grad_()
    splat = torch.ops.splat
    saved = [t.detach() for t in (y, scale, shift, attn)]
    # dgap, dscale, dshift, sum_my, sum_m: what pass 1 and the MLP's backward hand to pass 2.
    pass1 = (rand(B, C), rand(R * C), rand(R * C), rand(B, R * C), rand(B, R * C))
    return [
        (splat.radix_pool, (y, scale, shift, R, 1, backend)),
        (splat.radix_pool, (y_nhwc, scale, shift, R, 2, backend)),
        (splat.radix_pool_backward, (rand(B, C), *saved[:3], R, 1, backend)),
        (splat.radix_pool_backward, (rand(B, C), *saved[:3], R, 2, backend)),
        (splat.attention_sum, (y, scale, shift, attn, R, 1, backend)),
        (splat.attention_sum, (y_nhwc, scale, shift, attn, R, 2, backend)),
        (splat.attention_sum_backward, (rand(B, C, H, W), *saved, R, 1, backend)),
        (splat.attention_sum_backward, (rand(B, C, H, W), *saved, R, 2, backend)),
        (splat.radix_softmax, (rand(B, R * C, requires_grad=True), R, K, backend)),
        (splat.radix_softmax, (rand(B, C, requires_grad=True), 1, K, backend)),
        (splat.radix_softmax_backward, (rand(B, R * C), saved[3], R, K, backend)),
        (splat.channel_stats, (y, backend)),
        (splat.channel_stats, (y_nhwc, backend)),
        (splat.channel_stats_backward, (rand(R * C), rand(R * C), saved[0], rand(R * C), backend)),
        (splat.split_attention_backward_sums, (rand(B, C, H, W), *saved, R, 1, backend)),
        (splat.split_attention_backward_dy, (rand(B, C, H, W), *saved, *pass1, rand(R * C), rand(R * C).exp(),
                                             rand(R * C), rand(R * C), R, 2, backend)),
        (splat.split_attention_backward_dy, (rand(B, C, H, W), *saved, *pass1, rand(0), rand(0), None, None,
                                             R, 1, backend)),
    ] + [
        (splat.split_attention, split_attention_args(case, layout, backend))
        for case, layout in ((SPLIT_CASES[0], torch.contiguous_format), (SPLIT_CASES[4], torch.channels_last))
    ]


def split_attention_args(param, layout, backend):
    """The raw op's arguments for a ``SPLIT_CASES`` case, every tensor requiring grad."""
    case = param.values[0]
    B, R, G, K, C, inter, H, W, stats0, stats1, relu, _ = case
    t = {k: v if v is None else v.requires_grad_() for k, v in split_attention_inputs(case, torch.float64, layout).items()}
    return (t["y"], t["w0"], t["b0"], stats0, 1e-5, t["w1"], t["b1"], t["g1"], t["be1"], stats1, 1e-3, relu,
            t["w2"], t["b2"], R, G, K, torch.float64, backend)


@pytest.mark.parametrize("backend", backend_params())
def test_opcheck(backend):
    """Schema, fake kernel, autograd registration and compile tracing of every op (the backward
    ops are first-order only, so they get inputs that do not require grad)."""
    for op, args in opcheck_cases(backend):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", backend_params())
def test_split_attention_passes_take_any_strides(backend):
    """The backward passes' (B, n) and (n,) inputs as column-major or strided views: same results
    as from row-major copies."""
    B, R, K, C, H, W = 3, 2, 2, 4, 3, 3
    y, dout = rand(B, R * C, H, W), rand(B, C, H, W)
    scale, shift = bn_vectors(R * C, torch.float64)
    strided = lambda *shape: rand(*shape[::-1]).t() if len(shape) == 2 else rand(2 * shape[0])[::2]  # noqa: E731
    attn, dgap, sum_my, sum_m = strided(B, R * C), strided(B, C), strided(B, R * C), strided(B, R * C)
    dscale, dshift, mean, dvar = strided(R * C), strided(R * C), strided(R * C), strided(R * C)
    rstd = strided(R * C).abs() + 0.5
    splat = torch.ops.splat
    for op, args in (
        (splat.split_attention_backward_sums, (dout, y, scale, shift, attn, R, K, backend)),
        (splat.split_attention_backward_dy, (dout, y, scale, shift, attn, dgap, dscale, dshift, sum_my, sum_m,
                                             mean, rstd, None, dvar, R, K, backend)),
    ):
        got = op(*args)
        expected = op(*(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args))
        for i, (g, e) in enumerate(zip(got, expected)):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=f"{op} output {i}")


@pytest.mark.parametrize("backend", backend_params())
def test_deterministic(backend):
    """Reductions go through fixed-order partials: two runs on the same input agree bitwise."""
    y = rand(3, 16, 9, 9)
    scale, shift = bn_vectors(16, torch.float64)
    args = (rand(3, 8, 9, 9), y, scale, shift, rand(3, 16), 2, 1, backend)
    first = torch.ops.splat.attention_sum_backward(*args)
    second = torch.ops.splat.attention_sum_backward(*args)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert all(torch.equal(a, b) for a, b in zip(ops.channel_stats(y, backend), ops.channel_stats(y, backend)))
    first = torch.ops.splat.split_attention_backward_sums(*args)
    second = torch.ops.splat.split_attention_backward_sums(*args)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# The statistics of no elements are 0/0, which torch and numpy (the Triton interpreter) warn about.
@pytest.mark.filterwarnings("ignore:var_mean.*degrees of freedom:UserWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
@pytest.mark.parametrize("hw", [(4, 4), (0, 3), (0, 0)], ids=["4x4", "0x3", "0x0"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("backend", backend_params())
def test_empty_batch(backend, layout, hw):
    """Radix 2 with groups 2 (SK's channel order); sums over nothing are zeros written over the poison."""
    y = rand(0, 16, *hw, layout=layout)
    scale, shift = bn_vectors(16, torch.float64)
    attn, dout = rand(0, 16), rand(0, 8, *hw, layout=layout)
    assert ops.radix_pool(y, scale, shift, 2, backend, groups=2).shape == (0, 8)
    dy, dscale, dshift = torch.ops.splat.radix_pool_backward(rand(0, 8), y, scale, shift, 2, 2, backend)
    assert dy.shape == y.shape and dscale.shape == dshift.shape == (16,)
    assert not dscale.any() and not dshift.any()
    assert ops.attention_sum(y, scale, shift, attn, 2, backend, groups=2).shape == (0, 8, *hw)
    dy, dscale, dshift, dattn = torch.ops.splat.attention_sum_backward(dout, y, scale, shift, attn, 2, 2, backend)
    assert dy.shape == y.shape and dattn.shape == (0, 16) and not dscale.any() and not dshift.any()
    assert ops.radix_softmax(attn, 2, 2, backend).shape == (0, 16)
    mean, var = ops.channel_stats(y, backend)
    assert mean.shape == var.shape == (16,) and mean.isnan().all() and var.isnan().all()  # as torch.var_mean
    assert torch.ops.splat.channel_stats_backward(mean, var, y, mean, backend).shape == y.shape
    sums = torch.ops.splat.split_attention_backward_sums(dout, y, scale, shift, attn, 2, 2, backend)
    assert [t.shape for t in sums] == [(16,), (16,), (0, 16), (0, 16), (0, 16)]
    assert not sums[0].any() and not sums[1].any()
    dscale, dshift = rand(16), rand(16)
    dy, dweight, dbias = torch.ops.splat.split_attention_backward_dy(
        dout, y, scale, shift, attn, rand(0, 8), dscale, dshift, *sums[3:], rand(0), rand(0), None, None, 2, 2,
        backend,
    )
    assert dy.shape == y.shape
    torch.testing.assert_close(dweight, dscale)  # nothing to add over an empty batch
    torch.testing.assert_close(dbias, dshift)


@pytest.mark.filterwarnings("ignore:var_mean.*degrees of freedom:UserWarning")  # torch's, over no channels
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("backend", backend_params())
def test_no_channels(backend, layout):
    """Tensors of zero channels (a grid of no channel blocks): empty results, forward and backward."""
    y = rand(2, 0, 3, 3, layout=layout, requires_grad=True)
    scale, shift, attn = rand(0, requires_grad=True), rand(0, requires_grad=True), rand(2, 0, requires_grad=True)
    outs = [
        ops.radix_pool(y, scale, shift, 2, backend), ops.attention_sum(y, scale, shift, attn, 2, backend),
        ops.radix_softmax(attn, 2, 1, backend), ops.radix_softmax(attn, 1, 1, backend), *ops.channel_stats(y, backend),
    ]
    assert [tuple(t.shape) for t in outs] == [(2, 0), (2, 0, 3, 3), (2, 0), (2, 0), (0,), (0,)]
    sum(t.sum() for t in outs).backward()
    assert y.grad.shape == y.shape and scale.grad.shape == shift.grad.shape == (0,) and attn.grad.shape == (2, 0)


def test_bad_input():
    y = rand(2, 8, 3, 3)
    scale, shift = bn_vectors(8, torch.float64)
    with pytest.raises(ValueError, match="y must be 4-D"):
        ops.radix_pool(y[0], scale, shift, 2)
    with pytest.raises(ValueError, match="radix=3 must divide"):
        ops.radix_pool(y, scale, shift, 3)
    with pytest.raises(TypeError, match="y must be a floating-point"):
        ops.radix_pool(y.long(), scale, shift, 2)
    with pytest.raises(TypeError, match="y must be a floating-point"):
        ops.radix_pool(y.to(torch.complex128), scale, shift, 2)
    with pytest.raises(ValueError, match="scale must have 8 elements"):
        ops.radix_pool(y, scale[:4], shift, 2)
    with pytest.raises(TypeError, match="scale must be torch.float64"):
        ops.radix_pool(y, scale.float(), shift, 2)
    with pytest.raises(ValueError, match=r"attn must have shape \(2, 8\)"):
        ops.attention_sum(y, scale, shift, rand(2, 4), 2)
    with pytest.raises(ValueError, match="cardinality=3 must divide"):
        ops.radix_softmax(rand(2, 8), 2, 3)
    with pytest.raises(ValueError, match="radix must be a positive int, got 0"):
        ops.radix_pool(y, scale, shift, 0)
    with pytest.raises(ValueError, match="groups must be a positive int, got 0"):
        ops.attention_sum(y, scale, shift, rand(2, 8), 2, groups=0)
    with pytest.raises(ValueError, match="cardinality must be a positive int, got 0"):
        ops.radix_softmax(rand(2, 8), 2, 0)
    # The meta device stands in for a second device on a machine with one.
    with pytest.raises(ValueError, match="scale is on meta but y is on"):
        ops.radix_pool(y, scale.to("meta"), shift, 2)
    with pytest.raises(ValueError, match="attn is on meta but y is on"):
        ops.attention_sum(y, scale, shift, rand(2, 8).to("meta"), 2)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.radix_pool(y, scale, shift, 2, backend="fast")


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"w0": rand(5)}, ValueError, "bn0 weight must have 12 elements, got 5"),
        ({"w1": rand(4, 5)}, ValueError, r"fc1_weight must have shape \(4, 6\)"),
        ({"w2": rand(12, 3)}, ValueError, r"fc2_weight must have shape \(12, 4\)"),
        ({"b2": rand(6)}, ValueError, "fc2_bias must have 12 elements"),
        ({"g1": rand(4).long()}, TypeError, "bn1 weight must be a floating-point"),
        ({"y": rand(1, 12, 1, 1)}, ValueError, "Expected more than 1 value per channel when training"),
    ],
)
def test_split_attention_bad_input(change, error, match):
    case = SPLIT_CASES[0].values[0]
    inputs = split_attention_inputs(case, torch.float64) | change
    names = list(inputs)
    with pytest.raises(error, match=match):
        split_attention_fn(case, names, "torch")(*inputs.values())


@pytest.mark.skipif(DEVICE.type != "cpu", reason="checks the CPU-only error")
def test_cuda_backend_on_cpu_raises(monkeypatch):
    monkeypatch.delenv("SPLAT_CUDA_EMULATE", raising=False)
    y = rand(2, 8, 3, 3)
    scale, shift = bn_vectors(8, torch.float64)
    with pytest.raises(RuntimeError, match="backend='cuda' got a tensor on cpu"):
        ops.radix_pool(y, scale, shift, 2, backend="cuda")
