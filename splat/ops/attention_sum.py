"""``splat::attention_sum``: the attention-weighted sum over radix of the activated conv output.

    out[b, c, hw] = sum_r attn[b, r*C + c] * relu(y[b, r*C + c, hw] * scale[r*C + c] + shift[r*C + c])

y (B, R*C, H, W) is the conv output (radix-major, NCHW or NHWC), scale and shift (R*C,) a folded
BatchNorm in the accumulation dtype, attn (B, R*C) radix-major weights. out is (B, C, H, W) in
y's layout, of dtype promote(y.dtype, attn.dtype). BN + ReLU are recomputed, never stored.

``groups`` K (1 in ResNeSt) orders y's channels (k, r, j) instead: channel (r, c = k*C/K + j) of the
formula is y's k*(R*C/K) + r*(C/K) + j, and likewise for scale, shift and attn -- the natural
output order of one grouped conv (K groups) that computes all R branches, as in SKNet.
"""

import torch
from torch import Tensor

from splat import _layout
from splat import backend as _backend
from splat.ops import _checks


def _activate(y: Tensor, scale: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    y_acc = y.to(scale.dtype)
    return y_acc, y_acc * scale[:, None, None] + shift[:, None, None]


def _torch_forward(y: Tensor, scale: Tensor, shift: Tensor, attn: Tensor, radix: int, groups: int) -> Tensor:
    B, RC, H, W = y.shape
    _, pre = _activate(y, scale, shift)
    weighted = torch.relu(pre) * attn.to(scale.dtype)[:, :, None, None]
    out = weighted.reshape(B, groups, radix, RC // (radix * groups), H, W).sum(2).reshape(B, RC // radix, H, W)
    dtype = torch.promote_types(y.dtype, attn.dtype)
    return out.to(dtype).contiguous(memory_format=_layout.memory_format(y))


def _torch_backward(dout: Tensor, y: Tensor, scale: Tensor, shift: Tensor, attn: Tensor, radix: int, groups: int):
    y_acc, pre = _activate(y, scale, shift)
    B, RC, H, W = y.shape
    d = dout.to(scale.dtype).reshape(B, groups, 1, RC // (radix * groups), H, W)
    d = d.expand(B, groups, radix, RC // (radix * groups), H, W).reshape(B, RC, H, W)
    gm = d * attn.to(scale.dtype)[:, :, None, None] * (pre > 0)
    dy = (gm * scale[:, None, None]).to(y.dtype).contiguous(memory_format=_layout.memory_format(y))
    dattn = (d * torch.relu(pre)).sum((2, 3)).to(attn.dtype)
    return dy, (gm * y_acc).sum((0, 2, 3)), gm.sum((0, 2, 3)), dattn


def fake_forward(y, scale, shift, attn, radix, groups):
    """Shapes of the forward kernels (``splat_cuda::attention_sum_forward`` shares it)."""
    B, RC, H, W = y.shape
    return _layout.empty((B, RC // radix, H, W), y, dtype=torch.promote_types(y.dtype, attn.dtype))


def fake_backward(dout, y, scale, shift, attn, radix, groups):
    """Shapes of the backward kernels (``splat_cuda::attention_sum_backward`` shares it)."""
    return _layout.empty(y.shape, y), torch.empty_like(scale), torch.empty_like(scale), torch.empty_like(attn)


@torch.library.custom_op("splat::attention_sum", mutates_args=())
def _attention_sum(
    y: Tensor, scale: Tensor, shift: Tensor, attn: Tensor, radix: int, groups: int, backend: str
) -> Tensor:
    return _backend.call(backend, "attention_sum_forward", _torch_forward, y, scale, shift, attn, radix, groups)


_attention_sum.register_fake(lambda *args: fake_forward(*args[:-1]))


@torch.library.custom_op("splat::attention_sum_backward", mutates_args=())
def _attention_sum_backward(
    dout: Tensor, y: Tensor, scale: Tensor, shift: Tensor, attn: Tensor, radix: int, groups: int, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _backend.call(
        backend, "attention_sum_backward", _torch_backward, dout, y, scale, shift, attn, radix, groups
    )


_attention_sum_backward.register_fake(lambda *args: fake_backward(*args[:-1]))


def _setup_context(ctx, inputs, output):
    y, scale, shift, attn, radix, groups, backend = inputs
    ctx.save_for_backward(y, scale, shift, attn)
    ctx.radix, ctx.groups, ctx.backend = radix, groups, backend


def _backward(ctx, dout):
    y, scale, shift, attn = ctx.saved_tensors
    dout = dout.contiguous(memory_format=_layout.memory_format(y))
    dy, dscale, dshift, dattn = _attention_sum_backward(
        dout, y, scale, shift, attn, ctx.radix, ctx.groups, ctx.backend
    )
    return dy, dscale, dshift, dattn, None, None, None


_attention_sum.register_autograd(_backward, setup_context=_setup_context)


def attention_sum(
    y: Tensor, scale: Tensor, shift: Tensor, attn: Tensor, radix: int, backend: str = "auto", groups: int = 1
) -> Tensor:
    """Split-attention output (B, C, H, W) from the conv output and weights. See the module docstring."""
    C = _checks.conv_output(y, radix)
    _checks.divides(groups, C, "groups", "the channels per radix")
    _checks.channel_vector(scale, y, "scale")
    _checks.channel_vector(shift, y, "shift")
    _checks.batch_rows(attn, y, radix * C, "attn")
    backend = _backend.resolve(backend, y, "attention_sum")
    return _attention_sum(
        _layout.dense(y), scale.contiguous(), shift.contiguous(), attn.contiguous(), radix, groups, backend
    )
