"""``splat::radix_pool``: BN affine + ReLU + sum over radix + global average pool, in one read.

    gap[b, c] = 1/(H*W) * sum_r sum_hw relu(y[b, r*C + c, hw] * scale[r*C + c] + shift[r*C + c])

y (B, R*C, H, W) is the conv output (radix-major channels, NCHW or NHWC); scale and shift (R*C,)
are a folded BatchNorm in the accumulation dtype. gap is (B, C) in y's dtype.
"""

import torch
from torch import Tensor

from splat import _layout
from splat import backend as _backend
from splat.ops import _checks


def _torch_forward(y: Tensor, scale: Tensor, shift: Tensor, radix: int) -> Tensor:
    B, RC, H, W = y.shape
    act = torch.relu(y.to(scale.dtype) * scale[:, None, None] + shift[:, None, None])
    return act.reshape(B, radix, RC // radix, H * W).sum((1, 3)).div(H * W).to(y.dtype)


def _torch_backward(dgap: Tensor, y: Tensor, scale: Tensor, shift: Tensor, radix: int):
    B, RC, H, W = y.shape
    y_acc = y.to(scale.dtype)
    pos = y_acc * scale[:, None, None] + shift[:, None, None] > 0
    g = (dgap.to(scale.dtype) / (H * W)).repeat(1, radix)[:, :, None, None] * pos
    dy = (g * scale[:, None, None]).to(y.dtype).contiguous(memory_format=_layout.memory_format(y))
    return dy, (g * y_acc).sum((0, 2, 3)), g.sum((0, 2, 3))


@torch.library.custom_op("splat::radix_pool", mutates_args=())
def _radix_pool(y: Tensor, scale: Tensor, shift: Tensor, radix: int, backend: str) -> Tensor:
    return _backend.call(backend, "radix_pool_forward", _torch_forward, y, scale, shift, radix)


@_radix_pool.register_fake
def _(y, scale, shift, radix, backend):
    return y.new_empty((y.shape[0], y.shape[1] // radix))


@torch.library.custom_op("splat::radix_pool_backward", mutates_args=())
def _radix_pool_backward(
    dgap: Tensor, y: Tensor, scale: Tensor, shift: Tensor, radix: int, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    return _backend.call(backend, "radix_pool_backward", _torch_backward, dgap, y, scale, shift, radix)


@_radix_pool_backward.register_fake
def _(dgap, y, scale, shift, radix, backend):
    return _layout.empty(y.shape, y), torch.empty_like(scale), torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    y, scale, shift, radix, backend = inputs
    ctx.save_for_backward(y, scale, shift)
    ctx.radix, ctx.backend = radix, backend


def _backward(ctx, dgap):
    y, scale, shift = ctx.saved_tensors
    dy, dscale, dshift = _radix_pool_backward(dgap.contiguous(), y, scale, shift, ctx.radix, ctx.backend)
    return dy, dscale, dshift, None, None


_radix_pool.register_autograd(_backward, setup_context=_setup_context)


def radix_pool(y: Tensor, scale: Tensor, shift: Tensor, radix: int, backend: str = "auto") -> Tensor:
    """Pooled split-attention input: (B, R*C, H, W) conv output -> (B, C). See the module docstring."""
    _checks.conv_output(y, radix)
    _checks.channel_vector(scale, y, "scale")
    _checks.channel_vector(shift, y, "shift")
    backend = _backend.resolve(backend, y)
    return _radix_pool(_layout.dense(y), scale.contiguous(), shift.contiguous(), radix, backend)
