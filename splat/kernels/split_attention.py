"""Triton kernels for the backward passes of ``splat::split_attention``.

Pass 1 (sums) is ``attention_sum``'s backward kernel without its dy store, adding per (b, channel)
sum_hw m*y and sum_hw m (m = [pre > 0]). Pass 2 first reduces over the batch, per channel of y,

    dscale += sum_b dgap[b, c] * sum_my[b, ch] / HW    dshift += sum_b dgap[b, c] * sum_m[b, ch] / HW

and turns them into BN0's dweight, dbias and (with batch statistics) the coefficients gamma and
delta of the statistics' share of dy; then it writes, per element of y,

    dy = m * (scale * attn[b, ch] * dout[b, c] + scale * dgap[b, c] / HW) + gamma[ch] + delta[ch] * y

with y's channel ch = k*(R*C/K) + r*(C/K) + j for c = k*(C/K) + j, K = ``groups``.
"""

import triton
import triton.language as tl

from splat import _layout
from splat.kernels._tiles import hw_tile, hw_tiles, launch, strides, tile_offsets, tile_shape
from splat.kernels.attention_sum import backward_reduce

_COEF_BLOCK_B = 16
_COEF_BLOCK_C = 64


@triton.jit
def _split_attention_coefficients_kernel(
    dgap_ptr, sum_my_ptr, sum_m_ptr, dscale_ptr, dshift_ptr, scale_ptr, mean_ptr, rstd_ptr, dmean_ptr, dvar_ptr,
    gamma_ptr, delta_ptr, dweight_ptr, dbias_ptr,
    B, C, RC, RCG, CG, HW, N,  # N = B * HW from the host: an int32 product in the kernel could overflow
    BATCH_STATS: tl.constexpr, HAS_DMEAN: tl.constexpr, HAS_DVAR: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = ch < RC
    c = (ch // RCG) * CG + ch % CG
    acc_dtype = scale_ptr.dtype.element_ty
    acc_my = tl.zeros([BLOCK_B, BLOCK_C], dtype=acc_dtype)
    acc_m = tl.zeros([BLOCK_B, BLOCK_C], dtype=acc_dtype)
    rows = tl.arange(0, BLOCK_B)
    for b0 in range(0, B, BLOCK_B):
        b = (b0 + rows).to(tl.int64)
        mask = (b < B)[:, None] & c_mask[None, :]
        g = tl.load(dgap_ptr + b[:, None] * C + c[None, :], mask=mask, other=0.0)
        acc_my += g * tl.load(sum_my_ptr + b[:, None] * RC + ch[None, :], mask=mask, other=0.0)
        acc_m += g * tl.load(sum_m_ptr + b[:, None] * RC + ch[None, :], mask=mask, other=0.0)
    # Divisions by the integer counts, not products with reciprocals: a float argument would
    # reach the kernel as float32 and cost float64 its precision.
    # An empty map's sums are zero: divide by 1 there rather than make 0/0.
    pixels = tl.maximum(HW, 1)
    dscale = tl.load(dscale_ptr + ch, mask=c_mask, other=0.0) + tl.sum(acc_my, axis=0) / pixels
    dshift = tl.load(dshift_ptr + ch, mask=c_mask, other=0.0) + tl.sum(acc_m, axis=0) / pixels
    dweight = dscale
    if BATCH_STATS:
        scale = tl.load(scale_ptr + ch, mask=c_mask, other=0.0)
        mean = tl.load(mean_ptr + ch, mask=c_mask, other=0.0)
        rstd = tl.load(rstd_ptr + ch, mask=c_mask, other=0.0)
        dweight = (dscale - dshift * mean) * rstd
        delta = -(dweight * scale * rstd) / N
        if HAS_DVAR:
            delta += 2 * tl.load(dvar_ptr + ch, mask=c_mask, other=0.0) / N
        gamma = -(dshift * scale) / N - delta * mean
        if HAS_DMEAN:
            gamma += tl.load(dmean_ptr + ch, mask=c_mask, other=0.0) / N
        tl.store(gamma_ptr + ch, gamma, mask=c_mask)
        tl.store(delta_ptr + ch, delta, mask=c_mask)
    tl.store(dweight_ptr + ch, dweight, mask=c_mask)
    tl.store(dbias_ptr + ch, dshift, mask=c_mask)


@triton.jit
def _split_attention_backward_dy_kernel(
    dout_ptr, y_ptr, scale_ptr, shift_ptr, attn_ptr, dgap_ptr, gamma_ptr, delta_ptr, dy_ptr,
    RC, C, HW, RCG, CG, TILES, stride_yb, stride_yc, stride_yhw, stride_ob, stride_oc, stride_ohw,
    BATCH_STATS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = ch < RC
    c = (ch // RCG) * CG + ch % CG
    acc_dtype = scale_ptr.dtype.element_ty
    scale = tl.load(scale_ptr + ch, mask=c_mask)
    shift = tl.load(shift_ptr + ch, mask=c_mask)
    alpha = scale * tl.load(attn_ptr + b * RC + ch, mask=c_mask)
    beta = scale * (tl.load(dgap_ptr + b * C + c, mask=c_mask) / HW)
    if BATCH_STATS:
        gamma = tl.load(gamma_ptr + ch, mask=c_mask)
        delta = tl.load(delta_ptr + ch, mask=c_mask)
    for t in range(TILES):
        hw = hw_tile(t, TILES, BLOCK_HW)
        mask = c_mask[:, None] & (hw < HW)[None, :]
        offs = tile_offsets(b, ch, hw, stride_yb, stride_yc, stride_yhw)
        v = tl.load(y_ptr + offs, mask=mask, other=0.0).to(acc_dtype)
        d = tl.load(dout_ptr + tile_offsets(b, c, hw, stride_ob, stride_oc, stride_ohw), mask=mask, other=0.0)
        pos = v * scale[:, None] + shift[:, None] > 0
        dy = tl.where(pos, alpha[:, None] * d.to(acc_dtype) + beta[:, None], 0.0)
        if BATCH_STATS:
            dy += gamma[:, None] + delta[:, None] * v
        tl.store(dy_ptr + offs, dy, mask=mask)


def split_attention_backward_sums(dout, y, scale, shift, attn, radix, groups):
    """dout (B, C, H, W) in y's layout -> dscale, dshift (R*C,); dattn, sum m*y, sum m (B, R*C)."""
    scale, shift, attn = scale.contiguous(), shift.contiguous(), attn.contiguous()
    return backward_reduce(dout, y, scale, shift, attn, radix, groups, mask_sums=True)


def split_attention_backward_dy(dout, y, scale, shift, attn, dgap, dscale, dshift, sum_my, sum_m, mean, rstd, dmean,
                                dvar, radix, groups):
    """Pass 2: dout (B, C, H, W) in y's layout; attn, sum_my, sum_m (B, R*C); dgap (B, C); dscale,
    dshift (R*C,) from pass 1; BN0's batch mean and rstd (R*C,), empty without batch statistics;
    dmean, dvar (R*C,) or None -> dy (like y), BN0's dweight and dbias (R*C,)."""
    B, RC, H, W = y.shape
    C = RC // radix
    cg = C // groups
    batch_stats = mean.numel() > 0
    # The kernels index the vectors row-major; callers of the public op may hand over other strides.
    scale, shift, attn, dgap, dscale, dshift, sum_my, sum_m, mean, rstd = (
        t.contiguous() for t in (scale, shift, attn, dgap, dscale, dshift, sum_my, sum_m, mean, rstd)
    )
    dmean, dvar = (None if t is None else t.contiguous() for t in (dmean, dvar))
    dy = _layout.empty(y.shape, y)
    dweight, dbias = _layout.empty((RC,), scale), _layout.empty((RC,), scale)
    gamma, delta = (_layout.empty((RC,), scale), _layout.empty((RC,), scale)) if batch_stats else (scale, scale)
    # Absent inputs are never read (constexpr flags): any tensor stands in for their pointers.
    _split_attention_coefficients_kernel[(triton.cdiv(RC, _COEF_BLOCK_C),)](
        dgap, sum_my, sum_m, dscale, dshift, scale, mean if batch_stats else scale, rstd if batch_stats else scale,
        scale if dmean is None else dmean, scale if dvar is None else dvar, gamma, delta, dweight, dbias,
        B, C, RC, radix * cg, cg, H * W, B * H * W,
        BATCH_STATS=batch_stats, HAS_DMEAN=dmean is not None, HAS_DVAR=dvar is not None,
        BLOCK_B=_COEF_BLOCK_B, BLOCK_C=_COEF_BLOCK_C, **launch(_COEF_BLOCK_B, _COEF_BLOCK_C),
    )
    if B > 0:
        block_c, block_hw = tile_shape(y, RC, reduce_hw=False)
        programs, tiles = hw_tiles(y, block_hw)
        _split_attention_backward_dy_kernel[(B, triton.cdiv(RC, block_c), programs)](
            dout, y, scale, shift, attn, dgap, gamma, delta, dy,
            RC, C, H * W, radix * cg, cg, tiles, *strides(y), *strides(dout),
            BATCH_STATS=batch_stats, BLOCK_C=block_c, BLOCK_HW=block_hw, **launch(block_c, block_hw),
        )
    return dy, dweight, dbias
