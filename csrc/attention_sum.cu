// attention_sum: out[b, c, hw] = sum_r attn[b, r*C + c] * relu(y[b, r*C + c, hw] * scale + shift),
// reading y once and writing out once, and its backward. With groups K, channel r*C + c of the
// formula (of y, scale, shift and attn) is grouped_first(c) + r*C/K (common.cuh).
//
// out has dtype promote(y, attn). The kernels write it either in y's dtype or in the accumulation
// dtype (O below); a float64 result for low-precision y, which the reference also computes in
// float32, is converted afterwards. Likewise dout is read in y's dtype or in the accumulation dtype.
#include "common.cuh"

namespace splat {
namespace {

// NCHW forward: one group per output row (b, c) combines the R rows (b, grouped_first(c) + r*CG)
// element by element.
template <typename T, typename O>
__global__ void __launch_bounds__(kMaxBlock)
    sum_forward_nchw(const T* __restrict__ y, const acc_t<T>* __restrict__ scale,
                     const acc_t<T>* __restrict__ shift, const acc_t<T>* __restrict__ attn, O* __restrict__ out,
                     int64_t outputs, int64_t C, int64_t R, Groups gs, int64_t hw, int group) {
  using A = acc_t<T>;
  constexpr int V = vec_width<T>;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / group) + threadIdx.x / group;
  if (row >= outputs) return;  // no reduction below, so idle lanes may leave
  const int lane = threadIdx.x % group;
  const int64_t b = row / C, ch0 = grouped_first(row % C, gs);
  const T* y0 = y + (b * R * C + ch0) * hw;  // radix r starts at y0 + r * CG * hw
  O* o = out + row * hw;
  // The R input rows share the first one's alignment when CG*hw fills whole vectors.
  const int64_t head = (gs.cg * hw) % V == 0 ? aligned_head<V>(hw, y0, o) : hw;
  for_row<V>(hw, head, lane, group, [&](int64_t i, auto w) {
    constexpr int W = decltype(w)::value;
    A acc[W] = {};
    for (int64_t r = 0; r < R; ++r) {
      const auto v = load<W>(y0 + r * gs.cg * hw + i);
      const int64_t ch = ch0 + r * gs.cg;
      const A s = scale[ch], t = shift[ch], a = attn[b * R * C + ch];
#pragma unroll
      for (int k = 0; k < W; ++k) acc[k] += a * relu(affine(A(v.v[k]), s, t));
    }
    Pack<O, W> res;
#pragma unroll
    for (int k = 0; k < W; ++k) res.v[k] = O(acc[k]);
    store<W>(o + i, res);
  });
}

// NHWC forward: a lane produces V contiguous channels for kRows pixels at a time, so each radix's
// scale, shift and attn vectors are loaded once per kRows pixels. V > 1 needs V | CG, so that the
// V channels of a radix are contiguous in y.
template <typename T, typename O, int V>
__global__ void __launch_bounds__(kBlock)
    sum_forward_nhwc(const T* __restrict__ y, const acc_t<T>* __restrict__ scale,
                     const acc_t<T>* __restrict__ shift, const acc_t<T>* __restrict__ attn, O* __restrict__ out,
                     int64_t C, int64_t R, Groups gs, int64_t hw, NhwcPlan p) {
  using A = acc_t<T>;
  const NhwcTile t = nhwc_tile(p, hw);
  const int64_t c0 = (t.tile * p.tx + t.tx) * V;
  if (c0 >= C) return;
  const int64_t RC = R * C, ch0 = grouped_first(c0, gs);
  const T* yb = y + t.batch * hw * RC + ch0;
  const A* ab = attn + t.batch * RC + ch0;
  O* ob = out + t.batch * hw * C + c0;
  for (int64_t i0 = t.begin + t.ty; i0 < t.end; i0 += int64_t(p.ty) * kRows) {
    A acc[kRows][V] = {};
    for (int64_t r = 0; r < R; ++r) {
      A s[V], sh[V], a[V];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        s[k] = scale[ch0 + r * gs.cg + k];
        sh[k] = shift[ch0 + r * gs.cg + k];
        a[k] = ab[r * gs.cg + k];
      }
#pragma unroll
      for (int u = 0; u < kRows; ++u) {
        const int64_t i = i0 + int64_t(u) * p.ty;
        if (i < t.end) {
          const auto v = load<V>(yb + i * RC + r * gs.cg);
#pragma unroll
          for (int k = 0; k < V; ++k) acc[u][k] += a[k] * relu(affine(A(v.v[k]), s[k], sh[k]));
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      const int64_t i = i0 + int64_t(u) * p.ty;
      if (i < t.end) {
        Pack<O, V> res;
#pragma unroll
        for (int k = 0; k < V; ++k) res.v[k] = O(acc[u][k]);
        store<V>(ob + i * C, res);
      }
    }
  }
}

// NCHW backward: one group per row (b, ch) writes dy and the row's dscale, dshift and dattn terms.
template <typename T, typename D>
__global__ void __launch_bounds__(kMaxBlock)
    sum_backward_nchw(const D* __restrict__ dout, const T* __restrict__ y, const acc_t<T>* __restrict__ scale,
                      const acc_t<T>* __restrict__ shift, const acc_t<T>* __restrict__ attn, T* __restrict__ dy,
                      acc_t<T>* __restrict__ dscale_part, acc_t<T>* __restrict__ dshift_part,
                      acc_t<T>* __restrict__ dattn, int64_t rows, int64_t C, int64_t RC, Groups gs, int64_t hw,
                      int group) {
  using A = acc_t<T>;
  constexpr int V = vec_width<T>;
  __shared__ Sums<A, 3> smem[kMaxBlock / 32];
  const int lane = threadIdx.x % group;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / group) + threadIdx.x / group;
  Sums<A, 3> acc{};
  A a = 0;
  if (row < rows) {
    const int64_t ch = row % RC;
    const A s = scale[ch], t = shift[ch];
    a = attn[row];
    const T* yr = y + row * hw;
    T* dr = dy + row * hw;
    const D* gr = dout + (row / RC * C + plain_of(ch, gs)) * hw;
    for_row<V>(hw, aligned_head<V>(hw, yr, dr, gr), lane, group, [&](int64_t i, auto w) {
      constexpr int W = decltype(w)::value;
      const auto v = load<W>(yr + i);
      const auto g = load<W>(gr + i);
      Pack<T, W> d;
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const A x = A(v.v[k]), go = A(g.v[k]);
        const A pre = affine(x, s, t);
        const bool on = pre > A(0);
        d.v[k] = T(on ? go * a * s : A(0));
        acc.v[0] += on ? go * x : A(0);
        acc.v[1] += on ? go : A(0);
        acc.v[2] += go * relu(pre);
      }
      store<W>(dr + i, d);
    });
  }
  acc = group_reduce(acc, group, smem);
  if (row < rows && lane == 0) {
    dscale_part[row] = a * acc.v[0];
    dshift_part[row] = a * acc.v[1];
    dattn[row] = acc.v[2];
  }
}

