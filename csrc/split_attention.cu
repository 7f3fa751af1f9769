// split_attention_backward_dy: the second backward pass of splat::split_attention.
//
// First, per channel ch of y (one thread each, a fixed-order loop over the batch), BN0's backward:
//
//   dscale += sum_b dgap[b, c] * sum_my[b, ch] / hw      dshift += sum_b dgap[b, c] * sum_m[b, ch] / hw
//
// then dweight and dbias of BN0 and, with batch statistics, the coefficients gamma and delta of their
// share of dy. Then, elementwise over y:
//
//   dy[b, ch, hw] = [pre > 0] * (scale * attn[b, ch] * dout[b, c, hw] + scale * dgap[b, c] / hw)
//                   + gamma[ch] + delta[ch] * y
//
// with pre = y * scale[ch] + shift[ch], computed in the accumulation dtype; dout is read in y's dtype or
// in the accumulation dtype. y's channel ch belongs to dout's channel c = plain_of(ch) (common.cuh).
// The first pass, split_attention_backward_sums, shares attention_sum's backward kernels
// (attention_sum.cu).
#include "common.cuh"

namespace splat {
namespace {

// BN0's backward per channel of y. mean == nullptr: no batch statistics (gamma and delta unused);
// dmean, dvar == nullptr: no gradient reached the returned statistics.
template <typename A>
__global__ void __launch_bounds__(kBlock)
    coefficients(const A* __restrict__ dgap, const A* __restrict__ sum_my, const A* __restrict__ sum_m,
                 const A* __restrict__ dscale, const A* __restrict__ dshift, const A* __restrict__ scale,
                 const A* __restrict__ mean, const A* __restrict__ rstd, const A* __restrict__ dmean,
                 const A* __restrict__ dvar, A* __restrict__ gamma, A* __restrict__ delta, A* __restrict__ dweight,
                 A* __restrict__ dbias, int64_t B, int64_t C, int64_t RC, Groups gs, int64_t hw) {
  const int64_t ch = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (ch >= RC) return;
  const int64_t c = plain_of(ch, gs);
  A my = 0, m = 0;
  for (int64_t b = 0; b < B; ++b) {
    const A g = dgap[b * C + c];
    my += g * sum_my[b * RC + ch];
    m += g * sum_m[b * RC + ch];
  }
  // An empty map's sums are zero: divide by 1 there rather than make 0/0.
  const A pixels = A(hw > 0 ? hw : 1);
  const A ds = dscale[ch] + my / pixels, dh = dshift[ch] + m / pixels;
  dbias[ch] = dh;
  if (mean == nullptr) {
    dweight[ch] = ds;
    return;
  }
  const A n = A(B * hw);
  const A dw = (ds - dh * mean[ch]) * rstd[ch];
  A dl = -(dw * scale[ch] * rstd[ch]) / n;
  if (dvar != nullptr) dl += A(2) * dvar[ch] / n;
  A gm = -(dh * scale[ch]) / n - dl * mean[ch];
  if (dmean != nullptr) gm += dmean[ch] / n;
  dweight[ch] = dw;
  gamma[ch] = gm;
  delta[ch] = dl;
}

// What the elementwise pass reads: the attention weights and the pooled gradient of one batch
// row, and BN0's (gamma, delta); gamma == nullptr without batch statistics.
template <typename A>
struct DyInputs {
  const A* scale;
  const A* shift;
  const A* attn;
  const A* dgap;
  const A* gamma;
  const A* delta;
};

// The coefficients of one channel ch of y in batch row b.
template <typename A>
struct Coef {
  A scale, shift, alpha, beta, gamma, delta;

  Coef() = default;
  __device__ __forceinline__ Coef(const DyInputs<A>& in, int64_t b, int64_t ch, int64_t C, int64_t RC,
                                  const Groups& gs, int64_t hw)
      : scale(in.scale[ch]),
        shift(in.shift[ch]),
        alpha(scale * in.attn[b * RC + ch]),
        beta(scale * (in.dgap[b * C + plain_of(ch, gs)] / A(hw))),
        gamma(in.gamma == nullptr ? A(0) : in.gamma[ch]),
        delta(in.gamma == nullptr ? A(0) : in.delta[ch]) {}

