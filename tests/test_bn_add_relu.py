"""``splat::bn_add_relu`` against an independent PyTorch expression, on every backend that runs here."""

import pytest
import torch

from splat import ops
from tests.helpers import BACKENDS, DEVICE, DTYPES, LAYOUTS, backend_params, rand
from tests.test_ops import check_op

EPS = 1e-5

# (B, C, H, W, residual, batch statistics): odd channels, 1x1 maps, H*W beyond one tile (tails in
# both layouts), more channels than one NHWC tile; each with and without the residual or the batch
# statistics.
CASES = [
    pytest.param((3, 6, 5, 3, True, True), id="train-residual"),
    pytest.param((2, 5, 7, 7, False, True), id="train"),
    pytest.param((3, 8, 1, 1, True, False), id="eval-residual-1x1"),
    pytest.param((2, 7, 4, 5, False, False), id="eval"),
    pytest.param((1, 9, 33, 40, True, True), id="hw-tail"),
    pytest.param((2, 136, 3, 3, True, False), id="c-tail"),
]


def expected(y, residual, weight, bias, batch_stats):
    """relu(bn(y) + residual) from BatchNorm's definition: (out, mean, var) with batch statistics."""
    if not batch_stats:
        pre = y * weight[:, None, None] + bias[:, None, None]
        return (torch.relu(pre if residual is None else pre + residual).to(y.dtype),)
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    ya = y.to(acc)
    mean, var = ya.mean((0, 2, 3)), ya.var((0, 2, 3), unbiased=False)
    xhat = (ya - mean[:, None, None]) / torch.sqrt(var[:, None, None] + EPS)
    pre = xhat * weight[:, None, None] + bias[:, None, None]
    return torch.relu(pre if residual is None else pre + residual).to(y.dtype), mean, var


def inputs(case, dtype, layout):
    B, C, H, W, residual, _ = case
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    y = rand(B, C, H, W, dtype=dtype, layout=layout)
    weight, bias = rand(C, dtype=acc).abs() + 0.5, rand(C, dtype=acc) * 0.5
    return [y, weight, bias] + ([rand(B, C, H, W, dtype=dtype, layout=layout)] if residual else [])


def check(backend, dtype, layout, case):
    """Values of out and the statistics, and the gradients of every input through all of them."""
    batch_stats = case[5]

    def fn(y, weight, bias, residual=None):
        out, mean, var = ops.bn_add_relu(y, residual, bn=(weight, bias, batch_stats, EPS), backend=backend)
        return (out, mean, var) if batch_stats else out

    def reference(y, weight, bias, residual=None):
        return expected(y, residual, weight, bias, batch_stats)

    out, *_ = check_op(fn, reference, inputs(case, dtype, layout), dtype, "bn_add_relu")
    assert out.is_contiguous(memory_format=layout), "the output must keep the input's memory format"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", backend_params())
def test_bn_add_relu(backend, dtype, layout, case):
    check(backend, dtype, layout, case)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not available here")
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_triton_split_and_tiled_grids(monkeypatch, layout):
    """The sums with H*W split as far as ``hw_splits`` goes, the elementwise passes with several
    tiles a program (a grid axis of two programs, the last tile of the second past the map)."""
    from splat.kernels import _tiles

    monkeypatch.setattr(_tiles, "programs_wanted", lambda device: 1 << 20)
    monkeypatch.setattr(_tiles, "_MAX_GRID_YZ", 2)
    check("triton", torch.float64, layout, (2, 6, 57, 55, True, True))


@pytest.mark.parametrize("backend", backend_params())
def test_residual_in_another_layout(backend):
    """The residual is read in y's layout, whatever its own."""
    y = rand(2, 6, 4, 5)
    residual = rand(2, 6, 4, 5, layout=torch.channels_last)
    weight, bias = rand(6).abs() + 0.5, rand(6)
    out, _, _ = ops.bn_add_relu(y, residual, bn=(weight, bias, True, EPS), backend=backend)
    torch.testing.assert_close(out, expected(y, residual, weight, bias, True)[0], rtol=1e-12, atol=1e-12)
    assert out.is_contiguous()


