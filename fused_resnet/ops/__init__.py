"""The functional API: one fused op per file. Each validates its arguments
and runs the implementation fused_resnet.dispatch picks for the resolved
backend and the tensor's device: the native kernel (torch.ops.fused_resnet),
the Triton conv, or the plain-PyTorch reference.

  reference       ground-truth definitions (tests, benchmarks, export)
  bn_math         BatchNorm arithmetic shared by every path
  conv_args       argument checks shared by the conv ops
  conv_epilogue   the conv ops' shared epilogue contract and backward
Fake kernels and autograd formulas are registered beside each op.
"""

from . import bn_math, conv_args, reference
from .add_relu import add_relu
from .batch_norm_act import batch_norm_act
from .bn_apply import bn_apply
from .bn_backward import bn_backward
from .bn_backward_elemt import bn_backward_elemt
from .bn_backward_reduce import bn_backward_reduce
from .bn_finalize import bn_finalize
from .bn_stats import bn_stats
from .conv2d_bias_act_shortcut import conv2d_bias_act_shortcut
from .conv2d_bn_act import conv2d_bn_act
from .conv2d_dgrad_prologue import conv2d_dgrad_prologue
from .conv2d_prologue_bn_act import conv2d_prologue_bn_act
from .max_pool2d import max_pool2d
from .relu_mask import relu_mask
from .sync_batch_norm_act import sync_batch_norm_act

__all__ = [
    "reference",
    "bn_math",
    "conv_args",
    "add_relu",
    "batch_norm_act",
    "bn_apply",
    "bn_backward",
    "bn_backward_elemt",
    "bn_backward_reduce",
    "bn_finalize",
    "bn_stats",
    "conv2d_bn_act",
    "conv2d_bias_act_shortcut",
    "conv2d_dgrad_prologue",
    "conv2d_prologue_bn_act",
    "max_pool2d",
    "relu_mask",
    "sync_batch_norm_act",
]
