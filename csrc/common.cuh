// Helpers shared by the splat_cuda kernels: dtype traits, input checks, launch plans, 16-byte
// vector access with a scalar fallback, and deterministic reductions (no floating-point atomics).
//
// Only c10/cuda headers are used on the CUDA side (not ATen/cuda/CUDAContext.h, which needs the
// cuSPARSE/cuBLAS headers), so the sources compile with a bare nvcc against any torch wheel.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace splat {

constexpr int kBlock = 256;          // threads of the NHWC kernels, and the least of the NCHW ones
constexpr int kMaxBlock = 1024;      // threads of an NCHW block when one HW row takes 1024 lanes
constexpr int kVecBytes = 16;
constexpr int kRows = 4;             // pixels an NHWC lane handles per batch of parameter loads
constexpr int kThreadsPerSm = 2048;  // resident threads of an SM (sm_80, sm_90): one full wave

// Accumulation type: float64 for float64 data, float32 otherwise.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Elements of T in one 16-byte vector.
template <typename T>
constexpr int vec_width = kVecBytes / static_cast<int>(sizeof(T));

template <int W>
using Width = std::integral_constant<int, W>;

// ---------------------------------------------------------------------------------------------
// Host side: checks, layouts, launch plans.

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t pow2_ceil(int64_t n) {
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The dense layout a 4-D tensor is computed in: channels_last only when it is NHWC and not NCHW.
inline at::MemoryFormat layout_of(const at::Tensor& t) {
  if (!t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

// Whether every array starts on a 16-byte boundary; an absent one (nullptr) does.
template <typename... P>
bool aligned(const P*... p) {
  return (true && ... && (reinterpret_cast<uintptr_t>(p) % kVecBytes == 0));
}

inline void check_floating(const at::Tensor& t, const char* name) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kDouble || d == at::kHalf || d == at::kBFloat16, name,
              " must be float16, bfloat16, float32 or float64, got ", d);
}

inline void check_on_device_of(const at::Tensor& t, const at::Tensor& ref, const char* name,
                               const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

// y (B, R*C, H, W): a floating CUDA tensor whose channel count radix divides.
inline void check_conv_output(const at::Tensor& y, int64_t radix) {
  TORCH_CHECK(y.dim() == 4, "y must be 4-D (B, R*C, H, W), got shape ", y.sizes());
  TORCH_CHECK(y.is_cuda(), "y must be a CUDA tensor, got one on ", y.device());
  check_floating(y, "y");
  TORCH_CHECK(radix >= 1, "radix must be positive, got ", radix);
  TORCH_CHECK(y.size(1) % radix == 0, "radix=", radix, " must divide the channel count of y (",
              y.size(1), ")");
}

// groups K orders y's channels (k, r, j): K >= 1 must divide the C channels of each radix.
inline void check_groups(const at::Tensor& y, int64_t radix, int64_t groups) {
  TORCH_CHECK(groups >= 1, "groups must be positive, got ", groups);
  TORCH_CHECK(y.size(1) / radix % groups == 0, "groups=", groups, " must divide the channels per radix (",
              y.size(1) / radix, ")");
}

// A per-channel (R*C,) vector in y's accumulation dtype, on y's device.
inline void check_channel_vector(const at::Tensor& v, const at::Tensor& y, const char* name) {
  check_on_device_of(v, y, name, "y");
  check_shape(v, {y.size(1)}, name);
  const auto acc = acc_dtype(y.scalar_type());
  TORCH_CHECK(v.scalar_type() == acc, name, " must be ", acc, " for y of dtype ", y.scalar_type(),
              ", got ", v.scalar_type());
}

// dout (B, C, H, W) of an op over y (B, R*C, H, W), on y's device.
inline void check_dout(const at::Tensor& dout, const at::Tensor& y, int64_t radix) {
  check_on_device_of(dout, y, "dout", "y");
  check_floating(dout, "dout");
  check_shape(dout, {y.size(0), y.size(1) / radix, y.size(2), y.size(3)}, "dout");
}

// dout in y's layout, read in y's dtype or else in the accumulation dtype, as the references convert it.
inline at::Tensor dout_to_read(const at::Tensor& dout, const at::Tensor& y, at::MemoryFormat fmt) {
  const auto d = dout.scalar_type();
  return dout.to(d == y.scalar_type() ? d : acc_dtype(y.scalar_type())).contiguous(fmt);
}

inline int sm_count(c10::DeviceIndex device) {
  static std::array<std::atomic<int>, C10_COMPILE_TIME_MAX_GPUS> cache{};
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

inline unsigned grid_size(int64_t blocks) {
  TORCH_CHECK(blocks < (int64_t(1) << 31), "splat_cuda: launch of ", blocks, " blocks is too large");
  return static_cast<unsigned>(blocks);
}

// NCHW: a group of `group` lanes (a power of two) walks a chunk of `chunk` elements of one
// contiguous HW row; units enumerate (row, split), split fastest. The group is the smallest giving
// a lane at most four vectors of a row, widened (up to one vector per lane) until the grid holds a
// full wave of threads, so that short rows pack into blocks. Rows too few to fill the wave even
// then are cut into `splits` chunks of at least four vectors per lane: few long rows still fill
// the GPU, and no lane sums a whole huge map in float32, which drifts over millions of terms.
struct RowPlan {
  int group;
  int threads;
  unsigned blocks;
  int64_t splits;
  int64_t chunk;  // a multiple of the vector width, so aligned rows give aligned chunks
};

inline RowPlan plan_rows(int64_t rows, int64_t hw, int vec, int sms) {
  const int64_t wave = int64_t(sms) * kThreadsPerSm;
  const int64_t widest = std::min<int64_t>(pow2_ceil(ceil_div(hw, vec)), kMaxBlock);
  int64_t group = std::min<int64_t>(pow2_ceil(ceil_div(hw, 4 * vec)), widest);
  while (group < widest && rows * group < wave) group *= 2;
  int64_t splits =
      std::clamp<int64_t>(ceil_div(wave, rows * group), 1, std::max<int64_t>(1, hw / (4 * vec * group)));
  const int64_t chunk = ceil_div(ceil_div(hw, splits), vec) * vec;
  splits = ceil_div(hw, chunk);
  const int threads = static_cast<int>(std::max<int64_t>(group, kBlock));
  return {static_cast<int>(group), threads, grid_size(ceil_div(rows * splits, threads / group)), splits, chunk};
}

// NHWC: `tx` lanes span the channel vectors of a tile and `ty` lanes the pixels of one of `splits`
// chunks of HW; blocks enumerate (tile, split, batch), tile fastest.
struct NhwcPlan {
  int tx;
  int ty;
  int64_t tiles;
  int64_t splits;
  int64_t chunk;
};

inline NhwcPlan plan_nhwc(int64_t vecs, int64_t batch, int64_t hw, int sms) {
  NhwcPlan p;
  p.tx = static_cast<int>(std::min<int64_t>(pow2_ceil(vecs), 32));
  p.ty = kBlock / p.tx;
  p.tiles = ceil_div(vecs, p.tx);
  // Split HW until the grid holds a full wave of threads, keeping >= 4 pixels per lane.
  const int64_t want = ceil_div(int64_t(sms) * (kThreadsPerSm / kBlock), p.tiles * batch);
  p.splits = std::clamp<int64_t>(want, 1, std::max<int64_t>(1, hw / (4 * p.ty)));
  p.chunk = ceil_div(hw, p.splits);
  p.splits = ceil_div(hw, p.chunk);
  return p;
}

inline unsigned nhwc_blocks(const NhwcPlan& p, int64_t batch) { return grid_size(p.tiles * p.splits * batch); }

// ---------------------------------------------------------------------------------------------
// Device side.

// Channel layout of y with groups K: channel (r, c) of the formulas, c = k*CG + j with CG = C/K
// channels per group, is y's k*R*CG + r*CG + j; K = 1 gives r*C + c. Radix r of plain channel c
// lies at grouped_first(c) + r*CG, and y channel ch belongs to plain channel plain_of(ch).
struct Groups {
  int64_t cg;   // C / K
  int64_t rcg;  // R * C / K
};

__host__ __device__ __forceinline__ int64_t grouped_first(int64_t c, const Groups& g) {
  return c / g.cg * g.rcg + c % g.cg;
}

__host__ __device__ __forceinline__ int64_t plain_of(int64_t ch, const Groups& g) {
  return ch / g.rcg * g.cg + ch % g.cg;
}

// The unit of an NCHW lane: elements [begin, begin + n) of row `row`, walked by `lane` of its group.
// `row` may be past the last row in the last block.
struct RowChunk {
  int64_t row, split, begin, n;
  int lane;
};

__device__ __forceinline__ RowChunk row_chunk(const RowPlan& p, int64_t hw) {
  const int64_t unit = int64_t(blockIdx.x) * (blockDim.x / p.group) + threadIdx.x / p.group;
  RowChunk c;
  c.row = unit / p.splits;
  c.split = unit % p.splits;
  c.begin = c.split * p.chunk;
  c.n = c.begin + p.chunk < hw ? p.chunk : hw - c.begin;
  c.lane = static_cast<int>(threadIdx.x) % p.group;
  return c;
}

struct NhwcTile {
  int64_t tile, split, batch, begin, end;
  int tx, ty;
};

__device__ __forceinline__ NhwcTile nhwc_tile(const NhwcPlan& p, int64_t hw) {
  NhwcTile t;
  int64_t id = blockIdx.x;
  t.tile = id % p.tiles;
  id /= p.tiles;
  t.split = id % p.splits;
  t.batch = id / p.splits;
  t.begin = t.split * p.chunk;
  t.end = t.begin + p.chunk < hw ? t.begin + p.chunk : hw;
  t.tx = static_cast<int>(threadIdx.x) % p.tx;
  t.ty = static_cast<int>(threadIdx.x) / p.tx;
  return t;
}

template <typename T, int W>
struct alignas(sizeof(T) * W < kVecBytes ? sizeof(T) * W : kVecBytes) Pack {
  T v[W];
};

template <int W, typename T>
__device__ __forceinline__ Pack<T, W> load(const T* p) {
  return *reinterpret_cast<const Pack<T, W>*>(p);
}

template <int W, typename T>
__device__ __forceinline__ void store(T* p, const Pack<T, W>& v) {
  *reinterpret_cast<Pack<T, W>*>(p) = v;
}

// Elements before the first 16-byte boundary of `p`, where every array of a row starts its vector
// body; `n` (all scalar) when another array is not aligned the same way relative to `p`. An absent
// array (nullptr, not accessed) constrains nothing.
template <int V, typename T, typename... U>
__device__ __forceinline__ int64_t aligned_head(int64_t n, const T* p, const U*... q) {
  static_assert(V * sizeof(T) == kVecBytes, "the first array sets the vector width");
  const auto misalign = reinterpret_cast<uintptr_t>(p) % kVecBytes;
  const int64_t head = static_cast<int64_t>((kVecBytes - misalign) % kVecBytes / sizeof(T));
  const bool together = (true && ... &&
                         (q == nullptr ||
                          (reinterpret_cast<uintptr_t>(q) + head * sizeof(U)) % alignof(Pack<U, V>) == 0));
  return together && head < n ? head : n;
}

// Visits [0, n) of a row as a scalar head, a body of V-wide vectors and a scalar tail; lane `lane`
// of a group of `group` lanes takes every group-th step. f(i, Width<W>) handles [i, i + W).
template <int V, typename F>
__device__ __forceinline__ void for_row(int64_t n, int64_t head, int lane, int group, F&& f) {
  for (int64_t i = lane; i < head; i += group) f(i, Width<1>{});
  const int64_t body = (n - head) / V;
#pragma unroll 4
  for (int64_t k = lane; k < body; k += group) f(head + k * V, Width<V>{});
  for (int64_t i = head + body * V + lane; i < n; i += group) f(i, Width<1>{});
}

// pre = y * scale + shift rounded after each operation (no FMA), as the torch reference computes
// it, so that the ReLU masks of the backends agree.
__device__ __forceinline__ float affine(float y, float s, float t) { return __fadd_rn(__fmul_rn(y, s), t); }
__device__ __forceinline__ double affine(double y, double s, double t) { return __dadd_rn(__dmul_rn(y, s), t); }

template <typename A>
__device__ __forceinline__ A relu(A x) {
  return x < A(0) ? A(0) : x;  // NaN passes through, as torch.relu
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

// Reduction states. combine() is deterministic; shfl_xor() swaps a state with lane ^ offset.
template <typename A, int N>
struct Sums {
  A v[N];
};

template <typename A>
struct Welford {
  A n, mean, m2;
};

__device__ __forceinline__ float combine(float a, float b) { return a + b; }
__device__ __forceinline__ double combine(double a, double b) { return a + b; }

template <typename A, int N>
__device__ __forceinline__ Sums<A, N> combine(const Sums<A, N>& a, const Sums<A, N>& b) {
  Sums<A, N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r.v[i] = a.v[i] + b.v[i];
  return r;
}

// Chan et al.'s pairwise merge of (count, mean, sum of squared deviations).
template <typename A>
__device__ __forceinline__ Welford<A> combine(const Welford<A>& a, const Welford<A>& b) {
  const A n = a.n + b.n;
  if (n == A(0)) return a;
  const A w = b.n / n;
  const A d = b.mean - a.mean;
  return {n, a.mean + d * w, a.m2 + b.m2 + d * d * a.n * w};
}

// Statistics of the first `count` (>= 1) of N values, in two passes over registers.
template <int N, typename A>
__device__ __forceinline__ Welford<A> welford_of(const A (&x)[N], int count) {
  A sum = 0;
#pragma unroll
  for (int k = 0; k < N; ++k) sum += k < count ? x[k] : A(0);
  const A mean = sum / A(count);
  A m2 = 0;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const A d = x[k] - mean;
    m2 += k < count ? d * d : A(0);
  }
  return {A(count), mean, m2};
}

__device__ __forceinline__ float shfl_xor(float v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }
__device__ __forceinline__ double shfl_xor(double v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }

template <typename A, int N>
__device__ __forceinline__ Sums<A, N> shfl_xor(const Sums<A, N>& s, int o) {
  Sums<A, N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r.v[i] = shfl_xor(s.v[i], o);
  return r;
}

template <typename A>
__device__ __forceinline__ Welford<A> shfl_xor(const Welford<A>& s, int o) {
  return {shfl_xor(s.n, o), shfl_xor(s.mean, o), shfl_xor(s.m2, o)};
}

// Reduces a state over each aligned group of `group` lanes (a power of two); the first lane of a
// group gets the total. Every thread of the block must call it: it shuffles over whole warps and,
// for groups wider than a warp, synchronises the block through `smem` (blockDim / 32 states).
template <typename S>
__device__ __forceinline__ S group_reduce(S v, int group, S* smem) {
  for (int o = (group < 32 ? group : 32) / 2; o > 0; o >>= 1) v = combine(v, shfl_xor(v, o));
  if (group > 32) {
    if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = v;
    __syncthreads();
    const int first = static_cast<int>(threadIdx.x) / group * (group / 32);
    v = smem[first];
    for (int w = 1; w < group / 32; ++w) v = combine(v, smem[first + w]);
  }
  return v;
}

// NHWC: reduces each of the tx*V channel columns of a block over its ty pixel lanes, in a fixed
// order, then calls out(column, total) once per column. `smem` holds kBlock * V states.
template <int V, typename S, typename Out>
__device__ __forceinline__ void reduce_columns(const S (&part)[V], const NhwcTile& t, const NhwcPlan& p,
                                               S* smem, Out&& out) {
  const int cols = p.tx * V;
#pragma unroll
  for (int k = 0; k < V; ++k) smem[t.ty * cols + t.tx * V + k] = part[k];
  __syncthreads();
  for (int col = threadIdx.x; col < cols; col += blockDim.x) {
    S total = smem[col];
    for (int r = 1; r < p.ty; ++r) total = combine(total, smem[r * cols + col]);
    out(col, total);
  }
}

}  // namespace splat
