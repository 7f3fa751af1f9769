"""Triton kernels for ``splat::attention_sum``: the attention-weighted sum over radix.

Forward:  out[b, c, hw] = sum_r attn[b, r*C + c] * relu(y[b, r*C + c, hw] * scale + shift),
recomputing BN + ReLU from the conv output instead of storing the activated tensor.
Backward: dy = dout * attn * [pre > 0] * scale; dattn[b, ch] = sum_hw dout * relu(pre);
dscale and dshift through per-(batch, H*W chunk) partials (no atomics, so runs are bitwise
repeatable; ``hw_splits`` says when programs split H*W).
With ``groups`` K > 1, y's and attn's channel (r, c = k*C/K + j) is k*R*C/K + r*C/K + j.
"""

import torch
import triton
import triton.language as tl

from splat import _layout
from splat.kernels._tiles import (
    bn_relu, hw_chunk, hw_splits, hw_tile, hw_tiles, launch, strides, tile_offsets, tile_shape,
)


@triton.jit
def _attention_sum_forward_kernel(
    y_ptr, scale_ptr, shift_ptr, attn_ptr, out_ptr,
    C, HW, R, CG, TILES, stride_yb, stride_yc, stride_yhw, stride_ob, stride_oc, stride_ohw,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    k = c // CG
    c0 = k * (R * CG) + (c - k * CG)
    for t in range(TILES):
        hw = hw_tile(t, TILES, BLOCK_HW)
        mask = c_mask[:, None] & (hw < HW)[None, :]
        acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=scale_ptr.dtype.element_ty)
        for r in range(R):
            ch = c0 + r * CG
            scale = tl.load(scale_ptr + ch, mask=c_mask)
            shift = tl.load(shift_ptr + ch, mask=c_mask)
            a = tl.load(attn_ptr + b * C * R + ch, mask=c_mask, other=0.0).to(acc.dtype)
            offs = tile_offsets(b, ch, hw, stride_yb, stride_yc, stride_yhw)
            v = tl.load(y_ptr + offs, mask=mask, other=0.0).to(acc.dtype)
            act, _ = bn_relu(v, scale, shift)
            acc += a[:, None] * act
        out_offs = tile_offsets(b, c, hw, stride_ob, stride_oc, stride_ohw)
        tl.store(out_ptr + out_offs, acc, mask=mask)


@triton.jit
def _attention_sum_backward_kernel(
    dout_ptr, y_ptr, scale_ptr, shift_ptr, attn_ptr, dy_ptr, dscale_ptr, dshift_ptr, dattn_ptr,
    sum_my_ptr, sum_m_ptr,
    C, HW, CHUNK, R, CG, stride_yb, stride_yc, stride_yhw, stride_ob, stride_oc, stride_ohw,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, WRITE_DY: tl.constexpr, MASK_SUMS: tl.constexpr,
):
    # WRITE_DY=False, MASK_SUMS=True is the first backward pass of splat::split_attention: no dy,
    # and per (b, channel) sums of m*y and m (m = [pre > 0]) instead.
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    split, start, end = hw_chunk(CHUNK, HW)
    c_mask = c < C
    k = c // CG
    c0 = k * (R * CG) + (c - k * CG)
    hw = tl.arange(0, BLOCK_HW)
    acc_dtype = scale_ptr.dtype.element_ty
    # r outer, hw inner: the dout slab of this program is re-read R times while it is hot in L2.
    for r in range(R):
        ch = c0 + r * CG
        scale = tl.load(scale_ptr + ch, mask=c_mask)
        shift = tl.load(shift_ptr + ch, mask=c_mask)
        a = tl.load(attn_ptr + b * C * R + ch, mask=c_mask, other=0.0).to(acc_dtype)
        acc_scale = tl.zeros([BLOCK_C, BLOCK_HW], dtype=acc_dtype)
        acc_shift = tl.zeros([BLOCK_C, BLOCK_HW], dtype=acc_dtype)
        acc_attn = tl.zeros([BLOCK_C, BLOCK_HW], dtype=acc_dtype)
        acc_my = tl.zeros([BLOCK_C, BLOCK_HW], dtype=acc_dtype)
        acc_m = tl.zeros([BLOCK_C, BLOCK_HW], dtype=acc_dtype)
        for hw0 in range(start, end, BLOCK_HW):
            mask = c_mask[:, None] & (hw0 + hw < HW)[None, :]
            offs = tile_offsets(b, ch, hw0 + hw, stride_yb, stride_yc, stride_yhw)
            out_offs = tile_offsets(b, c, hw0 + hw, stride_ob, stride_oc, stride_ohw)
            v = tl.load(y_ptr + offs, mask=mask, other=0.0).to(acc_dtype)
            d = tl.load(dout_ptr + out_offs, mask=mask, other=0.0).to(acc_dtype)
            act, pos = bn_relu(v, scale, shift)
            gm = tl.where(pos, d * a[:, None], 0.0)
            if WRITE_DY:
                tl.store(dy_ptr + offs, gm * scale[:, None], mask=mask)
            if MASK_SUMS:
                acc_my += tl.where(pos, v, 0.0)
                acc_m += tl.where(pos & mask, 1.0, 0.0)
            acc_scale += gm * v
            acc_shift += gm
            acc_attn += d * act
        row = (b * tl.num_programs(2) + split) * C * R + ch
        tl.store(dscale_ptr + row, tl.sum(acc_scale, axis=1), mask=c_mask)
        tl.store(dshift_ptr + row, tl.sum(acc_shift, axis=1), mask=c_mask)
        tl.store(dattn_ptr + row, tl.sum(acc_attn, axis=1), mask=c_mask)
        if MASK_SUMS:
            tl.store(sum_my_ptr + row, tl.sum(acc_my, axis=1), mask=c_mask)
            tl.store(sum_m_ptr + row, tl.sum(acc_m, axis=1), mask=c_mask)


