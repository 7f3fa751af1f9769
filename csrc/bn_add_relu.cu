// bn_add_relu: out = relu(y * scale[c] + shift[c] + residual) in one pass over y (see
// splat/ops/bn_add_relu.py), and its two backward passes, with g = dout where out > 0, else 0:
//
//   backward_sums: per channel, sum g and sum g*y over (B, H, W), from fixed-order partials
//                  per (batch, split of H*W);
//   backward_dy:   dy = g * scale[c] (+ gamma[c] + delta[c] * y with batch statistics) and the
//                  residual's gradient g.
//
// y, out and the residual share dtype T; dout is read in T or in the accumulation dtype (D). Absent
// arrays (the residual, the residual's gradient, and gamma, delta and y's reads without batch
// statistics) are nullptr and never accessed, so they constrain no vector path either.
#include "common.cuh"

namespace splat {
namespace {

// dout where out > 0, else 0, as torch's ReLU backward (a NaN output passes dout).
template <typename A>
__device__ __forceinline__ A relu_grad(A dout, A out) {
  return out <= A(0) ? A(0) : dout;
}

// Folds one element into a chunk's (sum g, sum g*y).
template <typename A>
__device__ __forceinline__ void fold(Sums<A, 2>& acc, A dout, A out, A y) {
  const A g = relu_grad(dout, out);
  acc.v[0] += g;
  acc.v[1] += g * y;
}

// dy = g * scale, plus gamma + delta * y with batch statistics (`stats`). Without them y is not
// loaded and no zero coefficients multiply it, so that an inf or NaN in y stays out of dy.
template <typename A>
__device__ __forceinline__ A dy_of(A g, A s, bool stats, A gm, A dl, A y) {
  return stats ? g * s + gm + dl * y : g * s;
}

// NCHW forward: one group per chunk of a row (b, c).
template <typename T>
__global__ void __launch_bounds__(kMaxBlock)
    forward_nchw(const T* __restrict__ y, const T* __restrict__ residual, const acc_t<T>* __restrict__ scale,
                 const acc_t<T>* __restrict__ shift, T* __restrict__ out, int64_t rows, int64_t C, int64_t hw,
                 RowPlan p) {
  using A = acc_t<T>;
  constexpr int V = vec_width<T>;
  const RowChunk u = row_chunk(p, hw);
  if (u.row >= rows) return;  // no reduction below, so idle lanes may leave
  const A s = scale[u.row % C], t = shift[u.row % C];
  const int64_t at = u.row * hw + u.begin;
  const T* yr = y + at;
  const T* rr = residual == nullptr ? nullptr : residual + at;
  T* o = out + at;
  for_row<V>(u.n, aligned_head<V>(u.n, yr, o, rr), u.lane, p.group, [&](int64_t i, auto w) {
    constexpr int W = decltype(w)::value;
    const auto v = load<W>(yr + i);
    Pack<T, W> r, res;
    if (rr != nullptr) r = load<W>(rr + i);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      A pre = affine(A(v.v[k]), s, t);
      if (rr != nullptr) pre += A(r.v[k]);
      res.v[k] = T(relu(pre));
    }
    store<W>(o + i, res);
  });
}

// NHWC forward: a lane owns V contiguous channels over the pixels of its split.
template <typename T, int V>
__global__ void __launch_bounds__(kBlock)
    forward_nhwc(const T* __restrict__ y, const T* __restrict__ residual, const acc_t<T>* __restrict__ scale,
                 const acc_t<T>* __restrict__ shift, T* __restrict__ out, int64_t C, int64_t hw, NhwcPlan p) {
  using A = acc_t<T>;
  const NhwcTile t = nhwc_tile(p, hw);
  const int64_t c0 = (t.tile * p.tx + t.tx) * V;
  if (c0 >= C) return;
  A s[V], sh[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    s[k] = scale[c0 + k];
    sh[k] = shift[c0 + k];
  }
  const int64_t offset = t.batch * hw * C + c0;
#pragma unroll 4
  for (int64_t i = t.begin + t.ty; i < t.end; i += p.ty) {
    const int64_t at = offset + i * C;
    const auto v = load<V>(y + at);
    Pack<T, V> r, res;
    if (residual != nullptr) r = load<V>(residual + at);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      A pre = affine(A(v.v[k]), s[k], sh[k]);
      if (residual != nullptr) pre += A(r.v[k]);
      res.v[k] = T(relu(pre));
    }
    store<V>(out + at, res);
  }
}

