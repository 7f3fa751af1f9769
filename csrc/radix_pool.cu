// radix_pool: gap[b, c] = 1/HW * sum_r sum_hw relu(y[b, r*C + c, hw] * scale + shift) in one read
// of y, and its backward. With groups K, channel r*C + c of the formula is y's
// grouped_first(c) + r*C/K (common.cuh).
#include "common.cuh"

namespace splat {
namespace {

// NCHW forward: one group per output (b, c) walks the same chunk of the R rows
// (b, grouped_first(c) + r*CG). A single chunk writes gap; split rows write per-chunk sums
// (B, splits, C), added up by the caller.
template <typename T>
__global__ void __launch_bounds__(kMaxBlock)
    pool_forward_nchw(const T* __restrict__ y, const acc_t<T>* __restrict__ scale,
                      const acc_t<T>* __restrict__ shift, T* __restrict__ gap, acc_t<T>* __restrict__ part,
                      int64_t outputs, int64_t C, int64_t R, Groups gs, int64_t hw, RowPlan p) {
  using A = acc_t<T>;
  constexpr int V = vec_width<T>;
  __shared__ A smem[kMaxBlock / 32];
  const RowChunk u = row_chunk(p, hw);
  const int64_t b = u.row / C, c = u.row % C;
  A sum = 0;
  if (u.row < outputs) {
    const int64_t ch0 = grouped_first(c, gs);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t ch = ch0 + r * gs.cg;
      const T* row = y + (b * R * C + ch) * hw + u.begin;
      const A s = scale[ch], t = shift[ch];
      for_row<V>(u.n, aligned_head<V>(u.n, row), u.lane, p.group, [&](int64_t i, auto w) {
        constexpr int W = decltype(w)::value;
        const auto v = load<W>(row + i);
#pragma unroll
        for (int k = 0; k < W; ++k) sum += relu(affine(A(v.v[k]), s, t));
      });
    }
  }
  sum = group_reduce(sum, p.group, smem);
  if (u.row < outputs && u.lane == 0) {
    if (p.splits == 1) {
      gap[u.row] = T(sum / A(hw));
    } else {
      part[(b * p.splits + u.split) * C + c] = sum;
    }
  }
}

// NHWC forward: a lane sums V contiguous channels over its pixels, one radix at a time; the
// per-split sums (B, splits, C) are added up by the caller. V > 1 needs V | CG, so that the V
// channels of a radix are contiguous in y.
template <typename T, int V>
__global__ void __launch_bounds__(kBlock)
    pool_forward_nhwc(const T* __restrict__ y, const acc_t<T>* __restrict__ scale,
                      const acc_t<T>* __restrict__ shift, acc_t<T>* __restrict__ part, int64_t C, int64_t R,
                      Groups gs, int64_t hw, NhwcPlan p) {
  using A = acc_t<T>;
  __shared__ A smem[kBlock * V];
  const NhwcTile t = nhwc_tile(p, hw);
  const int64_t c0 = (t.tile * p.tx + t.tx) * V;
  A sum[V] = {};
  if (c0 < C) {
    const int64_t ch0 = grouped_first(c0, gs);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t ch = ch0 + r * gs.cg;
      const T* col = y + t.batch * hw * R * C + ch;
      A s[V], sh[V];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        s[k] = scale[ch + k];
        sh[k] = shift[ch + k];
      }
#pragma unroll 4
      for (int64_t i = t.begin + t.ty; i < t.end; i += p.ty) {
        const auto v = load<V>(col + i * R * C);
#pragma unroll
        for (int k = 0; k < V; ++k) sum[k] += relu(affine(A(v.v[k]), s[k], sh[k]));
      }
    }
  }
  reduce_columns(sum, t, p, smem, [&](int col, A total) {
    const int64_t c = t.tile * p.tx * V + col;
    if (c < C) part[(t.batch * p.splits + t.split) * C + c] = total;
  });
}

