"""The triton backend: Triton implicit-GEMM convolutions with fused
epilogues (folded BN, residual, ReLU, BatchNorm statistics), a BN + ReLU
prologue, and the projection shortcut as a second GEMM; the cuda backend's
BatchNorm kernels around them.

  conv2d_fwd       the @triton.jit kernels
  launch           host side: weight layout, output allocation, config choice, grid
  conv_configs     autotune candidates per architecture, shape buckets, the interpreter config
  autotune_cache   on-disk cache of autotune results
  autotune_budget  time caps on autotuning, and its log
  conv_ops         the kernels registered for fused_resnet.ops' conv ops
  units            the units of the blocks built from them

Importing this package imports no Triton: Triton reads TRITON_INTERPRET
when a kernel is decorated, so launch.py (and the kernels) are imported on
the first launch.
"""

from . import conv_ops  # noqa: F401 - registers the conv ops' CPU and CUDA kernels
