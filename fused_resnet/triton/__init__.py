"""Triton kernels of the `triton` backend and their launchers.

  conv2d_fwd      implicit-GEMM NHWC convolution with fused epilogues (the @triton.jit kernel)
  conv_configs    autotune candidates per architecture, shape buckets, the interpreter config
  autotune_cache  on-disk cache of autotune results
  launch          host side: weight layout, output allocation, config choice, grid

Nothing is imported here: Triton reads TRITON_INTERPRET when a kernel is
decorated, so importing the kernel module is left to the first launch (or to
a test that has set the variable first).
"""

from .._compat import patch_triton_interpreter

# Triton's interpreter runs these kernels on CPU tensors in tests; older
# releases of it need a fix to run with today's NumPy (see the function).
patch_triton_interpreter()