// NCHW backward: one group per chunk of a row (b, ch) writes dy and the chunk's terms of dscale and
// dshift, at (b * splits + split, ch).
template <typename T>
__global__ void __launch_bounds__(kMaxBlock)
    pool_backward_nchw(const acc_t<T>* __restrict__ dgap, const T* __restrict__ y,
                       const acc_t<T>* __restrict__ scale, const acc_t<T>* __restrict__ shift,
                       T* __restrict__ dy, acc_t<T>* __restrict__ dscale_part,
                       acc_t<T>* __restrict__ dshift_part, int64_t rows, int64_t C, int64_t RC, Groups gs,
                       int64_t hw, RowPlan p) {
  using A = acc_t<T>;
  constexpr int V = vec_width<T>;
  __shared__ Sums<A, 2> smem[kMaxBlock / 32];
  const RowChunk u = row_chunk(p, hw);
  const int64_t b = u.row / RC, ch = u.row % RC;
  Sums<A, 2> acc{};
  A g = 0;
  if (u.row < rows) {
    g = dgap[b * C + plain_of(ch, gs)] / A(hw);
    const A s = scale[ch], t = shift[ch], ds = g * s;
    const T* yr = y + u.row * hw + u.begin;
    T* dr = dy + u.row * hw + u.begin;
    for_row<V>(u.n, aligned_head<V>(u.n, yr, dr), u.lane, p.group, [&](int64_t i, auto w) {
      constexpr int W = decltype(w)::value;
      const auto v = load<W>(yr + i);
      Pack<T, W> d;
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const A x = A(v.v[k]);
        const bool on = affine(x, s, t) > A(0);
        d.v[k] = T(on ? ds : A(0));
        acc.v[0] += on ? x : A(0);
        acc.v[1] += on ? A(1) : A(0);
      }
      store<W>(dr + i, d);
    });
  }
  acc = group_reduce(acc, p.group, smem);
  if (u.row < rows && u.lane == 0) {
    const int64_t at = (b * p.splits + u.split) * RC + ch;
    dscale_part[at] = g * acc.v[0];
    dshift_part[at] = g * acc.v[1];
  }
}

// NHWC backward: a lane owns V contiguous channels of one radix slice (V > 1 needs V | CG, so that
// they are V contiguous channels of dgap too); per-split terms of dscale and dshift go to
// (B * splits, RC).
template <typename T, int V>
__global__ void __launch_bounds__(kBlock)
    pool_backward_nhwc(const acc_t<T>* __restrict__ dgap, const T* __restrict__ y,
                       const acc_t<T>* __restrict__ scale, const acc_t<T>* __restrict__ shift,
                       T* __restrict__ dy, acc_t<T>* __restrict__ dscale_part,
                       acc_t<T>* __restrict__ dshift_part, int64_t C, int64_t RC, Groups gs, int64_t hw,
                       NhwcPlan p) {
  using A = acc_t<T>;
  __shared__ Sums<A, 2> smem[kBlock * V];
  const NhwcTile t = nhwc_tile(p, hw);
  const int64_t ch0 = (t.tile * p.tx + t.tx) * V;
  Sums<A, 2> acc[V] = {};
  if (ch0 < RC) {
    const A* g = dgap + t.batch * C + plain_of(ch0, gs);
    A s[V], sh[V], ds[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      s[k] = scale[ch0 + k];
      sh[k] = shift[ch0 + k];
      ds[k] = g[k] / A(hw) * s[k];
    }
    const int64_t offset = t.batch * hw * RC + ch0;
#pragma unroll 4
    for (int64_t i = t.begin + t.ty; i < t.end; i += p.ty) {
      const auto v = load<V>(y + offset + i * RC);
      Pack<T, V> d;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A x = A(v.v[k]);
        const bool on = affine(x, s[k], sh[k]) > A(0);
        d.v[k] = T(on ? ds[k] : A(0));
        acc[k].v[0] += on ? x : A(0);
        acc[k].v[1] += on ? A(1) : A(0);
      }
      store<V>(dy + offset + i * RC, d);
    }
  }
  reduce_columns(acc, t, p, smem, [&](int col, const Sums<A, 2>& total) {
    const int64_t ch = t.tile * p.tx * V + col;
    if (ch < RC) {
      const A g = dgap[t.batch * C + plain_of(ch, gs)] / A(hw);
      const int64_t at = (t.batch * p.splits + t.split) * RC + ch;
      dscale_part[at] = g * total.v[0];
      dshift_part[at] = g * total.v[1];
    }
  });
}

void check_pool_inputs(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift, int64_t radix,
                       int64_t groups) {
  check_conv_output(y, radix);
  check_groups(y, radix, groups);
  check_channel_vector(scale, y, "scale");
  check_channel_vector(shift, y, "shift");
}