// NHWC backward: a lane owns V contiguous channels of one radix slice (V > 1 needs V | CG, so that
// they are V contiguous channels of dout too); per-split terms go to (B * splits, RC).
template <typename T, typename D, int V>
__global__ void __launch_bounds__(kBlock)
    sum_backward_nhwc(const D* __restrict__ dout, const T* __restrict__ y, const acc_t<T>* __restrict__ scale,
                      const acc_t<T>* __restrict__ shift, const acc_t<T>* __restrict__ attn, T* __restrict__ dy,
                      acc_t<T>* __restrict__ dscale_part, acc_t<T>* __restrict__ dshift_part,
                      acc_t<T>* __restrict__ dattn_part, int64_t C, int64_t RC, Groups gs, int64_t hw,
                      NhwcPlan p) {
  using A = acc_t<T>;
  __shared__ Sums<A, 3> smem[kBlock * V];
  const NhwcTile t = nhwc_tile(p, hw);
  const int64_t ch0 = (t.tile * p.tx + t.tx) * V;
  Sums<A, 3> acc[V] = {};
  if (ch0 < RC) {
    A s[V], sh[V], a[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      s[k] = scale[ch0 + k];
      sh[k] = shift[ch0 + k];
      a[k] = attn[t.batch * RC + ch0 + k];
    }
    const int64_t offset = t.batch * hw * RC + ch0;
    const D* gb = dout + t.batch * hw * C + plain_of(ch0, gs);
#pragma unroll 4
    for (int64_t i = t.begin + t.ty; i < t.end; i += p.ty) {
      const auto v = load<V>(y + offset + i * RC);
      const auto g = load<V>(gb + i * C);
      Pack<T, V> d;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A x = A(v.v[k]), go = A(g.v[k]);
        const A pre = affine(x, s[k], sh[k]);
        const bool on = pre > A(0);
        d.v[k] = T(on ? go * a[k] * s[k] : A(0));
        acc[k].v[0] += on ? go * x : A(0);
        acc[k].v[1] += on ? go : A(0);
        acc[k].v[2] += go * relu(pre);
      }
      store<V>(dy + offset + i * RC, d);
    }
  }
  reduce_columns(acc, t, p, smem, [&](int col, const Sums<A, 3>& total) {
    const int64_t ch = t.tile * p.tx * V + col;
    if (ch < RC) {
      const A a = attn[t.batch * RC + ch];
      const int64_t at = (t.batch * p.splits + t.split) * RC + ch;
      dscale_part[at] = a * total.v[0];
      dshift_part[at] = a * total.v[1];
      dattn_part[at] = total.v[2];
    }
  });
}

