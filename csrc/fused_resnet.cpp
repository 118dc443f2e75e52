// Every op schema of the fused_resnet library, in one place.
//
// Implementations register themselves per dispatch key in csrc/cpu/*.cpp and
// csrc/cuda/*_cuda.cpp; fake (meta) kernels and autograd are registered from
// Python (fused_resnet/ops/*.py), as pytorch/extension-cpp does.
//
// Conventions shared by the BatchNorm ops:
//  * z is (N, C, H, W) (any 2-D-or-more shape with channels in dim 1 works for
//    the CPU path) in the contiguous or channels_last memory format; any other
//    stride pattern is made contiguous first.
//  * Statistics, scale/shift, invstd, dweight and dbias are fp32 (fp64 when z
//    is fp64).
//  * The ReLU mask packs one bit per element of z in z's *memory* order
//    (bit i % 8 of byte i / 8); an empty mask means "no ReLU was applied".
#include <Python.h>
#include <torch/library.h>

#include "fused_resnet.h"

extern "C" {
// A bare module: importing fused_resnet._C is what loads the op registrations.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fused_resnet native ops (see torch.ops.fused_resnet)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fused_resnet, m) {
  // y = relu(x + residual). The foundation op: the smallest real fusion.
  m.def("add_relu(Tensor x, Tensor residual) -> Tensor");

  // The packed 1-bit ReLU mask !(y <= 0) of a ReLU output y (eager's ReLU
  // backward from its output), in bn_apply's bit order: the fused backward's
  // input when the ReLU output is what is saved.
  m.def("relu_mask(Tensor y) -> Tensor");

  // F.max_pool2d's output without its indices (inference after the stem);
  // no autograd: callers that need a gradient use F.max_pool2d.
  m.def(
      "max_pool2d(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
      "bool ceil_mode) -> Tensor");

  // Per-channel batch mean and *biased* variance of z, numerically stable
  // (Welford / Chan merge), accumulated in fp32 (fp64 for fp64 z).
  m.def("bn_stats(Tensor z) -> (Tensor mean, Tensor var)");

  // From batch mean/biased var over `count` values per channel: the scale and
  // shift that normalise z (scale = weight * invstd, shift = bias - mean *
  // scale), invstd, and PyTorch's running-statistic update in place:
  // running_var gets the unbiased variance; momentum=None means the cumulative
  // average 1 / num_batches_tracked (after its increment).
  m.def(
      "bn_finalize(Tensor mean, Tensor var, int count, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, "
      "float? momentum, float eps) -> (Tensor scale, Tensor shift, Tensor invstd)");

  // y = [relu](z * scale[c] + shift[c] [+ residual]), cast to out_dtype
  // (default: z's dtype), in z's memory format; mask = bit-packed (y > 0)
  // when relu, else empty.
  m.def(
      "bn_apply(Tensor z, Tensor scale, Tensor shift, Tensor? residual, bool relu, "
      "ScalarType? out_dtype=None) -> (Tensor y, Tensor mask)");

  // Fused backward of bn_apply after batch (batch_stats=True) or running
  // (batch_stats=False) statistics. dy' = dy masked by the ReLU mask;
  // dbias = sum dy', dweight = sum dy' * xhat, xhat = (z - mean) * invstd;
  // dz = weight * invstd * (dy' - [batch_stats] (dbias + xhat * dweight) / M);
  // dresidual = dy' when need_residual_grad, else an empty tensor.
  // Two passes over memory, deterministic.
  m.def(
      "bn_backward(Tensor dy, Tensor z, Tensor mask, Tensor mean, Tensor invstd, Tensor? weight, "
      "bool batch_stats, bool need_residual_grad) -> (Tensor dz, Tensor dresidual, Tensor dweight, "
      "Tensor dbias)");

  // bn_backward split for synchronised BatchNorm, where the per-channel sums
  // are all-reduced across processes between the two passes:
  // sum_dy = sum dy', sum_dy_xhat = sum dy' * xhat (this process's dbias and
  // dweight); then dz = weight * invstd * (dy' - (sum_dy + xhat * sum_dy_xhat)
  // / count) with the global sums and count, and dresidual = dy'.
  m.def(
      "bn_backward_reduce(Tensor dy, Tensor z, Tensor mask, Tensor mean, Tensor invstd) -> (Tensor sum_dy, "
      "Tensor sum_dy_xhat)");
  m.def(
      "bn_backward_elemt(Tensor dy, Tensor z, Tensor mask, Tensor mean, Tensor invstd, Tensor? weight, "
      "Tensor sum_dy, Tensor sum_dy_xhat, int count, bool need_residual_grad) -> (Tensor dz, Tensor dresidual)");

  // The CPU output cache (csrc/cpu/output_cache.h): [limit, cached bytes,
  // cached blocks, hits, misses, evictions]; a new limit in bytes (returns the
  // old one; 0 turns the cache off); release every cached block; zero the
  // hit/miss/eviction counters.
  m.def("cpu_cache_stats() -> int[]");
  m.def("cpu_cache_set_limit(int bytes) -> int");
  m.def("cpu_cache_clear() -> ()");
  m.def("cpu_cache_reset_counters() -> ()");

  // ---- cudnn backend (csrc/cudnn/; kernels exist only when the cuDNN frontend
  // headers were found at build time). Conv operands are N, C, H, W in any
  // layout; outputs are channels_last; per-channel vectors are (C,) in fp32 or
  // x's dtype. A graph cuDNN refuses runs as aten conv + fp32 epilogue and is
  // listed by cudnn_fallbacks().
  // y = [relu](conv(x, weight) [+ bias[c]] [+ residual]) in one cuDNN graph.
  m.def(
      "cudnn_conv_bias_act(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, bool relu, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> Tensor");
  // z = conv([relu](x * in_scale[c] + in_shift[c]), weight) (plain x without
  // in_scale/in_shift) and the fp32 per-channel sum and sum of squares of z.
  m.def(
      "cudnn_conv_genstats(Tensor x, Tensor weight, Tensor? in_scale, Tensor? in_shift, bool in_relu, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups) -> (Tensor z, Tensor sum, Tensor sumsq)");
  // Convolution data and weight gradients as cuDNN graphs.
  m.def(
      "cudnn_conv_dgrad(Tensor dy, Tensor weight, int[] x_size, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups) -> Tensor");
  m.def(
      "cudnn_conv_wgrad(Tensor dy, Tensor x, int[] weight_size, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups) -> Tensor");
  // The graph cache: its key for given operands and parameters, [entries,
  // hits, builds, refusals], "key<TAB>reason" per refused graph, a reset, and a
  // multi-threaded self-test of the build-once logic (runs without a GPU).
  m.def("cudnn_graph_key(str variant, Tensor?[] tensors, int[] params) -> str");
  m.def("cudnn_cache_stats() -> int[]");
  m.def("cudnn_fallbacks() -> str[]");
  m.def("cudnn_cache_clear() -> ()");
  m.def("cudnn_cache_selftest(int threads, int keys, int rounds) -> int[]");
}
