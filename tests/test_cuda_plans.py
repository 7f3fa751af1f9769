"""The launch plans of the C++/CUDA kernels (csrc/common.cuh: ``plan_rows``, ``plan_nhwc``).

Host code, built here through the CPU emulator. The op tests check that the kernels compute the
right values under these plans; a plan can still lose what it exists for (16-byte vectors in
every chunk, a full wave of threads, four vectors or pixels per lane) and every value stays right,
so those properties are checked on the plans themselves, over sizes from a 1x1 map to one of
more than 2**31 pixels and the SM counts of the emulator (4) and of an H100 (132).
"""

import itertools
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from splat import _cuda

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="built through the CPU emulator, which stands in for a GPU")

PLANS = r"""
#include "common.cuh"

std::vector<int64_t> row_plan(int64_t rows, int64_t hw, int64_t vec, int64_t sms) {
  const splat::RowPlan p = splat::plan_rows(rows, hw, static_cast<int>(vec), static_cast<int>(sms));
  return {p.group, p.threads, p.blocks, p.splits, p.chunk};
}

std::vector<int64_t> nhwc_plan(int64_t vecs, int64_t batch, int64_t hw, int64_t sms) {
  const splat::NhwcPlan p = splat::plan_nhwc(vecs, batch, hw, static_cast<int>(sms));
  return {p.tx, p.ty, p.tiles, p.splits, p.chunk, splat::nhwc_blocks(p, batch)};
}

TORCH_LIBRARY(splat_plan_test, m) {
  m.def("row_plan(int rows, int hw, int vec, int sms) -> int[]", &row_plan);
  m.def("nhwc_plan(int vecs, int batch, int hw, int sms) -> int[]", &nhwc_plan);
}
"""

BLOCK, MAX_BLOCK, THREADS_PER_SM = 256, 1024, 2048  # csrc/common.cuh's kBlock, kMaxBlock, kThreadsPerSm
SMS = [4, 132]
# 1x1, 7x7 (ResNeSt-50's last stage), 56x56, odd, 1024x2048 and 46341**2 > 2**31 pixels.
HWS = [1, 3, 49, 196, 3136, 66427, 1 << 21, 46341**2]


@pytest.fixture(scope="module")
def plans():
    if not cpp_extension.is_ninja_available():
        pytest.skip("building the plans needs ninja")
    common = (Path(_cuda.__file__).parent.parent / "csrc" / "common.cuh").read_text()
    _cuda.build_emulated("splat_plan_test", {"common.cuh": common, "plans.cu": PLANS})
    return torch.ops.splat_plan_test


def pow2_ceil(n):
    return 1 << (n - 1).bit_length()


def covers(hw, splits, chunk):
    """splits chunks of chunk elements cover [0, hw), none of them empty."""
    return (splits - 1) * chunk < hw <= splits * chunk


@pytest.mark.parametrize("sms", SMS)
def test_row_plan(plans, sms):
    """NCHW: ``rows`` rows of ``hw`` elements, ``vec`` of them to a 16-byte vector."""
    for rows, hw, vec in itertools.product([1, 3, 64, 4096, 1 << 16], HWS, [2, 4, 8]):
        what = f"rows={rows} hw={hw} vec={vec} sms={sms}"
        group, threads, blocks, splits, chunk = plans.row_plan(rows, hw, vec, sms)
        assert group & (group - 1) == 0 and 1 <= group <= MAX_BLOCK, what
        assert threads == max(group, BLOCK), what
        # Every chunk starts where an aligned row has a vector boundary.
        assert chunk % vec == 0, what
        assert covers(hw, splits, chunk), what
        units_per_block = threads // group
        assert (blocks - 1) * units_per_block < rows * splits <= blocks * units_per_block, what
        widest = min(pow2_ceil(-(-hw // vec)), MAX_BLOCK)  # one vector a lane
        assert group == widest or rows * group >= sms * THREADS_PER_SM, f"narrow groups on a partial wave: {what}"
        if splits > 1:
            assert chunk >= 4 * vec * group, f"fewer than four vectors a lane: {what}"
            assert rows * group < sms * THREADS_PER_SM, f"split, though the rows fill the wave: {what}"


@pytest.mark.parametrize("sms", SMS)
def test_nhwc_plan(plans, sms):
    """NHWC: ``vecs`` channel vectors a pixel, ``batch`` items of ``hw`` pixels."""
    for vecs, batch, hw in itertools.product([1, 3, 8, 16, 64, 100], [1, 2, 64], HWS):
        what = f"vecs={vecs} batch={batch} hw={hw} sms={sms}"
        tx, ty, tiles, splits, chunk, blocks = plans.nhwc_plan(vecs, batch, hw, sms)
        assert tx & (tx - 1) == 0 and 1 <= tx <= 32 and tx * ty == BLOCK, what
        assert (tiles - 1) * tx < vecs <= tiles * tx, what
        assert covers(hw, splits, chunk), what
        assert blocks == tiles * splits * batch, what
        if splits > 1:
            assert chunk >= 4 * ty, f"fewer than four pixels a lane: {what}"
            assert tiles * batch * BLOCK < sms * THREADS_PER_SM, f"split, though the tiles fill the wave: {what}"