void check_sum_inputs(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& attn,
                      int64_t radix, int64_t groups) {
  check_conv_output(y, radix);
  check_groups(y, radix, groups);
  check_channel_vector(scale, y, "scale");
  check_channel_vector(shift, y, "shift");
  check_on_device_of(attn, y, "attn", "y");
  check_floating(attn, "attn");
  check_shape(attn, {y.size(0), y.size(1)}, "attn");
}

at::Tensor attention_sum_forward(const at::Tensor& y_in, const at::Tensor& scale_in, const at::Tensor& shift_in,
                                 const at::Tensor& attn_in, int64_t radix, int64_t groups) {
  check_sum_inputs(y_in, scale_in, shift_in, attn_in, radix, groups);
  const auto fmt = layout_of(y_in);
  const at::Tensor y = y_in.contiguous(fmt), scale = scale_in.contiguous(), shift = shift_in.contiguous();
  const at::Tensor attn = attn_in.to(scale.scalar_type()).contiguous();
  const int64_t B = y.size(0), RC = y.size(1), C = RC / radix, H = y.size(2), W = y.size(3), hw = H * W;
  const Groups gs{C / groups, RC / groups};
  const auto out_dtype = c10::promoteTypes(y.scalar_type(), attn_in.scalar_type());
  // Written in y's dtype or in the accumulation dtype, and converted when that is not out_dtype.
  const auto write_dtype = out_dtype == y.scalar_type() ? out_dtype : scale.scalar_type();
  at::Tensor out = at::empty({B, C, H, W}, y.options().dtype(write_dtype).memory_format(fmt));
  if (out.numel() == 0) return out.to(out_dtype);
  const c10::cuda::CUDAGuard guard(y.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "attention_sum_forward", [&] {
    using A = acc_t<scalar_t>;
    constexpr int V = vec_width<scalar_t>;
    const auto launch = [&](auto out_tag) {
      using O = decltype(out_tag);
      if (fmt == at::MemoryFormat::Contiguous) {
        const RowPlan plan = plan_rows(B * C, hw, V, sm_count(y.get_device()));
        sum_forward_nchw<scalar_t, O><<<plan.blocks, plan.threads, 0, stream>>>(
            y.const_data_ptr<scalar_t>(), scale.const_data_ptr<A>(), shift.const_data_ptr<A>(),
            attn.const_data_ptr<A>(), out.mutable_data_ptr<O>(), B * C, C, radix, gs, hw, plan.group);
      } else {
        const bool vec = gs.cg % V == 0 && aligned(y.const_data_ptr());
        const NhwcPlan plan = plan_nhwc(vec ? C / V : C, B, hw, sm_count(y.get_device()));
        const auto kernel = vec ? sum_forward_nhwc<scalar_t, O, V> : sum_forward_nhwc<scalar_t, O, 1>;
        kernel<<<nhwc_blocks(plan, B), kBlock, 0, stream>>>(
            y.const_data_ptr<scalar_t>(), scale.const_data_ptr<A>(), shift.const_data_ptr<A>(),
            attn.const_data_ptr<A>(), out.mutable_data_ptr<O>(), C, radix, gs, hw, plan);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (write_dtype == y.scalar_type()) {
      launch(scalar_t{});
    } else {
      launch(A{});
    }
  });
  return out.to(out_dtype);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_sum_backward(
    const at::Tensor& dout_in, const at::Tensor& y_in, const at::Tensor& scale_in, const at::Tensor& shift_in,
    const at::Tensor& attn_in, int64_t radix, int64_t groups) {
  check_sum_inputs(y_in, scale_in, shift_in, attn_in, radix, groups);
  check_on_device_of(dout_in, y_in, "dout", "y");
  check_floating(dout_in, "dout");
  check_shape(dout_in, {y_in.size(0), y_in.size(1) / radix, y_in.size(2), y_in.size(3)}, "dout");
  const auto fmt = layout_of(y_in);
  const at::Tensor y = y_in.contiguous(fmt), scale = scale_in.contiguous(), shift = shift_in.contiguous();
  const at::Tensor attn = attn_in.to(scale.scalar_type()).contiguous();
  // Read in y's dtype or else in the accumulation dtype, as the reference converts it.
  const auto dout_dtype = dout_in.scalar_type() == y.scalar_type() ? y.scalar_type() : scale.scalar_type();
  const at::Tensor dout = dout_in.to(dout_dtype).contiguous(fmt);
  const int64_t B = y.size(0), RC = y.size(1), C = RC / radix, hw = y.size(2) * y.size(3);
  const Groups gs{C / groups, RC / groups};
  const at::Tensor dy = at::empty(y.sizes(), y.options().memory_format(fmt));
  if (y.numel() == 0) {
    return {dy, at::zeros_like(scale), at::zeros_like(scale), at::zeros({B, RC}, attn_in.options())};
  }
  const c10::cuda::CUDAGuard guard(y.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor dscale_part, dshift_part, dattn;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "attention_sum_backward", [&] {
    using A = acc_t<scalar_t>;
    constexpr int V = vec_width<scalar_t>;
    const auto launch = [&](auto dout_tag) {
      using D = decltype(dout_tag);
      if (fmt == at::MemoryFormat::Contiguous) {
        dscale_part = at::empty({B, RC}, scale.options());
        dshift_part = at::empty({B, RC}, scale.options());
        dattn = at::empty({B, RC}, scale.options());
        const RowPlan plan = plan_rows(B * RC, hw, V, sm_count(y.get_device()));
        sum_backward_nchw<scalar_t, D><<<plan.blocks, plan.threads, 0, stream>>>(
            dout.const_data_ptr<D>(), y.const_data_ptr<scalar_t>(), scale.const_data_ptr<A>(),
            shift.const_data_ptr<A>(), attn.const_data_ptr<A>(), dy.mutable_data_ptr<scalar_t>(),
            dscale_part.mutable_data_ptr<A>(), dshift_part.mutable_data_ptr<A>(), dattn.mutable_data_ptr<A>(),
            B * RC, C, RC, gs, hw, plan.group);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        const bool vec = gs.cg % V == 0 && aligned(y.const_data_ptr()) && aligned(dout.const_data_ptr());
        const NhwcPlan plan = plan_nhwc(vec ? RC / V : RC, B, hw, sm_count(y.get_device()));
        dscale_part = at::empty({B * plan.splits, RC}, scale.options());
        dshift_part = at::empty({B * plan.splits, RC}, scale.options());
        const at::Tensor dattn_part = at::empty({B, plan.splits, RC}, scale.options());
        const auto kernel = vec ? sum_backward_nhwc<scalar_t, D, V> : sum_backward_nhwc<scalar_t, D, 1>;
        kernel<<<nhwc_blocks(plan, B), kBlock, 0, stream>>>(
            dout.const_data_ptr<D>(), y.const_data_ptr<scalar_t>(), scale.const_data_ptr<A>(),
            shift.const_data_ptr<A>(), attn.const_data_ptr<A>(), dy.mutable_data_ptr<scalar_t>(),
            dscale_part.mutable_data_ptr<A>(), dshift_part.mutable_data_ptr<A>(),
            dattn_part.mutable_data_ptr<A>(), C, RC, gs, hw, plan);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        dattn = dattn_part.sum(1);
      }
    };
    if (dout_dtype == y.scalar_type()) {
      launch(scalar_t{});
    } else {
      launch(A{});
    }
  });
  return {dy, dscale_part.sum(0), dshift_part.sum(0), dattn.to(attn_in.scalar_type())};
}

}  // namespace
}  // namespace splat

TORCH_LIBRARY_IMPL(splat_cuda, CUDA, m) {
  m.impl("attention_sum_forward", &splat::attention_sum_forward);
  m.impl("attention_sum_backward", &splat::attention_sum_backward);
}
