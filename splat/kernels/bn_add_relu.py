"""Triton kernels for ``splat::bn_add_relu``: out = relu(y * scale + shift + residual) per channel.

Forward: one elementwise pass (the batch statistics come from ``channel_stats``' kernels).
Backward, with g = dout where out > 0, else 0: per-(batch, H*W chunk) partials of sum g and
sum g*y, added in a fixed order by the launcher (no atomics); then one elementwise pass writing
dy = g * scale + gamma + delta * y and the residual's gradient g.
"""

import triton
import triton.language as tl

from splat import _layout
from splat.kernels._tiles import (
    hw_chunk, hw_splits, hw_tile, hw_tiles, launch, relu, strides, tile_offsets, tile_shape,
)


@triton.jit
def _bn_add_relu_forward_kernel(
    y_ptr, res_ptr, scale_ptr, shift_ptr, out_ptr, C, HW, TILES, stride_b, stride_c, stride_hw,
    HAS_RESIDUAL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    scale = tl.load(scale_ptr + c, mask=c_mask)
    shift = tl.load(shift_ptr + c, mask=c_mask)
    for t in range(TILES):
        hw = hw_tile(t, TILES, BLOCK_HW)
        mask = c_mask[:, None] & (hw < HW)[None, :]
        offs = tile_offsets(b, c, hw, stride_b, stride_c, stride_hw)
        pre = tl.load(y_ptr + offs, mask=mask, other=0.0).to(scale.dtype) * scale[:, None] + shift[:, None]
        if HAS_RESIDUAL:
            pre += tl.load(res_ptr + offs, mask=mask, other=0.0).to(scale.dtype)
        tl.store(out_ptr + offs, relu(pre), mask=mask)


@triton.jit
def _relu_grad(d, o):
    """dout where out > 0, else 0, as torch's ReLU backward (a NaN output passes dout)."""
    return tl.where(o <= 0, 0.0, d)


@triton.jit
def _bn_add_relu_backward_sums_kernel(
    dout_ptr, out_ptr, y_ptr, sum_g_ptr, sum_gy_ptr, C, HW, CHUNK, stride_b, stride_c, stride_hw,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    split, start, end = hw_chunk(CHUNK, HW)
    c_mask = c < C
    hw = tl.arange(0, BLOCK_HW)
    acc_dtype = sum_g_ptr.dtype.element_ty
    acc_g = tl.zeros([BLOCK_C, BLOCK_HW], dtype=acc_dtype)
    acc_gy = tl.zeros([BLOCK_C, BLOCK_HW], dtype=acc_dtype)
    for hw0 in range(start, end, BLOCK_HW):
        mask = c_mask[:, None] & (hw0 + hw < HW)[None, :]
        offs = tile_offsets(b, c, hw0 + hw, stride_b, stride_c, stride_hw)
        d = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(acc_dtype)
        o = tl.load(out_ptr + offs, mask=mask, other=0.0).to(acc_dtype)
        g = _relu_grad(d, o)
        acc_g += g
        acc_gy += g * tl.load(y_ptr + offs, mask=mask, other=0.0).to(acc_dtype)
    row = (b * tl.num_programs(2) + split) * C + c
    tl.store(sum_g_ptr + row, tl.sum(acc_g, axis=1), mask=c_mask)
    tl.store(sum_gy_ptr + row, tl.sum(acc_gy, axis=1), mask=c_mask)


@triton.jit
def _bn_add_relu_backward_dy_kernel(
    dout_ptr, out_ptr, y_ptr, scale_ptr, gamma_ptr, delta_ptr, dy_ptr, dres_ptr,
    C, HW, TILES, stride_b, stride_c, stride_hw,
    BATCH_STATS: tl.constexpr, RESIDUAL_GRAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    scale = tl.load(scale_ptr + c, mask=c_mask)
    if BATCH_STATS:
        gamma = tl.load(gamma_ptr + c, mask=c_mask)
        delta = tl.load(delta_ptr + c, mask=c_mask)
    for t in range(TILES):
        hw = hw_tile(t, TILES, BLOCK_HW)
        mask = c_mask[:, None] & (hw < HW)[None, :]
        offs = tile_offsets(b, c, hw, stride_b, stride_c, stride_hw)
        d = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(scale.dtype)
        g = _relu_grad(d, tl.load(out_ptr + offs, mask=mask, other=0.0).to(scale.dtype))
        dy = g * scale[:, None]
        if BATCH_STATS:
            dy += gamma[:, None] + delta[:, None] * tl.load(y_ptr + offs, mask=mask, other=0.0).to(scale.dtype)
        tl.store(dy_ptr + offs, dy, mask=mask)
        if RESIDUAL_GRAD:
            tl.store(dres_ptr + offs, g, mask=mask)


def bn_add_relu_forward(y, residual, scale, shift):
    """y (B, C, H, W) dense, residual None or y's shape and strides, scale and shift (C,) -> out like y."""
    B, C, H, W = y.shape
    out = _layout.empty(y.shape, y)
    if out.numel() == 0:
        return out
    block_c, block_hw = tile_shape(y, C, reduce_hw=False)
    programs, tiles = hw_tiles(y, block_hw)
    # Without a residual its pointer is never read (a constexpr flag): y stands in for it.
    _bn_add_relu_forward_kernel[(B, triton.cdiv(C, block_c), programs)](
        y, y if residual is None else residual, scale, shift, out, C, H * W, tiles, *strides(y),
        HAS_RESIDUAL=residual is not None, BLOCK_C=block_c, BLOCK_HW=block_hw, **launch(block_c, block_hw),
    )
    return out


def bn_add_relu_backward_sums(dout, out, y):
    """dout, out, y (B, C, H, W) in one layout -> sum g, sum g*y (C,) in the accumulation dtype."""
    B, C, H, W = y.shape
    acc = _layout.acc_dtype(y.dtype)
    block_c, block_hw = tile_shape(y, C, reduce_hw=True)
    splits, chunk = hw_splits(y, B * triton.cdiv(C, block_c), block_hw)
    partial_g = _layout.empty((B * splits, C), y, dtype=acc)
    partial_gy = _layout.empty((B * splits, C), y, dtype=acc)
    if B > 0:
        _bn_add_relu_backward_sums_kernel[(B, triton.cdiv(C, block_c), splits)](
            dout, out, y, partial_g, partial_gy, C, H * W, chunk, *strides(y),
            BLOCK_C=block_c, BLOCK_HW=block_hw, **launch(block_c, block_hw),
        )
    return partial_g.sum(0), partial_gy.sum(0)


def bn_add_relu_backward_dy(dout, out, y, scale, gamma, delta, residual_grad):
    """dout, out, y (B, C, H, W) in one layout; scale (C,); gamma, delta (C,), or empty without
    batch statistics -> dy (like y) and, with ``residual_grad``, the residual's gradient (like y;
    else empty)."""
    B, C, H, W = y.shape
    batch_stats = gamma.numel() > 0
    scale, gamma, delta = scale.contiguous(), gamma.contiguous(), delta.contiguous()
    dy = _layout.empty(y.shape, y)
    dres = _layout.empty(y.shape, y) if residual_grad else y.new_empty(0)
    if y.numel() == 0:
        return dy, dres
    block_c, block_hw = tile_shape(y, C, reduce_hw=False)
    programs, tiles = hw_tiles(y, block_hw)
    # Absent inputs are never read (constexpr flags): any tensor stands in for their pointers.
    _bn_add_relu_backward_dy_kernel[(B, triton.cdiv(C, block_c), programs)](
        dout, out, y, scale, gamma if batch_stats else scale, delta if batch_stats else scale, dy,
        dres if residual_grad else dy, C, H * W, tiles, *strides(y),
        BATCH_STATS=batch_stats, RESIDUAL_GRAD=residual_grad, BLOCK_C=block_c, BLOCK_HW=block_hw,
        **launch(block_c, block_hw),
    )
    return dy, dres