at::Tensor radix_pool_forward(const at::Tensor& y_in, const at::Tensor& scale_in, const at::Tensor& shift_in,
                              int64_t radix, int64_t groups) {
  check_pool_inputs(y_in, scale_in, shift_in, radix, groups);
  const auto fmt = layout_of(y_in);
  const at::Tensor y = y_in.contiguous(fmt), scale = scale_in.contiguous(), shift = shift_in.contiguous();
  const int64_t B = y.size(0), RC = y.size(1), C = RC / radix, hw = y.size(2) * y.size(3);
  const Groups gs{C / groups, RC / groups};
  if (y.numel() == 0) {  // a mean over no pixels is NaN, as in torch
    return at::full({B, C}, std::numeric_limits<double>::quiet_NaN(), y.options());
  }
  const c10::cuda::CUDAGuard guard(y.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor gap;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "radix_pool_forward", [&] {
    using A = acc_t<scalar_t>;
    constexpr int V = vec_width<scalar_t>;
    at::Tensor part;  // per-split sums (B, splits, C); undefined when NCHW rows are one chunk each
    if (fmt == at::MemoryFormat::Contiguous) {
      const RowPlan plan = plan_rows(B * C, hw, V, sm_count(y.get_device()));
      if (plan.splits == 1) {
        gap = at::empty({B, C}, y.options());
      } else {
        part = at::empty({B, plan.splits, C}, scale.options());
      }
      pool_forward_nchw<scalar_t><<<plan.blocks, plan.threads, 0, stream>>>(
          y.const_data_ptr<scalar_t>(), scale.const_data_ptr<A>(), shift.const_data_ptr<A>(),
          plan.splits == 1 ? gap.mutable_data_ptr<scalar_t>() : nullptr,
          plan.splits == 1 ? nullptr : part.mutable_data_ptr<A>(), B * C, C, radix, gs, hw, plan);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const bool vec = gs.cg % V == 0 && aligned(y.const_data_ptr());
      const NhwcPlan plan = plan_nhwc(vec ? C / V : C, B, hw, sm_count(y.get_device()));
      part = at::empty({B, plan.splits, C}, scale.options());
      const auto kernel = vec ? pool_forward_nhwc<scalar_t, V> : pool_forward_nhwc<scalar_t, 1>;
      kernel<<<nhwc_blocks(plan, B), kBlock, 0, stream>>>(
          y.const_data_ptr<scalar_t>(), scale.const_data_ptr<A>(), shift.const_data_ptr<A>(),
          part.mutable_data_ptr<A>(), C, radix, gs, hw, plan);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (part.defined()) gap = part.sum(1).div_(hw).to(y.scalar_type());
  });
  return gap;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> radix_pool_backward(const at::Tensor& dgap_in,
                                                                   const at::Tensor& y_in,
                                                                   const at::Tensor& scale_in,
                                                                   const at::Tensor& shift_in, int64_t radix,
                                                                   int64_t groups) {
  check_pool_inputs(y_in, scale_in, shift_in, radix, groups);
  check_on_device_of(dgap_in, y_in, "dgap", "y");
  check_floating(dgap_in, "dgap");
  check_shape(dgap_in, {y_in.size(0), y_in.size(1) / radix}, "dgap");
  const auto fmt = layout_of(y_in);
  const at::Tensor y = y_in.contiguous(fmt), scale = scale_in.contiguous(), shift = shift_in.contiguous();
  const at::Tensor dgap = dgap_in.to(scale.scalar_type()).contiguous();
  const int64_t B = y.size(0), RC = y.size(1), C = RC / radix, hw = y.size(2) * y.size(3);
  const Groups gs{C / groups, RC / groups};
  const at::Tensor dy = at::empty(y.sizes(), y.options().memory_format(fmt));
  if (y.numel() == 0) return {dy, at::zeros_like(scale), at::zeros_like(scale)};
  const c10::cuda::CUDAGuard guard(y.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor dscale_part, dshift_part;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "radix_pool_backward", [&] {
    using A = acc_t<scalar_t>;
    constexpr int V = vec_width<scalar_t>;
    if (fmt == at::MemoryFormat::Contiguous) {
      const RowPlan plan = plan_rows(B * RC, hw, V, sm_count(y.get_device()));
      dscale_part = at::empty({B * plan.splits, RC}, scale.options());
      dshift_part = at::empty({B * plan.splits, RC}, scale.options());
      pool_backward_nchw<scalar_t><<<plan.blocks, plan.threads, 0, stream>>>(
          dgap.const_data_ptr<A>(), y.const_data_ptr<scalar_t>(), scale.const_data_ptr<A>(),
          shift.const_data_ptr<A>(), dy.mutable_data_ptr<scalar_t>(), dscale_part.mutable_data_ptr<A>(),
          dshift_part.mutable_data_ptr<A>(), B * RC, C, RC, gs, hw, plan);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const bool vec = gs.cg % V == 0 && aligned(y.const_data_ptr());
      const NhwcPlan plan = plan_nhwc(vec ? RC / V : RC, B, hw, sm_count(y.get_device()));
      dscale_part = at::empty({B * plan.splits, RC}, scale.options());
      dshift_part = at::empty({B * plan.splits, RC}, scale.options());
      const auto kernel = vec ? pool_backward_nhwc<scalar_t, V> : pool_backward_nhwc<scalar_t, 1>;
      kernel<<<nhwc_blocks(plan, B), kBlock, 0, stream>>>(
          dgap.const_data_ptr<A>(), y.const_data_ptr<scalar_t>(), scale.const_data_ptr<A>(),
          shift.const_data_ptr<A>(), dy.mutable_data_ptr<scalar_t>(), dscale_part.mutable_data_ptr<A>(),
          dshift_part.mutable_data_ptr<A>(), C, RC, gs, hw, plan);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {dy, dscale_part.sum(0), dshift_part.sum(0)};
}

}  // namespace
}  // namespace splat

TORCH_LIBRARY_IMPL(splat_cuda, CUDA, m) {
  m.impl("radix_pool_forward", &splat::radix_pool_forward);
  m.impl("radix_pool_backward", &splat::radix_pool_backward);
}
