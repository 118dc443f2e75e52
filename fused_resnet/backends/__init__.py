"""The backends: one folder per backend holding all of its Python, and the
pieces every backend shares. Which backend runs what is decided in
fused_resnet/dispatch.py; these modules implement what its table names.

  units.py        the default units (aten's convolution + the fused epilogue ops)
  bn_modules.py   the BatchNorm/conv modules the units take, and their rules
  fold.py         BatchNorm folded into the conv before it, cached
  cpu/            C++ kernels + oneDNN's fused convolutions
  cuda/           CUDA kernels around cuDNN's convolutions (aten)
  cudnn/          cuDNN frontend graphs: conv + BN + add + ReLU in one
  triton/         Triton convolutions with fused epilogues and prologues
"""

from . import triton  # noqa: F401 - registers the Triton kernels of the conv ops (imports no Triton)
from .cpu import output_cache

# The C++ output cache starts at its default limit; give it the configured one.
output_cache.apply_configured_limit()
