"""Triton kernels for ``splat::channel_stats``: per-channel batch mean and biased variance.

Each program computes the mean and sum of squared deviations of its (b, channel-block) slab in
two passes (the second from cache), never E[y^2] - E[y]^2, which cancels catastrophically when
|mean| >> std. The B partials per channel are combined with Chan's formula in a fixed order.
Backward: dy = (dmean + 2 * dvar * (y - mean)) / N, N = B*H*W.

The kernels divide by the integer counts rather than take reciprocals as arguments: Triton passes a
Python float as float32, which would cost float64 data its precision (1/15 is off by 1e-9).
"""

import triton
import triton.language as tl

from splat import _layout
from splat.kernels._tiles import strides, tile_offsets, tile_shape


@triton.jit
def _channel_stats_forward_kernel(
    y_ptr, mean_ptr, m2_ptr, C, HW, stride_yb, stride_yc, stride_yhw,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    hw = tl.arange(0, BLOCK_HW)
    acc_dtype = mean_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=acc_dtype)
    for hw0 in range(0, HW, BLOCK_HW):
        mask = c_mask[:, None] & (hw0 + hw < HW)[None, :]
        offs = tile_offsets(b, c, hw0 + hw, stride_yb, stride_yc, stride_yhw)
        acc += tl.load(y_ptr + offs, mask=mask, other=0.0).to(acc_dtype)
    mean = tl.sum(acc, axis=1) / HW
    acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=acc_dtype)
    for hw0 in range(0, HW, BLOCK_HW):
        mask = c_mask[:, None] & (hw0 + hw < HW)[None, :]
        offs = tile_offsets(b, c, hw0 + hw, stride_yb, stride_yc, stride_yhw)
        dev = tl.load(y_ptr + offs, mask=mask, other=0.0).to(acc_dtype) - mean[:, None]
        acc += tl.where(mask, dev * dev, 0.0)
    tl.store(mean_ptr + b * C + c, mean, mask=c_mask)
    tl.store(m2_ptr + b * C + c, tl.sum(acc, axis=1), mask=c_mask)


@triton.jit
def _channel_stats_backward_kernel(
    dmean_ptr, dvar_ptr, y_ptr, mean_ptr, dy_ptr, C, HW, N, stride_yb, stride_yc, stride_yhw,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = tl.program_id(2) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c_mask = c < C
    mask = c_mask[:, None] & (hw < HW)[None, :]
    dmean = tl.load(dmean_ptr + c, mask=c_mask) / N
    dvar = tl.load(dvar_ptr + c, mask=c_mask) / N
    mean = tl.load(mean_ptr + c, mask=c_mask)
    offs = tile_offsets(b, c, hw, stride_yb, stride_yc, stride_yhw)
    v = tl.load(y_ptr + offs, mask=mask, other=0.0).to(mean.dtype)
    dy = dmean[:, None] + 2.0 * dvar[:, None] * (v - mean[:, None])
    tl.store(dy_ptr + offs, dy, mask=mask)


def channel_stats_forward(y):
    """y (B, C, H, W) dense -> (mean, biased var), each (C,) in the accumulation dtype."""
    B, C, H, W = y.shape
    acc = _layout.acc_dtype(y.dtype)
    partial_mean = _layout.empty((B, C), y, dtype=acc)
    partial_m2 = _layout.empty((B, C), y, dtype=acc)
    if B > 0:
        block_c, block_hw = tile_shape(y, C, reduce_hw=True)
        _channel_stats_forward_kernel[(B, triton.cdiv(C, block_c))](
            y, partial_mean, partial_m2, C, H * W, *strides(y),
            BLOCK_C=block_c, BLOCK_HW=block_hw,
        )
    mean = partial_mean.mean(0)
    m2 = partial_m2.sum(0) + (partial_mean - mean).square().sum(0) * (H * W)
    return mean, m2 / (B * H * W)


def channel_stats_backward(dmean, dvar, y, mean):
    """dmean, dvar, mean (C,) -> dy (like y)."""
    B, C, H, W = y.shape
    dy = _layout.empty(y.shape, y)
    if B > 0:
        block_c, block_hw = tile_shape(y, C, reduce_hw=False)
        grid = (B, triton.cdiv(C, block_c), triton.cdiv(H * W, block_hw))
        _channel_stats_backward_kernel[grid](
            dmean, dvar, y, mean, dy, C, H * W, B * H * W, *strides(y),
            BLOCK_C=block_c, BLOCK_HW=block_hw,
        )
    return dy
