"""The CPU emulator of CUDA (csrc/cuda_emulator.h) that runs the C++/CUDA kernels without a GPU.

Small kernels of this file, built through the same source rewrite as csrc/, check that it computes
what a GPU computes (thread and block indices, shared memory, barriers, warp shuffles) and that it
stops the launches a GPU leaves undefined or rejects, rather than emulating one outcome.
"""

import pytest
import torch
from torch.utils import cpp_extension

import splat
from splat import _cuda

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the emulator stands in for a GPU where there is none")

KERNELS = r"""
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

// The sum over its warp of each thread's linear index, through a butterfly of shuffles, plus the
// block's first value read back through shared memory after a barrier.
__global__ void __launch_bounds__(256) butterfly(float* out) {
  __shared__ float first[1];
  float v = float(threadIdx.y * blockDim.x + threadIdx.x);
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x == 0 && threadIdx.y == 0) first[0] = v;
  __syncthreads();
  const int64_t block = blockIdx.y * gridDim.x + blockIdx.x;
  out[block * blockDim.x * blockDim.y + threadIdx.y * blockDim.x + threadIdx.x] = v + 1000.0f * first[0];
}

__global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

__global__ void divergent_shuffle(float* out) {
  out[threadIdx.x] = threadIdx.x < 16 ? __shfl_xor_sync(0xffffffffu, 1.0f, 1) : __shfl_xor_sync(0xffffffffu, 2.0f, 1);
}

__global__ void barrier_after_exit(float* out) {
  if (threadIdx.x >= 32) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void shuffle_with_exited_lane(float* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

__global__ void partial_warp_shuffle(float* out) { out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1); }

// Row m of out: the lane each lane reads with lane mask kMasks[m] (33 and -1 point outside the warp).
constexpr int kMasks[] = {1, 2, 4, 8, 16, 31, 33, -1};
__global__ void shuffle_sources(float* out) {
  for (int m = 0; m < 8; ++m) {
    out[m * blockDim.x + threadIdx.x] = __shfl_xor_sync(0xffffffffu, float(threadIdx.x), kMasks[m]);
  }
}

// Every block writes out[0]: the last block to run wins (a race between blocks).
__global__ void last_block(float* out) {
  if (threadIdx.x == 0) out[0] = float(blockIdx.x);
}

// Each thread reads its neighbour's shared value, with or without the barrier between its write
// and that read: without it the result depends on the order the threads run in.
__global__ void neighbour(float* out, bool barrier) {
  __shared__ float values[64];
  values[threadIdx.x] = float(threadIdx.x);
  if (barrier) __syncthreads();
  out[threadIdx.x] = values[(threadIdx.x + 1) % blockDim.x];
}

at::Tensor run(const at::Tensor& out, int64_t kernel, int64_t grid_x, int64_t grid_y, int64_t block_x,
               int64_t block_y) {
  TORCH_CHECK(out.is_cuda() && out.get_device() == 0, "out must be on the emulated device");
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(grid_x, grid_y), block(block_x, block_y);
  float* p = out.mutable_data_ptr<float>();
  switch (kernel) {
    case 0: butterfly<<<grid, block, 0, stream>>>(p); break;
    case 1: divergent_barrier<<<grid, block, 0, stream>>>(p); break;
    case 2: barrier_after_exit<<<grid, block, 0, stream>>>(p); break;
    case 3: shuffle_with_exited_lane<<<grid, block, 0, stream>>>(p); break;
    case 4: partial_warp_shuffle<<<grid, block, 0, stream>>>(p); break;
    case 5: divergent_shuffle<<<grid, block, 0, stream>>>(p); break;
    case 6: neighbour<<<grid, block, 0, stream>>>(p, false); break;
    case 7: neighbour<<<grid, block, 0, stream>>>(p, true); break;
    case 8: shuffle_sources<<<grid, block, 0, stream>>>(p); break;
    case 9: last_block<<<grid, block, 0, stream>>>(p); break;
  }
  return out;
}

TORCH_LIBRARY(splat_emulator_test, m) {
  m.def("run(Tensor(a!) out, int kernel, int grid_x, int grid_y, int block_x, int block_y) -> Tensor(a!)");
}
TORCH_LIBRARY_IMPL(splat_emulator_test, CUDA, m) { m.impl("run", &run); }
"""

(
    BUTTERFLY,
    DIVERGENT_BARRIER,
    BARRIER_AFTER_EXIT,
    SHUFFLE_WITH_EXITED_LANE,
    PARTIAL_WARP_SHUFFLE,
    DIVERGENT_SHUFFLE,
    RACY_NEIGHBOUR,
    NEIGHBOUR,
    SHUFFLE_SOURCES,
    LAST_BLOCK,
) = range(10)


