"""``splat::bn_add_relu``: BatchNorm, an optional residual add and ReLU, in one pass over y.

    out = relu(y * scale + shift + residual)       y, residual, out (B, C, H, W), NCHW or NHWC

The tail of a bottleneck (bn3, the shortcut add and ReLU; without a residual, bn1 and ReLU).
BatchNorm is given as (weight, bias, batch_stats, eps), as BN0 of ``splat::split_attention``:
with batch_stats, the batch's mean and biased variance (``channel_stats``' kernels) normalise
before the affine map, scale = weight * rstd and shift = bias - mean * scale, and the op returns
them so that the caller updates running statistics; without, (weight, bias) *are* (scale, shift)
(eval mode folded). out has y's dtype and layout; residual must match y's.

Eager PyTorch runs this as BN (reading y twice, writing once), an add and a ReLU: eight passes
of y's size in training, seven in eval. Here: four and three (the statistics read y once, then y
and the residual are read and out written once). The backward, with g = dout * [out > 0] (ReLU's
mask from its output, as torch's ReLU backward takes it):
1. ``bn_add_relu_backward_sums``: per channel, sum g and sum g*y (one read of dout, out and y);
2. ``_coefficients``, on (C,) vectors: BN's dweight and dbias and, with batch statistics, the
   coefficients gamma and delta of the statistics' share of dy;
3. ``bn_add_relu_backward_dy``: dy = scale*g + gamma + delta*y and, with a residual, its
   gradient g (a second read of dout, out and y).
The op keeps y and out for its backward, as the reference's BN and ReLU keep them.
"""

import torch
from torch import Tensor

from splat import _layout
from splat import backend as _backend
from splat.ops import _checks
from splat.ops.channel_stats import _torch_forward as _channel_stats_reference
from splat.ops.channel_stats import bn_affine, bn_stats_share


def _torch_forward(y: Tensor, residual: Tensor | None, scale: Tensor, shift: Tensor) -> Tensor:
    pre = y.to(scale.dtype) * scale[:, None, None] + shift[:, None, None]
    if residual is not None:
        pre = pre + residual.to(scale.dtype)
    return torch.relu(pre).to(y.dtype).contiguous(memory_format=_layout.memory_format(y))


def _relu_grad(dout: Tensor, out: Tensor, acc: torch.dtype) -> Tensor:
    """g = dout where out > 0, else 0, as torch's ReLU backward (a NaN output passes dout)."""
    return torch.where(out <= 0, 0.0, dout.to(acc))


