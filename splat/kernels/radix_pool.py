"""Triton kernels for ``splat::radix_pool``: BN affine + ReLU + sum over radix + global average pool.

Forward:  gap[b, c] = 1/HW * sum_r sum_hw relu(y[b, r*C + c, hw] * scale[r*C + c] + shift[r*C + c])
(radix-major y; with ``groups`` K > 1 channel (r, c = k*C/K + j) of y is k*R*C/K + r*C/K + j.)
Backward: dy = g * [pre > 0] * scale with g = dgap[b, c] / HW; dscale and dshift reduce over
(b, hw) through per-(batch, H*W chunk) partials, so the result does not depend on scheduling.
Where B x channel blocks would leave SMs idle, programs split H*W (``hw_splits``); the forward's
partial means are then added up by the launcher.
"""

import triton
import triton.language as tl

from splat import _layout
from splat.kernels._tiles import bn_relu, hw_chunk, hw_splits, launch, strides, tile_offsets, tile_shape


@triton.jit
def _radix_pool_forward_kernel(
    y_ptr, scale_ptr, shift_ptr, gap_ptr,
    C, HW, CHUNK, R, CG, stride_yb, stride_yc, stride_yhw,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    split, start, end = hw_chunk(CHUNK, HW)
    row = b * tl.num_programs(2) + split
    c_mask = c < C
    k = c // CG
    c0 = k * (R * CG) + (c - k * CG)
    hw = tl.arange(0, BLOCK_HW)
    acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=scale_ptr.dtype.element_ty)
    for r in range(R):
        ch = c0 + r * CG
        scale = tl.load(scale_ptr + ch, mask=c_mask)
        shift = tl.load(shift_ptr + ch, mask=c_mask)
        for hw0 in range(start, end, BLOCK_HW):
            mask = c_mask[:, None] & (hw0 + hw < HW)[None, :]
            offs = tile_offsets(b, ch, hw0 + hw, stride_yb, stride_yc, stride_yhw)
            v = tl.load(y_ptr + offs, mask=mask, other=0.0).to(acc.dtype)
            act, _ = bn_relu(v, scale, shift)
            acc += tl.where(mask, act, 0.0)
    gap = tl.sum(acc, axis=1) / HW  # not a float argument: Triton would pass it as float32
    tl.store(gap_ptr + row * C + c, gap, mask=c_mask)


@triton.jit
def _radix_pool_backward_kernel(
    dgap_ptr, y_ptr, scale_ptr, shift_ptr, dy_ptr, dscale_ptr, dshift_ptr,
    C, HW, CHUNK, R, CG, stride_yb, stride_yc, stride_yhw,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    split, start, end = hw_chunk(CHUNK, HW)
    row = b * tl.num_programs(2) + split
    c_mask = c < C
    k = c // CG
    c0 = k * (R * CG) + (c - k * CG)
    hw = tl.arange(0, BLOCK_HW)
    acc_dtype = scale_ptr.dtype.element_ty
    g = tl.load(dgap_ptr + b * C + c, mask=c_mask, other=0.0).to(acc_dtype) / HW
    for r in range(R):
        ch = c0 + r * CG
        scale = tl.load(scale_ptr + ch, mask=c_mask)
        shift = tl.load(shift_ptr + ch, mask=c_mask)
        acc_scale = tl.zeros([BLOCK_C, BLOCK_HW], dtype=acc_dtype)
        acc_shift = tl.zeros([BLOCK_C, BLOCK_HW], dtype=acc_dtype)
        for hw0 in range(start, end, BLOCK_HW):
            mask = c_mask[:, None] & (hw0 + hw < HW)[None, :]
            offs = tile_offsets(b, ch, hw0 + hw, stride_yb, stride_yc, stride_yhw)
            v = tl.load(y_ptr + offs, mask=mask, other=0.0).to(acc_dtype)
            _, pos = bn_relu(v, scale, shift)
            gm = tl.where(pos & mask, g[:, None], 0.0)
            tl.store(dy_ptr + offs, gm * scale[:, None], mask=mask)
            acc_scale += gm * v
            acc_shift += gm
        tl.store(dscale_ptr + row * C * R + ch, tl.sum(acc_scale, axis=1), mask=c_mask)
        tl.store(dshift_ptr + row * C * R + ch, tl.sum(acc_shift, axis=1), mask=c_mask)


def radix_pool_forward(y, scale, shift, radix, groups):
    """y (B, R*C, H, W) dense NCHW/NHWC; scale, shift (R*C,) acc dtype -> gap (B, C) in y.dtype.

    ``groups``: y's channels are ordered (k, r, j), k < groups (1: radix-major).
    """
    B, RC, H, W = y.shape
    C = RC // radix
    block_c, block_hw = tile_shape(y, C, reduce_hw=True)
    splits, chunk = hw_splits(y, B * triton.cdiv(C, block_c), block_hw)
    # Split, each program writes its chunk's share of the mean in the accumulation dtype.
    gap = _layout.empty((B, C), y) if splits == 1 else _layout.empty((B, splits, C), scale)
    if B > 0:
        _radix_pool_forward_kernel[(B, triton.cdiv(C, block_c), splits)](
            y, scale, shift, gap, C, H * W, chunk, radix, C // groups, *strides(y),
            BLOCK_C=block_c, BLOCK_HW=block_hw, **launch(block_c, block_hw),
        )
    return gap if splits == 1 else gap.sum(1).to(y.dtype)


def radix_pool_backward(dgap, y, scale, shift, radix, groups):
    """dgap (B, C) -> dy (like y), dscale (R*C,), dshift (R*C,) in scale's dtype."""
    B, RC, H, W = y.shape
    C = RC // radix
    block_c, block_hw = tile_shape(y, C, reduce_hw=True)
    splits, chunk = hw_splits(y, B * triton.cdiv(C, block_c), block_hw)
    dy = _layout.empty(y.shape, y)
    partial_scale = _layout.empty((B * splits, RC), scale)
    partial_shift = _layout.empty((B * splits, RC), scale)
    if B > 0:
        _radix_pool_backward_kernel[(B, triton.cdiv(C, block_c), splits)](
            dgap, y, scale, shift, dy, partial_scale, partial_shift,
            C, H * W, chunk, radix, C // groups, *strides(y),
            BLOCK_C=block_c, BLOCK_HW=block_hw, **launch(block_c, block_hw, per_thread=16),
        )
    return dy, partial_scale.sum(0), partial_shift.sum(0)
