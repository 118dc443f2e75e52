"""The cpu backend: the C++ kernels of fused_resnet._C (csrc/cpu:
at::vec, at::parallel_for; the ops' "native" entries in dispatch.TABLE) and
oneDNN's fused convolutions for inference.

  onednn.py         the inference unit: folded BN, bias, residual, ReLU as post-ops
  finite_bounds.py  where oneDNN's ReLU post-op is exact (NaN/Inf propagate as eager)
  pool.py           the stem's max pool without indices
  output_cache.py   the cache the C++ ops take their large outputs from
Training runs the default units (aten's oneDNN convolution, then the C++
BatchNorm kernels).
"""
