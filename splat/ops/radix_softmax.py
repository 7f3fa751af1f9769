"""``splat::radix_softmax``: fc2 logits to split-attention weights.

logits (B, R*C) are cardinal-major (element (k, r, j) at k*(R*C/K) + r*(C/K) + j, K the
cardinality); the weights (B, R*C) are radix-major (element (r, k, j) at r*C + k*(C/K) + j),
softmax over r for R > 1 and sigmoid for R == 1: the reference's
``x.view(B, K, R, -1).transpose(1, 2).softmax(1).reshape(B, -1)``. Under CUDA autocast the op
runs in float32, as ``torch.softmax`` does there.
"""

import torch
from torch import Tensor

from splat import _layout
from splat import backend as _backend
from splat.ops import _checks


def _to_cardinal_major(t: Tensor, radix: int, cardinality: int) -> Tensor:
    B, RC = t.shape
    return t.reshape(B, radix, cardinality, RC // (radix * cardinality)).transpose(1, 2).reshape(B, RC)


def _torch_forward(logits: Tensor, radix: int, cardinality: int) -> Tensor:
    x = logits.to(_layout.acc_dtype(logits.dtype))
    if radix == 1:
        return torch.sigmoid(x).to(logits.dtype)
    B, RC = x.shape
    a = x.reshape(B, cardinality, radix, RC // (radix * cardinality)).softmax(2)
    return a.transpose(1, 2).reshape(B, RC).to(logits.dtype)


def _torch_backward(dattn: Tensor, attn: Tensor, radix: int, cardinality: int) -> Tensor:
    acc = _layout.acc_dtype(attn.dtype)
    a, da = attn.to(acc), dattn.to(acc)
    if radix == 1:
        return (da * a * (1 - a)).to(attn.dtype)
    B, RC = a.shape
    a = a.reshape(B, radix, RC // radix)
    da = da.reshape(B, radix, RC // radix)
    dx = a * (da - (a * da).sum(1, keepdim=True))
    return _to_cardinal_major(dx.reshape(B, RC), radix, cardinality).to(attn.dtype)


@torch.library.custom_op("splat::radix_softmax", mutates_args=())
def _radix_softmax(logits: Tensor, radix: int, cardinality: int, backend: str) -> Tensor:
    return _backend.call(backend, "radix_softmax_forward", _torch_forward, logits, radix, cardinality)


def fake_forward(logits, radix, cardinality):
    """Shapes of the forward kernels (``splat_cuda::radix_softmax_forward`` shares it)."""
    return torch.empty_like(logits)


def fake_backward(dattn, attn, radix, cardinality):
    """Shapes of the backward kernels (``splat_cuda::radix_softmax_backward`` shares it)."""
    return torch.empty_like(attn)


_radix_softmax.register_fake(lambda *args: fake_forward(*args[:-1]))


@torch.library.custom_op("splat::radix_softmax_backward", mutates_args=())
def _radix_softmax_backward(dattn: Tensor, attn: Tensor, radix: int, cardinality: int, backend: str) -> Tensor:
    return _backend.call(backend, "radix_softmax_backward", _torch_backward, dattn, attn, radix, cardinality)


_radix_softmax_backward.register_fake(lambda *args: fake_backward(*args[:-1]))


def _setup_context(ctx, inputs, output):
    _, radix, cardinality, backend = inputs
    ctx.save_for_backward(output)
    ctx.radix, ctx.cardinality, ctx.backend = radix, cardinality, backend


def _backward(ctx, dattn):
    (attn,) = ctx.saved_tensors
    dlogits = _radix_softmax_backward(dattn.contiguous(), attn, ctx.radix, ctx.cardinality, ctx.backend)
    return dlogits, None, None, None


_radix_softmax.register_autograd(_backward, setup_context=_setup_context)
torch.library.register_autocast("splat::radix_softmax", "cuda", torch.float32)


def radix_softmax(logits: Tensor, radix: int, cardinality: int, backend: str = "auto") -> Tensor:
    """Attention weights (B, R*C) radix-major from fc2 logits (B, R*C) or (B, R*C, 1, 1)."""
    _checks.floating(logits, "logits")
    if logits.dim() == 4 and logits.shape[2:] == (1, 1):
        logits = logits.flatten(1)
    _checks.rank(logits, 2, "logits")
    _checks.divides(radix, logits.shape[1], "radix", "the channel count of logits")
    _checks.divides(cardinality, logits.shape[1] // radix, "cardinality", "the channels per radix")
    backend = _backend.resolve(backend, logits, "radix_softmax")
    return _radix_softmax(logits.contiguous(), radix, cardinality, backend)
