"""Triton kernels for ``splat::channel_stats``: per-channel batch mean and biased variance.

Each program computes the mean and sum of squared deviations of its (b, channel block, H*W chunk)
slab in two passes (the second from cache), never E[y^2] - E[y]^2, which cancels catastrophically
when |mean| >> std. A second kernel combines the partials of each channel in a fixed order:
mean = sum_p n_p mean_p / N, then m2 = sum_p m2_p + n_p (mean_p - mean)^2.
Backward: dy = (dmean + 2 * dvar * (y - mean)) / N, N = B*H*W.

The kernels divide by the integer counts rather than take reciprocals as arguments: Triton passes a
Python float as float32, which would cost float64 data its precision (1/15 is off by 1e-9).
"""

import triton
import triton.language as tl

from splat import _layout
from splat.kernels._tiles import hw_chunk, hw_splits, hw_tile, hw_tiles, launch, strides, tile_offsets, tile_shape

_MERGE_BLOCK_R = 16
_MERGE_BLOCK_C = 64


@triton.jit
def _channel_stats_forward_kernel(
    y_ptr, mean_ptr, m2_ptr, C, HW, CHUNK, stride_yb, stride_yc, stride_yhw,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    split, start, end = hw_chunk(CHUNK, HW)
    c_mask = c < C
    hw = tl.arange(0, BLOCK_HW)
    acc_dtype = mean_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=acc_dtype)
    for hw0 in range(start, end, BLOCK_HW):
        mask = c_mask[:, None] & (hw0 + hw < HW)[None, :]
        offs = tile_offsets(b, c, hw0 + hw, stride_yb, stride_yc, stride_yhw)
        acc += tl.load(y_ptr + offs, mask=mask, other=0.0).to(acc_dtype)
    mean = tl.sum(acc, axis=1) / (end - start)
    acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=acc_dtype)
    for hw0 in range(start, end, BLOCK_HW):
        mask = c_mask[:, None] & (hw0 + hw < HW)[None, :]
        offs = tile_offsets(b, c, hw0 + hw, stride_yb, stride_yc, stride_yhw)
        dev = tl.load(y_ptr + offs, mask=mask, other=0.0).to(acc_dtype) - mean[:, None]
        acc += tl.where(mask, dev * dev, 0.0)
    row = b * tl.num_programs(2) + split
    tl.store(mean_ptr + row * C + c, mean, mask=c_mask)
    tl.store(m2_ptr + row * C + c, tl.sum(acc, axis=1), mask=c_mask)


@triton.jit
def _chunk_pixels(row, SPLITS, CHUNK, HW):
    """Pixels in the H*W chunk of partial ``row`` (batch item row // SPLITS, chunk row % SPLITS)."""
    return tl.minimum(CHUNK, HW - (row % SPLITS).to(tl.int64) * CHUNK)


@triton.jit
def _channel_stats_merge_kernel(
    mean_part_ptr, m2_part_ptr, mean_ptr, var_ptr, ROWS, SPLITS, C, HW, CHUNK, N,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    rows = tl.arange(0, BLOCK_R)
    acc_dtype = mean_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=acc_dtype)
    for r0 in range(0, ROWS, BLOCK_R):
        r = r0 + rows
        n = _chunk_pixels(r, SPLITS, CHUNK, HW).to(acc_dtype)
        mask = (r < ROWS)[:, None] & c_mask[None, :]
        part = tl.load(mean_part_ptr + r.to(tl.int64)[:, None] * C + c[None, :], mask=mask, other=0.0)
        acc += n[:, None] * part
    mean = tl.sum(acc, axis=0) / N
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=acc_dtype)
    for r0 in range(0, ROWS, BLOCK_R):
        r = r0 + rows
        n = _chunk_pixels(r, SPLITS, CHUNK, HW).to(acc_dtype)
        mask = (r < ROWS)[:, None] & c_mask[None, :]
        offs = r.to(tl.int64)[:, None] * C + c[None, :]
        dev = tl.load(mean_part_ptr + offs, mask=mask, other=0.0) - mean[None, :]
        acc += tl.where(mask, tl.load(m2_part_ptr + offs, mask=mask, other=0.0) + n[:, None] * dev * dev, 0.0)
    tl.store(mean_ptr + c, mean, mask=c_mask)
    tl.store(var_ptr + c, tl.sum(acc, axis=0) / N, mask=c_mask)


@triton.jit
def _channel_stats_backward_kernel(
    dmean_ptr, dvar_ptr, y_ptr, mean_ptr, dy_ptr, C, HW, N, TILES, stride_yb, stride_yc, stride_yhw,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    dmean = tl.load(dmean_ptr + c, mask=c_mask) / N
    dvar = tl.load(dvar_ptr + c, mask=c_mask) / N
    mean = tl.load(mean_ptr + c, mask=c_mask)
    for t in range(TILES):
        hw = hw_tile(t, TILES, BLOCK_HW)
        mask = c_mask[:, None] & (hw < HW)[None, :]
        offs = tile_offsets(b, c, hw, stride_yb, stride_yc, stride_yhw)
        v = tl.load(y_ptr + offs, mask=mask, other=0.0).to(mean.dtype)
        dy = dmean[:, None] + 2.0 * dvar[:, None] * (v - mean[:, None])
        tl.store(dy_ptr + offs, dy, mask=mask)


def channel_stats_forward(y):
    """y (B, C, H, W) dense -> (mean, biased var), each (C,) in the accumulation dtype."""
    B, C, H, W = y.shape
    acc = _layout.acc_dtype(y.dtype)
    mean, var = _layout.empty((C,), y, dtype=acc), _layout.empty((C,), y, dtype=acc)
    block_c, block_hw = tile_shape(y, C, reduce_hw=True)
    splits, chunk = hw_splits(y, B * triton.cdiv(C, block_c), block_hw)
    partial_mean = _layout.empty((B * splits, C), y, dtype=acc)
    partial_m2 = _layout.empty((B * splits, C), y, dtype=acc)
    if B > 0:
        _channel_stats_forward_kernel[(B, triton.cdiv(C, block_c), splits)](
            y, partial_mean, partial_m2, C, H * W, chunk, *strides(y),
            BLOCK_C=block_c, BLOCK_HW=block_hw, **launch(block_c, block_hw),
        )
    _channel_stats_merge_kernel[(triton.cdiv(C, _MERGE_BLOCK_C),)](
        partial_mean, partial_m2, mean, var, B * splits, splits, C, H * W, chunk, B * H * W,
        BLOCK_R=_MERGE_BLOCK_R, BLOCK_C=_MERGE_BLOCK_C, **launch(_MERGE_BLOCK_R, _MERGE_BLOCK_C),
    )
    return mean, var


def channel_stats_backward(dmean, dvar, y, mean):
    """dmean, dvar, mean (C,) -> dy (like y)."""
    B, C, H, W = y.shape
    dy = _layout.empty(y.shape, y)
    if B > 0:
        block_c, block_hw = tile_shape(y, C, reduce_hw=False)
        programs, tiles = hw_tiles(y, block_hw)
        _channel_stats_backward_kernel[(B, triton.cdiv(C, block_c), programs)](
            dmean, dvar, y, mean, dy, C, H * W, B * H * W, tiles, *strides(y),
            BLOCK_C=block_c, BLOCK_HW=block_hw, **launch(block_c, block_hw),
        )
    return dy
