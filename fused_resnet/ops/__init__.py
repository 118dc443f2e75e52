"""The functional API: one fused op per file, each dispatching to the native
kernels (torch.ops.fused_resnet.*), Triton, or the plain-PyTorch reference.

`reference` holds the ground-truth definitions used by tests and benchmarks.
"""

from . import reference
from .add_relu import add_relu

__all__ = ["reference", "add_relu"]
