// attention_sum: out[b, c, hw] = sum_r attn[b, r*C + c] * relu(y[b, r*C + c, hw] * scale + shift),
// reading y once and writing out once, and its backward, whose kernels also run the first backward
// pass of split_attention (split_attention_backward_sums). With groups K, channel r*C + c of the
// formula (of y, scale, shift and attn) is grouped_first(c) + r*C/K (common.cuh).
//
// out has dtype promote(y, attn). The kernels write it either in y's dtype or in the accumulation
// dtype (O below); a float64 result for low-precision y, which the reference also computes in
// float32, is converted afterwards. Likewise dout is read in y's dtype or in the accumulation dtype.
#include "common.cuh"

namespace splat {
namespace {

// NCHW forward: one group per chunk of an output row (b, c) combines the same chunk of the R rows
// (b, grouped_first(c) + r*CG) element by element.
template <typename T, typename O>
__global__ void __launch_bounds__(kMaxBlock)
    sum_forward_nchw(const T* __restrict__ y, const acc_t<T>* __restrict__ scale,
                     const acc_t<T>* __restrict__ shift, const acc_t<T>* __restrict__ attn, O* __restrict__ out,
                     int64_t outputs, int64_t C, int64_t R, Groups gs, int64_t hw, RowPlan p) {
  using A = acc_t<T>;
  constexpr int V = vec_width<T>;
  const RowChunk u = row_chunk(p, hw);
  if (u.row >= outputs) return;  // no reduction below, so idle lanes may leave
  const int64_t b = u.row / C, ch0 = grouped_first(u.row % C, gs);
  const T* y0 = y + (b * R * C + ch0) * hw + u.begin;  // radix r starts at y0 + r * CG * hw
  O* o = out + u.row * hw + u.begin;
  // The R input rows share the first one's alignment when CG*hw fills whole vectors.
  const int64_t head = (gs.cg * hw) % V == 0 ? aligned_head<V>(u.n, y0, o) : u.n;
  for_row<V>(u.n, head, u.lane, p.group, [&](int64_t i, auto w) {
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

// The backward kernels serve two ops. attention_sum's backward writes dy and reduces per row the
// dscale, dshift and dattn terms; split_attention's first backward pass (kMaskSums) leaves dy to its
// second pass and also reduces sum m*y and sum m (m = [pre > 0]), which carry the pool's share of
// dscale and dshift.
template <bool kMaskSums>
constexpr int kBackwardSums = kMaskSums ? 5 : 3;

// Where the kernels write the reductions of a row (or of a split of one): dscale and dshift terms,
// dattn, then the mask sums.
template <typename A, int N>
struct SumsOut {
  A* at[N];
};

// Folds one element into the row's sums; returns its dy.
template <typename A, int N>
__device__ __forceinline__ A backward_element(Sums<A, N>& acc, A x, A go, A s, A t, A a) {
  const A pre = affine(x, s, t);
  const bool on = pre > A(0);
  const A dy = on ? go * a * s : A(0);
  acc.v[0] += on ? go * x : A(0);
  acc.v[1] += on ? go : A(0);
  acc.v[2] += go * relu(pre);
  if constexpr (N == kBackwardSums<true>) {
    acc.v[3] += on ? x : A(0);
    acc.v[4] += on ? A(1) : A(0);
  }
  return dy;
}

// The dscale and dshift terms carry the row's attention weight; dattn and the mask sums do not.
template <typename A, int N>
__device__ __forceinline__ void write_sums(const SumsOut<A, N>& out, int64_t at, A a, const Sums<A, N>& total) {
  out.at[0][at] = a * total.v[0];
  out.at[1][at] = a * total.v[1];
#pragma unroll
  for (int i = 2; i < N; ++i) out.at[i][at] = total.v[i];
}

// NCHW backward: one group per chunk of a row (b, ch) reduces the chunk's sums into
// (b * splits + split, ch), and writes dy unless kMaskSums.
template <typename T, typename D, bool kMaskSums>
__global__ void __launch_bounds__(kMaxBlock)
    sum_backward_nchw(const D* __restrict__ dout, const T* __restrict__ y, const acc_t<T>* __restrict__ scale,
                      const acc_t<T>* __restrict__ shift, const acc_t<T>* __restrict__ attn, T* __restrict__ dy,
                      SumsOut<acc_t<T>, kBackwardSums<kMaskSums>> out, int64_t rows, int64_t C, int64_t RC,
                      Groups gs, int64_t hw, RowPlan p) {
  using A = acc_t<T>;
  using S = Sums<A, kBackwardSums<kMaskSums>>;
  constexpr int V = vec_width<T>;
  __shared__ S smem[kMaxBlock / 32];
  const RowChunk u = row_chunk(p, hw);
  const int64_t b = u.row / RC, ch = u.row % RC;
  S acc{};
  A a = 0;
  if (u.row < rows) {
    const A s = scale[ch], t = shift[ch];
    a = attn[u.row];
    const T* yr = y + u.row * hw + u.begin;
    const D* gr = dout + (b * C + plain_of(ch, gs)) * hw + u.begin;
    T* dr = kMaskSums ? nullptr : dy + u.row * hw + u.begin;
    const int64_t head = kMaskSums ? aligned_head<V>(u.n, yr, gr) : aligned_head<V>(u.n, yr, dr, gr);
    for_row<V>(u.n, head, u.lane, p.group, [&](int64_t i, auto w) {
      constexpr int W = decltype(w)::value;
      const auto v = load<W>(yr + i);
      const auto g = load<W>(gr + i);
      Pack<T, W> d;
#pragma unroll
      for (int k = 0; k < W; ++k) d.v[k] = T(backward_element(acc, A(v.v[k]), A(g.v[k]), s, t, a));
      if constexpr (!kMaskSums) store<W>(dr + i, d);
    });
  }
  acc = group_reduce(acc, p.group, smem);
  if (u.row < rows && u.lane == 0) write_sums(out, (b * p.splits + u.split) * RC + ch, a, acc);
}

// NHWC backward: a lane owns V contiguous channels of one radix slice (V > 1 needs V | CG, so that
// they are V contiguous channels of dout too); per-split sums go to (B * splits, RC).
template <typename T, typename D, bool kMaskSums, int V>
__global__ void __launch_bounds__(kBlock)
    sum_backward_nhwc(const D* __restrict__ dout, const T* __restrict__ y, const acc_t<T>* __restrict__ scale,
                      const acc_t<T>* __restrict__ shift, const acc_t<T>* __restrict__ attn, T* __restrict__ dy,
                      SumsOut<acc_t<T>, kBackwardSums<kMaskSums>> out, int64_t C, int64_t RC, Groups gs,
                      int64_t hw, NhwcPlan p) {
  using A = acc_t<T>;
  using S = Sums<A, kBackwardSums<kMaskSums>>;
  // Static shared memory stops at 48 KiB: 40 KiB for 16-bit y with the mask sums.
  static_assert(sizeof(S) * kBlock * V <= 48 * 1024, "reduce_columns' states outgrow static shared memory");
  __shared__ S smem[kBlock * V];
  const NhwcTile t = nhwc_tile(p, hw);
  const int64_t ch0 = (t.tile * p.tx + t.tx) * V;
  S acc[V] = {};
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
      for (int k = 0; k < V; ++k) d.v[k] = T(backward_element(acc[k], A(v.v[k]), A(g.v[k]), s[k], sh[k], a[k]));
      if constexpr (!kMaskSums) store<V>(dy + offset + i * RC, d);
    }
  }
  reduce_columns(acc, t, p, smem, [&](int col, const S& total) {
    const int64_t ch = t.tile * p.tx * V + col;
    if (ch < RC) write_sums(out, (t.batch * p.splits + t.split) * RC + ch, attn[t.batch * RC + ch], total);
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
            attn.const_data_ptr<A>(), out.mutable_data_ptr<O>(), B * C, C, radix, gs, hw, plan);
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

// Host side of both backward ops: dy (undefined with kMaskSums) and the sums reduced over splits,
// and over the batch for dscale and dshift (RC,); dattn (B, RC) in attn's dtype, and with kMaskSums
// sum m*y and sum m (B, RC).
template <bool kMaskSums>
std::pair<at::Tensor, std::array<at::Tensor, kBackwardSums<kMaskSums>>> sum_backward(
    const at::Tensor& dout_in, const at::Tensor& y_in, const at::Tensor& scale_in, const at::Tensor& shift_in,
    const at::Tensor& attn_in, int64_t radix, int64_t groups) {
  constexpr int N = kBackwardSums<kMaskSums>;
  check_sum_inputs(y_in, scale_in, shift_in, attn_in, radix, groups);
  check_dout(dout_in, y_in, radix);
  const auto fmt = layout_of(y_in);
  const at::Tensor y = y_in.contiguous(fmt), scale = scale_in.contiguous(), shift = shift_in.contiguous();
  const at::Tensor attn = attn_in.to(scale.scalar_type()).contiguous();
  const at::Tensor dout = dout_to_read(dout_in, y, fmt);
  const int64_t B = y.size(0), RC = y.size(1), C = RC / radix, hw = y.size(2) * y.size(3);
  const Groups gs{C / groups, RC / groups};
  const at::Tensor dy = kMaskSums ? at::Tensor() : at::empty(y.sizes(), y.options().memory_format(fmt));
  std::array<at::Tensor, N> sums;
  if (y.numel() == 0) {
    sums[0] = at::zeros_like(scale);
    sums[1] = at::zeros_like(scale);
    sums[2] = at::zeros({B, RC}, attn_in.options());
    for (int i = 3; i < N; ++i) sums[i] = at::zeros({B, RC}, scale.options());
    return {dy, sums};
  }
  const c10::cuda::CUDAGuard guard(y.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  std::array<at::Tensor, N> parts;  // (B * splits, RC)
  int64_t splits;
  constexpr const char* name = kMaskSums ? "split_attention_backward_sums" : "attention_sum_backward";
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), name, [&] {
    using A = acc_t<scalar_t>;
    constexpr int V = vec_width<scalar_t>;
    scalar_t* const dy_data = kMaskSums ? nullptr : dy.mutable_data_ptr<scalar_t>();
    const auto allocate = [&](int64_t splits) {
      SumsOut<A, N> out;
      for (int i = 0; i < N; ++i) {
        at::Tensor& part = parts[i];
        part = at::empty({B * splits, RC}, scale.options());
        out.at[i] = part.mutable_data_ptr<A>();
      }
      return out;
    };
    const auto launch = [&](auto dout_tag) {
      using D = decltype(dout_tag);
      if (fmt == at::MemoryFormat::Contiguous) {
        const RowPlan plan = plan_rows(B * RC, hw, V, sm_count(y.get_device()));
        splits = plan.splits;
        sum_backward_nchw<scalar_t, D, kMaskSums><<<plan.blocks, plan.threads, 0, stream>>>(
            dout.const_data_ptr<D>(), y.const_data_ptr<scalar_t>(), scale.const_data_ptr<A>(),
            shift.const_data_ptr<A>(), attn.const_data_ptr<A>(), dy_data, allocate(splits), B * RC, C, RC, gs, hw,
            plan);
      } else {
        const bool vec = gs.cg % V == 0 && aligned(y.const_data_ptr()) && aligned(dout.const_data_ptr());
        const NhwcPlan plan = plan_nhwc(vec ? RC / V : RC, B, hw, sm_count(y.get_device()));
        splits = plan.splits;
        const auto kernel =
            vec ? sum_backward_nhwc<scalar_t, D, kMaskSums, V> : sum_backward_nhwc<scalar_t, D, kMaskSums, 1>;
        kernel<<<nhwc_blocks(plan, B), kBlock, 0, stream>>>(
            dout.const_data_ptr<D>(), y.const_data_ptr<scalar_t>(), scale.const_data_ptr<A>(),
            shift.const_data_ptr<A>(), attn.const_data_ptr<A>(), dy_data, allocate(splits), C, RC, gs, hw, plan);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (dout.scalar_type() == y.scalar_type()) {
      launch(scalar_t{});
    } else {
      launch(A{});
    }
  });
  sums[0] = parts[0].sum(0);
  sums[1] = parts[1].sum(0);
  for (int i = 2; i < N; ++i) {
    sums[i] = splits == 1 ? parts[i] : parts[i].view({B, splits, RC}).sum(1);
  }
  sums[2] = sums[2].to(attn_in.scalar_type());
  return {dy, sums};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_sum_backward(
    const at::Tensor& dout, const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& attn, int64_t radix, int64_t groups) {
  const auto [dy, sums] = sum_backward<false>(dout, y, scale, shift, attn, radix, groups);
  return {dy, sums[0], sums[1], sums[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> split_attention_backward_sums(
    const at::Tensor& dout, const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& attn, int64_t radix, int64_t groups) {
  const auto sums = sum_backward<true>(dout, y, scale, shift, attn, radix, groups).second;
  return {sums[0], sums[1], sums[2], sums[3], sums[4]};
}

}  // namespace
}  // namespace splat

TORCH_LIBRARY_IMPL(splat_cuda, CUDA, m) {
  m.impl("attention_sum_forward", &splat::attention_sum_forward);
  m.impl("attention_sum_backward", &splat::attention_sum_backward);
  m.impl("split_attention_backward_sums", &splat::split_attention_backward_sums);
}
