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