def _torch_backward_sums(dout: Tensor, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    g = _relu_grad(dout, out, _layout.acc_dtype(y.dtype))
    return g.sum((0, 2, 3)), (g * y.to(g.dtype)).sum((0, 2, 3))


def _torch_backward_dy(dout: Tensor, out: Tensor, y: Tensor, scale: Tensor, gamma: Tensor, delta: Tensor,
                       residual_grad: bool) -> tuple[Tensor, Tensor]:
    g = _relu_grad(dout, out, scale.dtype)
    dy = g * scale[:, None, None]
    if gamma.numel():
        dy = dy + gamma[:, None, None] + delta[:, None, None] * y.to(scale.dtype)
    fmt = _layout.memory_format(y)
    dres = g.to(y.dtype).contiguous(memory_format=fmt) if residual_grad else y.new_empty(0)
    return dy.to(y.dtype).contiguous(memory_format=fmt), dres


def fake_forward(y, residual, scale, shift):
    """Shapes of the forward kernels (``splat_cuda::bn_add_relu_forward`` shares it)."""
    return _layout.empty(y.shape, y)


def fake_backward_sums(dout, out, y):
    """Shapes of the first backward pass (``splat_cuda::bn_add_relu_backward_sums`` shares it)."""
    acc = _layout.acc_dtype(y.dtype)
    return y.new_empty(y.shape[1], dtype=acc), y.new_empty(y.shape[1], dtype=acc)


def fake_backward_dy(dout, out, y, scale, gamma, delta, residual_grad):
    """Shapes of the second backward pass (``splat_cuda::bn_add_relu_backward_dy`` shares it)."""
    return _layout.empty(y.shape, y), _layout.empty(y.shape, y) if residual_grad else y.new_empty(0)


@torch.library.custom_op("splat::bn_add_relu", mutates_args=())
def _bn_add_relu(
    y: Tensor, residual: Tensor | None, weight: Tensor, bias: Tensor, batch_stats: bool, eps: float, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    acc = _layout.acc_dtype(y.dtype)
    # Outputs may not alias each other or the inputs: a new empty tensor for each one not computed.
    mean, var, scale_out, rstd_out = (y.new_empty(0, dtype=acc) for _ in range(4))
    if batch_stats:
        mean, var = _backend.call(backend, "channel_stats_forward", _channel_stats_reference, y)
    scale, shift, rstd = bn_affine(weight, bias, batch_stats, eps, mean, var)
    if batch_stats:
        scale_out, rstd_out = scale, rstd
    out = _backend.call(backend, "bn_add_relu_forward", _torch_forward, y, residual, scale, shift)
    return out, mean, var, scale_out, rstd_out


@_bn_add_relu.register_fake
def _fake(y, residual, weight, bias, batch_stats, eps, backend):
    n = y.shape[1] if batch_stats else 0
    acc = _layout.acc_dtype(y.dtype)
    return fake_forward(y, residual, None, None), *(y.new_empty(n, dtype=acc) for _ in range(4))


@torch.library.custom_op("splat::bn_add_relu_backward_sums", mutates_args=())
def _backward_sums(dout: Tensor, out: Tensor, y: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    return _backend.call(backend, "bn_add_relu_backward_sums", _torch_backward_sums, dout, out, y)


_backward_sums.register_fake(lambda *args: fake_backward_sums(*args[:-1]))


@torch.library.custom_op("splat::bn_add_relu_backward_dy", mutates_args=())
def _backward_dy(
    dout: Tensor, out: Tensor, y: Tensor, scale: Tensor, gamma: Tensor, delta: Tensor, residual_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return _backend.call(
        backend, "bn_add_relu_backward_dy", _torch_backward_dy, dout, out, y, scale, gamma, delta, residual_grad
    )


_backward_dy.register_fake(lambda *args: fake_backward_dy(*args[:-1]))


def _coefficients(sum_g: Tensor, sum_gy: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor,
                  dmean: Tensor | None, dvar: Tensor | None, n: int):
    """(dweight, dbias, gamma, delta) from pass 1's sums; gamma and delta empty without batch
    statistics (``mean`` empty), where (weight, bias) are (scale, shift)."""
    if not mean.numel():
        return sum_gy, sum_g, mean, mean
    dweight, gamma, delta = bn_stats_share(sum_gy, sum_g, scale, mean, rstd, dmean, dvar, n)
    return dweight, sum_g, gamma, delta


def _setup_context(ctx, inputs, output):
    y, residual, weight, bias, batch_stats, eps, backend = inputs
    out, mean, var, scale, rstd = output
    ctx.mark_non_differentiable(scale, rstd)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(y, out, weight, mean, scale, rstd)
    ctx.residual_dtype = None if residual is None else residual.dtype
    ctx.backend = backend


def _backward(ctx, dout, dmean, dvar, _dscale, _drstd):
    y, out, weight, mean, scale, rstd = ctx.saved_tensors
    acc = _layout.acc_dtype(y.dtype)
    if dout is None:
        dout = torch.zeros_like(out)
    dout = dout.contiguous(memory_format=_layout.memory_format(y))
    if not mean.numel():  # the affine map is (weight, bias) itself; no statistics to differentiate
        scale, dmean, dvar = _layout.cast(weight, acc), None, None
    n = y.shape[0] * y.shape[2] * y.shape[3]
    sum_g, sum_gy = _backward_sums(dout, out, y, ctx.backend)
    dweight, dbias, gamma, delta = _coefficients(sum_g, sum_gy, scale, mean, rstd, dmean, dvar, n)
    residual_grad = ctx.residual_dtype is not None and ctx.needs_input_grad[1]
    dy, dres = _backward_dy(dout, out, y, scale, gamma, delta, residual_grad, ctx.backend)
    return (dy, dres if residual_grad else None, _layout.cast(dweight, weight.dtype),
            _layout.cast(dbias, weight.dtype), None, None, None)


_bn_add_relu.register_autograd(_backward, setup_context=_setup_context)


def bn_add_relu(
    y: Tensor, residual: Tensor | None = None, *, bn: tuple, backend: str = "auto"
) -> tuple[Tensor, Tensor, Tensor]:
    """relu(bn(y) + residual) and the batch statistics: (out, mean, var). See the module docstring.

    y (B, C, H, W) NCHW or NHWC; residual None or y's shape and dtype (any layout: it is read in
    y's); ``bn`` = (weight, bias, batch_stats, eps) with (C,) floating vectors. out (B, C, H, W)
    in y's layout and dtype; (mean, var) (C,) in the accumulation dtype with batch_stats, else empty.
    """
    _checks.rank(y, 4, "y")
    weight, bias, batch_stats, eps = bn
    _checks.vector(weight, y, y.shape[1], "bn weight")
    _checks.vector(bias, y, y.shape[1], "bn bias")
    if residual is not None:
        _checks.floating(residual, "residual")
        _checks.same_device(residual, y, "residual", "y")
        if residual.shape != y.shape:
            raise ValueError(f"residual must have y's shape {tuple(y.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != y.dtype:
            raise TypeError(f"residual must have y's dtype {y.dtype}, got {residual.dtype}")
        residual = residual.contiguous(memory_format=_layout.memory_format(_layout.dense(y)))
    if batch_stats and y.shape[0] * y.shape[2] * y.shape[3] <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(y.shape)}")
    backend = _backend.resolve(backend, y, "bn_add_relu")
    out, mean, var, _, _ = _bn_add_relu(
        _layout.dense(y), residual, weight.contiguous(), bias.contiguous(), bool(batch_stats), float(eps), backend
    )
    return out, mean, var
