// radix_softmax: fc2 logits (B, R*C), cardinal-major (k, r, j), to attention weights (B, R*C),
// radix-major (r, k, j): a softmax over r for R > 1, a sigmoid for R == 1; and its backward.
#include "common.cuh"

namespace splat {
namespace {

template <typename A>
__device__ __forceinline__ A sigmoid(A x) {
  if (x >= A(0)) return A(1) / (A(1) + exp_acc(-x));
  const A e = exp_acc(x);  // the form that cannot overflow for very negative x
  return e / (A(1) + e);
}

// One thread per (b, k, j) handles its R values: logit r at stride C/K, weight r at stride C.
template <typename T>
__global__ void __launch_bounds__(kBlock)
    softmax_forward(const T* __restrict__ logits, T* __restrict__ attn, int64_t n, int64_t C, int64_t R,
                    int64_t width) {
  using A = acc_t<T>;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t b = i / C, kj = i % C;
  const T* x = logits + b * R * C + kj / width * R * width + kj % width;
  T* a = attn + b * R * C + kj;
  if (R == 1) {
    a[0] = T(sigmoid(A(x[0])));
    return;
  }
  A top = A(x[0]);
  for (int64_t r = 1; r < R; ++r) top = A(x[r * width]) > top ? A(x[r * width]) : top;
  A sum = 0;
  for (int64_t r = 0; r < R; ++r) sum += exp_acc(A(x[r * width]) - top);
  for (int64_t r = 0; r < R; ++r) a[r * C] = T(exp_acc(A(x[r * width]) - top) / sum);
}

template <typename T>
__global__ void __launch_bounds__(kBlock)
    softmax_backward(const T* __restrict__ dattn, const T* __restrict__ attn, T* __restrict__ dlogits,
                     int64_t n, int64_t C, int64_t R, int64_t width) {
  using A = acc_t<T>;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t b = i / C, kj = i % C;
  const T* a = attn + b * R * C + kj;
  const T* da = dattn + b * R * C + kj;
  T* dx = dlogits + b * R * C + kj / width * R * width + kj % width;
  if (R == 1) {
    const A s = A(a[0]);
    dx[0] = T(A(da[0]) * s * (A(1) - s));
    return;
  }
  A dot = 0;
  for (int64_t r = 0; r < R; ++r) dot += A(a[r * C]) * A(da[r * C]);
  for (int64_t r = 0; r < R; ++r) dx[r * width] = T(A(a[r * C]) * (A(da[r * C]) - dot));
}

void check_weights(const at::Tensor& t, int64_t radix, int64_t cardinality, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D (B, R*C), got shape ", t.sizes());
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  check_floating(t, name);
  TORCH_CHECK(radix >= 1, "radix must be positive, got ", radix);
  TORCH_CHECK(cardinality >= 1, "cardinality must be positive, got ", cardinality);
  TORCH_CHECK(t.size(1) % radix == 0, "radix=", radix, " must divide the channel count of ", name, " (",
              t.size(1), ")");
  TORCH_CHECK(t.size(1) / radix % cardinality == 0, "cardinality=", cardinality,
              " must divide the channels per radix (", t.size(1) / radix, ")");
}

at::Tensor radix_softmax_forward(const at::Tensor& logits_in, int64_t radix, int64_t cardinality) {
  check_weights(logits_in, radix, cardinality, "logits");
  const at::Tensor logits = logits_in.contiguous();
  const int64_t B = logits.size(0), C = logits.size(1) / radix;
  at::Tensor attn = at::empty(logits.sizes(), logits.options());
  if (attn.numel() == 0) return attn;
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "radix_softmax_forward", [&] {
    softmax_forward<scalar_t><<<grid_size(ceil_div(B * C, kBlock)), kBlock, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), attn.mutable_data_ptr<scalar_t>(), B * C, C, radix, C / cardinality);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return attn;
}

at::Tensor radix_softmax_backward(const at::Tensor& dattn_in, const at::Tensor& attn_in, int64_t radix,
                                  int64_t cardinality) {
  check_weights(attn_in, radix, cardinality, "attn");
  check_on_device_of(dattn_in, attn_in, "dattn", "attn");
  check_shape(dattn_in, attn_in.sizes(), "dattn");
  TORCH_CHECK(dattn_in.scalar_type() == attn_in.scalar_type(), "dattn must have attn's dtype ",
              attn_in.scalar_type(), ", got ", dattn_in.scalar_type());
  const at::Tensor dattn = dattn_in.contiguous(), attn = attn_in.contiguous();
  const int64_t B = attn.size(0), C = attn.size(1) / radix;
  at::Tensor dlogits = at::empty(attn.sizes(), attn.options());
  if (dlogits.numel() == 0) return dlogits;
  const c10::cuda::CUDAGuard guard(attn.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, attn.scalar_type(), "radix_softmax_backward", [&] {
    softmax_backward<scalar_t><<<grid_size(ceil_div(B * C, kBlock)), kBlock, 0, stream>>>(
        dattn.const_data_ptr<scalar_t>(), attn.const_data_ptr<scalar_t>(), dlogits.mutable_data_ptr<scalar_t>(),
        B * C, C, radix, C / cardinality);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dlogits;
}

}  // namespace
}  // namespace splat

TORCH_LIBRARY_IMPL(splat_cuda, CUDA, m) {
  m.impl("radix_softmax_forward", &splat::radix_softmax_forward);
  m.impl("radix_softmax_backward", &splat::radix_softmax_backward);
}
