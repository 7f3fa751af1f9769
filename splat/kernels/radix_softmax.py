"""Triton kernels for ``splat::radix_softmax``: fc2 logits to attention weights.

logits (B, R*C) are cardinal-major, element (k, r, j) at k*(R*C/K) + r*(C/K) + j; the weights
are radix-major, element (r, k, j) at r*C + k*(C/K) + j. Softmax over r for R > 1, sigmoid for
R == 1. A program owns one batch row and BLOCK_C channels, all R values of each in one tile.
"""

import triton
import triton.language as tl

from splat import _layout
from splat.kernels._tiles import launch


@triton.jit
def _gather_offsets(C, CK, R, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    r = tl.arange(0, BLOCK_R)
    k = c // CK
    logit_offs = k[None, :] * (R * CK) + r[:, None] * CK + (c - k * CK)[None, :]
    attn_offs = r[:, None] * C + c[None, :]
    r_mask = r < R
    mask = r_mask[:, None] & (c < C)[None, :]
    return logit_offs, attn_offs, r_mask, mask


@triton.jit
def _radix_softmax_forward_kernel(
    logits_ptr, attn_ptr, C, CK, R,
    SIGMOID: tl.constexpr, IS_F64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    logit_offs, attn_offs, r_mask, mask = _gather_offsets(C, CK, R, BLOCK_R, BLOCK_C)
    x = tl.load(logits_ptr + b * C * R + logit_offs, mask=mask, other=0.0)
    x = x.to(tl.float64) if IS_F64 else x.to(tl.float32)
    if SIGMOID:
        # exp of -|x| only: no overflow for logits of any size.
        e = tl.exp(-tl.abs(x))
        a = tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    else:
        x = tl.where(r_mask[:, None], x, float("-inf"))
        e = tl.exp(x - tl.max(x, axis=0)[None, :])
        a = e / tl.sum(e, axis=0)[None, :]
    tl.store(attn_ptr + b * C * R + attn_offs, a, mask=mask)


@triton.jit
def _radix_softmax_backward_kernel(
    dattn_ptr, attn_ptr, dlogits_ptr, C, CK, R,
    SIGMOID: tl.constexpr, IS_F64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    logit_offs, attn_offs, _, mask = _gather_offsets(C, CK, R, BLOCK_R, BLOCK_C)
    a = tl.load(attn_ptr + b * C * R + attn_offs, mask=mask, other=0.0)
    da = tl.load(dattn_ptr + b * C * R + attn_offs, mask=mask, other=0.0)
    a = a.to(tl.float64) if IS_F64 else a.to(tl.float32)
    da = da.to(a.dtype)
    if SIGMOID:
        dx = da * a * (1.0 - a)
    else:
        dx = a * (da - tl.sum(a * da, axis=0)[None, :])
    tl.store(dlogits_ptr + b * C * R + logit_offs, dx, mask=mask)


def _launch(kernel, B, RC, radix, cardinality, dtype, *tensors):
    if B * RC == 0:  # no programs to run, and a block of next_power_of_2(0) = 0 channels
        return
    C = RC // radix
    block_r = triton.next_power_of_2(radix)
    block_c = min(triton.next_power_of_2(C), max(16, 2048 // block_r))
    kernel[(B, triton.cdiv(C, block_c))](
        *tensors, C, C // cardinality, radix,
        SIGMOID=radix == 1, IS_F64=dtype.itemsize == 8, BLOCK_R=block_r, BLOCK_C=block_c,
        **launch(block_r, block_c),
    )


def radix_softmax_forward(logits, radix, cardinality):
    """logits (B, R*C) cardinal-major -> attention weights (B, R*C) radix-major, same dtype."""
    attn = _layout.empty(logits.shape, logits)
    _launch(_radix_softmax_forward_kernel, *logits.shape, radix, cardinality, logits.dtype, logits, attn)
    return attn


def radix_softmax_backward(dattn, attn, radix, cardinality):
    """dattn, attn (B, R*C) radix-major -> dlogits (B, R*C) cardinal-major, attn's dtype."""
    dlogits = _layout.empty(attn.shape, attn)
    _launch(_radix_softmax_backward_kernel, *attn.shape, radix, cardinality, attn.dtype, dattn, attn, dlogits)
    return dlogits
