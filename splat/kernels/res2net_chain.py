"""Triton kernels for ``splat::res2net_chain``: Res2Net's 3x3 branch chain as implicit GEMMs.

Forward, per chain step (one launch covers every branch of a 'stage' block as a grouped conv):
- ``_conv_forward_kernel``: implicit-GEMM 3x3 conv, rows = output pixels (B*H'*W'), columns =
  output channels of one group, reduction = 9 taps x input channels of the group. The chain's
  add (previous branch output + split) happens in the operand loads; nothing is materialised.
  Eval mode applies the folded BN + ReLU in the epilogue and stores straight into the output
  slot. Training mode stores the raw conv output and per-(row block, channel) mean and M2
  partials, combined on the host in a fixed order (Chan's formula: no atomics, deterministic);
  ``_bn_relu_kernel`` then writes relu(y * scale + shift) into the slot.
- The passthrough slot (the last split: copied in 'normal' blocks, 3x3 average-pooled with
  count_include_pad in 'stage' blocks) is handled by extra programs of the first launch.
Backward, per step in reverse (the gradient of a branch output is its output slot's gradient
plus the input gradient of the next branch, already in dx):
- ``_bn_backward_reduce_kernel``: per-block partial sums of dpre and dpre * xhat.
- ``_bn_backward_dy_kernel``: the BN + ReLU backward, dy.
- ``_conv_dgrad_kernel``: implicit-GEMM transposed conv dy -> dx slot (+ passthrough programs).
- ``_conv_wgrad_kernel``: split-K implicit GEMM dy x input -> per-split partials, summed on the host.
float64 uses a broadcast-multiply reduction (``tl.dot`` has no float64); float32 uses IEEE dots.
"""

import os

import torch
import triton
import triton.language as tl

from splat import _layout
from splat.kernels._tiles import launch, relu
from splat.ops.res2net_chain import output_size

# Split-K of the weight gradient: output pixels each split reduces (at least), and most splits.
PIXELS_PER_SPLIT = 4096
_MAX_SPLITS = 64

# Elements of a tile a thread holds (see _tiles.launch): at 32, the per-element 64-bit pixel
# arithmetic of these kernels spills registers.
_PER_THREAD = 16

_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _mma(acc, a, b, USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """acc + a @ b with a [M, K], b [K, N]."""
    if USE_DOT:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision="ieee")
    return acc + tl.sum(a[:, :, None].to(acc.dtype) * b[None, :, :].to(acc.dtype), axis=1)


@triton.jit
def _pixels(m, HW, W):
    """Split flat pixel indices m = (b*H + h)*W + w of an (H, W) map into 64-bit (b, h, w)."""
    m = m.to(tl.int64)
    b = m // HW
    r = m % HW
    return b, r // W, r % W


@triton.jit
def _offsets(b, h, w, c, sb, sc, sh, sw):
    """[rows, cols] element offsets for per-row pixels (b, h, w) and per-column channels c."""
    return (b * sb + h * sh + w * sw)[:, None] + c.to(tl.int64)[None, :] * sc


