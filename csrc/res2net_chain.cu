// res2net_chain: the multi-scale 3x3 stage of a Res2Net bottleneck in one call (see
// splat/ops/res2net_chain.py for the semantics). The branch convolutions run through ATen (cuDNN);
// everything between them is one fused epilogue kernel per branch that reads the raw conv output
// once and writes the BN + ReLU result straight into the branch's slot of the preallocated output,
// the raw output into the slot of y (kept for the backward), and the next branch's input
// (this output + the next split, rounded like the reference's add), so a 'normal' chain costs one
// conv and one epilogue launch per branch and never splits or concatenates tensors. Batch
// statistics come from splat_cuda::channel_stats_forward (deterministic, no atomics).
//
// Every elementwise kernel addresses its tensors through (b, c, h, w) strides, so NCHW, NHWC and
// channel slices of either share one code path.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/avg_pool2d.h>
#include <ATen/ops/avg_pool2d_backward.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty_like.h>

#include "common.cuh"

namespace splat {
namespace {

// A 4-D view: base pointer and (b, c, h, w) element strides.
template <typename T>
struct View {
  T* p;
  int64_t sb, sc, sh, sw;
  __device__ __forceinline__ T& at(int64_t b, int64_t c, int64_t h, int64_t w) const {
    return p[b * sb + c * sc + h * sh + w * sw];
  }
};

template <typename T>
View<T> view_of(const at::Tensor& t) {
  // libtorch instantiates data_ptr<T> for non-const T only: a const view reads const_data_ptr.
  T* p;
  if constexpr (std::is_const_v<T>) {
    p = t.const_data_ptr<std::remove_const_t<T>>();
  } else {
    p = t.mutable_data_ptr<T>();
  }
  return {p, t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Logical (b, c, h, w) of flat index i over a (B, C, H, W) extent, channels fastest: consecutive
// threads then touch consecutive channels in NHWC and stay within a few rows in NCHW.
struct Index {
  int64_t b, c, h, w;
};

__device__ __forceinline__ Index unflatten(int64_t i, int64_t C, int64_t H, int64_t W) {
  Index r;
  r.c = i % C;
  i /= C;
  r.w = i % W;
  i /= W;
  r.h = i % H;
  r.b = i / H;
  return r;
}

// out = relu(y * scale + shift); optionally y_keep = y and next = T(out) + x_next.
template <typename T>
__global__ void __launch_bounds__(kBlock)
    epilogue(View<const T> y, View<T> out, View<T> y_keep, View<const T> x_next, View<T> next,
             const acc_t<T>* __restrict__ scale, const acc_t<T>* __restrict__ shift, int64_t n, int64_t C,
             int64_t H, int64_t W, bool keep, bool chain) {
  using A = acc_t<T>;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const Index ix = unflatten(i, C, H, W);
    const T v = y.at(ix.b, ix.c, ix.h, ix.w);
    const T o = T(relu(affine(A(v), scale[ix.c], shift[ix.c])));
    out.at(ix.b, ix.c, ix.h, ix.w) = o;
    if (keep) y_keep.at(ix.b, ix.c, ix.h, ix.w) = v;
    if (chain) next.at(ix.b, ix.c, ix.h, ix.w) = T(A(o) + A(x_next.at(ix.b, ix.c, ix.h, ix.w)));
  }
}

// dpre = (dout + carry) * [out > 0] and dpre * xhat, both (B, C, H, W) contiguous in acc dtype.
template <typename T>
__global__ void __launch_bounds__(kBlock)
    bn_relu_grad(View<const T> dout, View<const T> carry, View<const T> out, View<const T> y,
                 const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ rstd, acc_t<T>* __restrict__ dpre,
                 acc_t<T>* __restrict__ dpre_xhat, int64_t n, int64_t C, int64_t H, int64_t W, bool has_carry) {
  using A = acc_t<T>;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const Index ix = unflatten(i, C, H, W);
    A d = A(dout.at(ix.b, ix.c, ix.h, ix.w));
    if (has_carry) d += A(carry.at(ix.b, ix.c, ix.h, ix.w));
    // The reference's ReLU mask tests the BN output rounded to T, which is what out holds.
    d = A(out.at(ix.b, ix.c, ix.h, ix.w)) > A(0) ? d : A(0);
    const A xhat = (A(y.at(ix.b, ix.c, ix.h, ix.w)) - mean[ix.c]) * rstd[ix.c];
    const int64_t at = ((ix.b * C + ix.c) * H + ix.h) * W + ix.w;
    dpre[at] = d;
    dpre_xhat[at] = d * xhat;
  }
}

// dy = g * (dpre - a - xhat * k); a = k = 0 with running statistics.
template <typename T>
__global__ void __launch_bounds__(kBlock)
    bn_grad_input(const acc_t<T>* __restrict__ dpre, View<const T> y, const acc_t<T>* __restrict__ mean,
                  const acc_t<T>* __restrict__ rstd, const acc_t<T>* __restrict__ g, const acc_t<T>* __restrict__ a,
                  const acc_t<T>* __restrict__ k, View<T> dy, int64_t n, int64_t C, int64_t H, int64_t W,
                  bool batch_stats) {
  using A = acc_t<T>;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const Index ix = unflatten(i, C, H, W);
    A d = dpre[((ix.b * C + ix.c) * H + ix.h) * W + ix.w];
    if (batch_stats) {
      const A xhat = (A(y.at(ix.b, ix.c, ix.h, ix.w)) - mean[ix.c]) * rstd[ix.c];
      d = d - a[ix.c] - xhat * k[ix.c];
    }
    dy.at(ix.b, ix.c, ix.h, ix.w) = T(d * g[ix.c]);
  }
}

unsigned blocks_for(int64_t n, c10::DeviceIndex device) {
  return grid_size(std::min<int64_t>(ceil_div(n, kBlock), int64_t(sm_count(device)) * 32));
}

std::tuple<at::Tensor, at::Tensor> batch_stats_of(const at::Tensor& y) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("splat_cuda::channel_stats_forward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>();
  return op.call(y);
}

struct Geometry {
  int64_t B, C, H, W, width, nums, Ho, Wo;
};

Geometry check_chain(const at::Tensor& x, const at::Tensor& weight, int64_t scale, int64_t stride,
                     int64_t dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4, "x must be 4-D (B, width*scale, H, W), got shape ", x.sizes());
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got one on ", x.device());
  check_floating(x, "x");
  TORCH_CHECK(scale >= 1 && stride >= 1 && dilation >= 1 && groups >= 1,
              "scale, stride, dilation and groups must be positive");
  TORCH_CHECK(x.size(1) % scale == 0, "scale=", scale, " must divide the channel count of x (", x.size(1), ")");
  Geometry g;
  g.B = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.width = g.C / scale;
  g.nums = scale > 1 ? scale - 1 : 1;
  g.Ho = (g.H - 1) / stride + 1;
  g.Wo = (g.W - 1) / stride + 1;
  TORCH_CHECK(g.width % groups == 0, "groups=", groups, " must divide width=", g.width);
  check_on_device_of(weight, x, "weight", "x");
  check_shape(weight, {g.nums * g.width, g.width / groups, 3, 3}, "weight");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight dtype ", weight.scalar_type(),
              " does not match x dtype ", x.scalar_type());
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> res2net_chain_forward(
    const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& gamma, const at::Tensor& beta,
    const at::Tensor& running_mean, const at::Tensor& running_var, double eps, int64_t scale, bool stage,
    int64_t stride, int64_t dilation, int64_t groups, bool batch_stats, bool save_y) {
  const Geometry g = check_chain(x_in, weight_in, scale, stride, dilation, groups);
  TORCH_CHECK(stage || stride == 1 || scale == 1, "stride > 1 needs stage=True");
  const auto fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt), weight = weight_in.contiguous();
  const auto acc = acc_dtype(x.scalar_type());
  const auto acc_options = x.options().dtype(acc);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t branch_c = g.nums * g.width;
  at::Tensor out = at::empty({g.B, g.C, g.Ho, g.Wo}, x.options().memory_format(fmt));
  at::Tensor y = save_y ? at::empty({g.B, branch_c, g.Ho, g.Wo}, x.options().memory_format(fmt))
                        : at::empty({0}, x.options());
  at::Tensor mean = at::empty({branch_c}, acc_options), var = at::empty({branch_c}, acc_options);
  if (!batch_stats) {
    mean.copy_(running_mean);
    var.copy_(running_var);
  }
  if (g.B * g.Ho * g.Wo == 0) {
    if (batch_stats) {
      mean.fill_(std::numeric_limits<double>::quiet_NaN());
      var.fill_(std::numeric_limits<double>::quiet_NaN());
    }
    return {out, y, mean, var};
  }
  const std::vector<int64_t> strides{stride, stride}, pads{dilation, dilation}, dils{dilation, dilation};
  const int64_t steps = stage ? 1 : g.nums;
  const int64_t step_c = stage ? branch_c : g.width;
  const int64_t step_groups = stage ? groups * g.nums : groups;
  // The next branch's input, written by this branch's epilogue once (stream order) this branch's
  // convolution has consumed the previous contents.
  const at::Tensor input = !stage && g.nums > 1 ? at::empty({g.B, g.width, g.H, g.W}, x.options().memory_format(fmt))
                                                : at::Tensor();
  const at::Tensor gamma_acc = gamma.to(acc), beta_acc = beta.to(acc);
  for (int64_t i = 0; i < steps; ++i) {
    const int64_t c0 = i * step_c;
    const at::Tensor sp = (stage || i == 0) ? x.narrow(1, c0, step_c) : input;
    const at::Tensor yi = at::convolution(sp, weight.narrow(0, c0, step_c), std::nullopt, strides, pads, dils,
                                          false, {0, 0}, step_groups);
    at::Tensor step_mean = mean.narrow(0, c0, step_c), step_var = var.narrow(0, c0, step_c);
    if (batch_stats) {
      auto [m, v] = batch_stats_of(yi);
      step_mean.copy_(m);
      step_var.copy_(v);
    }
    const at::Tensor sc = gamma_acc.narrow(0, c0, step_c).mul(step_var.add(eps).rsqrt());
    const at::Tensor sh = beta_acc.narrow(0, c0, step_c).sub(step_mean.mul(sc));
    const bool chain = !stage && i + 1 < g.nums;
    const at::Tensor out_slot = out.narrow(1, c0, step_c);
    const at::Tensor y_slot = save_y ? y.narrow(1, c0, step_c) : out_slot;
    const at::Tensor x_next = chain ? x.narrow(1, c0 + g.width, g.width) : x;
    const at::Tensor next = chain ? input : out_slot;
    const int64_t n = yi.numel();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "res2net_chain_forward", [&] {
      epilogue<scalar_t><<<blocks_for(n, x.get_device()), kBlock, 0, stream>>>(
          view_of<const scalar_t>(yi), view_of<scalar_t>(out_slot), view_of<scalar_t>(y_slot),
          view_of<const scalar_t>(x_next), view_of<scalar_t>(next), sc.const_data_ptr<acc_t<scalar_t>>(),
          sh.const_data_ptr<acc_t<scalar_t>>(), n, step_c, g.Ho, g.Wo, save_y, chain);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (scale > 1) {
    const at::Tensor last = x.narrow(1, branch_c, g.width);
    out.narrow(1, branch_c, g.width).copy_(stage ? at::avg_pool2d(last, {3, 3}, {stride, stride}, {1, 1}) : last);
  }
  return {out, y, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> res2net_chain_backward(
    const at::Tensor& dout_in, const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& gamma,
    const at::Tensor& out, const at::Tensor& y, const at::Tensor& mean, const at::Tensor& var, double eps,
    int64_t scale, bool stage, int64_t stride, int64_t dilation, int64_t groups, bool batch_stats) {
  const Geometry g = check_chain(x_in, weight_in, scale, stride, dilation, groups);
  const auto fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt), weight = weight_in.contiguous();
  const at::Tensor dout = dout_in.contiguous(layout_of(out));
  const auto acc = acc_dtype(x.scalar_type());
  const int64_t branch_c = g.nums * g.width;
  check_shape(y, {g.B, branch_c, g.Ho, g.Wo}, "y (save_y must be set when a backward follows)");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor dx = at::empty_like(x, x.options().memory_format(fmt));
  at::Tensor dweight = at::empty_like(weight);
  at::Tensor dgamma = at::zeros({branch_c}, x.options().dtype(acc));
  at::Tensor dbeta = at::zeros({branch_c}, x.options().dtype(acc));
  const int64_t m = g.B * g.Ho * g.Wo;
  if (m == 0) {
    dx.zero_();
    dweight.zero_();
    return {dx, dweight, dgamma.to(gamma.scalar_type()), dbeta.to(gamma.scalar_type())};
  }
  const at::Tensor rstd = var.add(eps).rsqrt();
  const at::Tensor gain = gamma.to(acc).mul(rstd);
  const std::vector<int64_t> strides{stride, stride}, pads{dilation, dilation}, dils{dilation, dilation};
  const int64_t steps = stage ? 1 : g.nums;
  const int64_t step_c = stage ? branch_c : g.width;
  const int64_t step_groups = stage ? groups * g.nums : groups;
  for (int64_t i = steps - 1; i >= 0; --i) {
    const int64_t c0 = i * step_c;
    const bool has_carry = !stage && i + 1 < g.nums;
    const at::Tensor carry = has_carry ? dx.narrow(1, c0 + g.width, g.width) : dout;
    const at::Tensor step_mean = mean.narrow(0, c0, step_c), step_rstd = rstd.narrow(0, c0, step_c);
    const at::Tensor dpre = at::empty({g.B, step_c, g.Ho, g.Wo}, x.options().dtype(acc));
    const at::Tensor dpre_xhat = at::empty_like(dpre);
    const at::Tensor y_slot = y.narrow(1, c0, step_c);
    const at::Tensor dy = at::empty({g.B, step_c, g.Ho, g.Wo}, x.options().memory_format(layout_of(out)));
    const int64_t n = dpre.numel();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "res2net_chain_backward", [&] {
      using A = acc_t<scalar_t>;
      bn_relu_grad<scalar_t><<<blocks_for(n, x.get_device()), kBlock, 0, stream>>>(
          view_of<const scalar_t>(dout.narrow(1, c0, step_c)), view_of<const scalar_t>(carry),
          view_of<const scalar_t>(out.narrow(1, c0, step_c)), view_of<const scalar_t>(y_slot),
          step_mean.const_data_ptr<A>(), step_rstd.const_data_ptr<A>(), dpre.mutable_data_ptr<A>(),
          dpre_xhat.mutable_data_ptr<A>(), n, step_c, g.Ho, g.Wo, has_carry);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const at::Tensor db = dpre.sum({0, 2, 3}), dg = dpre_xhat.sum({0, 2, 3});
      dbeta.narrow(0, c0, step_c).copy_(db);
      dgamma.narrow(0, c0, step_c).copy_(dg);
      const at::Tensor a = db.div(double(m)), k = dg.div(double(m));
      bn_grad_input<scalar_t><<<blocks_for(n, x.get_device()), kBlock, 0, stream>>>(
          dpre.const_data_ptr<A>(), view_of<const scalar_t>(y_slot), step_mean.const_data_ptr<A>(),
          step_rstd.const_data_ptr<A>(), gain.narrow(0, c0, step_c).contiguous().const_data_ptr<A>(),
          a.const_data_ptr<A>(), k.const_data_ptr<A>(), view_of<scalar_t>(dy), n, step_c, g.Ho, g.Wo,
          batch_stats);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const at::Tensor xs = x.narrow(1, c0, step_c);
    const at::Tensor sp = (stage || i == 0) ? xs : xs.add(out.narrow(1, c0 - g.width, g.width));
    const auto grads = at::convolution_backward(dy, sp, weight.narrow(0, c0, step_c), std::nullopt, strides, pads,
                                                dils, false, {0, 0}, step_groups, {true, true, false});
    dx.narrow(1, c0, step_c).copy_(std::get<0>(grads));
    dweight.narrow(0, c0, step_c).copy_(std::get<1>(grads));
  }
  if (scale > 1) {
    const at::Tensor dlast = dout.narrow(1, branch_c, g.width);
    dx.narrow(1, branch_c, g.width)
        .copy_(stage ? at::avg_pool2d_backward(dlast, x.narrow(1, branch_c, g.width), {3, 3}, {stride, stride},
                                               {1, 1}, false, true, std::nullopt)
                     : dlast);
  }
  return {dx, dweight, dgamma.to(gamma.scalar_type()), dbeta.to(gamma.scalar_type())};
}

}  // namespace
}  // namespace splat

TORCH_LIBRARY_FRAGMENT(splat_cuda, m) {
  m.def(
      "res2net_chain_forward(Tensor x, Tensor weight, Tensor gamma, Tensor beta, Tensor running_mean,"
      " Tensor running_var, float eps, int scale, bool stage, int stride, int dilation, int groups,"
      " bool batch_stats, bool save_y) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "res2net_chain_backward(Tensor dout, Tensor x, Tensor weight, Tensor gamma, Tensor out, Tensor y,"
      " Tensor mean, Tensor var, float eps, int scale, bool stage, int stride, int dilation, int groups,"
      " bool batch_stats) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(splat_cuda, CUDA, m) {
  m.impl("res2net_chain_forward", &splat::res2net_chain_forward);
  m.impl("res2net_chain_backward", &splat::res2net_chain_backward);
}
