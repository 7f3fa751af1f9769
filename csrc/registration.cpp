// Schemas of the splat_cuda operators. Each csrc/*.cu registers its CUDA kernels for them with
// TORCH_LIBRARY_IMPL; other files may add operators with TORCH_LIBRARY_FRAGMENT(splat_cuda, m).
// The fake (meta) implementations are registered from Python, in splat/_cuda.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(splat_cuda, m) {
  m.def("radix_pool_forward(Tensor y, Tensor scale, Tensor shift, int radix, int groups) -> Tensor");
  m.def(
      "radix_pool_backward(Tensor dgap, Tensor y, Tensor scale, Tensor shift, int radix, int groups)"
      " -> (Tensor, Tensor, Tensor)");
  m.def("radix_softmax_forward(Tensor logits, int radix, int cardinality) -> Tensor");
  m.def("radix_softmax_backward(Tensor dattn, Tensor attn, int radix, int cardinality) -> Tensor");
  m.def(
      "attention_sum_forward(Tensor y, Tensor scale, Tensor shift, Tensor attn, int radix, int groups)"
      " -> Tensor");
  m.def(
      "attention_sum_backward(Tensor dout, Tensor y, Tensor scale, Tensor shift, Tensor attn, int radix,"
      " int groups) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "split_attention_backward_sums(Tensor dout, Tensor y, Tensor scale, Tensor shift, Tensor attn, int radix,"
      " int groups) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "split_attention_backward_dy(Tensor dout, Tensor y, Tensor scale, Tensor shift, Tensor attn, Tensor dgap,"
      " Tensor dscale, Tensor dshift, Tensor sum_my, Tensor sum_m, Tensor mean, Tensor rstd, Tensor? dmean,"
      " Tensor? dvar, int radix, int groups) -> (Tensor, Tensor, Tensor)");
  m.def("channel_stats_forward(Tensor y) -> (Tensor, Tensor)");
  m.def("channel_stats_backward(Tensor dmean, Tensor dvar, Tensor y, Tensor mean) -> Tensor");
  m.def("bn_add_relu_forward(Tensor y, Tensor? residual, Tensor scale, Tensor shift) -> Tensor");
  m.def("bn_add_relu_backward_sums(Tensor dout, Tensor out, Tensor y) -> (Tensor, Tensor)");
  m.def(
      "bn_add_relu_backward_dy(Tensor dout, Tensor out, Tensor y, Tensor scale, Tensor gamma, Tensor delta,"
      " bool residual_grad) -> (Tensor, Tensor)");
}

// An empty Python module, so that the library built by setup.py loads with `import splat._C`
// (importing it runs the registrations above).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
