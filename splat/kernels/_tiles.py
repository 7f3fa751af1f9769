"""Tiling shared by the split-attention kernels.

Every kernel works on tiles of ``[BLOCK_C, BLOCK_HW]`` elements of a dense 4-D tensor, addressed
through ``(stride_b, stride_c, stride_hw)``, so one kernel serves NCHW (``stride_hw == 1``) and
NHWC (``stride_c == 1``): Triton specialises unit strides at compile time and vectorises along
whichever axis is contiguous. Only the tile shape differs per layout.
"""

import functools
import math

import torch
import triton
import triton.language as tl

from splat import _layout

# ~4K elements a tile: 32 elements in flight per thread at 4 warps (see ``launch``).
_TILE_ELEMS = 4096


def launch(*block: int, per_thread: int = 32) -> dict:
    """Compile options of a launch whose programs each cover a tile of ``block`` (its dimensions).

    Warps (4 to 16): enough that a thread holds at most ``per_thread`` elements. 32 (4 warps on a
    4K tile) keeps most kernels within sm_90's 255 registers with the most tiles resident per SM;
    kernels that would spill there pass 16 (attention_sum's backward with its five accumulator
    tiles, radix_pool's backward, Res2Net's chain, whose per-element 64-bit index math is heavy).
    tests/test_triton_compile.py::test_no_spills_at_benchmark_shapes checks the split-attention ones.
    No fused multiply-add: y * scale + shift rounds after the product and after the sum, as torch
    and the CUDA backend compute it, so that the ReLU masks (pre > 0) of all backends agree where
    pre is within a rounding of zero.
    """
    threads = math.prod(block) // per_thread
    return {"enable_fp_fusion": False, "num_warps": min(16, max(4, triton.next_power_of_2(threads) // 32))}


# CUDA grids hold at most 65535 programs along axes 1 and 2.
_MAX_GRID_YZ = 65535


def tile_shape(y, channels: int, reduce_hw: bool) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW) for ``y`` (B, *, H, W) with ``channels`` channels a program may cover.

    ``reduce_hw``: the program loops over the whole H*W extent, so BLOCK_HW need not cover it.
    """
    # Empty extents still get blocks of one element, so that grids and splits stay defined.
    hw, channels = max(1, y.shape[2] * y.shape[3]), max(1, channels)
    if _layout.hw_stride(y) == 1 and y.stride(1) != 1:
        block_hw = min(triton.next_power_of_2(hw), 1024 if reduce_hw else 512)
        # At most 16 rows: threads lie along H*W, so on small maps each holds a share of every
        # row's values (scale, shift, attention, sums); 64 rows at 7x7 spill registers.
        block_c = min(triton.next_power_of_2(channels), max(1, _TILE_ELEMS // block_hw), 16)
    else:
        block_c = min(triton.next_power_of_2(channels), 128)
        block_hw = min(triton.next_power_of_2(hw), max(1, _TILE_ELEMS // block_c))
    return block_c, block_hw


@functools.cache
def programs_wanted(device: torch.device) -> int:
    """Programs a grid needs to keep ``device``'s memory busy: 4 per SM (each with a tile of loads
    in flight). The interpreter runs programs one by one: 8 there, so that CPU tests take both
    paths of ``hw_splits``."""
    if device.type != "cuda":
        return 8
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def hw_splits(y, programs: int, block_hw: int) -> tuple[int, int]:
    """(splits, chunk) for a reduction over H*W whose grid has ``programs`` programs per split.

    A grid of B x channel blocks can leave most SMs idle (NHWC at 56x56: 64 programs on 132
    SMs), so each row's H*W range is cut into ``splits`` chunks of ``chunk`` pixels, a multiple of
    ``block_hw`` (no tile straddles two chunks), each reduced by its own program into a partial
    that the launcher combines. It splits only where that at least doubles the grid, and keeps two
    tiles or more per program: combining costs the launcher a small op, which the small maps, where
    the host's time per launch dominates, should not pay.
    """
    tiles = max(1, triton.cdiv(y.shape[2] * y.shape[3], block_hw))
    splits = max(1, min(programs_wanted(y.device) // max(programs, 1), tiles // 2))
    per_split = triton.cdiv(tiles, splits)
    return triton.cdiv(tiles, per_split), per_split * block_hw


def hw_tiles(y, block_hw: int) -> tuple[int, int]:
    """(programs, tiles per program) along grid axis 2 for an elementwise pass over y's H*W in
    tiles of ``block_hw`` pixels: one tile a program, unless the map has more tiles than axis 2
    may hold programs (a map of millions of pixels)."""
    tiles = max(1, triton.cdiv(y.shape[2] * y.shape[3], block_hw))
    per_program = triton.cdiv(tiles, _MAX_GRID_YZ)
    return triton.cdiv(tiles, per_program), per_program


def strides(t) -> tuple[int, int, int]:
    """(stride_b, stride_c, stride_hw) of a dense 4-D tensor."""
    return t.stride(0), t.stride(1), _layout.hw_stride(t)


@triton.jit
def tile_offsets(b, ch, hw, stride_b, stride_c, stride_hw):
    """Element offsets of tile rows ``ch`` (channels) and columns ``hw`` in batch item ``b``.

    64-bit, so tensors of more than 2**31 elements address correctly.
    """
    return b * stride_b + ch.to(tl.int64)[:, None] * stride_c + hw.to(tl.int64)[None, :] * stride_hw


@triton.jit
def hw_chunk(CHUNK, HW):
    """(split, start, end): this program's H*W chunk, axis 2 of the grid (see ``hw_splits``).
    64-bit: a chunk's end may pass 2**31 on a map of almost that many pixels."""
    split = tl.program_id(2)
    start = split.to(tl.int64) * CHUNK
    return split, start, tl.minimum(start + CHUNK, HW)


@triton.jit
def hw_tile(t, TILES, BLOCK_HW: tl.constexpr):
    """Pixel indices of tile ``t`` of this program's ``TILES`` along grid axis 2 (see ``hw_tiles``);
    64-bit, for maps of more than 2**31 pixels."""
    return (tl.program_id(2).to(tl.int64) * TILES + t) * BLOCK_HW + tl.arange(0, BLOCK_HW)


@triton.jit
def relu(x):
    """max(x, 0) with NaN passed through, as torch.relu (the GPU's max instruction drops NaN)."""
    return tl.where(x <= 0, 0.0, x)


@triton.jit
def bn_relu(v, scale, shift):
    """relu(v * scale + shift) with per-row (channel) scale and shift, and its ``> 0`` mask, the
    gradient mask of torch's ReLU backward."""
    pre = v * scale[:, None] + shift[:, None]
    return relu(pre), pre > 0
