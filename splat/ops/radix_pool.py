"""``splat::radix_pool``: BN affine + ReLU + sum over radix + global average pool, in one read.

    gap[b, c] = 1/(H*W) * sum_r sum_hw relu(y[b, r*C + c, hw] * scale[r*C + c] + shift[r*C + c])

y (B, R*C, H, W) is the conv output (radix-major channels, NCHW or NHWC); scale and shift (R*C,)
are a folded BatchNorm in the accumulation dtype. gap is (B, C) in y's dtype.

``groups`` K (1 in ResNeSt) orders y's channels (k, r, j) instead: channel (r, c = k*C/K + j) of the
formula is y's k*(R*C/K) + r*(C/K) + j (and likewise for scale, shift) -- the natural output
order of one grouped conv (K groups) that computes all R branches, as in SKNet.
"""

import torch
from torch import Tensor

from splat import _layout
from splat import backend as _backend
from splat.ops import _checks


def _torch_forward(y: Tensor, scale: Tensor, shift: Tensor, radix: int, groups: int) -> Tensor:
    B, RC, H, W = y.shape
    act = torch.relu(y.to(scale.dtype) * scale[:, None, None] + shift[:, None, None])
    act = act.reshape(B, groups, radix, RC // (radix * groups), H * W)
    return act.sum((2, 4)).reshape(B, RC // radix).div(H * W).to(y.dtype)


def _torch_backward(dgap: Tensor, y: Tensor, scale: Tensor, shift: Tensor, radix: int, groups: int):
    B, RC, H, W = y.shape
    y_acc = y.to(scale.dtype)
    pos = y_acc * scale[:, None, None] + shift[:, None, None] > 0
    g = (dgap.to(scale.dtype) / (H * W)).reshape(B, groups, 1, RC // (radix * groups))
    g = g.expand(B, groups, radix, RC // (radix * groups)).reshape(B, RC)[:, :, None, None] * pos
    dy = (g * scale[:, None, None]).to(y.dtype).contiguous(memory_format=_layout.memory_format(y))
    return dy, (g * y_acc).sum((0, 2, 3)), g.sum((0, 2, 3))


def fake_forward(y, scale, shift, radix, groups):
    """Shapes of the forward kernels (``splat_cuda::radix_pool_forward`` shares it)."""
    return y.new_empty((y.shape[0], y.shape[1] // radix))


def fake_backward(dgap, y, scale, shift, radix, groups):
    """Shapes of the backward kernels (``splat_cuda::radix_pool_backward`` shares it)."""
    return _layout.empty(y.shape, y), torch.empty_like(scale), torch.empty_like(scale)


@torch.library.custom_op("splat::radix_pool", mutates_args=())
def _radix_pool(y: Tensor, scale: Tensor, shift: Tensor, radix: int, groups: int, backend: str) -> Tensor:
    return _backend.call(backend, "radix_pool_forward", _torch_forward, y, scale, shift, radix, groups)


_radix_pool.register_fake(lambda *args: fake_forward(*args[:-1]))


@torch.library.custom_op("splat::radix_pool_backward", mutates_args=())
def _radix_pool_backward(
    dgap: Tensor, y: Tensor, scale: Tensor, shift: Tensor, radix: int, groups: int, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    return _backend.call(backend, "radix_pool_backward", _torch_backward, dgap, y, scale, shift, radix, groups)


_radix_pool_backward.register_fake(lambda *args: fake_backward(*args[:-1]))


def _setup_context(ctx, inputs, output):
    y, scale, shift, radix, groups, backend = inputs
    ctx.save_for_backward(y, scale, shift)
    ctx.radix, ctx.groups, ctx.backend = radix, groups, backend


def _backward(ctx, dgap):
    y, scale, shift = ctx.saved_tensors
    dy, dscale, dshift = _radix_pool_backward(dgap.contiguous(), y, scale, shift, ctx.radix, ctx.groups, ctx.backend)
    return dy, dscale, dshift, None, None, None


_radix_pool.register_autograd(_backward, setup_context=_setup_context)


def radix_pool(
    y: Tensor, scale: Tensor, shift: Tensor, radix: int, backend: str = "auto", groups: int = 1
) -> Tensor:
    """Pooled split-attention input: (B, R*C, H, W) conv output -> (B, C). See the module docstring."""
    C = _checks.conv_output(y, radix)
    _checks.divides(groups, C, "groups", "the channels per radix")
    _checks.channel_vector(scale, y, "scale")
    _checks.channel_vector(shift, y, "shift")
    backend = _backend.resolve(backend, y, "radix_pool")
    return _radix_pool(_layout.dense(y), scale.contiguous(), shift.contiguous(), radix, groups, backend)