@pytest.fixture(scope="module")
def run():
    if not cpp_extension.is_ninja_available():
        pytest.skip("building the emulated kernels needs ninja")
    _cuda.build_emulated("splat_emulator_test", {"kernels.cu": KERNELS})

    def launch(kernel, grid, block, size=None):
        out = torch.full((size or grid[0] * grid[1] * block[0] * block[1],), float("nan"))
        return torch.ops.splat_emulator_test.run(out, kernel, *grid, *block)

    return launch


@pytest.mark.parametrize("grid, block", [((3, 1), (64, 1)), ((2, 3), (32, 4)), ((1, 1), (256, 1))])
def test_indices_shuffles_and_shared_memory(run, grid, block):
    out = run(BUTTERFLY, grid, block).view(-1, block[0] * block[1])
    t = torch.arange(block[0] * block[1], dtype=torch.float32)
    warp_sums = t.view(-1, 32).sum(1, keepdim=True).expand(-1, 32).reshape(-1)
    assert torch.equal(out, (warp_sums + 1000 * warp_sums[0]).expand_as(out))


@pytest.mark.parametrize(
    "kernel, grid, block, match",
    [
        (BUTTERFLY, (1, 1), (512, 1), r"over its __launch_bounds__\(256\)"),
        (BUTTERFLY, (0, 1), (64, 1), "invalid grid"),
        (BUTTERFLY, (1, 1), (2048, 1), "invalid block size"),
        (DIVERGENT_BARRIER, (1, 1), (64, 1), "wait at different barriers"),
        (BARRIER_AFTER_EXIT, (1, 1), (64, 1), "__syncthreads after 32 of 64 threads exited"),
        (SHUFFLE_WITH_EXITED_LANE, (1, 1), (32, 1), "wait at different barriers"),
        (PARTIAL_WARP_SHUFFLE, (1, 1), (48, 1), "shuffle in a partial warp of 16 threads"),
        (DIVERGENT_SHUFFLE, (1, 1), (32, 1), "wait at different barriers"),
    ],
)
def test_undefined_launches_stop(run, kernel, grid, block, match):
    with pytest.raises(RuntimeError, match=match):
        run(kernel, grid, block)
    assert torch.equal(run(BUTTERFLY, (1, 1), (32, 1)), torch.full((32,), 496.0 * 1001))  # and it recovers


def test_splat_kernels_build_for_it():
    """Without this the tests of backend="cuda" would all skip, silently, where the build fails."""
    assert _cuda.emulated(), "tests/conftest.py sets SPLAT_CUDA_EMULATE=1 where there is no GPU"
    ok, why = splat.backends()["cuda"]
    assert ok, why


def test_every_rewrite_applies():
    copies, unmatched = _cuda.emulator_sources({"kernels.cu": KERNELS})
    assert list(copies) == ["kernels.cpp"] and unmatched == []
    without_bounds = KERNELS.replace("__launch_bounds__(256) ", "")
    assert _cuda.emulator_sources({"kernels.cu": without_bounds})[1] == [r"__launch_bounds__\((\w+)\)([^{;]*)\{"]


def test_shuffle_sources(run):
    lanes = torch.arange(64)
    masks = torch.tensor([1, 2, 4, 8, 16, 31, 33, -1]).view(-1, 1)
    source = lanes % 32 ^ masks
    expected = torch.where((source >= 0) & (source < 32), lanes - lanes % 32 + source, lanes)  # own value outside
    assert torch.equal(run(SHUFFLE_SOURCES, (1, 1), (64, 1), size=8 * 64).view(8, 64), expected.float())


def test_thread_and_block_order_expose_races(run, monkeypatch):
    """Reversed, the threads of a block and the blocks of a grid run in the opposite order: a race
    between threads on shared memory, or between blocks on global memory, changes the result."""
    ordered = torch.arange(1, 65, dtype=torch.float32) % 64
    nan = float("nan")
    racy = {
        "forward": torch.tensor([nan] * 63 + [0.0]),  # each thread reads its neighbour before it writes
        "reverse": torch.cat([ordered[:63], torch.tensor([nan])]),
    }
    for order, expected in racy.items():
        monkeypatch.setenv("SPLAT_CUDA_EMULATE_ORDER", order)
        assert torch.equal(run(NEIGHBOUR, (1, 1), (64, 1)), ordered)
        torch.testing.assert_close(run(RACY_NEIGHBOUR, (1, 1), (64, 1)), expected, equal_nan=True, rtol=0, atol=0)
        last = run(LAST_BLOCK, (5, 1), (32, 1), size=1).item()
        assert last == (4.0 if order == "forward" else 0.0)