@triton.jit
def _passthrough_tile(
    src_ptr, dst_ptr, pid_m, pid_c, M, C, H, W, Ho, Wo, STRIDE: tl.constexpr,
    ssb, ssc, ssh, ssw, sdb, sdc, sdh, sdw,
    POOL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dst (B, C, Ho, Wo) = src (B, C, H, W), or avg_pool2d(src, 3, STRIDE, 1) counting padding."""
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    c = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    b, oh, ow = _pixels(m, Ho * Wo, Wo)
    mask = (m < M)[:, None] & (c < C)[None, :]
    if POOL:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32 if src_ptr.dtype.element_ty != tl.float64 else tl.float64)
        for tap in range(9):
            ih = oh * STRIDE - 1 + tap // 3
            iw = ow * STRIDE - 1 + tap % 3
            ok = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            offs = _offsets(b, ih, iw, c, ssb, ssc, ssh, ssw)
            acc += tl.load(src_ptr + offs, mask=mask & ok[:, None], other=0.0).to(acc.dtype)
        v = acc / 9.0
    else:
        v = tl.load(src_ptr + _offsets(b, oh, ow, c, ssb, ssc, ssh, ssw), mask=mask)
    tl.store(dst_ptr + _offsets(b, oh, ow, c, sdb, sdc, sdh, sdw), v, mask=mask)


@triton.jit
def _passthrough_backward_tile(
    dsrc_ptr, ddst_ptr, pid_m, pid_c, M, C, H, W, Ho, Wo, STRIDE: tl.constexpr,
    ssb, ssc, ssh, ssw, sdb, sdc, sdh, sdw,
    POOL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Gradient of ``_passthrough_tile``: ddst (B, C, Ho, Wo) -> dsrc (B, C, H, W); M = B*H*W."""
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    c = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    b, ih, iw = _pixels(m, H * W, W)
    mask = (m < M)[:, None] & (c < C)[None, :]
    if POOL:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32 if dsrc_ptr.dtype.element_ty != tl.float64 else tl.float64)
        for tap in range(9):
            nh = ih + 1 - tap // 3
            nw = iw + 1 - tap % 3
            oh = nh // STRIDE
            ow = nw // STRIDE
            ok = (nh >= 0) & (nw >= 0) & (nh % STRIDE == 0) & (nw % STRIDE == 0) & (oh < Ho) & (ow < Wo)
            offs = _offsets(b, oh, ow, c, sdb, sdc, sdh, sdw)
            acc += tl.load(ddst_ptr + offs, mask=mask & ok[:, None], other=0.0).to(acc.dtype)
        v = acc / 9.0
    else:
        v = tl.load(ddst_ptr + _offsets(b, ih, iw, c, sdb, sdc, sdh, sdw), mask=mask)
    tl.store(dsrc_ptr + _offsets(b, ih, iw, c, ssb, ssc, ssh, ssw), v, mask=mask)