def attention_sum_forward(y, scale, shift, attn, radix, groups):
    """y (B, R*C, H, W), attn (B, R*C) radix-major -> out (B, C, H, W) in y's layout.

    out's dtype is promote(y.dtype, attn.dtype), as the reference's multiply gives. ``groups``:
    y's (and attn's) channels are ordered (k, r, j), k < groups (1: radix-major).
    """
    B, RC, H, W = y.shape
    C = RC // radix
    out = _layout.empty((B, C, H, W), y, dtype=torch.promote_types(y.dtype, attn.dtype))
    if B == 0:
        return out
    block_c, block_hw = tile_shape(y, C, reduce_hw=False)
    programs, tiles = hw_tiles(y, block_hw)
    _attention_sum_forward_kernel[(B, triton.cdiv(C, block_c), programs)](
        y, scale, shift, attn, out, C, H * W, radix, C // groups, tiles, *strides(y), *strides(out),
        BLOCK_C=block_c, BLOCK_HW=block_hw, **launch(block_c, block_hw),
    )
    return out


def backward_reduce(dout, y, scale, shift, attn, radix, groups, dy=None, mask_sums=False):
    """Launch the backward kernel -> (dscale, dshift) (R*C,) and dattn (B, R*C) in attn's dtype,
    then with ``mask_sums`` the sums of m*y and m (B, R*C) in scale's dtype; writes dy when given."""
    B, RC, H, W = y.shape
    C = RC // radix
    block_c, block_hw = tile_shape(y, C, reduce_hw=True)
    splits, chunk = hw_splits(y, B * triton.cdiv(C, block_c), block_hw)
    partial_scale = _layout.empty((B * splits, RC), scale)
    partial_shift = _layout.empty((B * splits, RC), scale)

    def rows(dtype):
        """A (B, R*C) result, or its per-split partials in scale's dtype, added up below."""
        return _layout.empty((B, RC), scale, dtype) if splits == 1 else _layout.empty((B * splits, RC), scale)

    dattn = rows(attn.dtype)
    sums = (rows(scale.dtype), rows(scale.dtype)) if mask_sums else (partial_scale, partial_shift)
    if B > 0:
        _attention_sum_backward_kernel[(B, triton.cdiv(C, block_c), splits)](
            dout, y, scale, shift, attn, y if dy is None else dy, partial_scale, partial_shift, dattn,
            *sums, C, H * W, chunk, radix, C // groups, *strides(y), *strides(dout),
            BLOCK_C=block_c, BLOCK_HW=block_hw, WRITE_DY=dy is not None, MASK_SUMS=mask_sums,
            **launch(block_c, block_hw, per_thread=16),
        )
    per_row = (dattn, *sums) if mask_sums else (dattn,)
    if splits > 1:
        per_row = tuple(t.view(B, splits, RC).sum(1) for t in per_row)
    dattn, *sums = per_row
    return partial_scale.sum(0), partial_shift.sum(0), _layout.cast(dattn, attn.dtype), *sums


def attention_sum_backward(dout, y, scale, shift, attn, radix, groups):
    """dout (B, C, H, W) in y's layout -> dy (like y), dscale, dshift (R*C,), dattn (like attn)."""
    dy = _layout.empty(y.shape, y)
    return (dy, *backward_reduce(dout, y, scale, shift, attn, radix, groups, dy=dy))