  __device__ __forceinline__ A dy(A x, A go) const {
    return (affine(x, scale, shift) > A(0) ? alpha * go + beta : A(0)) + gamma + delta * x;
  }
};

// NCHW: one group per chunk of a row (b, ch) of y, reading the same chunk of the row (b, plain_of(ch))
// of dout.
template <typename T, typename D>
__global__ void __launch_bounds__(kMaxBlock)
    dy_nchw(const D* __restrict__ dout, const T* __restrict__ y, const DyInputs<acc_t<T>> in, T* __restrict__ dy,
            int64_t rows, int64_t C, int64_t RC, Groups gs, int64_t hw, RowPlan p) {
  using A = acc_t<T>;
  constexpr int V = vec_width<T>;
  const RowChunk u = row_chunk(p, hw);
  if (u.row >= rows) return;
  const int64_t b = u.row / RC, ch = u.row % RC;
  const Coef<A> c(in, b, ch, C, RC, gs, hw);
  const T* yr = y + u.row * hw + u.begin;
  const D* gr = dout + (b * C + plain_of(ch, gs)) * hw + u.begin;
  T* dr = dy + u.row * hw + u.begin;
  for_row<V>(u.n, aligned_head<V>(u.n, yr, dr, gr), u.lane, p.group, [&](int64_t i, auto w) {
    constexpr int W = decltype(w)::value;
    const auto v = load<W>(yr + i);
    const auto g = load<W>(gr + i);
    Pack<T, W> d;
#pragma unroll
    for (int k = 0; k < W; ++k) d.v[k] = T(c.dy(A(v.v[k]), A(g.v[k])));
    store<W>(dr + i, d);
  });
}

// NHWC: a lane owns V contiguous channels of one radix slice over the pixels of its split (V > 1
// needs V | CG, so that they are V contiguous channels of dout too).
template <typename T, typename D, int V>
__global__ void __launch_bounds__(kBlock)
    dy_nhwc(const D* __restrict__ dout, const T* __restrict__ y, const DyInputs<acc_t<T>> in, T* __restrict__ dy,
            int64_t C, int64_t RC, Groups gs, int64_t hw, NhwcPlan p) {
  using A = acc_t<T>;
  const NhwcTile t = nhwc_tile(p, hw);
  const int64_t ch0 = (t.tile * p.tx + t.tx) * V;
  if (ch0 >= RC) return;
  Coef<A> c[V];
#pragma unroll
  for (int k = 0; k < V; ++k) c[k] = Coef<A>(in, t.batch, ch0 + k, C, RC, gs, hw);
  const int64_t offset = t.batch * hw * RC + ch0;
  const D* gb = dout + t.batch * hw * C + plain_of(ch0, gs);
#pragma unroll 4
  for (int64_t i = t.begin + t.ty; i < t.end; i += p.ty) {
    const auto v = load<V>(y + offset + i * RC);
    const auto g = load<V>(gb + i * C);
    Pack<T, V> d;
#pragma unroll
    for (int k = 0; k < V; ++k) d.v[k] = T(c[k].dy(A(v.v[k]), A(g.v[k])));
    store<V>(dy + offset + i * RC, d);
  }
}

// A (B, n) matrix in y's accumulation dtype, on y's device.
void check_rows(const at::Tensor& m, const at::Tensor& y, int64_t n, const char* name) {
  check_on_device_of(m, y, name, "y");
  check_shape(m, {y.size(0), n}, name);
  const auto acc = acc_dtype(y.scalar_type());
  TORCH_CHECK(m.scalar_type() == acc, name, " must be ", acc, " for y of dtype ", y.scalar_type(), ", got ",
              m.scalar_type());
}

// The pointer of an optional per-channel vector (contiguous in `keep`), nullptr when absent.
template <typename A>
const A* optional_vector(const std::optional<at::Tensor>& v, const at::Tensor& y, const char* name, at::Tensor& keep) {
  if (!v.has_value()) return nullptr;
  check_channel_vector(*v, y, name);
  keep = v->contiguous();
  return keep.const_data_ptr<A>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> split_attention_backward_dy(
    const at::Tensor& dout_in, const at::Tensor& y_in, const at::Tensor& scale_in, const at::Tensor& shift_in,
    const at::Tensor& attn_in, const at::Tensor& dgap_in, const at::Tensor& dscale_in, const at::Tensor& dshift_in,
    const at::Tensor& sum_my_in, const at::Tensor& sum_m_in, const at::Tensor& mean_in, const at::Tensor& rstd_in,
    const std::optional<at::Tensor>& dmean_in, const std::optional<at::Tensor>& dvar_in, int64_t radix,
    int64_t groups) {
  check_conv_output(y_in, radix);
  check_groups(y_in, radix, groups);
  check_dout(dout_in, y_in, radix);
  const int64_t B = y_in.size(0), RC = y_in.size(1), C = RC / radix, hw = y_in.size(2) * y_in.size(3);
  check_channel_vector(scale_in, y_in, "scale");
  check_channel_vector(shift_in, y_in, "shift");
  check_channel_vector(dscale_in, y_in, "dscale");
  check_channel_vector(dshift_in, y_in, "dshift");
  check_rows(attn_in, y_in, RC, "attn");
  check_rows(sum_my_in, y_in, RC, "sum_my");
  check_rows(sum_m_in, y_in, RC, "sum_m");
  check_rows(dgap_in, y_in, C, "dgap");
  const bool batch_stats = mean_in.numel() > 0;
  if (batch_stats) {
    check_channel_vector(mean_in, y_in, "mean");
    check_channel_vector(rstd_in, y_in, "rstd");
  } else {
    TORCH_CHECK(rstd_in.numel() == 0, "rstd must be empty when mean is (no batch statistics), got ",
                rstd_in.sizes());
    TORCH_CHECK(!dmean_in.has_value() && !dvar_in.has_value(),
                "dmean and dvar need the batch statistics (mean and rstd), which are empty");
  }
  const auto fmt = layout_of(y_in);
  const at::Tensor y = y_in.contiguous(fmt), dout = dout_to_read(dout_in, y, fmt);
  const at::Tensor scale = scale_in.contiguous(), shift = shift_in.contiguous(), attn = attn_in.contiguous();
  const at::Tensor dgap = dgap_in.contiguous(), dscale = dscale_in.contiguous(), dshift = dshift_in.contiguous();
  const at::Tensor sum_my = sum_my_in.contiguous(), sum_m = sum_m_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const Groups gs{C / groups, RC / groups};
  const at::Tensor dy = at::empty(y.sizes(), y.options().memory_format(fmt));
  const at::Tensor dweight = at::empty({RC}, scale.options()), dbias = at::empty({RC}, scale.options());
  const at::Tensor gamma = batch_stats ? at::empty({RC}, scale.options()) : at::Tensor();
  const at::Tensor delta = batch_stats ? at::empty({RC}, scale.options()) : at::Tensor();
  const c10::cuda::CUDAGuard guard(y.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "split_attention_backward_dy", [&] {
    using A = acc_t<scalar_t>;
    constexpr int V = vec_width<scalar_t>;
    at::Tensor dmean, dvar;  // contiguous copies, alive until the launches are queued
    const A* dmean_data = optional_vector<A>(dmean_in, y, "dmean", dmean);
    const A* dvar_data = optional_vector<A>(dvar_in, y, "dvar", dvar);
    A* const gamma_data = batch_stats ? gamma.mutable_data_ptr<A>() : nullptr;
    A* const delta_data = batch_stats ? delta.mutable_data_ptr<A>() : nullptr;
    if (RC > 0) {
      coefficients<A><<<grid_size(ceil_div(RC, kBlock)), kBlock, 0, stream>>>(
          dgap.const_data_ptr<A>(), sum_my.const_data_ptr<A>(), sum_m.const_data_ptr<A>(), dscale.const_data_ptr<A>(),
          dshift.const_data_ptr<A>(), scale.const_data_ptr<A>(), batch_stats ? mean.const_data_ptr<A>() : nullptr,
          batch_stats ? rstd.const_data_ptr<A>() : nullptr, dmean_data, dvar_data, gamma_data, delta_data,
          dweight.mutable_data_ptr<A>(), dbias.mutable_data_ptr<A>(), B, C, RC, gs, hw);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (y.numel() == 0) return;
    const DyInputs<A> in{scale.const_data_ptr<A>(), shift.const_data_ptr<A>(), attn.const_data_ptr<A>(),
                         dgap.const_data_ptr<A>(),  gamma_data,                 delta_data};
    const auto launch = [&](auto dout_tag) {
      using D = decltype(dout_tag);
      if (fmt == at::MemoryFormat::Contiguous) {
        const RowPlan plan = plan_rows(B * RC, hw, V, sm_count(y.get_device()));
        dy_nchw<scalar_t, D><<<plan.blocks, plan.threads, 0, stream>>>(
            dout.const_data_ptr<D>(), y.const_data_ptr<scalar_t>(), in, dy.mutable_data_ptr<scalar_t>(), B * RC, C,
            RC, gs, hw, plan);
      } else {
        const bool vec = gs.cg % V == 0 && aligned(y.const_data_ptr()) && aligned(dout.const_data_ptr());
        const NhwcPlan plan = plan_nhwc(vec ? RC / V : RC, B, hw, sm_count(y.get_device()));
        const auto kernel = vec ? dy_nhwc<scalar_t, D, V> : dy_nhwc<scalar_t, D, 1>;
        kernel<<<nhwc_blocks(plan, B), kBlock, 0, stream>>>(dout.const_data_ptr<D>(), y.const_data_ptr<scalar_t>(),
                                                             in, dy.mutable_data_ptr<scalar_t>(), C, RC, gs, hw, plan);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (dout.scalar_type() == y.scalar_type()) {
      launch(scalar_t{});
    } else {
      launch(A{});
    }
  });
  return {dy, dweight, dbias};
}

}  // namespace
}  // namespace splat

TORCH_LIBRARY_IMPL(splat_cuda, CUDA, m) {
  m.impl("split_attention_backward_dy", &splat::split_attention_backward_dy);
}