@triton.jit
def _conv_forward_kernel(
    x_ptr, prev_ptr, w_ptr, y_ptr, out_ptr, scale_ptr, shift_ptr, pmean_ptr, pm2_ptr, last_ptr, last_out_ptr,
    M, H, W, Ho, Wo, CIN_G, COUT_G, C_OUT, N_TILES, STRIDE: tl.constexpr, dilation, PASS_C,
    sxb, sxc, sxh, sxw, spb, spc, sph, spw, syb, syc, syh, syw, sob, soc, soh, sow,
    ADD: tl.constexpr, SAVE_Y: tl.constexpr, STATS: tl.constexpr, EPILOGUE: tl.constexpr,
    PASS: tl.constexpr, POOL: tl.constexpr, USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if PASS:
        if pid_n >= N_TILES * (C_OUT // COUT_G):
            _passthrough_tile(
                last_ptr, last_out_ptr, pid_m, pid_n - N_TILES * (C_OUT // COUT_G), M, PASS_C, H, W, Ho, Wo, STRIDE,
                sxb, sxc, sxh, sxw, sob, soc, soh, sow, POOL, BLOCK_M, BLOCK_N,
            )
            return
    group = pid_n // N_TILES
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = (pid_n % N_TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = m < M
    n_mask = n < COUT_G
    co = group * COUT_G + n
    b, oh, ow = _pixels(m, Ho * Wo, Wo)
    k = tl.arange(0, BLOCK_K)
    acc_dtype: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_dtype)
    for tap in range(9):
        ih = oh * STRIDE - dilation + (tap // 3) * dilation
        iw = ow * STRIDE - dilation + (tap % 3) * dilation
        pix_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        for c0 in range(0, CIN_G, BLOCK_K):
            ci = group * CIN_G + c0 + k
            a_mask = pix_ok[:, None] & (c0 + k < CIN_G)[None, :]
            a = tl.load(x_ptr + _offsets(b, ih, iw, ci, sxb, sxc, sxh, sxw), mask=a_mask, other=0.0)
            if ADD:
                p = tl.load(prev_ptr + _offsets(b, ih, iw, ci, spb, spc, sph, spw), mask=a_mask, other=0.0)
                # Rounded to the storage dtype like the reference's sp + spx[i].
                a = (a.to(acc_dtype) + p.to(acc_dtype)).to(x_ptr.dtype.element_ty)
            w_offs = co.to(tl.int64)[None, :] * (CIN_G * 9) + (c0 + k)[:, None] * 9 + tap
            wt = tl.load(w_ptr + w_offs, mask=(c0 + k < CIN_G)[:, None] & n_mask[None, :], other=0.0)
            acc = _mma(acc, a, wt, USE_DOT, DOT_DTYPE)
    mask = m_mask[:, None] & n_mask[None, :]
    # BN sees the conv output rounded to the storage dtype, as it does after nn.Conv2d.
    v = acc.to(y_ptr.dtype.element_ty)
    if SAVE_Y:
        tl.store(y_ptr + _offsets(b, oh, ow, co, syb, syc, syh, syw), v, mask=mask)
    v = v.to(acc_dtype)
    if STATS:
        count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(acc_dtype)
        mean = tl.sum(tl.where(mask, v, 0.0), axis=0) / count
        dev = tl.where(mask, v - mean[None, :], 0.0)
        tl.store(pmean_ptr + pid_m * C_OUT + co, mean, mask=n_mask)
        tl.store(pm2_ptr + pid_m * C_OUT + co, tl.sum(dev * dev, axis=0), mask=n_mask)
    if EPILOGUE:
        scale = tl.load(scale_ptr + co, mask=n_mask, other=0.0)
        shift = tl.load(shift_ptr + co, mask=n_mask, other=0.0)
        act = relu(v * scale[None, :] + shift[None, :])
        tl.store(out_ptr + _offsets(b, oh, ow, co, sob, soc, soh, sow), act, mask=mask)


@triton.jit
def _bn_relu_kernel(
    y_ptr, out_ptr, scale_ptr, shift_ptr, last_ptr, last_out_ptr, M, C, H, W, Ho, Wo, STRIDE: tl.constexpr, PASS_C,
    syb, syc, syh, syw, sob, soc, soh, sow, sxb, sxc, sxh, sxw,
    PASS: tl.constexpr, POOL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    c_tiles = tl.cdiv(C, BLOCK_N)
    if PASS:
        if pid_n >= c_tiles:
            _passthrough_tile(
                last_ptr, last_out_ptr, pid_m, pid_n - c_tiles, M, PASS_C, H, W, Ho, Wo, STRIDE,
                sxb, sxc, sxh, sxw, sob, soc, soh, sow, POOL, BLOCK_M, BLOCK_N,
            )
            return
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    b, oh, ow = _pixels(m, Ho * Wo, Wo)
    c_mask = c < C
    mask = (m < M)[:, None] & c_mask[None, :]
    scale = tl.load(scale_ptr + c, mask=c_mask, other=0.0)
    shift = tl.load(shift_ptr + c, mask=c_mask, other=0.0)
    v = tl.load(y_ptr + _offsets(b, oh, ow, c, syb, syc, syh, syw), mask=mask, other=0.0).to(scale.dtype)
    act = relu(v * scale[None, :] + shift[None, :])
    tl.store(out_ptr + _offsets(b, oh, ow, c, sob, soc, soh, sow), act, mask=mask)


@triton.jit
def _bn_backward_terms(
    dout_ptr, carry_ptr, out_ptr, y_ptr, mean_ptr, rstd_ptr, m, c, M, C, HW, W,
    sdb, sdc, sdh, sdw, scb, scc, sch, scw, sob, soc, soh, sow, syb, syc, syh, syw,
    HAS_CARRY: tl.constexpr,
):
    """(dpre, xhat, mask) of a [pixels, channels] tile: dpre = (dout + carry) * [out > 0]."""
    b, h, w = _pixels(m, HW, W)
    c_mask = c < C
    mask = (m < M)[:, None] & c_mask[None, :]
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
    rstd = tl.load(rstd_ptr + c, mask=c_mask, other=0.0)
    d = tl.load(dout_ptr + _offsets(b, h, w, c, sdb, sdc, sdh, sdw), mask=mask, other=0.0).to(mean.dtype)
    if HAS_CARRY:
        d += tl.load(carry_ptr + _offsets(b, h, w, c, scb, scc, sch, scw), mask=mask, other=0.0).to(mean.dtype)
    o = tl.load(out_ptr + _offsets(b, h, w, c, sob, soc, soh, sow), mask=mask, other=0.0)
    v = tl.load(y_ptr + _offsets(b, h, w, c, syb, syc, syh, syw), mask=mask, other=0.0).to(mean.dtype)
    # out > 0 is the reference's ReLU mask: it tests the BN output rounded to the storage dtype.
    dpre = tl.where(mask & (o > 0), d, 0.0)
    xhat = (v - mean[None, :]) * rstd[None, :]
    return dpre, xhat, mask


@triton.jit
def _bn_backward_reduce_kernel(
    dout_ptr, carry_ptr, out_ptr, y_ptr, mean_ptr, rstd_ptr, pdbeta_ptr, pdgamma_ptr, M, C, HW, W,
    sdb, sdc, sdh, sdw, scb, scc, sch, scw, sob, soc, soh, sow, syb, syc, syh, syw,
    HAS_CARRY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    dpre, xhat, _ = _bn_backward_terms(
        dout_ptr, carry_ptr, out_ptr, y_ptr, mean_ptr, rstd_ptr, m, c, M, C, HW, W,
        sdb, sdc, sdh, sdw, scb, scc, sch, scw, sob, soc, soh, sow, syb, syc, syh, syw, HAS_CARRY,
    )
    tl.store(pdbeta_ptr + pid_m * C + c, tl.sum(dpre, axis=0), mask=c < C)
    tl.store(pdgamma_ptr + pid_m * C + c, tl.sum(dpre * xhat, axis=0), mask=c < C)


@triton.jit
def _bn_backward_dy_kernel(
    dout_ptr, carry_ptr, out_ptr, y_ptr, mean_ptr, rstd_ptr, g_ptr, a_ptr, k_ptr, dy_ptr, M, C, HW, W,
    sdb, sdc, sdh, sdw, scb, scc, sch, scw, sob, soc, soh, sow, syb, syc, syh, syw, sgb, sgc, sgh, sgw,
    HAS_CARRY: tl.constexpr, BATCH_STATS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dy = g * (dpre - a - xhat * k), g = gamma * rstd; a, k the batch-statistics terms."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    dpre, xhat, mask = _bn_backward_terms(
        dout_ptr, carry_ptr, out_ptr, y_ptr, mean_ptr, rstd_ptr, m, c, M, C, HW, W,
        sdb, sdc, sdh, sdw, scb, scc, sch, scw, sob, soc, soh, sow, syb, syc, syh, syw, HAS_CARRY,
    )
    c_mask = c < C
    g = tl.load(g_ptr + c, mask=c_mask, other=0.0)
    if BATCH_STATS:
        a = tl.load(a_ptr + c, mask=c_mask, other=0.0)
        k = tl.load(k_ptr + c, mask=c_mask, other=0.0)
        dpre = dpre - a[None, :] - xhat * k[None, :]
    b, h, w = _pixels(m, HW, W)
    tl.store(dy_ptr + _offsets(b, h, w, c, sgb, sgc, sgh, sgw), dpre * g[None, :], mask=mask)


@triton.jit
def _conv_dgrad_kernel(
    dy_ptr, w_ptr, dx_ptr, dlast_ptr, dxlast_ptr,
    M, H, W, Ho, Wo, CIN_G, COUT_G, N_GROUPS, N_TILES, STRIDE: tl.constexpr, dilation, PASS_C,
    syb, syc, syh, syw, sxb, sxc, sxh, sxw, slb, slc, slh, slw,
    PASS: tl.constexpr, POOL: tl.constexpr, USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx[b, ci, ih, iw] = sum over taps and output channels of the group of dy * w; M = B*H*W."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if PASS:
        if pid_n >= N_TILES * N_GROUPS:
            _passthrough_backward_tile(
                dxlast_ptr, dlast_ptr, pid_m, pid_n - N_TILES * N_GROUPS, M, PASS_C, H, W, Ho, Wo, STRIDE,
                sxb, sxc, sxh, sxw, slb, slc, slh, slw, POOL, BLOCK_M, BLOCK_N,
            )
            return
    group = pid_n // N_TILES
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = (pid_n % N_TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = m < M
    n_mask = n < CIN_G
    b, ih, iw = _pixels(m, H * W, W)
    k = tl.arange(0, BLOCK_K)
    acc_dtype: tl.constexpr = tl.float64 if dy_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_dtype)
    for tap in range(9):
        nh = ih + dilation - (tap // 3) * dilation
        nw = iw + dilation - (tap % 3) * dilation
        oh = nh // STRIDE
        ow = nw // STRIDE
        pix_ok = m_mask & (nh >= 0) & (nw >= 0) & (nh % STRIDE == 0) & (nw % STRIDE == 0) & (oh < Ho) & (ow < Wo)
        for c0 in range(0, COUT_G, BLOCK_K):
            co = group * COUT_G + c0 + k
            a_mask = pix_ok[:, None] & (c0 + k < COUT_G)[None, :]
            a = tl.load(dy_ptr + _offsets(b, oh, ow, co, syb, syc, syh, syw), mask=a_mask, other=0.0)
            w_offs = co.to(tl.int64)[:, None] * (CIN_G * 9) + n[None, :] * 9 + tap
            wt = tl.load(w_ptr + w_offs, mask=(c0 + k < COUT_G)[:, None] & n_mask[None, :], other=0.0)
            acc = _mma(acc, a, wt, USE_DOT, DOT_DTYPE)
    ci = group * CIN_G + n
    tl.store(dx_ptr + _offsets(b, ih, iw, ci, sxb, sxc, sxh, sxw), acc, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _conv_wgrad_kernel(
    dy_ptr, x_ptr, prev_ptr, ws_ptr, M, H, W, Ho, Wo, CIN_G, COUT_G, C_OUT, M_TILES, PIX_PER_SPLIT,
    STRIDE: tl.constexpr, dilation,
    syb, syc, syh, syw, sxb, sxc, sxh, sxw, spb, spc, sph, spw,
    ADD: tl.constexpr, USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Partial dw[split, co, n] = sum over this split's output pixels of dy[co] * input[n], where
    n = ci * 9 + tap is the weight's own (ci, kh, kw) order, so the columns gather the 9 taps.

    Grid: (output-channel tiles x column tiles, groups, splits); M = B*H'*W'.
    """
    pid_t = tl.program_id(0)
    group = tl.program_id(1)
    split = tl.program_id(2)
    co = (pid_t % M_TILES) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = (pid_t // M_TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_mask = co < COUT_G
    n_mask = n < CIN_G * 9
    co_abs = group * COUT_G + co
    ci = group * CIN_G + n // 9
    kh = (n % 9) // 3
    kw = n % 3
    k = tl.arange(0, BLOCK_K)
    acc_dtype: tl.constexpr = tl.float64 if dy_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_dtype)
    start = split * PIX_PER_SPLIT
    stop = tl.minimum(start + PIX_PER_SPLIT, M)
    for p0 in range(start, stop, BLOCK_K):
        p = p0 + k
        p_mask = p < stop
        b, oh, ow = _pixels(p, Ho * Wo, Wo)
        dy_offs = (b * syb + oh * syh + ow * syw)[None, :] + co_abs.to(tl.int64)[:, None] * syc
        a = tl.load(dy_ptr + dy_offs, mask=co_mask[:, None] & p_mask[None, :], other=0.0)
        ih = (oh * STRIDE - dilation)[:, None] + (kh * dilation)[None, :]
        iw = (ow * STRIDE - dilation)[:, None] + (kw * dilation)[None, :]
        x_mask = p_mask[:, None] & n_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        pix = b[:, None] * sxb + ih * sxh + iw * sxw
        xv = tl.load(x_ptr + pix + ci.to(tl.int64)[None, :] * sxc, mask=x_mask, other=0.0)
        if ADD:
            ppix = b[:, None] * spb + ih * sph + iw * spw
            pv = tl.load(prev_ptr + ppix + ci.to(tl.int64)[None, :] * spc, mask=x_mask, other=0.0)
            xv = (xv.to(acc_dtype) + pv.to(acc_dtype)).to(x_ptr.dtype.element_ty)
        acc = _mma(acc, a, xv, USE_DOT, DOT_DTYPE)
    offs = split.to(tl.int64) * C_OUT * CIN_G * 9 + co_abs.to(tl.int64)[:, None] * (CIN_G * 9) + n[None, :]
    tl.store(ws_ptr + offs, acc, mask=co_mask[:, None] & n_mask[None, :])


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_args(dtype: torch.dtype) -> dict:
    """float64 has no tl.dot; the interpreter computes 16-bit dots wrongly, so it upcasts them."""
    if dtype == torch.float64:
        return {"USE_DOT": False, "DOT_DTYPE": tl.float64}
    return {"USE_DOT": True, "DOT_DTYPE": tl.float32 if _interpreted() else _DOT_DTYPES[dtype]}


def _gemm_blocks(dtype: torch.dtype, n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) of an implicit GEMM with n columns and k reduction channels.

    tl.dot needs every dimension >= 16; float64's broadcast product keeps M*N*K small.
    """
    if dtype == torch.float64:
        return 32, min(16, triton.next_power_of_2(n)), min(8, triton.next_power_of_2(k))
    return 64, max(16, min(64, triton.next_power_of_2(n))), max(16, min(32, triton.next_power_of_2(k)))


def _wgrad_blocks(dtype: torch.dtype, channels: int) -> tuple[int, int, int]:
    """(output-channel, input-channel x tap, pixel) blocks of the weight-gradient GEMM."""
    if dtype == torch.float64:
        return min(16, triton.next_power_of_2(channels)), 64, 8
    return max(16, min(64, triton.next_power_of_2(channels))), 64, 32


def _ew_blocks(c: int) -> tuple[int, int]:
    return 64, min(64, triton.next_power_of_2(max(c, 1)))


def _steps(width: int, nums: int, stage: bool) -> list[slice]:
    """Channel ranges of the conv launches: all branches at once ('stage') or one per branch."""
    if stage:
        return [slice(0, nums * width)]
    return [slice(i * width, (i + 1) * width) for i in range(nums)]


def res2net_chain_forward(x, weight, gamma, beta, running_mean, running_var, eps, scale, stage, stride, dilation,
                          groups, batch_stats, save_y):
    """x (B, width*scale, H, W) dense -> (out, y, mean, var); see ``splat.ops.res2net_chain``."""
    B, C, H, W = x.shape
    width = C // scale
    nums = weight.shape[0] // width
    acc = _layout.acc_dtype(x.dtype)
    Ho, Wo = output_size(H, stride), output_size(W, stride)
    M = B * Ho * Wo
    out = _layout.empty((B, C, Ho, Wo), x)
    y_shape = (B, nums * width, Ho, Wo)
    y = _layout.empty(y_shape, x) if save_y or batch_stats else x.new_empty(0)
    mean = _layout.empty((nums * width,), x, dtype=acc)
    var = _layout.empty((nums * width,), x, dtype=acc)
    if M == 0:
        mean.copy_(running_mean if not batch_stats else torch.full_like(mean, float("nan")))
        var.copy_(running_var if not batch_stats else torch.full_like(var, float("nan")))
        return out, y, mean, var
    if not batch_stats:
        mean.copy_(running_mean)
        var.copy_(running_var)
    rstd = torch.rsqrt(var + eps) if not batch_stats else None
    cin_g = width // groups
    pass_c = C - nums * width
    last, last_out = x[:, nums * width:], out[:, nums * width:]
    dot = _dot_args(x.dtype)
    block_m, block_n, block_k = _gemm_blocks(x.dtype, cin_g, cin_g)
    n_tiles = triton.cdiv(cin_g, block_n)
    for i, ch in enumerate(_steps(width, nums, stage)):
        n_groups = (ch.stop - ch.start) // cin_g
        add = not stage and i > 0
        xs, ws, os_ = x[:, ch], weight[ch], out[:, ch]
        prev = out[:, ch.start - width:ch.start] if add else xs
        ys = y[:, ch] if y.dim() == 4 else os_
        passes = i == 0 and pass_c > 0
        n_m = triton.cdiv(M, block_m)
        conv_grid = (n_m, n_groups * n_tiles + (triton.cdiv(pass_c, block_n) if passes and not batch_stats else 0))
        if batch_stats:
            pmean = _layout.empty((n_m, ch.stop - ch.start), x, dtype=acc)
            pm2 = _layout.empty((n_m, ch.stop - ch.start), x, dtype=acc)
            sc = sh = pmean
        else:
            pmean = pm2 = mean
            sc = gamma[ch].to(acc) * rstd[ch]
            sh = beta[ch].to(acc) - mean[ch] * sc
        _conv_forward_kernel[conv_grid](
            xs, prev, ws, ys, os_, sc, sh, pmean, pm2, last, last_out,
            M, H, W, Ho, Wo, cin_g, cin_g, ch.stop - ch.start, n_tiles, stride, dilation, pass_c,
            *xs.stride(), *prev.stride(), *ys.stride(), *os_.stride(),
            ADD=add, SAVE_Y=batch_stats or save_y, STATS=batch_stats, EPILOGUE=not batch_stats,
            PASS=passes and not batch_stats, POOL=stage, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            **dot, **launch(block_m, block_n, per_thread=_PER_THREAD),
        )
        if not batch_stats:
            continue
        count = torch.full((n_m, 1), block_m, dtype=acc, device=x.device)
        count[-1] = M - block_m * (n_m - 1)
        step_mean = (pmean * count).sum(0) / M
        step_var = (pm2.sum(0) + (count * (pmean - step_mean).square()).sum(0)) / M
        mean[ch], var[ch] = step_mean, step_var
        sc = gamma[ch].to(acc) * torch.rsqrt(step_var + eps)
        sh = beta[ch].to(acc) - step_mean * sc
        ew_m, ew_n = _ew_blocks(ch.stop - ch.start)
        pass_tiles = triton.cdiv(pass_c, ew_n) if passes else 0
        grid = (triton.cdiv(M, ew_m), triton.cdiv(ch.stop - ch.start, ew_n) + pass_tiles)
        _bn_relu_kernel[grid](
            ys, os_, sc, sh, last, last_out, M, ch.stop - ch.start, H, W, Ho, Wo, stride, pass_c,
            *ys.stride(), *os_.stride(), *last.stride(),
            PASS=passes, POOL=stage, BLOCK_M=ew_m, BLOCK_N=ew_n, **launch(ew_m, ew_n, per_thread=_PER_THREAD),
        )
    if not save_y and y.dim() == 4:
        y = x.new_empty(0)
    return out, y, mean, var


def res2net_chain_backward(dout, x, weight, gamma, out, y, mean, var, eps, scale, stage, stride, dilation, groups,
                           batch_stats):
    """dout like out -> (dx like x, dweight like weight, dgamma, dbeta like gamma)."""
    B, C, H, W = x.shape
    width = C // scale
    nums = weight.shape[0] // width
    acc = _layout.acc_dtype(x.dtype)
    Ho, Wo = out.shape[2], out.shape[3]
    M = B * Ho * Wo
    dx = _layout.empty(x.shape, x)
    dweight = torch.empty_like(weight)
    dgamma = _layout.empty((nums * width,), x, dtype=acc)
    dbeta = _layout.empty((nums * width,), x, dtype=acc)
    if M == 0:
        dx.zero_()
        dweight.zero_()
        return dx, dweight, dgamma.zero_().to(gamma.dtype), dbeta.zero_().to(gamma.dtype)
    rstd = torch.rsqrt(var + eps)
    g = gamma.to(acc) * rstd
    cin_g = width // groups
    pass_c = C - nums * width
    dot = _dot_args(x.dtype)
    steps = _steps(width, nums, stage)
    for i in reversed(range(len(steps))):
        ch = steps[i]
        c = ch.stop - ch.start
        n_groups = c // cin_g
        add = not stage and i > 0
        carry = dx[:, ch.stop:ch.stop + width] if not stage and i < len(steps) - 1 else dx[:, ch]
        ds, os_, ys, xs = dout[:, ch], out[:, ch], y[:, ch], x[:, ch]
        args = (ds, carry, os_, ys, mean[ch], rstd[ch])
        strides = (*ds.stride(), *carry.stride(), *os_.stride(), *ys.stride())
        has_carry = not stage and i < len(steps) - 1
        ew_m, ew_n = _ew_blocks(c)
        n_m = triton.cdiv(M, ew_m)
        pdbeta = _layout.empty((n_m, c), x, dtype=acc)
        pdgamma = _layout.empty((n_m, c), x, dtype=acc)
        grid = (n_m, triton.cdiv(c, ew_n))
        _bn_backward_reduce_kernel[grid](
            *args, pdbeta, pdgamma, M, c, Ho * Wo, Wo, *strides, HAS_CARRY=has_carry, BLOCK_M=ew_m, BLOCK_N=ew_n,
            **launch(ew_m, ew_n, per_thread=_PER_THREAD),
        )
        dbeta[ch] = pdbeta.sum(0)
        dgamma[ch] = pdgamma.sum(0)
        dy = _layout.empty((B, c, Ho, Wo), out)
        _bn_backward_dy_kernel[grid](
            *args, g[ch], dbeta[ch] / M, dgamma[ch] / M, dy, M, c, Ho * Wo, Wo, *strides, *dy.stride(),
            HAS_CARRY=has_carry, BATCH_STATS=batch_stats, BLOCK_M=ew_m, BLOCK_N=ew_n,
            **launch(ew_m, ew_n, per_thread=_PER_THREAD),
        )
        block_m, block_n, block_k = _gemm_blocks(x.dtype, cin_g, cin_g)
        n_tiles = triton.cdiv(cin_g, block_n)
        passes = i == len(steps) - 1 and pass_c > 0
        dlast, dxlast = dout[:, nums * width:], dx[:, nums * width:]
        m_in = B * H * W
        grid = (triton.cdiv(m_in, block_m), n_groups * n_tiles + (triton.cdiv(pass_c, block_n) if passes else 0))
        dxs = dx[:, ch]
        _conv_dgrad_kernel[grid](
            dy, weight[ch], dxs, dlast, dxlast, m_in, H, W, Ho, Wo, cin_g, cin_g, n_groups, n_tiles, stride,
            dilation, pass_c, *dy.stride(), *dxs.stride(), *dlast.stride(),
            PASS=passes, POOL=stage, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **dot,
            **launch(block_m, block_n, per_thread=_PER_THREAD),
        )
        prev = out[:, ch.start - width:ch.start] if add else xs
        wm, wn, wk = _wgrad_blocks(x.dtype, cin_g)
        m_tiles = triton.cdiv(cin_g, wm)
        # Enough splits to fill the machine; a fixed count per shape keeps the sum order fixed.
        splits = max(1, min(_MAX_SPLITS, triton.cdiv(M, PIXELS_PER_SPLIT)))
        pix = triton.cdiv(triton.cdiv(M, splits), wk) * wk
        splits = triton.cdiv(M, pix)
        ws = _layout.empty((splits, c, cin_g, 3, 3), x, dtype=acc)
        _conv_wgrad_kernel[(m_tiles * triton.cdiv(cin_g * 9, wn), n_groups, splits)](
            dy, xs, prev, ws, M, H, W, Ho, Wo, cin_g, cin_g, c, m_tiles, pix, stride, dilation,
            *dy.stride(), *xs.stride(), *prev.stride(),
            ADD=add, BLOCK_M=wm, BLOCK_N=wn, BLOCK_K=wk, **dot, **launch(wm, wn, per_thread=_PER_THREAD),
        )
        dweight[ch] = ws.sum(0).to(weight.dtype)
    return dx, dweight, dgamma.to(gamma.dtype), dbeta.to(gamma.dtype)