// NCHW backward sums: one group per chunk of a row (b, c); partials (B * splits, C).
template <typename T, typename D>
__global__ void __launch_bounds__(kMaxBlock)
    sums_nchw(const D* __restrict__ dout, const T* __restrict__ out, const T* __restrict__ y,
              acc_t<T>* __restrict__ g_part, acc_t<T>* __restrict__ gy_part, int64_t rows, int64_t C, int64_t hw,
              RowPlan p) {
  using A = acc_t<T>;
  constexpr int V = vec_width<T>;
  __shared__ Sums<A, 2> smem[kMaxBlock / 32];
  const RowChunk u = row_chunk(p, hw);
  Sums<A, 2> acc{};
  if (u.row < rows) {
    const int64_t at = u.row * hw + u.begin;
    const D* gr = dout + at;
    const T* orow = out + at;
    const T* yr = y + at;
    for_row<V>(u.n, aligned_head<V>(u.n, yr, orow, gr), u.lane, p.group, [&](int64_t i, auto w) {
      constexpr int W = decltype(w)::value;
      const auto g = load<W>(gr + i);
      const auto o = load<W>(orow + i);
      const auto v = load<W>(yr + i);
#pragma unroll
      for (int k = 0; k < W; ++k) fold(acc, A(g.v[k]), A(o.v[k]), A(v.v[k]));
    });
  }
  acc = group_reduce(acc, p.group, smem);
  if (u.row < rows && u.lane == 0) {
    const int64_t at = (u.row / C * p.splits + u.split) * C + u.row % C;
    g_part[at] = acc.v[0];
    gy_part[at] = acc.v[1];
  }
}

// NHWC backward sums: a lane owns V contiguous channels over the pixels of its split; partials
// (B * splits, C).
template <typename T, typename D, int V>
__global__ void __launch_bounds__(kBlock)
    sums_nhwc(const D* __restrict__ dout, const T* __restrict__ out, const T* __restrict__ y,
              acc_t<T>* __restrict__ g_part, acc_t<T>* __restrict__ gy_part, int64_t C, int64_t hw, NhwcPlan p) {
  using A = acc_t<T>;
  __shared__ Sums<A, 2> smem[kBlock * V];
  const NhwcTile t = nhwc_tile(p, hw);
  const int64_t c0 = (t.tile * p.tx + t.tx) * V;
  Sums<A, 2> acc[V] = {};
  if (c0 < C) {
    const int64_t offset = t.batch * hw * C + c0;
#pragma unroll 4
    for (int64_t i = t.begin + t.ty; i < t.end; i += p.ty) {
      const int64_t at = offset + i * C;
      const auto g = load<V>(dout + at);
      const auto o = load<V>(out + at);
      const auto v = load<V>(y + at);
#pragma unroll
      for (int k = 0; k < V; ++k) fold(acc[k], A(g.v[k]), A(o.v[k]), A(v.v[k]));
    }
  }
  reduce_columns(acc, t, p, smem, [&](int col, const Sums<A, 2>& total) {
    const int64_t ch = t.tile * p.tx * V + col;
    if (ch < C) {
      const int64_t at = (t.batch * p.splits + t.split) * C + ch;
      g_part[at] = total.v[0];
      gy_part[at] = total.v[1];
    }
  });
}

