"""``splat::channel_stats``: per-channel batch mean and biased variance for training-mode BN.

y (B, C, H, W) NCHW or NHWC -> (mean, var), each (C,) in the accumulation dtype (float64 for
float64 y, float32 otherwise), reduced over (B, H, W); var is biased (divides by N = B*H*W).
"""

import torch
from torch import Tensor

from splat import _layout
from splat import backend as _backend
from splat.ops import _checks


def _torch_forward(y: Tensor) -> tuple[Tensor, Tensor]:
    var, mean = torch.var_mean(y.to(_layout.acc_dtype(y.dtype)), dim=(0, 2, 3), correction=0)
    return mean, var


def _torch_backward(dmean: Tensor, dvar: Tensor, y: Tensor, mean: Tensor) -> Tensor:
    n = y.shape[0] * y.shape[2] * y.shape[3]
    dy = (dmean[:, None, None] + 2 * dvar[:, None, None] * (y.to(mean.dtype) - mean[:, None, None])) / n
    return dy.to(y.dtype).contiguous(memory_format=_layout.memory_format(y))


def bn_affine(weight: Tensor, bias: Tensor, batch_stats: bool, eps: float, mean: Tensor, var: Tensor):
    """A BN given as (weight, bias, batch_stats, eps) as (scale, shift, rstd) in the accumulation
    dtype (``mean``'s): with batch statistics scale = weight * rstd and shift = bias - mean * scale;
    without, (weight, bias) are (scale, shift) and rstd is ``var``, empty as the statistics are."""
    acc = mean.dtype
    weight, bias = _layout.cast(weight, acc), _layout.cast(bias, acc)
    if not batch_stats:
        return weight, bias, var
    rstd = torch.rsqrt(var + eps)
    scale = weight * rstd
    return scale, torch.addcmul(bias, mean, scale, value=-1), rstd


def bn_stats_share(dscale: Tensor, dshift: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor,
                   dmean: Tensor | None, dvar: Tensor | None, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """(dweight, gamma, delta) of a BN with batch statistics over n values per channel, from the
    gradients of its affine map (scale, shift) and of the statistics it returns (None if unused):
    the statistics' share of dy is gamma + delta * y, all (C,).

    scale = weight*rstd and shift = bias - mean*scale give dmean = -dshift*scale and
    dvar = -dweight*scale*rstd/2 (dweight = (dscale - dshift*mean)*rstd); their share of dy is
    (dmean + 2*dvar*(y - mean))/n = gamma + delta*y."""
    dweight = torch.addcmul(dscale, dshift, mean, value=-1) * rstd
    delta = dweight * scale * (rstd * (-1 / n))
    if dvar is not None:
        delta = delta + dvar * (2 / n)
    gamma = torch.addcmul(dshift * scale * (-1 / n), delta, mean, value=-1)
    if dmean is not None:
        gamma = gamma + dmean / n
    return dweight, gamma, delta


@torch.library.custom_op("splat::channel_stats", mutates_args=())
def _channel_stats(y: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    return _backend.call(backend, "channel_stats_forward", _torch_forward, y)


def fake_forward(y):
    """Shapes of the forward kernels (``splat_cuda::channel_stats_forward`` shares it)."""
    acc = _layout.acc_dtype(y.dtype)
    return y.new_empty(y.shape[1], dtype=acc), y.new_empty(y.shape[1], dtype=acc)


def fake_backward(dmean, dvar, y, mean):
    """Shapes of the backward kernels (``splat_cuda::channel_stats_backward`` shares it)."""
    return _layout.empty(y.shape, y)


_channel_stats.register_fake(lambda *args: fake_forward(*args[:-1]))


@torch.library.custom_op("splat::channel_stats_backward", mutates_args=())
def _channel_stats_backward(dmean: Tensor, dvar: Tensor, y: Tensor, mean: Tensor, backend: str) -> Tensor:
    return _backend.call(backend, "channel_stats_backward", _torch_backward, dmean, dvar, y, mean)


_channel_stats_backward.register_fake(lambda *args: fake_backward(*args[:-1]))


def _setup_context(ctx, inputs, output):
    y, backend = inputs
    ctx.save_for_backward(y, output[0])
    ctx.backend = backend


def _backward(ctx, dmean, dvar):
    y, mean = ctx.saved_tensors
    return _channel_stats_backward(dmean.contiguous(), dvar.contiguous(), y, mean, ctx.backend), None


_channel_stats.register_autograd(_backward, setup_context=_setup_context)


def channel_stats(y: Tensor, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """(mean, biased var) per channel of y (B, C, H, W). See the module docstring."""
    _checks.rank(y, 4, "y")
    backend = _backend.resolve(backend, y, "channel_stats")
    return _channel_stats(_layout.dense(y), backend)
