// split_attention_backward_dy: the second backward pass of splat::split_attention, elementwise over y:
//
//   dy[b, ch, hw] = [pre > 0] * (alpha[b, ch] * dout[b, c, hw] + beta[b, ch]) + gamma[ch] + delta[ch] * y
//
// with pre = y * scale[ch] + shift[ch], computed in the accumulation dtype; dout is read in y's dtype or
// in the accumulation dtype. y's channel ch belongs to dout's channel c = plain_of(ch) (common.cuh).
// The first pass, split_attention_backward_sums, shares attention_sum's backward kernels
// (attention_sum.cu).
#include "common.cuh"

namespace splat {
namespace {

// The coefficients of one channel of y (and of one batch row, for alpha and beta).
template <typename A>
struct Coef {
  A scale, shift, alpha, beta, gamma, delta;

  __device__ __forceinline__ A dy(A x, A go) const {
    return (affine(x, scale, shift) > A(0) ? alpha * go + beta : A(0)) + gamma + delta * x;
  }
};

// NCHW: one group per row (b, ch) of y, reading the row (b, plain_of(ch)) of dout.
template <typename T, typename D>
__global__ void __launch_bounds__(kMaxBlock)
    dy_nchw(const D* __restrict__ dout, const T* __restrict__ y, const acc_t<T>* __restrict__ scale,
            const acc_t<T>* __restrict__ shift, const acc_t<T>* __restrict__ alpha, const acc_t<T>* __restrict__ beta,
            const acc_t<T>* __restrict__ gamma, const acc_t<T>* __restrict__ delta, T* __restrict__ dy, int64_t rows,
            int64_t C, int64_t RC, Groups gs, int64_t hw, int group) {
  using A = acc_t<T>;
  constexpr int V = vec_width<T>;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / group) + threadIdx.x / group;
  if (row >= rows) return;
  const int lane = threadIdx.x % group;
  const int64_t ch = row % RC;
  const Coef<A> c{scale[ch], shift[ch], alpha[row], beta[row], gamma[ch], delta[ch]};
  const T* yr = y + row * hw;
  const D* gr = dout + (row / RC * C + plain_of(ch, gs)) * hw;
  T* dr = dy + row * hw;
  for_row<V>(hw, aligned_head<V>(hw, yr, dr, gr), lane, group, [&](int64_t i, auto w) {
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
    dy_nhwc(const D* __restrict__ dout, const T* __restrict__ y, const acc_t<T>* __restrict__ scale,
            const acc_t<T>* __restrict__ shift, const acc_t<T>* __restrict__ alpha, const acc_t<T>* __restrict__ beta,
            const acc_t<T>* __restrict__ gamma, const acc_t<T>* __restrict__ delta, T* __restrict__ dy, int64_t C,
            int64_t RC, Groups gs, int64_t hw, NhwcPlan p) {
  using A = acc_t<T>;
  const NhwcTile t = nhwc_tile(p, hw);
  const int64_t ch0 = (t.tile * p.tx + t.tx) * V;
  if (ch0 >= RC) return;
  Coef<A> c[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int64_t ch = ch0 + k, at = t.batch * RC + ch;
    c[k] = {scale[ch], shift[ch], alpha[at], beta[at], gamma[ch], delta[ch]};
  }
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

// A per-(b, channel) (B, R*C) matrix in y's accumulation dtype, on y's device.
void check_row_matrix(const at::Tensor& m, const at::Tensor& y, const char* name) {
  check_on_device_of(m, y, name, "y");
  check_shape(m, {y.size(0), y.size(1)}, name);
  const auto acc = acc_dtype(y.scalar_type());
  TORCH_CHECK(m.scalar_type() == acc, name, " must be ", acc, " for y of dtype ", y.scalar_type(), ", got ",
              m.scalar_type());
}

at::Tensor split_attention_backward_dy(const at::Tensor& dout_in, const at::Tensor& y_in, const at::Tensor& scale_in,
                                       const at::Tensor& shift_in, const at::Tensor& alpha_in,
                                       const at::Tensor& beta_in, const at::Tensor& gamma_in,
                                       const at::Tensor& delta_in, int64_t radix, int64_t groups) {
  check_conv_output(y_in, radix);
  check_groups(y_in, radix, groups);
  check_dout(dout_in, y_in, radix);
  check_channel_vector(scale_in, y_in, "scale");
  check_channel_vector(shift_in, y_in, "shift");
  check_row_matrix(alpha_in, y_in, "alpha");
  check_row_matrix(beta_in, y_in, "beta");
  check_channel_vector(gamma_in, y_in, "gamma");
  check_channel_vector(delta_in, y_in, "delta");
  const auto fmt = layout_of(y_in);
  const at::Tensor y = y_in.contiguous(fmt), dout = dout_to_read(dout_in, y, fmt);
  const at::Tensor scale = scale_in.contiguous(), shift = shift_in.contiguous();
  const at::Tensor alpha = alpha_in.contiguous(), beta = beta_in.contiguous();
  const at::Tensor gamma = gamma_in.contiguous(), delta = delta_in.contiguous();
  const int64_t B = y.size(0), RC = y.size(1), C = RC / radix, hw = y.size(2) * y.size(3);
  const Groups gs{C / groups, RC / groups};
  const at::Tensor dy = at::empty(y.sizes(), y.options().memory_format(fmt));
  if (y.numel() == 0) return dy;
  const c10::cuda::CUDAGuard guard(y.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "split_attention_backward_dy", [&] {
    using A = acc_t<scalar_t>;
    constexpr int V = vec_width<scalar_t>;
    const auto launch = [&](auto dout_tag) {
      using D = decltype(dout_tag);
      if (fmt == at::MemoryFormat::Contiguous) {
        const RowPlan plan = plan_rows(B * RC, hw, V, sm_count(y.get_device()));
        dy_nchw<scalar_t, D><<<plan.blocks, plan.threads, 0, stream>>>(
            dout.const_data_ptr<D>(), y.const_data_ptr<scalar_t>(), scale.const_data_ptr<A>(),
            shift.const_data_ptr<A>(), alpha.const_data_ptr<A>(), beta.const_data_ptr<A>(),
            gamma.const_data_ptr<A>(), delta.const_data_ptr<A>(), dy.mutable_data_ptr<scalar_t>(), B * RC, C, RC,
            gs, hw, plan.group);
      } else {
        const bool vec = gs.cg % V == 0 && aligned(y.const_data_ptr()) && aligned(dout.const_data_ptr());
        const NhwcPlan plan = plan_nhwc(vec ? RC / V : RC, B, hw, sm_count(y.get_device()));
        const auto kernel = vec ? dy_nhwc<scalar_t, D, V> : dy_nhwc<scalar_t, D, 1>;
        kernel<<<nhwc_blocks(plan, B), kBlock, 0, stream>>>(
            dout.const_data_ptr<D>(), y.const_data_ptr<scalar_t>(), scale.const_data_ptr<A>(),
            shift.const_data_ptr<A>(), alpha.const_data_ptr<A>(), beta.const_data_ptr<A>(),
            gamma.const_data_ptr<A>(), delta.const_data_ptr<A>(), dy.mutable_data_ptr<scalar_t>(), C, RC, gs, hw,
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
  return dy;
}

}  // namespace
}  // namespace splat

TORCH_LIBRARY_IMPL(splat_cuda, CUDA, m) {
  m.impl("split_attention_backward_dy", &splat::split_attention_backward_dy);
}