// NCHW dy: one group per chunk of a row (b, c).
template <typename T, typename D>
__global__ void __launch_bounds__(kMaxBlock)
    dy_nchw(const D* __restrict__ dout, const T* __restrict__ out, const T* __restrict__ y,
            const acc_t<T>* __restrict__ scale, const acc_t<T>* __restrict__ gamma, const acc_t<T>* __restrict__ delta,
            T* __restrict__ dy, T* __restrict__ dres, int64_t rows, int64_t C, int64_t hw, RowPlan p) {
  using A = acc_t<T>;
  constexpr int V = vec_width<T>;
  const RowChunk u = row_chunk(p, hw);
  if (u.row >= rows) return;
  const int64_t ch = u.row % C;
  const bool stats = gamma != nullptr;
  const A s = scale[ch], gm = stats ? gamma[ch] : A(0), dl = stats ? delta[ch] : A(0);
  const int64_t at = u.row * hw + u.begin;
  const D* gr = dout + at;
  const T* orow = out + at;
  const T* yr = stats ? y + at : nullptr;
  T* dr = dy + at;
  T* rr = dres == nullptr ? nullptr : dres + at;
  for_row<V>(u.n, aligned_head<V>(u.n, dr, gr, orow, yr, rr), u.lane, p.group, [&](int64_t i, auto w) {
    constexpr int W = decltype(w)::value;
    const auto g = load<W>(gr + i);
    const auto o = load<W>(orow + i);
    Pack<T, W> v{}, d, r;
    if (stats) v = load<W>(yr + i);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const A gk = relu_grad(A(g.v[k]), A(o.v[k]));
      d.v[k] = T(dy_of(gk, s, stats, gm, dl, A(v.v[k])));
      r.v[k] = T(gk);
    }
    store<W>(dr + i, d);
    if (rr != nullptr) store<W>(rr + i, r);
  });
}

// NHWC dy: a lane owns V contiguous channels over the pixels of its split.
template <typename T, typename D, int V>
__global__ void __launch_bounds__(kBlock)
    dy_nhwc(const D* __restrict__ dout, const T* __restrict__ out, const T* __restrict__ y,
            const acc_t<T>* __restrict__ scale, const acc_t<T>* __restrict__ gamma, const acc_t<T>* __restrict__ delta,
            T* __restrict__ dy, T* __restrict__ dres, int64_t C, int64_t hw, NhwcPlan p) {
  using A = acc_t<T>;
  const NhwcTile t = nhwc_tile(p, hw);
  const int64_t c0 = (t.tile * p.tx + t.tx) * V;
  if (c0 >= C) return;
  const bool stats = gamma != nullptr;
  A s[V], gm[V], dl[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    s[k] = scale[c0 + k];
    gm[k] = stats ? gamma[c0 + k] : A(0);
    dl[k] = stats ? delta[c0 + k] : A(0);
  }
  const int64_t offset = t.batch * hw * C + c0;
#pragma unroll 4
  for (int64_t i = t.begin + t.ty; i < t.end; i += p.ty) {
    const int64_t at = offset + i * C;
    const auto g = load<V>(dout + at);
    const auto o = load<V>(out + at);
    Pack<T, V> v{}, d, r;
    if (stats) v = load<V>(y + at);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const A gk = relu_grad(A(g.v[k]), A(o.v[k]));
      d.v[k] = T(dy_of(gk, s[k], stats, gm[k], dl[k], A(v.v[k])));
      r.v[k] = T(gk);
    }
    store<V>(dy + at, d);
    if (dres != nullptr) store<V>(dres + at, r);
  }
}

void check_y(const at::Tensor& y) {
  TORCH_CHECK(y.dim() == 4, "y must be 4-D (B, C, H, W), got shape ", y.sizes());
  TORCH_CHECK(y.is_cuda(), "y must be a CUDA tensor, got one on ", y.device());
  check_floating(y, "y");
}

// out or the residual: y's shape and dtype, on y's device.
void check_like_y(const at::Tensor& t, const at::Tensor& y, const char* name) {
  check_on_device_of(t, y, name, "y");
  check_shape(t, y.sizes(), name);
  TORCH_CHECK(t.scalar_type() == y.scalar_type(), name, " must have y's dtype ", y.scalar_type(), ", got ",
              t.scalar_type());
}

