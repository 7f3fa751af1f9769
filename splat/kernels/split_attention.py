"""Triton kernels for the two backward passes of ``splat::split_attention``.

Pass 1 (sums) is ``attention_sum``'s backward kernel without its dy store, adding per (b, channel)
sum_hw m*y and sum_hw m (m = [pre > 0]). Pass 2 (dy) writes, per element of y's channel (r, c),

    dy = m * (alpha[b, ch] * dout[b, c] + beta[b, ch]) + gamma[ch] + delta[ch] * y

with y's channel ch = k*(R*C/K) + r*(C/K) + j for c = k*(C/K) + j, K = ``groups``.
"""

import triton
import triton.language as tl

from splat import _layout
from splat.kernels._tiles import strides, tile_offsets, tile_shape
from splat.kernels.attention_sum import backward_reduce


@triton.jit
def _split_attention_backward_dy_kernel(
    dout_ptr, y_ptr, scale_ptr, shift_ptr, alpha_ptr, beta_ptr, gamma_ptr, delta_ptr, dy_ptr,
    RC, HW, RCG, CG, stride_yb, stride_yc, stride_yhw, stride_ob, stride_oc, stride_ohw,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = tl.program_id(2) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c_mask = ch < RC
    mask = c_mask[:, None] & (hw < HW)[None, :]
    c = (ch // RCG) * CG + ch % CG
    acc_dtype = scale_ptr.dtype.element_ty
    scale = tl.load(scale_ptr + ch, mask=c_mask)
    shift = tl.load(shift_ptr + ch, mask=c_mask)
    gamma = tl.load(gamma_ptr + ch, mask=c_mask)
    delta = tl.load(delta_ptr + ch, mask=c_mask)
    alpha = tl.load(alpha_ptr + b * RC + ch, mask=c_mask)
    beta = tl.load(beta_ptr + b * RC + ch, mask=c_mask)
    offs = tile_offsets(b, ch, hw, stride_yb, stride_yc, stride_yhw)
    v = tl.load(y_ptr + offs, mask=mask, other=0.0).to(acc_dtype)
    d = tl.load(dout_ptr + tile_offsets(b, c, hw, stride_ob, stride_oc, stride_ohw), mask=mask, other=0.0)
    pos = v * scale[:, None] + shift[:, None] > 0
    dy = tl.where(pos, alpha[:, None] * d.to(acc_dtype) + beta[:, None], 0.0) + gamma[:, None] + delta[:, None] * v
    tl.store(dy_ptr + offs, dy, mask=mask)


def split_attention_backward_sums(dout, y, scale, shift, attn, radix, groups):
    """dout (B, C, H, W) in y's layout -> dscale, dshift (R*C,); dattn, sum m*y, sum m (B, R*C)."""
    B, RC = y.shape[:2]
    sums = (_layout.empty((B, RC), scale), _layout.empty((B, RC), scale))
    scale, shift, attn = scale.contiguous(), shift.contiguous(), attn.contiguous()
    dscale, dshift, dattn = backward_reduce(dout, y, scale, shift, attn, radix, groups, mask_sums=sums)
    return dscale, dshift, dattn, *sums


def split_attention_backward_dy(dout, y, scale, shift, alpha, beta, gamma, delta, radix, groups):
    """dy (like y) from dout (B, C, H, W) in y's layout, alpha and beta (B, R*C), gamma and delta (R*C,)."""
    B, RC, H, W = y.shape
    dy = _layout.empty(y.shape, y)
    # The kernel indexes the vectors row-major; the MLP's einsums can hand over other strides.
    scale, shift, alpha, beta, gamma, delta = (t.contiguous() for t in (scale, shift, alpha, beta, gamma, delta))
    if B > 0:
        block_c, block_hw = tile_shape(y, RC, reduce_hw=False)
        grid = (B, triton.cdiv(RC, block_c), triton.cdiv(H * W, block_hw))
        cg = RC // (radix * groups)
        _split_attention_backward_dy_kernel[grid](
            dout, y, scale, shift, alpha, beta, gamma, delta, dy,
            RC, H * W, radix * cg, cg, *strides(y), *strides(dout),
            BLOCK_C=block_c, BLOCK_HW=block_hw,
        )
    return dy
