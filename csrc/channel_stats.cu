// channel_stats: per-channel mean and biased variance over (B, H, W) for training-mode BatchNorm,
// and its backward.
//
// Each (batch, pixel-chunk) partial is a Welford state (count, mean, M2) built from exact two-pass
// statistics of small register chunks; the partials are merged in a fixed order with Chan's
// formula, so the result is deterministic and free of the cancellation of E[y^2] - E[y]^2.
#include "common.cuh"

namespace splat {
namespace {

// NCHW: one group per chunk of a row (b, ch); partials (B * splits, RC).
template <typename T>
__global__ void __launch_bounds__(kMaxBlock)
    stats_nchw(const T* __restrict__ y, acc_t<T>* __restrict__ mean_part, acc_t<T>* __restrict__ m2_part,
               int64_t rows, int64_t RC, int64_t hw, RowPlan p) {
  using A = acc_t<T>;
  constexpr int V = vec_width<T>;
  __shared__ Welford<A> smem[kMaxBlock / 32];
  const RowChunk u = row_chunk(p, hw);
  Welford<A> st{};
  if (u.row < rows) {
    const T* yr = y + u.row * hw + u.begin;
    for_row<V>(u.n, aligned_head<V>(u.n, yr), u.lane, p.group, [&](int64_t i, auto w) {
      constexpr int W = decltype(w)::value;
      const auto v = load<W>(yr + i);
      A x[W];
#pragma unroll
      for (int k = 0; k < W; ++k) x[k] = A(v.v[k]);
      st = combine(st, welford_of(x, W));
    });
  }
  st = group_reduce(st, p.group, smem);
  if (u.row < rows && u.lane == 0) {
    const int64_t at = (u.row / RC * p.splits + u.split) * RC + u.row % RC;
    mean_part[at] = st.mean;
    m2_part[at] = st.m2;
  }
}

// NHWC: a lane owns V contiguous channels and folds in kRows pixels at a time; partials
// (B * splits, RC).
template <typename T, int V>
__global__ void __launch_bounds__(kBlock)
    stats_nhwc(const T* __restrict__ y, acc_t<T>* __restrict__ mean_part, acc_t<T>* __restrict__ m2_part,
               int64_t RC, int64_t hw, NhwcPlan p) {
  using A = acc_t<T>;
  __shared__ Welford<A> smem[kBlock * V];
  const NhwcTile t = nhwc_tile(p, hw);
  const int64_t ch0 = (t.tile * p.tx + t.tx) * V;
  Welford<A> st[V] = {};
  if (ch0 < RC) {
    const T* yb = y + t.batch * hw * RC + ch0;
    for (int64_t i0 = t.begin + t.ty; i0 < t.end; i0 += int64_t(p.ty) * kRows) {
      A x[V][kRows] = {};
      int count = 0;
#pragma unroll
      for (int u = 0; u < kRows; ++u) {
        const int64_t i = i0 + int64_t(u) * p.ty;
        if (i < t.end) {
          const auto v = load<V>(yb + i * RC);
#pragma unroll
          for (int k = 0; k < V; ++k) x[k][u] = A(v.v[k]);
          ++count;
        }
      }
#pragma unroll
      for (int k = 0; k < V; ++k) st[k] = combine(st[k], welford_of(x[k], count));
    }
  }
  reduce_columns(st, t, p, smem, [&](int col, const Welford<A>& total) {
    const int64_t ch = t.tile * p.tx * V + col;
    if (ch < RC) {
      const int64_t at = (t.batch * p.splits + t.split) * RC + ch;
      mean_part[at] = total.mean;
      m2_part[at] = total.m2;
    }
  });
}

// Merges the B * splits partials of 32 channels per block: lanes span the channels (coalesced),
// each of the 32 warps folds every 32nd partial, then a fixed tree merges the warps' states.
template <typename A>
__global__ void __launch_bounds__(kMaxBlock)
    stats_merge(const A* __restrict__ mean_part, const A* __restrict__ m2_part, A* __restrict__ mean,
                A* __restrict__ var, int64_t parts, int64_t RC, int64_t splits, int64_t chunk, int64_t hw, A count) {
  constexpr int kSlices = kMaxBlock / 32;
  __shared__ Welford<A> smem[kMaxBlock];
  const int lane = threadIdx.x % 32, slice = threadIdx.x / 32;
  const int64_t ch = int64_t(blockIdx.x) * 32 + lane;
  Welford<A> st{};
  if (ch < RC) {
    for (int64_t q = slice; q < parts; q += kSlices) {
      const int64_t begin = q % splits * chunk;
      const A n = A(begin + chunk < hw ? chunk : hw - begin);
      st = combine(st, Welford<A>{n, mean_part[q * RC + ch], m2_part[q * RC + ch]});
    }
  }
  smem[threadIdx.x] = st;
  for (int half = kSlices / 2; half > 0; half /= 2) {
    __syncthreads();
    if (slice < half) {
      st = combine(st, smem[(slice + half) * 32 + lane]);
      smem[threadIdx.x] = st;
    }
  }
  if (slice == 0 && ch < RC) {
    mean[ch] = st.mean;
    var[ch] = st.m2 / count;
  }
}

// NCHW backward: one group per chunk of a row (b, ch), elementwise.
template <typename T>
__global__ void __launch_bounds__(kMaxBlock)
    stats_backward_nchw(const acc_t<T>* __restrict__ dmean, const acc_t<T>* __restrict__ dvar,
                        const T* __restrict__ y, const acc_t<T>* __restrict__ mean, T* __restrict__ dy,
                        int64_t rows, int64_t RC, int64_t hw, acc_t<T> inv_n, RowPlan p) {
  using A = acc_t<T>;
  constexpr int V = vec_width<T>;
  const RowChunk u = row_chunk(p, hw);
  if (u.row >= rows) return;
  const int64_t ch = u.row % RC;
  const A dm = dmean[ch], dv = A(2) * dvar[ch], mu = mean[ch];
  const T* yr = y + u.row * hw + u.begin;
  T* dr = dy + u.row * hw + u.begin;
  for_row<V>(u.n, aligned_head<V>(u.n, yr, dr), u.lane, p.group, [&](int64_t i, auto w) {
    constexpr int W = decltype(w)::value;
    const auto v = load<W>(yr + i);
    Pack<T, W> d;
#pragma unroll
    for (int k = 0; k < W; ++k) d.v[k] = T((dm + dv * (A(v.v[k]) - mu)) * inv_n);
    store<W>(dr + i, d);
  });
}

// NHWC backward: a lane owns V contiguous channels over the pixels of its split.
template <typename T, int V>
__global__ void __launch_bounds__(kBlock)
    stats_backward_nhwc(const acc_t<T>* __restrict__ dmean, const acc_t<T>* __restrict__ dvar,
                        const T* __restrict__ y, const acc_t<T>* __restrict__ mean, T* __restrict__ dy, int64_t RC,
                        int64_t hw, acc_t<T> inv_n, NhwcPlan p) {
  using A = acc_t<T>;
  const NhwcTile t = nhwc_tile(p, hw);
  const int64_t ch0 = (t.tile * p.tx + t.tx) * V;
  if (ch0 >= RC) return;
  A dm[V], dv[V], mu[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    dm[k] = dmean[ch0 + k];
    dv[k] = A(2) * dvar[ch0 + k];
    mu[k] = mean[ch0 + k];
  }
  const int64_t offset = t.batch * hw * RC + ch0;
#pragma unroll 4
  for (int64_t i = t.begin + t.ty; i < t.end; i += p.ty) {
    const auto v = load<V>(y + offset + i * RC);
    Pack<T, V> d;
#pragma unroll
    for (int k = 0; k < V; ++k) d.v[k] = T((dm[k] + dv[k] * (A(v.v[k]) - mu[k])) * inv_n);
    store<V>(dy + offset + i * RC, d);
  }
}

void check_stats_input(const at::Tensor& y) {
  TORCH_CHECK(y.dim() == 4, "y must be 4-D (B, C, H, W), got shape ", y.sizes());
  TORCH_CHECK(y.is_cuda(), "y must be a CUDA tensor, got one on ", y.device());
  check_floating(y, "y");
}

std::tuple<at::Tensor, at::Tensor> channel_stats_forward(const at::Tensor& y_in) {
  check_stats_input(y_in);
  const auto fmt = layout_of(y_in);
  const at::Tensor y = y_in.contiguous(fmt);
  const int64_t B = y.size(0), RC = y.size(1), hw = y.size(2) * y.size(3);
  const auto acc_options = y.options().dtype(acc_dtype(y.scalar_type()));
  if (y.numel() == 0) {  // statistics of no values are NaN, as in torch
    const double nan = std::numeric_limits<double>::quiet_NaN();
    return {at::full({RC}, nan, acc_options), at::full({RC}, nan, acc_options)};
  }
  const c10::cuda::CUDAGuard guard(y.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor mean = at::empty({RC}, acc_options), var = at::empty({RC}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "channel_stats_forward", [&] {
    using A = acc_t<scalar_t>;
    constexpr int V = vec_width<scalar_t>;
    at::Tensor mean_part, m2_part;
    int64_t splits, chunk;  // of HW, for the merge
    if (fmt == at::MemoryFormat::Contiguous) {
      const RowPlan plan = plan_rows(B * RC, hw, V, sm_count(y.get_device()));
      splits = plan.splits;
      chunk = plan.chunk;
      mean_part = at::empty({B * splits, RC}, acc_options);
      m2_part = at::empty({B * splits, RC}, acc_options);
      stats_nchw<scalar_t><<<plan.blocks, plan.threads, 0, stream>>>(
          y.const_data_ptr<scalar_t>(), mean_part.mutable_data_ptr<A>(), m2_part.mutable_data_ptr<A>(), B * RC,
          RC, hw, plan);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const bool vec = RC % V == 0 && aligned(y.const_data_ptr());
      const NhwcPlan plan = plan_nhwc(vec ? RC / V : RC, B, hw, sm_count(y.get_device()));
      splits = plan.splits;
      chunk = plan.chunk;
      mean_part = at::empty({B * splits, RC}, acc_options);
      m2_part = at::empty({B * splits, RC}, acc_options);
      const auto kernel = vec ? stats_nhwc<scalar_t, V> : stats_nhwc<scalar_t, 1>;
      kernel<<<nhwc_blocks(plan, B), kBlock, 0, stream>>>(
          y.const_data_ptr<scalar_t>(), mean_part.mutable_data_ptr<A>(), m2_part.mutable_data_ptr<A>(), RC, hw,
          plan);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    stats_merge<A><<<grid_size(ceil_div(RC, 32)), kMaxBlock, 0, stream>>>(
        mean_part.const_data_ptr<A>(), m2_part.const_data_ptr<A>(), mean.mutable_data_ptr<A>(),
        var.mutable_data_ptr<A>(), B * splits, RC, splits, chunk, hw, A(B * hw));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

at::Tensor channel_stats_backward(const at::Tensor& dmean_in, const at::Tensor& dvar_in, const at::Tensor& y_in,
                                  const at::Tensor& mean_in) {
  check_stats_input(y_in);
  check_channel_vector(dmean_in, y_in, "dmean");
  check_channel_vector(dvar_in, y_in, "dvar");
  check_channel_vector(mean_in, y_in, "mean");
  const auto fmt = layout_of(y_in);
  const at::Tensor y = y_in.contiguous(fmt);
  const at::Tensor dmean = dmean_in.contiguous(), dvar = dvar_in.contiguous(), mean = mean_in.contiguous();
  const int64_t B = y.size(0), RC = y.size(1), hw = y.size(2) * y.size(3);
  const at::Tensor dy = at::empty(y.sizes(), y.options().memory_format(fmt));
  if (y.numel() == 0) return dy;
  const c10::cuda::CUDAGuard guard(y.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "channel_stats_backward", [&] {
    using A = acc_t<scalar_t>;
    constexpr int V = vec_width<scalar_t>;
    const A inv_n = A(1) / A(B * hw);
    if (fmt == at::MemoryFormat::Contiguous) {
      const RowPlan plan = plan_rows(B * RC, hw, V, sm_count(y.get_device()));
      stats_backward_nchw<scalar_t><<<plan.blocks, plan.threads, 0, stream>>>(
          dmean.const_data_ptr<A>(), dvar.const_data_ptr<A>(), y.const_data_ptr<scalar_t>(),
          mean.const_data_ptr<A>(), dy.mutable_data_ptr<scalar_t>(), B * RC, RC, hw, inv_n, plan);
    } else {
      const bool vec = RC % V == 0 && aligned(y.const_data_ptr());
      const NhwcPlan plan = plan_nhwc(vec ? RC / V : RC, B, hw, sm_count(y.get_device()));
      const auto kernel = vec ? stats_backward_nhwc<scalar_t, V> : stats_backward_nhwc<scalar_t, 1>;
      kernel<<<nhwc_blocks(plan, B), kBlock, 0, stream>>>(
          dmean.const_data_ptr<A>(), dvar.const_data_ptr<A>(), y.const_data_ptr<scalar_t>(),
          mean.const_data_ptr<A>(), dy.mutable_data_ptr<scalar_t>(), RC, hw, inv_n, plan);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dy;
}

}  // namespace
}  // namespace splat

TORCH_LIBRARY_IMPL(splat_cuda, CUDA, m) {
  m.impl("channel_stats_forward", &splat::channel_stats_forward);
  m.impl("channel_stats_backward", &splat::channel_stats_backward);
}