@pytest.mark.parametrize("backend", backend_params())
def test_gradcheck(backend):
    """float64 gradcheck through out and the statistics; along random directions on the interpreter."""
    y, residual = rand(2, 3, 3, 2, requires_grad=True), rand(2, 3, 3, 2, requires_grad=True)
    weight, bias = (rand(3).abs() + 0.5).requires_grad_(), rand(3, requires_grad=True)
    for batch_stats in (True, False):
        def fn(y, weight, bias, residual):
            outs = ops.bn_add_relu(y, residual, bn=(weight, bias, batch_stats, EPS), backend=backend)
            return outs if batch_stats else outs[0]

        assert torch.autograd.gradcheck(fn, (y, weight, bias, residual), fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", backend_params())
def test_opcheck(backend):
    """Schema, fake kernel, autograd registration and compile tracing of the op and its backward passes."""
    splat = torch.ops.splat
    y, residual = rand(2, 4, 3, 3, requires_grad=True), rand(2, 4, 3, 3, requires_grad=True)
    y_nhwc = rand(2, 4, 3, 3, layout=torch.channels_last, requires_grad=True)
    weight, bias = (rand(4).abs() + 0.5).requires_grad_(), rand(4, requires_grad=True)
    dout, out = rand(2, 4, 3, 3), rand(2, 4, 3, 3)
    for op, args in (
        (splat.bn_add_relu, (y, residual, weight, bias, True, EPS, backend)),
        (splat.bn_add_relu, (y_nhwc, None, weight, bias, False, EPS, backend)),
        (splat.bn_add_relu_backward_sums, (dout, out, y.detach(), backend)),
        (splat.bn_add_relu_backward_dy, (dout, out, y.detach(), rand(4), rand(4), rand(4), True, backend)),
        (splat.bn_add_relu_backward_dy, (dout, out, y.detach(), rand(4), rand(0), rand(0), False, backend)),
    ):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", backend_params())
def test_relu_gradient_where_out_is_zero_or_nan(backend):
    """ReLU's gradient mask comes from the output, as torch's: none where out is 0, dout where it is NaN."""
    y = rand(1, 2, 2, 2)
    y[0, 0, 0, 0] = -3.0  # out 0
    y[0, 1, 1, 1] = float("nan")
    y.requires_grad_()
    weight, bias = torch.ones(2, dtype=y.dtype, device=DEVICE), torch.zeros(2, dtype=y.dtype, device=DEVICE)
    out, _, _ = ops.bn_add_relu(y, bn=(weight, bias, False, EPS), backend=backend)
    assert out[0, 0, 0, 0] == 0 and out[0, 1, 1, 1].isnan()
    dout = rand(1, 2, 2, 2)
    (dy,) = torch.autograd.grad(out, y, dout)
    assert dy[0, 0, 0, 0] == 0 and dy[0, 1, 1, 1] == dout[0, 1, 1, 1]
    kept = y.detach() > 0
    torch.testing.assert_close(dy[kept], dout[kept])


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("backend", backend_params())
def test_empty_batch(backend, layout):
    """An empty batch: empty outputs, and sums over nothing written as zeros over the poison."""
    y = rand(0, 6, 3, 3, layout=layout)
    weight, bias = rand(6), rand(6)
    out, _, _ = ops.bn_add_relu(y, rand(0, 6, 3, 3, layout=layout), bn=(weight, bias, False, EPS), backend=backend)
    assert out.shape == y.shape
    sum_g, sum_gy = torch.ops.splat.bn_add_relu_backward_sums(y, y, y, backend)
    assert sum_g.shape == sum_gy.shape == (6,) and not sum_g.any() and not sum_gy.any()
    dy, dres = torch.ops.splat.bn_add_relu_backward_dy(y, y, y, weight, weight, bias, True, backend)
    assert dy.shape == dres.shape == y.shape


@pytest.mark.parametrize("backend", backend_params())
def test_deterministic(backend):
    """The sums go through fixed-order partials: two runs agree bitwise."""
    args = (rand(3, 16, 9, 9), rand(3, 16, 9, 9), rand(3, 16, 9, 9), backend)
    first = torch.ops.splat.bn_add_relu_backward_sums(*args)
    second = torch.ops.splat.bn_add_relu_backward_sums(*args)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"y": rand(2, 4, 3)}, ValueError, "y must be 4-D"),
        ({"weight": rand(3)}, ValueError, "bn weight must have 4 elements, got 3"),
        ({"bias": rand(4).long()}, TypeError, "bn bias must be a floating-point"),
        ({"residual": rand(2, 4, 3, 2)}, ValueError, r"residual must have y's shape \(2, 4, 3, 3\)"),
        ({"residual": rand(2, 4, 3, 3).float()}, TypeError, "residual must have y's dtype torch.float64"),
        ({"residual": rand(2, 4, 3, 3).to("meta")}, ValueError, "residual is on meta but y is on"),
        ({"y": rand(1, 4, 1, 1), "residual": None}, ValueError, "Expected more than 1 value per channel"),
    ],
)
def test_bad_input(change, error, match):
    args = {"y": rand(2, 4, 3, 3), "weight": rand(4), "bias": rand(4), "residual": rand(2, 4, 3, 3)} | change
    with pytest.raises(error, match=match):
        ops.bn_add_relu(args["y"], args["residual"], bn=(args["weight"], args["bias"], True, EPS))