at::Tensor bn_add_relu_forward(const at::Tensor& y_in, const std::optional<at::Tensor>& residual_in,
                               const at::Tensor& scale_in, const at::Tensor& shift_in) {
  check_y(y_in);
  check_channel_vector(scale_in, y_in, "scale");
  check_channel_vector(shift_in, y_in, "shift");
  if (residual_in.has_value()) check_like_y(*residual_in, y_in, "residual");
  const auto fmt = layout_of(y_in);
  const at::Tensor y = y_in.contiguous(fmt), scale = scale_in.contiguous(), shift = shift_in.contiguous();
  const at::Tensor residual = residual_in.has_value() ? residual_in->contiguous(fmt) : at::Tensor();
  const int64_t B = y.size(0), C = y.size(1), hw = y.size(2) * y.size(3);
  const at::Tensor out = at::empty(y.sizes(), y.options().memory_format(fmt));
  if (y.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(y.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_add_relu_forward", [&] {
    using A = acc_t<scalar_t>;
    constexpr int V = vec_width<scalar_t>;
    const scalar_t* y_data = y.const_data_ptr<scalar_t>();
    const scalar_t* res_data = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    if (fmt == at::MemoryFormat::Contiguous) {
      const RowPlan plan = plan_rows(B * C, hw, V, sm_count(y.get_device()));
      forward_nchw<scalar_t><<<plan.blocks, plan.threads, 0, stream>>>(
          y_data, res_data, scale.const_data_ptr<A>(), shift.const_data_ptr<A>(), out_data, B * C, C, hw, plan);
    } else {
      const bool vec = C % V == 0 && aligned(y_data, res_data, out_data);
      const NhwcPlan plan = plan_nhwc(vec ? C / V : C, B, hw, sm_count(y.get_device()));
      const auto kernel = vec ? forward_nhwc<scalar_t, V> : forward_nhwc<scalar_t, 1>;
      kernel<<<nhwc_blocks(plan, B), kBlock, 0, stream>>>(y_data, res_data, scale.const_data_ptr<A>(),
                                                           shift.const_data_ptr<A>(), out_data, C, hw, plan);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> bn_add_relu_backward_sums(const at::Tensor& dout_in, const at::Tensor& out_in,
                                                             const at::Tensor& y_in) {
  check_y(y_in);
  check_like_y(out_in, y_in, "out");
  check_dout(dout_in, y_in, 1);
  const auto fmt = layout_of(y_in);
  const at::Tensor y = y_in.contiguous(fmt), out = out_in.contiguous(fmt), dout = dout_to_read(dout_in, y, fmt);
  const int64_t B = y.size(0), C = y.size(1), hw = y.size(2) * y.size(3);
  const auto acc_options = y.options().dtype(acc_dtype(y.scalar_type()));
  if (y.numel() == 0) return {at::zeros({C}, acc_options), at::zeros({C}, acc_options)};
  const c10::cuda::CUDAGuard guard(y.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor g_part, gy_part;  // (B * splits, C)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_add_relu_backward_sums", [&] {
    using A = acc_t<scalar_t>;
    constexpr int V = vec_width<scalar_t>;
    const auto allocate = [&](int64_t splits) {
      g_part = at::empty({B * splits, C}, acc_options);
      gy_part = at::empty({B * splits, C}, acc_options);
    };
    const auto launch = [&](auto dout_tag) {
      using D = decltype(dout_tag);
      const D* dout_data = dout.const_data_ptr<D>();
      const scalar_t* out_data = out.const_data_ptr<scalar_t>();
      const scalar_t* y_data = y.const_data_ptr<scalar_t>();
      if (fmt == at::MemoryFormat::Contiguous) {
        const RowPlan plan = plan_rows(B * C, hw, V, sm_count(y.get_device()));
        allocate(plan.splits);
        sums_nchw<scalar_t, D><<<plan.blocks, plan.threads, 0, stream>>>(
            dout_data, out_data, y_data, g_part.mutable_data_ptr<A>(), gy_part.mutable_data_ptr<A>(), B * C, C, hw,
            plan);
      } else {
        const bool vec = C % V == 0 && aligned(dout_data, out_data, y_data);
        const NhwcPlan plan = plan_nhwc(vec ? C / V : C, B, hw, sm_count(y.get_device()));
        allocate(plan.splits);
        const auto kernel = vec ? sums_nhwc<scalar_t, D, V> : sums_nhwc<scalar_t, D, 1>;
        kernel<<<nhwc_blocks(plan, B), kBlock, 0, stream>>>(dout_data, out_data, y_data,
                                                             g_part.mutable_data_ptr<A>(),
                                                             gy_part.mutable_data_ptr<A>(), C, hw, plan);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (dout.scalar_type() == y.scalar_type()) {
      launch(scalar_t{});
    } else {
      launch(A{});
    }
  });
  return {g_part.sum(0), gy_part.sum(0)};
}

std::tuple<at::Tensor, at::Tensor> bn_add_relu_backward_dy(const at::Tensor& dout_in, const at::Tensor& out_in,
                                                           const at::Tensor& y_in, const at::Tensor& scale_in,
                                                           const at::Tensor& gamma_in, const at::Tensor& delta_in,
                                                           bool residual_grad) {
  check_y(y_in);
  check_like_y(out_in, y_in, "out");
  check_dout(dout_in, y_in, 1);
  check_channel_vector(scale_in, y_in, "scale");
  const bool batch_stats = gamma_in.numel() > 0;
  if (batch_stats) {
    check_channel_vector(gamma_in, y_in, "gamma");
    check_channel_vector(delta_in, y_in, "delta");
  } else {
    TORCH_CHECK(delta_in.numel() == 0, "delta must be empty when gamma is (no batch statistics), got ",
                delta_in.sizes());
  }
  const auto fmt = layout_of(y_in);
  const at::Tensor y = y_in.contiguous(fmt), out = out_in.contiguous(fmt), dout = dout_to_read(dout_in, y, fmt);
  const at::Tensor scale = scale_in.contiguous(), gamma = gamma_in.contiguous(), delta = delta_in.contiguous();
  const int64_t B = y.size(0), C = y.size(1), hw = y.size(2) * y.size(3);
  const at::Tensor dy = at::empty(y.sizes(), y.options().memory_format(fmt));
  const at::Tensor dres =
      residual_grad ? at::empty(y.sizes(), y.options().memory_format(fmt)) : at::empty({0}, y.options());
  if (y.numel() == 0) return {dy, dres};
  const c10::cuda::CUDAGuard guard(y.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_add_relu_backward_dy", [&] {
    using A = acc_t<scalar_t>;
    constexpr int V = vec_width<scalar_t>;
    const A* gamma_data = batch_stats ? gamma.const_data_ptr<A>() : nullptr;
    const A* delta_data = batch_stats ? delta.const_data_ptr<A>() : nullptr;
    const scalar_t* y_data = batch_stats ? y.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dy_data = dy.mutable_data_ptr<scalar_t>();
    scalar_t* dres_data = residual_grad ? dres.mutable_data_ptr<scalar_t>() : nullptr;
    const auto launch = [&](auto dout_tag) {
      using D = decltype(dout_tag);
      const D* dout_data = dout.const_data_ptr<D>();
      const scalar_t* out_data = out.const_data_ptr<scalar_t>();
      if (fmt == at::MemoryFormat::Contiguous) {
        const RowPlan plan = plan_rows(B * C, hw, V, sm_count(y.get_device()));
        dy_nchw<scalar_t, D><<<plan.blocks, plan.threads, 0, stream>>>(
            dout_data, out_data, y_data, scale.const_data_ptr<A>(), gamma_data, delta_data, dy_data, dres_data,
            B * C, C, hw, plan);
      } else {
        const bool vec = C % V == 0 && aligned(dout_data, out_data, y_data, dy_data, dres_data);
        const NhwcPlan plan = plan_nhwc(vec ? C / V : C, B, hw, sm_count(y.get_device()));
        const auto kernel = vec ? dy_nhwc<scalar_t, D, V> : dy_nhwc<scalar_t, D, 1>;
        kernel<<<nhwc_blocks(plan, B), kBlock, 0, stream>>>(dout_data, out_data, y_data, scale.const_data_ptr<A>(),
                                                             gamma_data, delta_data, dy_data, dres_data, C, hw,
                                                             plan);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (dout.scalar_type() == y.scalar_type()) {
      launch(scalar_t{});
    } else {
      launch(A{});
    }
  });
  return {dy, dres};
}

}  // namespace
}  // namespace splat

TORCH_LIBRARY_IMPL(splat_cuda, CUDA, m) {
  m.impl("bn_add_relu_forward", &splat::bn_add_relu_forward);
  m.impl("bn_add_relu_backward_sums", &splat::bn_add_relu_backward_sums);
  m.impl("bn_add_relu_backward_dy", &splat::bn_add_relu_backward_dy);
}
